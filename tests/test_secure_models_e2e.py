"""``flwr run`` end to end with secure models (run-config ``secure-models = true``, i.e.
``FedTAN(secure_models=True)``): in Flower's Ray simulation and in a loopback deployment.

Reference: the same run with ``secure-models = false`` in Ray simulation (itself checked
against the in-process FedTAN run in tests/test_e2e_flower.py). The secure average is the
clear one up to float rounding (the fixed-point sum is exact; decoding rounds once per
value), so the runs are compared by their accuracy and loss curves and their final models
within tolerances, not by digests.

Run with ``pytest -m slow tests/test_secure_models_e2e.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import pytest

from simulations.app.task import model_from_config
from simulations.flower_processes import FlowerProcesses
from test_e2e_flower import (
    CNN_EXCHANGES,
    REPO,
    TOLERANCE,
    app_config,
    assert_completed,
    cli_config,
    max_abs_diff,
    read_results,
    report,
    start_supernodes,
)

pytestmark = pytest.mark.slow

NODES = 3
ROUNDS = 2
# statistics = "running": the new global model's BatchNorm buffers are then the released
# average's pooled moments (with "exact" the statistics pass would overwrite them), so the
# test accuracy depends on every part of the secure average.
OVERRIDES = dict(dataset="synthetic", model="cnn", num_server_rounds=ROUNDS, local_steps=2, batch_size=16,
                 statistics="running")
SIMULATION_FEDERATION = {"num-supernodes": NODES, "client-resources-num-cpus": 2, "init-args-num-cpus": 2}
# Bytes of one model value in a client's final reply: float32 in the clear, a Z_2^128 ring
# element when masked (docs/security.md, "Precision").
CLEAR_VALUE_BYTES, MASKED_VALUE_BYTES = 4, 16
# One round in deployment: 8 exchanges of some seconds each (Flower's polling, a fresh
# process per message). The timeout guards against hangs; it is not the expected time.
DEPLOYMENT_ROUNDS = 1
DEPLOYMENT_RUN_TIMEOUT = 360


@dataclass
class Run:
    summary: dict
    model: dict
    wall_seconds: float
    output: str

    @property
    def rounds(self) -> int:
        return int(self.summary["config"]["num-server-rounds"])

    def curve(self, key: str) -> list[float]:
        """``key`` ("test-accuracy" or "test-loss") of the global model before round 1 and after each round."""
        return [self.summary["test"][str(r)][key] for r in range(self.rounds + 1)]


def stopped(processes: FlowerProcesses) -> None:
    processes.stop()
    left = processes.remaining()
    assert not left, f"processes still alive after teardown: {left}"


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    """A private FLWR_HOME for the module's simulations; everything started is stopped by PID."""
    processes = FlowerProcesses(tmp_path_factory.mktemp("flower"))
    try:
        yield processes
    finally:
        stopped(processes)


@pytest.fixture
def deployment(tmp_path):
    """Another for the deployment (its wait for SuperNodes fails on any process that has
    exited, such as a finished ``flwr run``)."""
    processes = FlowerProcesses(tmp_path / "flower")
    try:
        yield processes
    finally:
        stopped(processes)


_SIMULATIONS: dict[tuple, Run] = {}


def simulation(flower: FlowerProcesses, **overrides) -> Run:
    """One ``flwr run --stream`` of the app in Ray simulation (made once per module and
    overrides: the deployment test reuses the simulation test's runs)."""
    key = tuple(sorted(overrides.items()))
    if key not in _SIMULATIONS:
        if "e2e-secure-sim" not in flower.connections:
            flower.add_connection("e2e-secure-sim", flower.start_superlink(simulation=True))
        _SIMULATIONS[key] = run(flower, "e2e-secure-sim", SIMULATION_FEDERATION, timeout=150, **overrides)
    return _SIMULATIONS[key]


def run(flower: FlowerProcesses, connection: str, federation: Optional[dict], *, timeout: float, **overrides) -> Run:
    name = f"flwr-run-{time.monotonic_ns()}"
    results_file = flower.root / f"{name}.json"
    outcome = flower.run_app(REPO, connection=connection, federation_config=federation, timeout=timeout, name=name,
                             run_config=cli_config(**{**OVERRIDES, **overrides}, results_file=str(results_file)))
    assert_completed(outcome, flower)
    summary, state_dict = read_results(results_file)
    return Run(summary, state_dict, outcome.wall_seconds, outcome.output)


def model_values() -> int:
    """Values in the app model's state (parameters and BatchNorm buffers)."""
    return sum(v.numel() for v in model_from_config(app_config(**OVERRIDES)).state_dict().values())


