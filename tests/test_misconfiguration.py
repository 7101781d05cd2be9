"""Misconfiguration is refused before the first round, every problem with its fix (issue 27):
the app's run config, FedTAN's and FedTANClient's arguments, a client's device and data,
and a scalar loss that sums without declaring it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, validate
from flwr_fedtan.errors import ClientDataError, InvalidArgumentsError, UnsupportedModelError
from flwr_fedtan.client import _client_from
from flwr_fedtan.training import ClientRound
from simulations.app.run_config import check_run_config, run_config_problems

REPO = Path(__file__).resolve().parents[1]


def app_config(**overrides) -> dict:
    with (REPO / "pyproject.toml").open("rb") as f:
        config = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    config.update(overrides)
    return config


def problem_names(problems) -> list[str]:
    return [problem.name for problem in problems]


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---------------------------------------------------------------------- the run config
def test_the_default_run_config_has_no_problem():
    assert run_config_problems(app_config()) == []


@pytest.mark.parametrize("key, value", [
    ("local-steps", -1), ("batch-size", 0), ("num-server-rounds", 0), ("local-steps", 2.5), ("lr", 0),
    ("lr", "fast"), ("strategy", "fedtann"), ("model", "resnet21"), ("dataset", "cifar100"),
    ("partitioning", "random"), ("server-optimizer", "adam"), ("statistics", "precise"),
    ("statistics-examples", 0), ("statistics-every", 0), ("secure-stats", 1), ("fixbn-switch", 1.5),
    ("exchange-timeout", 0), ("mode", "benchmark"), ("seed", True), ("progress-interval", -1),
    ("progress-interval", "often"),
])
def test_each_bad_setting_is_named(key, value):
    assert problem_names(run_config_problems(app_config(**{key: value}))) == [key]


@pytest.mark.parametrize("overrides, name, words", [
    ({"sync-steps": 3, "local-steps": 2}, "sync-steps", "exceeds local-steps=2"),
    ({"secure-stats": True, "strategy": "fedbn"}, "secure-stats", "no statistics to protect"),
    ({"server-optimizer": "fedadam", "strategy": "silobn"}, "server-optimizer", "not available"),
    ({"model": "mlp", "dataset": "cifar10"}, "model", "28x28"),
])
def test_combinations_that_cannot_run_are_refused(overrides, name, words):
    problems = run_config_problems(app_config(**overrides))
    assert problem_names(problems) == [name] and words in problems[0].problem


def test_combinations_that_can_run_are_accepted():
    assert run_config_problems(app_config(**{"sync-steps": 2, "local-steps": 2, "secure-stats": True,
                                             "strategy": "fedavg-exact", "server-optimizer": "fedadam"})) == []


def test_a_missing_cuda_device_is_refused(no_cuda):
    problems = run_config_problems(app_config(device="cuda:0"))
    assert problem_names(problems) == ["device"] and "no CUDA device" in problems[0].problem
    assert "'cpu'" in problems[0].fix


def test_every_problem_in_one_message(no_cuda):
    config = app_config(**{"local-steps": -1, "batch-size": 0, "device": "cuda:0", "statistics-every": 0})
    with pytest.raises(InvalidArgumentsError) as caught:
        check_run_config(config)
    assert problem_names(caught.value.problems) == ["local-steps", "batch-size", "statistics-every", "device"]
    message = str(caught.value)
    assert "4 invalid settings" in message and message.count("Fix: ") == 4
    assert "local-steps=-1: must be >= 1" in message


# ---------------------------------------------------------------------- FedTAN
def test_fedtan_lists_every_bad_argument():
    with pytest.raises(InvalidArgumentsError) as caught:
        FedTAN(sync_steps=0, exchange_timeout=-1, max_restarts=-1, client_weight="heavy",
               statistics="precise", statistics_every=0, keep_checkpoints=-1)  # 0 keeps all: allowed
    assert set(problem_names(caught.value.problems)) == {
        "sync_steps", "exchange_timeout", "max_restarts", "client_weight", "statistics", "statistics_every",
        "keep_checkpoints"}


# ---------------------------------------------------------------------- FedTANClient
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _data(n: int = 12, features: int = 4) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, features, generator=generator), torch.arange(n) % 3)


def test_client_lists_every_bad_argument(no_cuda):
    with pytest.raises(InvalidArgumentsError) as caught:
        FedTANClient(_model(), _data(), batch_size=4, lr=-0.1, momentum=1.0, weight_decay=-1, local_steps=0,
                     eval_batch_size=0, device="cuda:1")
    assert problem_names(caught.value.problems) == [
        "lr", "momentum", "weight_decay", "local_steps", "eval_batch_size", "device"]


def test_client_lr_is_not_checked_when_an_optimizer_replaces_sgd():
    client = FedTANClient(_model(), _data(), batch_size=4, lr=-1.0,
                          optimizer_fn=lambda params: torch.optim.Adam(params, lr=0.01))
    assert isinstance(client.make_optimizer(client.model.parameters()), torch.optim.Adam)


def test_client_refuses_nan_in_its_data():
    data = _data()
    data.tensors[0][5, 2] = float("nan")
    with pytest.raises(ClientDataError, match=r"NaN or infinite inputs \(first in sample 5\)"):
        FedTANClient(_model(), data, batch_size=4)


def test_client_refuses_data_of_the_wrong_shape():
    with pytest.raises(ClientDataError, match=r"inputs of shape \(5,\) per sample .*Fix: "):
        FedTANClient(_model(), _data(features=5), batch_size=4)


def test_the_shape_check_runs_no_forward_on_real_data():
    model, devices = _model(), []
    model[0].register_forward_hook(lambda module, args, output: devices.append(args[0].device.type))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FedTANClient(model, _data(), batch_size=4)
    assert devices == ["meta"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics untouched


def test_a_client_that_cannot_be_built_names_its_node():
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ClientDataError, match=r"^node 7: FedTANClient: the model cannot train"):
        _client_from(lambda ctx: FedTANClient(_model(), _data(features=5), batch_size=4), context)
    with pytest.raises(InvalidArgumentsError, match=r"^node 7: FedTANClient: 1 invalid setting"):
        _client_from(lambda ctx: FedTANClient(_model(), _data(), batch_size=4, lr=0), context)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ClientDataError, match=r"^node 7: FedTANClient: train_data is empty\. Fix: give this client"):
        _client_from(lambda ctx: FedTANClient(_model(), empty, batch_size=4), context)


# ---------------------------------------------------------------------- summing losses
def summing_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="sum")


class DeclaresSumButAverages:
    reduction = "sum"

    def __call__(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


@pytest.mark.parametrize("loss_fn, refused", [
    (summing_cross_entropy, True),
    (DeclaresSumButAverages(), True),
    (lambda o, t: F.cross_entropy(o, t), False),
    (nn.CrossEntropyLoss(reduction="sum"), False),
    (lambda o, t: F.cross_entropy(o, t, reduction="none"), False),
    (lambda o, t: F.mse_loss(o, t, reduction="sum"), True),  # judged on the float-target probe
    (lambda o, t: F.mse_loss(o, t), False),
])
def test_validate_finds_a_loss_that_sums_without_declaring_it(loss_fn, refused):
    issues = [i for i in validate(_model(), loss_fn) if i.module == "loss_fn"]
    assert bool(issues) is refused, issues
    if refused:
        assert "reduction" in issues[0].fix


def test_client_refuses_a_summing_loss_at_construction():
    with pytest.raises(UnsupportedModelError, match="declares no reduction='sum'"):
        FedTANClient(_model(), _data(), summing_cross_entropy, batch_size=4)


def first_two_outputs_summed(outputs, targets):
    """Fits only (n, 2+) outputs with (n, 2) targets: the synthetic probe cannot judge it."""
    return ((outputs[:, :2] - targets) ** 2).sum()


def test_the_step_finds_a_summing_loss_the_synthetic_probe_cannot_judge():
    assert validate(_model(), first_two_outputs_summed) == []
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
    batches = [data.tensors[0][:4], data.tensors[1][:4]]
    # An ordinary step (a synchronised one probes the same way, once its forward is through).
    round_ = ClientRound(_model(), lambda seed: tuple(batches), first_two_outputs_summed,
                         lambda params: torch.optim.SGD(params, lr=0.1), sync_steps=0, local_steps=1, seed=0)
    assert round_.start() is None
    with pytest.raises(UnsupportedModelError, match="declares no reduction='sum'"):
        round_.finish()
    mean_round = ClientRound(_model(), lambda seed: tuple(batches), lambda o, t: ((o[:, :2] - t) ** 2).mean(),
                             lambda params: torch.optim.SGD(params, lr=0.1), sync_steps=0, local_steps=1, seed=0)
    assert mean_round.start() is None and mean_round.finish()["num-examples"] == 4


# ---------------------------------------------------------------------- through flwr run
@pytest.mark.slow
def test_flwr_run_refuses_a_bad_run_config_before_the_first_round(tmp_path):
    from simulations.flower_processes import FlowerProcesses

    flower = FlowerProcesses(tmp_path / "flower")
    try:
        superlink = flower.start_superlink(simulation=True)
        flower.add_connection("misconfigured", superlink)
        outcome = flower.run_app(REPO, run_config={"num-server-rounds": 1, "local-steps": -1, "batch-size": 0,
                                                   "strategy": "fedtann", "statistics-every": 0}, timeout=120)
    finally:
        flower.stop()
        assert not flower.remaining()
    assert outcome.status.startswith("finished:failed"), (outcome.status, outcome.output[-4000:])
    text = outcome.output
    for line in ("local-steps=-1: must be >= 1", "batch-size=0: must be >= 1", "strategy='fedtann': must be one of",
                 "statistics-every=0: must be >= 1"):
        assert line in text, text[-4000:]
    assert "4 invalid settings" in text
    assert "Starting FedTAN" not in text and "[ROUND 1]" not in text  # refused before any round


# ---------------------------------------------------------------------- progress-interval
def _small_app_config(**overrides) -> dict:
    """The app's run config on tiny synthetic data (a round takes about a second)."""
    config = app_config(dataset="synthetic", model="cnn", **{"batch-size": 8, "local-steps": 1,
                        "num-server-rounds": 1, "num-partitions": 3, "statistics": "running"})
    config.update(overrides)
    return config


