"""FedTAN's protocol, both sides, no torch: the server's round driver and statistics pass
driver (:mod:`.driver`, :mod:`.pass_driver`) and the exchanges under them (:mod:`.exchange`)."""
