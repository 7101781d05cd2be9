"""A node's side of FedTAN between Flower messages: :mod:`.state` (what it keeps),
:mod:`.session` (what it does with each message, :mod:`.turn` being one message),
:mod:`.secure_stats` (its side of secure statistics), :mod:`.weights` (the round's
starting weights in node-local files)."""