def test_the_progress_interval_key_reaches_fedtan():
    from flwr_fedtan.progress import DEFAULT_PROGRESS_INTERVAL
    from simulations.app.server_app import make_strategy

    assert app_config()["progress-interval"] == DEFAULT_PROGRESS_INTERVAL
    assert make_strategy(app_config()).progress_interval == DEFAULT_PROGRESS_INTERVAL
    assert make_strategy(app_config(**{"progress-interval": 0})).progress_interval == 0.0
    assert make_strategy(app_config(**{"progress-interval": 2.5})).progress_interval == 2.5


@pytest.mark.parametrize("interval, lines", [(0, 7), (3600.0, 2)])  # 2L + 1 = 7; else first and last only
def test_the_progress_interval_key_paces_the_exchange_lines_of_a_round(interval, lines, caplog):
    import logging

    from flwr_fedtan.client import clear_live_rounds
    from simulations.app.client_app import app
    from simulations.app.server_app import run_experiment

    from _grid import LocalGrid

    config = _small_app_config(**{"progress-interval": interval})
    clear_live_rounds()
    try:
        with caplog.at_level(logging.INFO, logger="flwr"):
            run_experiment(LocalGrid(app, 3, config), config)
    finally:
        clear_live_rounds()
    logged = [r.getMessage() for r in caplog.records
              if r.name == "flwr" and r.getMessage().startswith("FedTAN round 1: exchange ")]
    assert len(logged) == lines, logged


