"""End to end through real Flower 1.41 processes: ``flwr run .`` against a SuperLink the
test starts, in Ray simulation and in a loopback deployment with three SuperNodes.

The final global model must equal :func:`simulations.app.task.in_process_fedtan` (the same
FedTAN run computed in one process, without Flower, statistics pass included). Every process a test starts is
stopped by PID in the fixture's finalizer (see ``simulations/flower_processes.py``).

Run with ``pytest -m slow tests/test_e2e_flower.py``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from simulations.experiments.compare import model_digest
from simulations.flower_processes import FlowerProcesses

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# The cnn of simulations/app/models.py has 3 BatchNorm calls: 2L + 1 exchanges per round.
CNN_BN_CALLS = 3
CNN_EXCHANGES = 2 * CNN_BN_CALLS + 1
TOLERANCE = 1e-5


def app_config(**overrides) -> dict:
    """[tool.flwr.app.config] of pyproject.toml with overrides (``_`` in names -> ``-``)."""
    with (REPO / "pyproject.toml").open("rb") as f:
        config = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    for key, value in overrides.items():
        key = key.replace("_", "-")
        assert key in config, f"{key} is not in [tool.flwr.app.config]"
        config[key] = value
    return config


def cli_config(**overrides) -> dict:
    """``--run-config`` overrides: Python names -> run-config keys (``_`` -> ``-``)."""
    return {key.replace("_", "-"): value for key, value in overrides.items()}


@functools.lru_cache(maxsize=4)
def _reference(config_items: tuple, num_partitions: int, num_rounds: int) -> dict:
    from simulations.app.task import in_process_fedtan

    return in_process_fedtan(dict(config_items), num_partitions, num_rounds)


def reference_model(config: dict, num_partitions: int, num_rounds: int) -> dict:
    """The in-process FedTAN run (cached: several tests share a configuration)."""
    return _reference(tuple(sorted(config.items())), num_partitions, num_rounds)


def max_abs_diff(reference: dict, state_dict: dict) -> float:
    """Largest absolute difference over all state entries (same keys and shapes required)."""
    assert set(reference) == set(state_dict), (sorted(reference), sorted(state_dict))
    worst = 0.0
    for key, expected in reference.items():
        actual = state_dict[key].detach().cpu().numpy()
        expected = np.asarray(expected)
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
        if expected.size:
            worst = max(worst, float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))))
    return worst


def read_results(results_file: Path) -> tuple[dict, dict]:
    """The server app's JSON summary and its final model (``<results-file>.pt``)."""
    summary = json.loads(results_file.read_text())
    state_dict = torch.load(results_file.with_suffix(".pt"), map_location="cpu")
    return summary, state_dict


def assert_completed(outcome, flower: FlowerProcesses) -> None:
    assert outcome.status == "finished:completed", (
        f"run {outcome.run_id}: {outcome.status} ({outcome.details})\n--- flwr run output ---\n"
        f"{outcome.output[-8000:]}\n--- superlink log ---\n{flower.log_tail('superlink', 80)}"
    )


def report(capsys, text: str) -> None:
    """Print past pytest's capture: the measured times belong in the test output."""
    with capsys.disabled():
        print(f"\n[e2e] {text}")


@pytest.fixture
def flower(tmp_path):
    """A private FLWR_HOME and process registry; everything started is stopped by PID."""
    processes = FlowerProcesses(tmp_path / "flower")
    try:
        yield processes
    finally:
        killed = processes.stop()
        left = processes.remaining()
        assert not left, f"processes still alive after teardown: {left}"
        if killed:
            print(f"teardown needed SIGKILL for: {killed}")


# ---------------------------------------------------------------------- 1. Ray simulation
SIMULATION_CASES = {
    # Ray is told it has 2 CPUs (init-args-num-cpus) on any machine; actors = 2 // CPUs per client.
    # One actor serves all three nodes; the live rounds stay in the actor's memory, so no
    # message needs a replay.
    "one-actor-live": dict(federation={"num-supernodes": 3, "client-resources-num-cpus": 2,
                                       "init-args-num-cpus": 2},
                           env={}, actors=1, homes=0),
    # Two actors: any actor may get a node's next message. Each forwards FedTAN messages to
    # the node's Ray home actor (flwr_fedtan/runtime/ray_home.py; 2 homes for 2 actors),
    # where the round stays live: no replays. "verbose" makes Flower log the pool's size.
    "several-actors-homes": dict(federation={"num-supernodes": 3, "client-resources-num-cpus": 1,
                                             "init-args-num-cpus": 2, "verbose": True},
                                 env={}, actors=2, homes=2),
    # Replays in a real Ray runtime: tests/test_ray_cluster.py (homes off, two raylets) and
    # tests/test_runtime_ray.py (a home killed mid-round).
}


