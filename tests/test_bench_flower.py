"""The Flower benchmark (``python -m simulations.bench_flower``) runs every variant end to end.

Its FedTAN variants share one Flower run, so each must continue the round numbering of
the one before (a node refuses a round it has already passed). Checked here: every
variant completed with the exchanges its protocol prescribes, and every time is a finite
positive number (no speed targets).
"""

from __future__ import annotations

import math

import pytest

from simulations.bench_flower import format_report
from simulations.flower_processes import run_app

NODES = 2
CNN_BN_CALLS = 3  # the cnn of simulations/app/models.py: 3 BatchNorm calls


@pytest.mark.slow
def test_every_variant_of_the_flower_benchmark_completes():
    summary = run_app(
        {"mode": "bench", "bench-rounds": 1, "model": "cnn", "dataset": "synthetic", "partitioning": "iid",
         "batch-size": 8, "local-steps": 1, "statistics-examples": 16},
        num_supernodes=NODES, num_cpus_per_client=2.0, timeout=170,
    )
    bench = summary["bench"]
    assert bench["nodes"] == NODES
    assert bench["bn-calls"] == CNN_BN_CALLS
    # 2L aggregate exchanges and the final one; the secure rounds add one key exchange.
    assert bench["fedtan-exchanges-per-round"] == 2 * CNN_BN_CALLS + 1, bench
    assert bench["secure-exchanges-per-round"] == 2 * CNN_BN_CALLS + 2, bench
    # The statistics pass: one exchange per BatchNorm call, and the closing one.
    assert bench["pass-exchanges"] == CNN_BN_CALLS + 1, bench
    assert bench["pass-applied"] == [1], bench
    assert bench["pass-examples"] > 0, bench
    for key in ("empty-exchange-seconds", "fedavg-round-seconds", "fedtan-round-seconds", "secure-round-seconds",
                "exact-round-seconds", "pass-seconds", "fedtan-sync-wall-seconds", "fedtan-final-exchange-seconds",
                "ratio"):
        assert math.isfinite(bench[key]) and bench[key] > 0, (key, bench[key])
    for key in ("fedtan-bytes-per-round", "secure-bytes-per-round", "pass-bytes", "fedavg-bytes-per-round"):
        assert bench[key] > 0, (key, bench[key])
    assert bench["secure-bytes-per-round"] > bench["fedtan-bytes-per-round"], bench
    assert len(bench["client-replays"]) == 1
    assert "FedTAN / (FedAvg + 2L x empty)" in format_report(bench)
