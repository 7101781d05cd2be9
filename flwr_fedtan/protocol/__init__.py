"""FedTAN's protocol, both sides, no torch: :mod:`.wire`, the wire format (message type,
record names in :mod:`.names`, the server's messages, the clients' replies in :mod:`.status`);
:mod:`.codec`, the one checked encoding of statistics, sums, masked payloads, rosters and
shifts; the server's round driver and statistics pass driver (:mod:`.driver`,
:mod:`.pass_driver`) and the exchanges under them (:mod:`.exchange`)."""