def assert_secure_rounds(run: Run, *, secure_stats: bool) -> None:
    assert f"Secure statistics: {'on' if secure_stats else 'off'}; secure models: on" in run.output, run.output[-4000:]
    for round_no in map(str, range(1, run.rounds + 1)):
        train = run.summary["train"][round_no]
        assert train["fedtan-clients"] == NODES and train["fedtan-restarts"] == 0, train
        assert train.get("fedtan-skipped", 0) == 0, train  # a refused release ends the round without a model
        assert train["fedtan-exchanges"] == CNN_EXCHANGES + 1, train  # + the key exchange


def assert_same_curve(run: Run, clear: Run) -> Optional[float]:
    """``run``'s rounds repeat ``clear``'s first rounds; the final models' largest difference
    if both ran as many rounds.

    The secure average is the clear one up to the float32 rounding of the decoded average (an
    ulp here and there), far below what moves one of the 500 test examples across a decision
    boundary in two rounds: the accuracies are equal, and the losses agree to 1e-6 relative
    (measured: equal to the last digit, in simulation and in deployment)."""
    rounds = run.rounds + 1
    assert run.curve("test-accuracy") == clear.curve("test-accuracy")[:rounds]
    assert run.curve("test-loss") == pytest.approx(clear.curve("test-loss")[:rounds], rel=1e-6)
    if run.rounds != clear.rounds:
        return None
    diff = max_abs_diff({k: v.numpy() for k, v in clear.model.items()}, run.model)
    assert diff <= TOLERANCE, f"the secure run's final model differs from the clear run's by {diff:g}"
    return diff


def test_simulation_secure_models_match_the_clear_run(flower, capsys):
    clear = simulation(flower, secure_models=False)
    secure = simulation(flower, secure_models=True)
    assert "secure models: off" in clear.output
    assert_secure_rounds(secure, secure_stats=False)
    values = model_values()
    for round_no in map(str, range(1, ROUNDS + 1)):
        assert clear.summary["train"][round_no]["fedtan-exchanges"] == CNN_EXCHANGES
        # The models came back masked: every value of every client's final reply is a
        # 16-byte ring element instead of a 4-byte float (the statistics are the same bytes
        # in both runs). A clear model sent beside the masked one would add 4 bytes a value.
        extra = (secure.summary["communication"][round_no]["train-bytes-up"]
                 - clear.summary["communication"][round_no]["train-bytes-up"])
        expected = NODES * values * (MASKED_VALUE_BYTES - CLEAR_VALUE_BYTES)
        assert 0.98 * expected <= extra <= 1.02 * expected, (extra, expected)
    diff = assert_same_curve(secure, clear)
    report(capsys, f"simulation secure-models: flwr run {secure.wall_seconds:.1f}s (clear {clear.wall_seconds:.1f}s), "
                   f"accuracy {secure.curve('test-accuracy')}, test loss {secure.curve('test-loss')} "
                   f"(clear {clear.curve('test-loss')}), max |model diff| {diff:.2e}")


def test_deployment_secure_models_and_statistics_match_the_clear_simulation(flower, deployment, capsys):
    """SuperLink and three SuperNodes on loopback, secure statistics and secure models: the
    accuracy curve of the clear Ray simulation of the same run config (its first round; a
    round does not depend on how many follow)."""
    started = time.monotonic()
    superlink = deployment.start_superlink(simulation=False)
    deployment.add_connection("e2e-secure-deployment", superlink)
    start_supernodes(deployment, superlink, NODES)
    deployment.wait_for_nodes(NODES)
    startup = time.monotonic() - started
    deployed = run(deployment, "e2e-secure-deployment", None, timeout=DEPLOYMENT_RUN_TIMEOUT,
                   num_server_rounds=DEPLOYMENT_ROUNDS, secure_stats=True, secure_models=True)
    assert_secure_rounds(deployed, secure_stats=True)
    secure = simulation(flower, secure_models=True)
    for round_no in map(str, range(1, DEPLOYMENT_ROUNDS + 1)):
        # The statistics are masked too: more bytes up than with secure models alone.
        assert (deployed.summary["communication"][round_no]["train-bytes-up"]
                > secure.summary["communication"][round_no]["train-bytes-up"])
    assert_same_curve(deployed, simulation(flower, secure_models=False))
    train = deployed.summary["train"]
    report(capsys, f"deployment secure-stats + secure-models ({NODES} supernodes): flwr run "
                   f"{deployed.wall_seconds:.1f}s wall, round {train['1']['fedtan-round-seconds']:.1f}s, "
                   f"startup {startup:.1f}s, "
                   f"accuracy {deployed.curve('test-accuracy')}")