def test_the_server_app_refuses_a_bad_progress_interval_before_building_anything(monkeypatch):
    from simulations.app import server_app

    monkeypatch.setattr(server_app, "run_experiment", lambda *a, **k: pytest.fail("a round was started"))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=app_config(**{"progress-interval": -5}))
    with pytest.raises(InvalidArgumentsError, match=r"progress-interval=-5: must be >= 0.*Fix: give the seconds"):
        server_app.main(None, context)


# ---------------------------------------------------------------------- baseline clients
def _message_to(node: int, message_type: str, arrays: dict, config: Optional[dict] = None):
    from flwr.app import ArrayRecord, ConfigRecord, Message

    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config or {"server-round": 1})})
    return Message(content, node, message_type)


def _initial_state(config: dict, norm: str) -> dict:
    from flwr.app import Array

    from simulations.app.task import model_from_config

    return {k: Array(v.detach().numpy()) for k, v in model_from_config(config, norm=norm).state_dict().items()}


@pytest.mark.parametrize("method, message_type", [
    ("fedavg", "train"), ("fedavg-exact", "train"), ("fedbn", "train"), ("fedbn", "evaluate"),
    ("silobn", "train"), ("silobn", "evaluate"), ("fixbn", "train"), ("fedgn", "train"), ("centralised", "train"),
])
def test_a_baseline_client_that_cannot_be_built_names_its_node(method, message_type):
    from simulations.app.baselines import model_norm
    from simulations.app.client_app import app

    from _grid import LocalGrid

    config = _small_app_config(strategy=method, **{"batch-size": 0})
    grid = LocalGrid(app, 1, config)
    node = grid.node_ids[0]
    reply, = grid.send_and_receive([_message_to(node, message_type, _initial_state(config, model_norm(config)))])
    assert reply.has_error()
    assert reply.error.reason.startswith(f"InvalidArgumentsError: node {node}: FedTANClient: 1 invalid setting"), \
        reply.error.reason
    assert "batch_size=0: must be >= 1" in reply.error.reason and "Fix: " in reply.error.reason


