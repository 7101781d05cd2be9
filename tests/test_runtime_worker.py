"""The node worker (flwr_fedtan/runtime/worker.py): a deployed node's live rounds in one
long-lived process behind a private Unix socket.

The in-process Grid (tests/_grid.py) plays Flower: with ``separate_processes=True`` it
forgets this process's live rounds before every message, as a fresh ``flwr-clientapp``
process would; the light ClientApp forwards each message to the worker, which keeps the
rounds alive. Results are checked against the in-process reference. The tests that
start workers (each imports torch) are marked slow.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flwr_fedtan import FedTAN
from flwr_fedtan.runtime import worker as worker_mod
from flwr_fedtan.runtime.private import PrivateFolderError, private_folder

from _grid import LocalGrid
import _runtime_app as rt

REPO = Path(__file__).resolve().parents[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    text = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return not text or text[text.rindex(")") + 2] not in "ZX"


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def runtime_dir(tmp_path_factory, monkeypatch):
    """A private folder for the worker sockets; every worker started there is stopped."""
    folder = Path(tmp_path_factory.mktemp("rt")) / "sockets"  # short: sockets have a 108-byte limit
    monkeypatch.setenv("FEDTAN_RUNTIME_DIR", str(folder))
    monkeypatch.delenv("FEDTAN_NODE_WORKER_SOCKET", raising=False)
    yield folder
    for path in folder.glob("*.sock") if folder.exists() else []:
        try:
            pid = worker_mod.worker_request(path, "stop", timeout=10)
        except (OSError, EOFError, worker_mod.WorkerError):
            continue
        assert _wait_gone(pid), f"worker {pid} did not stop"


def _run(grid, rounds):
    strategy = FedTAN(min_available_nodes=len(grid.node_ids), fraction_evaluate=0.0)
    return strategy, strategy.start(grid, rt.initial_arrays(), num_rounds=rounds)


def _worker_pids(folder: Path) -> dict[Path, int]:
    return {p: worker_mod.worker_request(p, "stats", timeout=10)["pid"] for p in sorted(folder.glob("*.sock"))}


@pytest.mark.slow
def test_worker_keeps_live_rounds_across_fresh_processes(runtime_dir):
    grid = LocalGrid(rt.worker_app, 3, {"local-steps": 2}, separate_processes=True)
    strategy, result = _run(grid, rounds=2)
    expected = rt.reference_rounds(list(grid.contexts.values()), strategy.seed, rounds=2, statistics=True)
    assert rt.max_diff(rt.to_numpy(result.arrays), expected) <= 1e-10
    for round_no in (1, 2):
        metrics = result.train_metrics_clientapp[round_no]
        assert metrics["fedtan-exchanges"] == 2 * rt.NUM_BN_CALLS + 1 and metrics["fedtan-clients"] == 3
        assert metrics["replays"] == 0, metrics  # every aggregate found its round alive in the worker
    # One worker per node, each in a private folder with a socket only its user can open.
    pids = _worker_pids(runtime_dir)
    assert len(pids) == 3 and len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700
    for path in pids:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0
        # Two rounds, each 2L + 1 exchanges and then the statistics pass's L + 1.
        served = 2 * (2 * rt.NUM_BN_CALLS + 1 + rt.NUM_BN_CALLS + 1)
        assert worker_mod.worker_request(path, "stats", timeout=10)["served"] == served


@pytest.mark.slow
def test_worker_killed_mid_round_is_restarted_and_replays_to_the_same_result(runtime_dir):
    """SIGKILL the worker of one node after the round's third exchange: its next message
    starts a new worker, which rebuilds the round from context.state (replay)."""
    victim = {}

    class KillsAWorker(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if self.messages_handled == 3 * 3 and not victim:  # after 3 exchanges of 3 nodes
                pids = _worker_pids(runtime_dir)
                path, pid = next(iter(pids.items()))
                os.kill(pid, signal.SIGKILL)
                assert _wait_gone(pid)
                victim.update(path=path, pid=pid)
            return super().push_messages(messages)

    grid = KillsAWorker(rt.worker_app, 3, {"local-steps": 2}, separate_processes=True)
    strategy, result = _run(grid, rounds=2)
    assert victim, "the test did not kill a worker"
    expected = rt.reference_rounds(list(grid.contexts.values()), strategy.seed, rounds=2, statistics=True)
    assert rt.max_diff(rt.to_numpy(result.arrays), expected) <= 1e-10
    first, second = result.train_metrics_clientapp[1], result.train_metrics_clientapp[2]
    assert first["fedtan-clients"] == 3 and first["fedtan-restarts"] == 0 and first["fedtan-dropped"] == 0
    # One node replayed once (the new worker); Flower averages the clients' metrics weighted by
    # examples, so the round's figure is that node's share of the pooled batch. Next round: live.
    batches = [rt.BATCH_SIZES[int(c.node_config["partition-id"])] for c in grid.contexts.values()]
    shares = [b / sum(batches) for b in batches]
    assert any(first["replays"] == pytest.approx(share) for share in shares), (first["replays"], shares)
    assert second["replays"] == 0
    new_pid = worker_mod.worker_request(victim["path"], "stats", timeout=10)["pid"]
    assert new_pid != victim["pid"]


@pytest.mark.slow
def test_handler_error_comes_back_with_its_text(runtime_dir):
    """An exception inside the worker is the ClientApp's error (the server drops the node
    with that reason), and the worker keeps serving."""
    grid = LocalGrid(rt.worker_app, 3, {"local-steps": 2}, separate_processes=True)
    context = grid.contexts[grid.node_ids[0]]
    context.node_config["partition-id"] = "no-such-partition"  # int(...) fails inside the worker's client_fn
    strategy = FedTAN(min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0)
    result = strategy.start(grid, rt.initial_arrays(), num_rounds=1)
    reason = strategy.dropped[1][grid.node_ids[0]]
    assert "ValueError" in reason and "no-such-partition" in reason, reason
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2


@pytest.mark.slow
def test_worker_exits_when_idle_or_when_its_supernode_is_gone(runtime_dir):
    folder = private_folder()
    idle = subprocess.Popen([sys.executable, "-m", "flwr_fedtan.runtime.worker", "serve",
                             "--socket", str(folder / "idle.sock"), "--idle-timeout", "1"],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    orphan = subprocess.Popen([sys.executable, "-m", "flwr_fedtan.runtime.worker", "serve",
                               "--socket", str(folder / "watch.sock"), "--idle-timeout", "0",
                               "--watch-pid", str(watched.pid)], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert idle.wait(timeout=30) == 0
        assert not (folder / "idle.sock").exists()
        deadline = time.monotonic() + 30
        while not (folder / "watch.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert orphan.poll() is None
        watched.kill()
        watched.wait()
        assert orphan.wait(timeout=30) == 0
        assert not (folder / "watch.sock").exists()
    finally:
        for process in (idle, watched, orphan):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_private_folder_refuses_a_folder_others_can_open(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(PrivateFolderError, match="chmod 700"):
        private_folder(loose)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(PrivateFolderError, match="not a folder"):
        private_folder(link)
    fresh = private_folder(tmp_path / "fresh" / "sockets")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def test_the_light_client_app_module_imports_no_torch():
    """What a deployment flwr-clientapp process imports for every message."""
    code = ("import sys, simulations.app.node_app as m; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'ray' not in sys.modules, 'ray imported'; print(type(m.app).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NodeClientApp"
