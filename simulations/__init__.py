"""This repository's Flower app (``app``), its experiment runners (``experiments``) and benchmarks (``bench_*``)."""