@pytest.mark.parametrize("method", ["fedbn", "fixbn", "fedgn"])
def test_a_baseline_client_sent_another_model_names_its_node(method):
    from flwr.app import Array

    from simulations.app.baselines import model_norm
    from simulations.app.client_app import app

    from _grid import LocalGrid

    config = _small_app_config(strategy=method)
    grid = LocalGrid(app, 1, config)
    node = grid.node_ids[0]
    arrays = dict(_initial_state(config, model_norm(config)), **{"extra.weight": Array(np.zeros(3, np.float32))})
    reply, = grid.send_and_receive([_message_to(node, "train", arrays)])
    assert reply.has_error()
    assert reply.error.reason.startswith(f"ValueError: node {node}: received entries the model does not have: "
                                         "['extra.weight']"), reply.error.reason


# ---------------------------------------------------------------------- the loss probe in a synchronised step
class TwoBatchNormNet(nn.Module):
    """Two BatchNorm calls: the forward of a synchronised step pauses twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5),
                                  nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.body(x)


def _synchronised_rounds(loss_fn, sizes=(3, 5, 8)) -> list[ClientRound]:
    torch.manual_seed(0)
    model = TwoBatchNormNet()
    rounds = []
    for k, size in enumerate(sizes):
        generator = torch.Generator().manual_seed(10 + k)
        batch = (torch.randn(size, 4, generator=generator), torch.arange(size) % 3)
        client_model = TwoBatchNormNet()
        client_model.load_state_dict(model.state_dict())
        rounds.append(ClientRound(client_model, lambda seed, b=batch: b, loss_fn,
                                  lambda params: torch.optim.SGD(params, lr=0.1), sync_steps=1, local_steps=1,
                                  seed=k))
    return rounds


def _drive(rounds: list[ClientRound], phases: list[str]) -> None:
    """Run the rounds' synchronised step in lockstep, noting the phase of every exchange done."""
    from flwr_fedtan.reference import aggregate_requests

    requests = {k: r.start() for k, r in enumerate(rounds)}
    try:
        while any(request is not None for request in requests.values()):
            point, aggregate = aggregate_requests(requests)
            phases.append(point.phase)
            requests = {k: rounds[k].resume(aggregate) for k in requests}
    finally:
        for round_ in rounds:
            round_.close()


def hand_written_sum(outputs, targets):
    """A squared error summed over the batch: nothing declares it a sum."""
    return ((outputs - F.one_hot(targets, 3)) ** 2).sum()


@pytest.mark.parametrize("loss_fn", [summing_cross_entropy, hand_written_sum])
def test_a_synchronised_step_refuses_a_loss_that_sums_before_it_shares_a_gradient(loss_fn):
    phases: list[str] = []
    with pytest.raises(UnsupportedModelError) as caught:
        _drive(_synchronised_rounds(loss_fn), phases)
    # Refused once the forward is through (both BatchNorm calls pooled), before any backward payload.
    assert phases == ["forward", "forward"]
    message = str(caught.value)
    assert "loss_fn: it returns the batch's sum" in message and "declares no reduction='sum'" in message
    assert "Fix: declare the sum" in message and "reduction='none'" in message


