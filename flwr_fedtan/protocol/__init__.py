"""FedTAN's protocol, both sides, no torch: :mod:`.codec`, the one checked encoding of
statistics, sums, masked payloads, rosters and shifts."""
