"""FedTAN added to an existing Flower app with ``add_fedtan`` (issue 16), the client's
batch-size rule and its options (arguments, environment overrides).

``tests/dropin_app`` is a Flower app written the way ``flwr new``'s PyTorch template writes
one (``task.py`` with ``Net``/``load_data``/``train``/``test``; a ClientApp with its own
``@app.train()`` and ``@app.evaluate()`` and metric names ``train_loss``/``eval_acc``; a
ServerApp running ``FedAvg`` in ``@app.main()``), committed twice: ``fedavg_*`` as written,
``fedtan_*`` switched to FedTAN. The tests count the difference, run one FedTAN round of
the switched app and compare it with centralised SGD on the pooled batch (pure PyTorch),
and check that the app's own handlers still serve FedAvg exactly as before.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, add_fedtan, fedtan_client_app, settings
from flwr_fedtan.protocol import wire
from flwr_fedtan.client import clear_live_rounds

from _grid import LocalGrid

APP_DIR = Path(__file__).resolve().parent / "dropin_app"
PACKAGE = APP_DIR / "dropin"
MAX_CHANGED_LINES = 15
NUM_NODES = 3
RUN_CONFIG = {"num-server-rounds": 1, "fraction-train": 1.0, "local-epochs": 1, "lr": 0.1, "batch-size": 32,
              "seed": 0}
# float64 model and data: the switched app's round equals centralised SGD to rounding.
TOLERANCE = 1e-10


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


@pytest.fixture(scope="module")
def dropin():
    """The app's modules (``dropin.*``), imported from tests/dropin_app."""
    sys.path.insert(0, str(APP_DIR))
    try:
        yield {name: importlib.import_module(f"dropin.{name}") for name in
               ("task", "fedavg_client_app", "fedavg_server_app", "fedtan_client_app", "fedtan_server_app")}
    finally:
        sys.path.remove(str(APP_DIR))
        for name in [n for n in sys.modules if n == "dropin" or n.startswith("dropin.")]:
            del sys.modules[name]


class RecordingGrid(LocalGrid):
    """A LocalGrid that keeps, per reply, the message type and the metric names."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies: list[tuple[str, dict]] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, message_id in zip(messages, ids):
            reply = self._replies.get(message_id)
            assert reply is not None and not reply.has_error(), reply.error if reply is not None else "no reply"
            metrics = reply.content.metric_records.get("metrics")
            self.replies.append((msg.metadata.message_type, dict(metrics) if metrics is not None else {}))
        return ids

    def metric_names(self, message_type: str) -> set[str]:
        return {name for kind, metrics in self.replies if kind == message_type for name in metrics}


def run_server(server_module, client_app, tmp_path: Path, name: str,
               separate_processes: bool = False) -> tuple[dict, RecordingGrid]:
    """The app's own ServerApp main on an in-process grid; the final model it saved."""
    grid = RecordingGrid(client_app, NUM_NODES, RUN_CONFIG, separate_processes=separate_processes)
    final = tmp_path / f"{name}.pt"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**RUN_CONFIG, "final-model": str(final)})
    server_module.main(grid, context)
    return torch.load(final), grid


def centralised_sgd_step(task) -> dict:
    """One plain SGD step of the app's ``Net`` on the pooled training data of all nodes
    (every node's batch is its whole training split at batch-size 32), pure PyTorch."""
    inputs, targets = [], []
    for partition_id in range(NUM_NODES):
        trainloader, _ = task.load_data(partition_id, NUM_NODES, RUN_CONFIG["batch-size"])
        assert len(trainloader) == 1  # one step per round: FedTAN's round is then centralised SGD
        x, y = trainloader.dataset.tensors
        inputs.append(x)
        targets.append(y)
    torch.manual_seed(RUN_CONFIG["seed"])  # the ServerApp's initial model
    net = task.Net()
    net.train()
    F.cross_entropy(net(torch.cat(inputs)), torch.cat(targets)).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= RUN_CONFIG["lr"] * p.grad
        # FedTAN's statistics pass (its default): the stepped model's BatchNorm statistics,
        # exact, over every node's examples (here all of them): precise-BN, done the plain way.
        # (num_batches_tracked ends at 1 either way: the pass leaves the step's count alone.)
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None
                module.reset_running_stats()
        net(torch.cat(inputs))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def max_abs_diff(expected: dict, actual: dict) -> float:
    assert expected.keys() == actual.keys()
    return max(float((expected[k].double() - actual[k].double()).abs().max()) for k in expected)