def test_a_synchronised_step_takes_a_mean_loss_and_a_declared_sum():
    for loss_fn in (lambda o, t: F.cross_entropy(o, t), nn.CrossEntropyLoss(reduction="sum")):
        rounds, phases = _synchronised_rounds(loss_fn), []
        _drive(rounds, phases)
        assert phases == ["forward", "forward", "backward", "backward"]
        assert all(r.finish()["num-examples"] == size for r, size in zip(rounds, (3, 5, 8)))


# ---------------------------------------------------------------------- client faults, through flwr run
FAULTY_APP = Path(__file__).resolve().parent / "faulty_clients_app"


@pytest.mark.slow
def test_flwr_run_names_each_faulty_client_and_its_fix_and_finishes(tmp_path):
    """One FedTAN round over 6 simulated nodes: partition 0 holds a NaN, partition 1 data of
    the wrong width, partition 2 asks for CUDA on a machine without it, partition 3 has no
    data; 4 and 5 are sound.
    Each faulty node is dropped at its first message with one line in the ServerApp's log
    that names it and gives the fix; the round completes with the other two."""
    import re

    from simulations.flower_processes import FlowerProcesses

    if torch.cuda.is_available():
        pytest.skip("the device fault needs a machine without CUDA")
    flower = FlowerProcesses(tmp_path / "flower")
    try:
        flower.add_connection("faulty", flower.start_superlink(simulation=True))
        outcome = flower.run_app(FAULTY_APP, run_config={"nodes": 6, "faults": "nan,shape,device,empty"},
                                 federation_config={"num-supernodes": 6, "client-resources-num-cpus": 2,
                                                    "init-args-num-cpus": 2}, timeout=240)
    finally:
        flower.stop()
        assert not flower.remaining()
    text = re.sub(r"\x1b\[[0-9;]*m", "", outcome.output)  # no colours
    assert outcome.status == "finished:completed", (outcome.status, outcome.details, text[-6000:])
    # Each faulty node is dropped once, at its first message, by one line of FedTAN's that
    # quotes the node's own message and its fix (in Ray simulation the error reply's reason is
    # Ray's traceback, with the client's message at its end).
    expected = {
        "nan": r"node (\d+): FedTANClient: train_data holds NaN or infinite inputs \(first in sample 3\)\. "
               r"Fix: clean or drop those samples",
        "shape": r"node (\d+): FedTANClient: the model cannot train on this client's data: inputs of "
                 r"shape \(5,\) per sample .*\. Fix: give the model data of the shape it was built for",
        "device": r"node (\d+): FedTANClient: 1 invalid setting:\n- device='cuda': torch finds "
                  r"no CUDA device on this machine\. Fix: use device 'cpu'",
        "empty": r"node (\d+): FedTANClient: train_data is empty\. Fix: give this client at least one",
    }
    dropped = re.findall(r"FedTAN round 1: dropping node (\d+): error reply: ", text)
    named = {}
    for fault, pattern in expected.items():
        nodes = re.findall(r"FedTAN round 1: dropping node (\d+): error reply: " + pattern, text)
        assert len(nodes) == 1 and nodes[0][0] == nodes[0][1], (fault, nodes, text[-6000:])
        named[fault] = nodes[0][0]
    assert len(set(named.values())) == 4, named
    assert sorted(dropped) == sorted(named.values()), (dropped, named)
    # The round goes on with the two others and completes.
    assert "'fedtan-dropped': '4'" in text and "'fedtan-clients': '2'" in text, text[-4000:]


def test_a_drop_line_quotes_the_clients_message_not_rays_traceback():
    from flwr_fedtan.protocol.exchange import client_error_text

    message = ("node 7: FedTANClient: train_data holds NaN or infinite inputs (first in sample 3). "
               "Fix: clean or drop those samples")
    ray_reason = (
        "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=123, ip=10.0.0.1)\n"
        '  File "/venv/lib/python3.11/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 60, in run\n'
        "    raise ClientAppException(str(ex)) from ex\n"
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
        + message + "'>"
    )
    assert client_error_text(ray_reason) == message
    # A reason without Ray's wrapping (deployment, in-process grids) stays as it is, colours removed.
    assert client_error_text("\x1b[31m" + message + "\x1b[0m") == message