def home_lines(flower: FlowerProcesses) -> dict[int, str]:
    """{node id: home name} from the Ray homes' logs (one line per home and node)."""
    found = {}
    for path in flower.ray_tmp.rglob("worker-*.out"):
        for line in path.read_text(errors="replace").splitlines():
            match = re.search(r"FedTAN live home (\S+): node (\d+)", line)
            if match:
                found[int(match.group(2))] = match.group(1)
    return found


SIMULATION_OVERRIDES = dict(dataset="synthetic", model="cnn", num_server_rounds=2, local_steps=2, batch_size=16)

# Final-model digests of this module's Ray simulations, by (case, overrides): the rerun test
# below reuses the runs the other tests already made (and makes those it lacks).
_DIGESTS: dict[tuple, str] = {}


def run_simulation(flower: FlowerProcesses, folder: Path, case: str, **overrides):
    """One ``flwr run`` of the app in Ray simulation (``SIMULATION_CASES[case]``); returns
    the outcome, the results summary and the final model, and records the model's digest."""
    spec = SIMULATION_CASES[case]
    connection = f"e2e-sim-{case}"
    if connection not in flower.connections:
        flower.add_connection(connection, flower.start_superlink(simulation=True, env=spec["env"]))
    run_name = f"flwr-run-{case}-{time.monotonic_ns()}"  # its own log: the run id is read from it
    results_file = folder / f"{run_name}.json"
    outcome = flower.run_app(
        REPO, connection=connection, federation_config=spec["federation"],
        run_config=cli_config(**overrides, results_file=str(results_file)), timeout=150, name=run_name,
    )
    assert_completed(outcome, flower)
    summary, state_dict = read_results(results_file)
    _DIGESTS[(case, tuple(sorted(overrides.items())))] = rerun_signature(summary, results_file)
    return outcome, summary, state_dict


def rerun_signature(summary: dict, results_file: Path) -> str:
    """What a rerun must repeat: the final model's digest, and the per-round training loss
    and test metrics (not the times)."""
    losses = {r: metrics.get("train-loss") for r, metrics in summary["train"].items()}
    metrics = json.dumps([losses, summary.get("test")], sort_keys=True)
    return f"{model_digest(results_file.with_suffix('.pt'))} {metrics}"


def simulation_digest(flower: FlowerProcesses, folder: Path, case: str, **overrides) -> str:
    key = (case, tuple(sorted(overrides.items())))
    if key not in _DIGESTS:
        run_simulation(flower, folder, case, **overrides)
    return _DIGESTS[key]


@pytest.mark.parametrize("case", list(SIMULATION_CASES))
def test_ray_simulation_matches_in_process_reference(flower, tmp_path, capsys, case):
    spec = SIMULATION_CASES[case]
    overrides = SIMULATION_OVERRIDES
    outcome, summary, state_dict = run_simulation(flower, tmp_path, case, **overrides)

    for round_no in ("1", "2"):
        train = summary["train"][round_no]
        assert train["fedtan-exchanges"] == CNN_EXCHANGES, train
        assert train["fedtan-clients"] == 3 and train["fedtan-restarts"] == 0, train
        assert train["replays"] == 0, train
        # The statistics pass (the app's default) ran over all three clients; the reference has it too.
        assert train["fedtan-stats-applied"] == 1 and train["fedtan-stats-clients"] == 3, train
        assert train["fedtan-stats-exchanges"] == CNN_BN_CALLS + 1, train
    if spec["actors"] > 1:
        assert f"Constructed ActorPool with: {spec['actors']} actors" in outcome.output, outcome.output[-4000:]
    homes = home_lines(flower)
    if spec["homes"]:
        # Every node's step lived in one home; the three nodes share the two homes.
        assert len(homes) == 3 and len(set(homes.values())) == spec["homes"], homes
    else:
        assert not homes, homes

    diff = max_abs_diff(reference_model(app_config(**overrides), 3, 2), state_dict)
    assert diff <= TOLERANCE, f"final model differs from in_process_fedtan by {diff:g}"
    report(capsys, f"simulation[{case}]: flwr run {outcome.wall_seconds:.1f}s wall, strategy "
                   f"{summary['seconds']:.1f}s, rounds {summary['train']['1']['fedtan-round-seconds']:.2f}s / "
                   f"{summary['train']['2']['fedtan-round-seconds']:.2f}s, max |diff| {diff:.2e}")