def changed_lines(before: Path, after: Path) -> tuple[int, int]:
    """(deleted, inserted) lines between two files, as ``git diff --stat`` counts them."""
    diff = list(difflib.unified_diff(before.read_text().splitlines(), after.read_text().splitlines(),
                                     lineterm="", n=0))
    body = [line for line in diff if not line.startswith(("---", "+++", "@@"))]
    return sum(line.startswith("-") for line in body), sum(line.startswith("+") for line in body)


# ---------------------------------------------------------------------- issue 16
def test_switching_the_app_to_fedtan_changes_at_most_15_lines():
    client = changed_lines(PACKAGE / "fedavg_client_app.py", PACKAGE / "fedtan_client_app.py")
    server = changed_lines(PACKAGE / "fedavg_server_app.py", PACKAGE / "fedtan_server_app.py")
    total = sum(client) + sum(server)
    print(f"\nchanged lines: client -{client[0]} +{client[1]}, server -{server[0]} +{server[1]}, total {total}")
    assert client[0] == 0, "the switch must not delete or edit any line of the user's ClientApp"
    assert 0 < total <= MAX_CHANGED_LINES, (client, server)


@pytest.mark.parametrize("separate_processes", [False, True], ids=["live", "replay"])
def test_one_fedtan_round_of_the_switched_app_equals_centralised_sgd(dropin, tmp_path, separate_processes):
    """The app's own ServerApp with FedTAN, the app's ClientApp with add_fedtan: one round
    (local-epochs 1, one batch per node) is one SGD step on the pooled batch; the lr comes
    from the round's train config, the batch size from the app's DataLoader; evaluation
    ran through the app's own evaluate handler. "replay": every message as in a fresh
    process, so the user's client_fn rebuilds the paused round each time."""
    final, grid = run_server(dropin["fedtan_server_app"], dropin["fedtan_client_app"].app, tmp_path, "fedtan",
                             separate_processes=separate_processes)
    diff = max_abs_diff(centralised_sgd_step(dropin["task"]), final)
    assert diff <= TOLERANCE, f"FedTAN round differs from centralised SGD by {diff:g}"
    kinds = {kind for kind, _ in grid.replies}
    assert kinds == {wire.MESSAGE_TYPE, "evaluate"}, kinds  # no plain "train" message
    assert {"eval_loss", "eval_acc", "num-examples"} <= grid.metric_names("evaluate")
    assert {"train-loss", "num-examples"} <= grid.metric_names(wire.MESSAGE_TYPE)
    replays = [m["replays"] for kind, m in grid.replies if kind == wire.MESSAGE_TYPE and "replays" in m]
    assert replays == [4.0 if separate_processes else 0.0] * NUM_NODES  # 2L = 4 aggregates, each replayed


def test_the_apps_own_handlers_still_serve_fedavg(dropin, tmp_path):
    """FedAvg on the switched ClientApp runs the user's train/evaluate handlers: the same
    final model as the original app, the user's metric names, no FedTAN message."""
    original, original_grid = run_server(dropin["fedavg_server_app"], dropin["fedavg_client_app"].app,
                                         tmp_path, "original")
    switched, grid = run_server(dropin["fedavg_server_app"], dropin["fedtan_client_app"].app, tmp_path, "switched")
    assert max_abs_diff(original, switched) <= 1e-12  # equal up to the order of the shuffled samples
    assert max_abs_diff(original, centralised_sgd_step(dropin["task"])) > 1e-3  # FedAvg is not FedTAN
    assert {kind for kind, _ in grid.replies} == {"train", "evaluate"}
    assert {"train_loss", "num-examples"} == grid.metric_names("train")
    assert {"eval_loss", "eval_acc", "num-examples"} == grid.metric_names("evaluate")
    assert [kind for kind, _ in grid.replies] == [kind for kind, _ in original_grid.replies]


