"""A new user's first run: the README's ``flwr run . --stream`` on a machine where no full
copy of Fashion-MNIST can be reached (no Debian package, no cache, no internet).

``FEDTAN_DATA_SOURCES=embedded`` (see :mod:`simulations.app.datasets`) hides every such copy,
so the app must train on the subset it ships, say so in the log, and its test accuracy
must rise round by round to at least 0.6 with the default run config. ``flwr run .`` runs
against the local SuperLink of a default configuration (the ``:local:`` address), in a
private ``FLWR_HOME`` on private ports; every process is stopped by PID afterwards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from simulations.flower_processes import BIN, FlowerProcesses

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_default_app_trains_on_the_embedded_subset_when_nothing_else_is_reachable(tmp_path, capsys):
    session = FlowerProcesses(tmp_path / "flower")
    session.env.update({
        "FEDTAN_DATA_SOURCES": "embedded",
        "FEDTAN_CACHE_DIR": str(tmp_path / "cache"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_CONTROL_API_PORT": str(session.port()),
    })
    results = tmp_path / "results.json"
    try:
        # `flwr run` would start the local SuperLink itself but gives it only 15 s to come
        # up, too little on a busy CI machine: start the same simulation SuperLink here on
        # the port `flwr run` looks for; it then finds it running and uses it.
        superlink = session.start_superlink(simulation=True)
        session.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = superlink.rsplit(":", 1)[1]
        process = session.start(
            "flwr-run", [BIN / "flwr", "run", ".", "--stream", "--run-config", f'results-file="{results}"'],
            cwd=PROJECT_ROOT,
        )
        try:
            process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr run did not finish in 900 s:\n{session.log_tail('flwr-run', 80)}")
        output = session.log_path("flwr-run").read_text(errors="replace")
    finally:
        leftover = session.stop()
    assert not leftover, leftover
    # `flwr run --stream` exits 0 even when the run failed: judge the results file.
    assert results.is_file(), output[-6000:]
    summary = json.loads(results.read_text())
    assert summary["config"]["dataset"] == "fashion-mnist" and summary["config"]["strategy"] == "fedtan"

    data_lines = [line for line in output.splitlines() if "fashion-mnist" in line and "split:" in line]
    assert any("train split: embedded subset, 12000 of 60000 images" in line for line in data_lines), output[-6000:]
    assert any("test split: embedded subset, 2000 of 10000 images" in line for line in data_lines), output[-6000:]
    assert all("embedded subset" in line for line in data_lines), data_lines

    accuracy = {int(r): m["test-accuracy"] for r, m in summary["test"].items()}
    rounds = int(summary["config"]["num-server-rounds"])
    with capsys.disabled():  # the README quotes this curve
        print(f"\n[fresh machine] test accuracy by round: {', '.join(f'{accuracy[r]:.2f}' for r in sorted(accuracy))}")
    assert sorted(accuracy) == list(range(rounds + 1)), accuracy
    assert accuracy[0] < 0.2, accuracy  # the untrained model guesses
    first, last = [accuracy[r] for r in (1, 2, 3)], [accuracy[r] for r in (rounds - 2, rounds - 1, rounds)]
    assert min(last) > max(first), accuracy  # rising round by round, not by one lucky round
    assert accuracy[rounds] >= 0.6, accuracy