def test_reruns_give_bit_identical_models(flower, tmp_path, capsys):
    """The same seed gives the same final model, byte for byte, with one actor and with two
    (homes), with Flower's random node ids in every run; another seed gives another model;
    the same for FedAdam (docs/reproducibility.md)."""
    one = simulation_digest(flower, tmp_path, "one-actor-live", **SIMULATION_OVERRIDES)
    two = simulation_digest(flower, tmp_path, "several-actors-homes", **SIMULATION_OVERRIDES)
    assert one == two
    assert simulation_digest(flower, tmp_path, "several-actors-homes", **SIMULATION_OVERRIDES, seed=1) != two
    adam = dict(SIMULATION_OVERRIDES, server_optimizer="fedadam", server_eta=0.02)
    adam_one = simulation_digest(flower, tmp_path, "one-actor-live", **adam)
    assert adam_one == simulation_digest(flower, tmp_path, "several-actors-homes", **adam)
    assert adam_one != one
    report(capsys, f"reruns: seed 0 {one[:12]} (1 and 2 actors), FedAdam {adam_one[:12]} (1 and 2 actors)")


# ---------------------------------------------------------------------- 2. deployment
# In deployment every message runs in a fresh flwr-clientapp process. The app's ClientApp
# module (simulations/app/node_app.py) imports Flower only and forwards each message to the
# node worker (flwr_fedtan/runtime/worker.py), which the first message starts and which
# keeps the node's live rounds, client and data. The test uses the "twice-bn" model (one
# BatchNorm module called twice: L = 2, 5 exchanges) to stay within its time budget; it
# also checks that a module called twice per forward is told apart.
DEPLOYMENT_MODEL = "twice-bn"
DEPLOYMENT_BN_CALLS = 2
# A guard against hangs, not the expected time: each exchange waits for Flower's polling
# and three fresh processes, so jobs competing for the CPU stretch the round.
DEPLOYMENT_RUN_TIMEOUT = 240


def worker_logs(flower: FlowerProcesses) -> dict[str, str]:
    """The node workers' logs (in the harness's FEDTAN_RUNTIME_DIR), by file name."""
    folder = Path(flower.env["FEDTAN_RUNTIME_DIR"])
    return {p.name: p.read_text(errors="replace") for p in folder.glob("*.log")} if folder.exists() else {}


def start_supernodes(flower: FlowerProcesses, superlink: str, count: int) -> list:
    return [flower.start_supernode(superlink, {"partition-id": p, "num-partitions": count}, name=f"supernode-{p}")
            for p in range(count)]


def test_deployment_loopback_one_round(flower, tmp_path, capsys):
    results_file = tmp_path / "d.json"
    overrides = dict(dataset="synthetic", model=DEPLOYMENT_MODEL, num_server_rounds=1, local_steps=1,
                     batch_size=16)
    t0 = time.monotonic()
    superlink = flower.start_superlink(simulation=False)
    flower.add_connection("e2e-deployment", superlink)
    start_supernodes(flower, superlink, 3)
    flower.wait_for_nodes(3)
    startup = time.monotonic() - t0

    outcome = flower.run_app(REPO, connection="e2e-deployment",
                             run_config=cli_config(**overrides, results_file=str(results_file)),
                             timeout=DEPLOYMENT_RUN_TIMEOUT)
    assert_completed(outcome, flower)
    summary, state_dict = read_results(results_file)
    train = summary["train"]["1"]
    exchanges = 2 * DEPLOYMENT_BN_CALLS + 1
    assert train["fedtan-exchanges"] == exchanges and train["fedtan-clients"] == 3, train
    # Every aggregate message found the node's round alive in its worker.
    assert train["replays"] == 0, train
    assert train["fedtan-stats-applied"] == 1 and train["fedtan-stats-clients"] == 3, train
    logs = worker_logs(flower)
    assert len(logs) == 3 and all("FedTAN node worker pid" in text for text in logs.values()), logs

    diff = max_abs_diff(reference_model(app_config(**overrides), 3, 1), state_dict)
    assert diff <= TOLERANCE, f"final model differs from in_process_fedtan by {diff:g}"
    # Wherever it runs: a Ray simulation of the same run config gives the same bytes.
    deployed = rerun_signature(summary, results_file)
    assert simulation_digest(flower, tmp_path, "one-actor-live", **overrides) == deployed
    report(capsys, f"deployment ({DEPLOYMENT_MODEL}, 3 supernodes): round {train['fedtan-round-seconds']:.1f}s "
                   f"({exchanges} exchanges, {train['fedtan-round-seconds'] / exchanges:.1f}s each; "
                   f"client handlers {train['sync-seconds']:.1f}s per client), strategy {summary['seconds']:.1f}s, "
                   f"flwr run {outcome.wall_seconds:.1f}s wall, startup {startup:.1f}s, max |diff| {diff:.2e}")