def test_add_fedtan_before_or_after_the_users_handlers_and_as_a_call(dropin):
    """Registration order does not matter (Flower keeps a dict of handlers); the call form
    registers the same handler as the decorator; the user's handlers are the user's."""
    task = dropin["task"]

    def client_fn(context):
        trainloader, _ = task.load_data(context.node_config["partition-id"], 3, 32)
        return FedTANClient(task.Net(), trainloader)

    calls = []

    def user_train(msg, context):
        calls.append(msg.metadata.message_type)
        return Message(RecordDict(), reply_to=msg)

    first = ClientApp()
    assert add_fedtan(first, client_fn) is first
    first.train()(user_train)
    second = ClientApp()
    second.train()(user_train)
    assert add_fedtan(second)(client_fn) is client_fn
    for app in (first, second):
        assert app._registered_funcs.keys() == {"train.fedtan", "train.default"}
        grid = LocalGrid(app, 1, {})
        replies = grid.pull_messages(grid.push_messages([Message(RecordDict(), 1000, "train")]))
        assert not next(iter(replies)).has_error()
    assert calls == ["train", "train"]


def test_add_fedtan_refuses_what_it_cannot_extend(dropin):
    task = dropin["task"]

    def client_fn(context):
        return FedTANClient(task.Net(), task.load_data(0, 1, 8)[0])

    with pytest.raises(ValueError, match=r"legacy ClientApp\(client_fn=...\).*fedtan_client_app"):
        add_fedtan(ClientApp(client_fn=lambda context: client_fn(context).to_client()), client_fn)
    app = add_fedtan(ClientApp(), client_fn)
    with pytest.raises(ValueError, match="already handles 'train.fedtan'"):
        add_fedtan(app, client_fn)
    with pytest.raises(TypeError, match="needs a flwr.clientapp.ClientApp"):
        add_fedtan(object(), client_fn)
    with pytest.raises(ValueError, match="replay_store must be one of"):
        add_fedtan(ClientApp(), client_fn, replay_store="memory")
    with pytest.raises(ValueError, match="max_live_rounds must be an integer >= 0"):
        add_fedtan(ClientApp(), client_fn, max_live_rounds=-1)


# ---------------------------------------------------------------------- batch size rule
def _data(n=20, classes=3):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % classes)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))


def test_a_dataset_needs_an_explicit_batch_size():
    with pytest.raises(ValueError, match=r"TensorDataset, which carries no batch size: pass batch_size="):
        FedTANClient(_model(), _data())
    assert FedTANClient(_model(), _data(), batch_size=6).sample_batch(1)[0].shape[0] == 6


def test_a_dataloader_gives_its_batch_size_and_a_conflicting_one_is_refused():
    client = FedTANClient(_model(), DataLoader(_data(), batch_size=7, shuffle=True))
    assert client.batch_size == 7 and client.sample_batch(1)[0].shape[0] == 7
    assert FedTANClient(_model(), DataLoader(_data(), batch_size=7), batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="batch_size=8 but the DataLoader has batch_size=7"):
        FedTANClient(_model(), DataLoader(_data(), batch_size=7), batch_size=8)
    sampler_loader = DataLoader(_data(), batch_sampler=BatchSampler(SequentialSampler(range(20)), 5, False))
    with pytest.raises(ValueError, match="a DataLoader without a batch_size: pass batch_size="):
        FedTANClient(_model(), sampler_loader)
    assert FedTANClient(_model(), sampler_loader, batch_size=5).sample_batch(2)[0].shape[0] == 5
    # More than the data holds: the whole data set, each sample once.
    assert FedTANClient(_model(), _data(n=4), batch_size=32).sample_batch(0)[0].shape[0] == 4


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_batch_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="batch_size=.+: must be"):
        FedTANClient(_model(), _data(), batch_size=bad)


def test_tensors_and_iterables_are_refused_with_the_fix():
    x, y = _data().tensors
    with pytest.raises(TypeError, match=r"wrap them in torch.utils.data.TensorDataset"):
        FedTANClient(_model(), (x, y), batch_size=4)
    with pytest.raises(TypeError, match="map-style Dataset"):
        FedTANClient(_model(), iter([(x, y)]), batch_size=4)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

        def __len__(self):
            return len(x)

    with pytest.raises(TypeError, match="map-style Dataset .* got Stream"):
        FedTANClient(_model(), DataLoader(Stream(), batch_size=4))