def _processes_with(text: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if text.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    out.append(int(name))
            except OSError:
                pass
    return out


def test_deployment_supernode_killed_mid_round_then_rejoins(flower, tmp_path, capsys):
    """SIGKILL one of three SuperNodes during round 1: the round restarts without it (never
    hangs); its node worker exits (no orphan); the node, started again, joins round 2."""
    results_file = tmp_path / "k.json"
    superlink = flower.start_superlink(simulation=False)
    flower.add_connection("e2e-fault", superlink)
    victim = start_supernodes(flower, superlink, 3)[2]
    flower.wait_for_nodes(3)
    events: dict[str, float] = {}

    def kill_mid_round() -> None:
        log_path = flower.log_path("flwr-run")
        deadline = time.monotonic() + DEPLOYMENT_RUN_TIMEOUT
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            if "[ROUND 1/" in text:
                break
            time.sleep(0.2)
        # Wait until the victim's node worker has served the round's first two messages
        # (the round is live in it, every node's worker is up), then kill the SuperNode
        # alone, as a crash would.
        from flwr_fedtan.runtime.worker import worker_request

        workers: list[int] = []
        while time.monotonic() < deadline:
            workers = _processes_with(f"--watch-pid\0{victim.pid}\0")
            if workers:
                args = Path(f"/proc/{workers[0]}/cmdline").read_bytes().split(b"\0")
                sock = Path(args[args.index(b"--socket") + 1].decode())
                try:
                    if worker_request(sock, "stats", timeout=10)["served"] >= 2:
                        break
                except (OSError, EOFError, RuntimeError):
                    pass
            time.sleep(0.2)
        os.kill(victim.pid, signal.SIGKILL)
        events["killed"] = time.monotonic()
        events["workers"] = workers
        flower.start_supernode(superlink, {"partition-id": 2, "num-partitions": 3}, name="supernode-2-restarted")

    killer = threading.Thread(target=kill_mid_round, daemon=True)
    killer.start()
    outcome = flower.run_app(REPO, connection="e2e-fault", timeout=DEPLOYMENT_RUN_TIMEOUT,
                             run_config=cli_config(dataset="synthetic", model=DEPLOYMENT_MODEL, num_server_rounds=2,
                                                   local_steps=1, batch_size=16, exchange_timeout=60.0,
                                                   results_file=str(results_file)))
    killer.join(timeout=5)
    assert_completed(outcome, flower)
    assert "killed" in events and events["workers"], events
    # The killed SuperNode's worker watched it and is gone, without anyone stopping it.
    for pid in events["workers"]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], pid
    summary, _ = read_results(results_file)
    first, second = summary["train"]["1"], summary["train"]["2"]
    assert first["fedtan-clients"] == 2 and first["fedtan-restarts"] >= 1, first
    assert first.get("fedtan-skipped", 0) == 0, first
    assert second["fedtan-clients"] == 3, second  # the restarted node is back
    report(capsys, f"deployment fault: round 1 {first['fedtan-round-seconds']:.1f}s with 2 clients after "
                   f"{first['fedtan-restarts']} restart(s); round 2 {second['fedtan-round-seconds']:.1f}s with "
                   f"{second['fedtan-clients']} clients; flwr run {outcome.wall_seconds:.1f}s")


# ---------------------------------------------------------------------- 3. the example app
@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists(),
                    reason=f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (Debian package dataset-fashion-mnist)")
def test_default_app_one_round_on_fashion_mnist(flower, tmp_path, capsys):
    results_file = tmp_path / "fm.json"
    superlink = flower.start_superlink(simulation=True)
    flower.add_connection("e2e-default", superlink)  # the config.toml default: plain `flwr run .`
    outcome = flower.run_app(REPO, run_config={"num-server-rounds": 1, "results-file": str(results_file)},
                             timeout=170)
    assert_completed(outcome, flower)
    summary = json.loads(results_file.read_text())
    accuracy = summary["test"]["1"]["test-accuracy"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0, summary["test"]
    train = summary["train"]["1"]
    assert train["fedtan-clients"] == 2 and train["fedtan-exchanges"] == CNN_EXCHANGES, train
    report(capsys, f"default app (Fashion-MNIST, 2 supernodes): flwr run {outcome.wall_seconds:.1f}s wall, "
                   f"strategy {summary['seconds']:.1f}s, test accuracy after 1 round {accuracy:.3f}")