class DictDataset(Dataset):
    """Samples as dictionaries, like a Hugging Face dataset with a transform."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, y = self.base[index]
        return {"img": x, "label": y}


def test_the_dataloaders_collate_fn_and_dict_batches():
    base = _data()
    with pytest.raises(TypeError, match=r"dictionaries \(keys \['img', 'label'\]\).*unpack_batch="):
        FedTANClient(_model(), DictDataset(base), batch_size=5).sample_batch(0)
    client = FedTANClient(_model(), DataLoader(DictDataset(base), batch_size=5),
                          unpack_batch=lambda b: (b["img"], b["label"]))
    reference = FedTANClient(_model(), base, batch_size=5)
    for seed in (0, 1):
        for got, want in zip(client.sample_batch(seed), reference.sample_batch(seed)):
            assert torch.equal(got, want)
    loss, count, metrics = client.evaluate(client.get_parameters({}), {})
    assert count == 20 and 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(loss)

    def doubling_collate(samples):
        x, y = torch.utils.data.default_collate(samples)
        return 2 * x, y

    doubled = FedTANClient(_model(), DataLoader(base, batch_size=5, collate_fn=doubling_collate))
    assert torch.equal(doubled.sample_batch(3)[0], 2 * reference.sample_batch(3)[0])


# ---------------------------------------------------------------------- options and overrides
def test_settings_arguments_defaults_and_environment_overrides(monkeypatch, tmp_path, caplog):
    for variable in (settings.REPLAY_STORE_ENV, settings.STATE_DIR_ENV, settings.MAX_LIVE_ROUNDS_ENV,
                     settings.STATE_MAX_AGE_ENV):
        monkeypatch.delenv(variable, raising=False)
    assert settings.state_max_age_hours() == 24.0 and settings.state_max_age_hours(5) == 5.0
    assert settings.replay_store() == "disk" and settings.replay_store("context") == "context"
    assert settings.max_live_rounds() is None and settings.max_live_rounds(0) == 0
    assert settings.state_dir() == settings.default_state_dir()
    assert settings.state_dir(tmp_path / "a") == tmp_path / "a"

    monkeypatch.setenv(settings.REPLAY_STORE_ENV, "context")
    monkeypatch.setenv(settings.MAX_LIVE_ROUNDS_ENV, "3")
    monkeypatch.setenv(settings.STATE_DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setenv(settings.STATE_MAX_AGE_ENV, "1.5")
    with caplog.at_level(logging.WARNING, logger="flwr_fedtan.settings"):
        assert settings.state_max_age_hours(5) == 1.5
        assert settings.replay_store("disk") == "context"  # the variable overrides the argument
        assert settings.max_live_rounds(0) == 3
        assert settings.state_dir(tmp_path / "a") == tmp_path / "env"
        assert settings.replay_store() == "context"
    assert "FEDTAN_REPLAY_STORE=context overrides the argument 'disk'" in caplog.text
    assert "FEDTAN_MAX_LIVE_ROUNDS=3 overrides the argument 0" in caplog.text

    monkeypatch.setenv(settings.REPLAY_STORE_ENV, "ram")
    with pytest.raises(ValueError, match="FEDTAN_REPLAY_STORE must be one of"):
        settings.replay_store()
    monkeypatch.setenv(settings.MAX_LIVE_ROUNDS_ENV, "many")
    with pytest.raises(ValueError, match="FEDTAN_MAX_LIVE_ROUNDS must be an integer >= 0, got 'many'"):
        settings.max_live_rounds()
    monkeypatch.setenv(settings.REPLAY_STORE_ENV, "")  # empty: not set
    assert settings.replay_store("context") == "context"


def _round_replays(app, **strategy_options) -> tuple[float, LocalGrid]:
    grid = LocalGrid(app, 2, {})
    result = FedTAN(statistics="running", min_available_nodes=2, fraction_evaluate=0.0, **strategy_options).start(
        grid, ArrayRecord(_model().double().state_dict()), num_rounds=1)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 2, metrics
    return metrics["replays"], grid


def _client_fn(context):
    base = _data(n=12)
    return FedTANClient(_model().double(), TensorDataset(base.tensors[0].double(), base.tensors[1]), batch_size=5)


def test_max_live_rounds_argument_and_its_override(monkeypatch):
    """``max_live_rounds=0``: every aggregate message replays; FEDTAN_MAX_LIVE_ROUNDS wins."""
    monkeypatch.delenv(settings.MAX_LIVE_ROUNDS_ENV, raising=False)
    bn_calls = 1
    assert _round_replays(fedtan_client_app(_client_fn, max_live_rounds=0))[0] == 2 * bn_calls
    assert _round_replays(fedtan_client_app(_client_fn))[0] == 0
    monkeypatch.setenv(settings.MAX_LIVE_ROUNDS_ENV, "4")
    assert _round_replays(fedtan_client_app(_client_fn, max_live_rounds=0))[0] == 0


@pytest.mark.parametrize("store", ["disk", "context"])
def test_state_dir_and_replay_store_arguments_and_their_overrides(monkeypatch, tmp_path, store):
    """Where the starting weights go during a round: the ``state_dir`` argument, unless
    FEDTAN_STATE_DIR is set; ``replay_store`` unless FEDTAN_REPLAY_STORE is set."""
    monkeypatch.delenv(settings.STATE_DIR_ENV, raising=False)
    monkeypatch.delenv(settings.REPLAY_STORE_ENV, raising=False)
    seen: list[tuple[str, ...]] = []

    def spy(node, msg):
        seen.append(tuple(sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.npz"))))
        return None

    def run(**options):
        seen.clear()
        grid = LocalGrid(fedtan_client_app(_client_fn, **options), 2, {}, intercept=spy)
        FedTAN(statistics="running", min_available_nodes=2, fraction_evaluate=0.0).start(
            grid, ArrayRecord(_model().double().state_dict()), num_rounds=1)
        return grid

    grid = run(state_dir=tmp_path / "argument", replay_store=store)
    during_round = set().union(*seen)
    if store == "disk":
        assert during_round == {"argument/replay/run-1/node-1000.npz", "argument/replay/run-1/node-1007.npz"}
    else:
        assert during_round == set()
    assert not list(tmp_path.rglob("*.npz"))  # removed at the end of the round
    assert all(not k.startswith("fedtan.weights") for c in grid.contexts.values() for k in c.state.keys())

    monkeypatch.setenv(settings.STATE_DIR_ENV, str(tmp_path / "environment"))
    monkeypatch.setenv(settings.REPLAY_STORE_ENV, "disk")
    run(state_dir=tmp_path / "argument", replay_store=store)
    assert set().union(*seen) == {"environment/replay/run-1/node-1000.npz", "environment/replay/run-1/node-1007.npz"}


# ---------------------------------------------------------------------- through Flower
@pytest.mark.slow
def test_switched_app_through_flower_simulation_equals_centralised_sgd(dropin, tmp_path):
    """``flwr run tests/dropin_app`` (Ray simulation, private SuperLink): one FedTAN round
    of the switched app equals centralised SGD on the pooled batch; its own evaluate ran."""
    from simulations.flower_processes import FlowerProcesses

    final = tmp_path / "final.pt"
    flower = FlowerProcesses(tmp_path / "flower")
    try:
        flower.add_connection("dropin", flower.start_superlink(simulation=True))
        outcome = flower.run_app(APP_DIR, connection="dropin", run_config={"final-model": str(final)},
                                 federation_config={"num-supernodes": NUM_NODES, "client-resources-num-cpus": 2,
                                                    "init-args-num-cpus": 2}, timeout=180)
    finally:
        flower.stop()
    assert not flower.remaining()
    assert outcome.status == "finished:completed", f"{outcome.status} {outcome.details}\n{outcome.output[-6000:]}"
    diff = max_abs_diff(centralised_sgd_step(dropin["task"]), torch.load(final))
    assert diff <= TOLERANCE, f"FedTAN round through Flower differs from centralised SGD by {diff:g}"
    print(f"\nflwr run of the switched app: {outcome.wall_seconds:.1f}s wall, max |diff| {diff:.2e}")
    assert "'fedtan-exchanges': 5" in outcome.output  # 2 BatchNorm calls: 2L + 1 exchanges
    assert "eval_acc" in outcome.output  # the app's own evaluate handler served FedTAN's evaluation
