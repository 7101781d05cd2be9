"""A node's side of the exchanges (flwr_fedtan.node.session): what it checks once per node,
what it keeps in its state between messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flwr_fedtan import FedTAN, FedTANClient, client as client_module, fedtan_client_app
from flwr_fedtan.protocol import wire
from flwr_fedtan.client import clear_live_rounds
from flwr_fedtan.errors import ClientDataError, ServerMessageError

from _grid import LocalGrid
from _runtime_app import SmallNet, client_data, initial_arrays


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(tmp_path))
    clear_live_rounds()
    yield
    clear_live_rounds()


def make_client(context) -> FedTANClient:
    torch.manual_seed(999)
    return FedTANClient(SmallNet().double(), client_data(int(context.node_config["partition-id"])), batch_size=6,
                        lr=0.1)


def counting_checks(monkeypatch) -> list:
    calls = []
    real = client_module.check_training_data

    def check(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "check_training_data", check)
    return calls


def test_training_data_is_checked_once_per_node_not_at_every_replayed_message(monkeypatch):
    """Every message lands in a 'fresh process' (live rounds forgotten, so each one rebuilds
    the client and replays), yet the data of each node is scanned once; a client built
    outside a node's handler is checked every time."""
    calls = counting_checks(monkeypatch)
    grid = LocalGrid(fedtan_client_app(make_client), 3, {})
    messages = []
    real_push = grid.push_messages

    def push(batch):
        batch = list(batch)
        messages.extend(batch)
        ids = []
        for message in batch:
            client_module.live_rounds().clear()  # every message replays (the checks' memory stays)
            ids.extend(real_push([message]))
        return ids

    grid.push_messages = push
    strategy = FedTAN(statistics="running", min_available_nodes=3, fraction_evaluate=0.0)
    strategy.start(grid, initial_arrays(), num_rounds=1)
    assert len(messages) > 3 * 4  # begin and several aggregates per node
    assert len(calls) == 3  # once per node

    context = Context(run_id=1, node_id=1000, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    make_client(context)
    make_client(context)
    assert len(calls) == 5  # direct constructions: always checked


def test_a_node_whose_data_holds_nan_is_refused_with_the_same_message():
    def bad_client(context):
        data = client_data(0)
        data.tensors[0][3, 0] = float("nan")
        return FedTANClient(SmallNet().double(), data, batch_size=6)

    app = fedtan_client_app(bad_client)
    context = Context(run_id=1, node_id=42, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    begin = Message(wire.encode_begin(initial_arrays(), ConfigRecord({}), 1, 1, 3), 42, wire.MESSAGE_TYPE,
                    group_id="1")
    begin.metadata.__dict__["_message_id"] = "m"
    for _ in range(2):  # refused at every message, not only the first
        with pytest.raises(ClientDataError, match=r"node 42: FedTANClient: train_data holds NaN or infinite inputs"):
            app(begin, context)


def _deliver(app, content: RecordDict, context: Context) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    message = Message(content, 5, wire.MESSAGE_TYPE, group_id="1")
    message.metadata.__dict__["_message_id"] = "m"
    return app(message, context)


def _begin(round_no: int, run_seed: int, attempt: int = 0) -> RecordDict:
    return wire.encode_begin(initial_arrays(), ConfigRecord({}), round_no, 1, run_seed, attempt)


def test_the_node_derives_its_batch_seed_from_the_run_seed_round_and_attempt():
    """The batch of the first synchronised step is the one drawn from
    derive_seed(derive_seed(derive_seed(run seed, round, attempt), node key), step 0)."""
    from flwr_fedtan.seeds import derive_seed

    app = fedtan_client_app(make_client)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    reply = _deliver(app, _begin(4, 17, attempt=2), context)
    mean = reply.content.array_records[wire.STATS]["mean"].numpy()
    client = make_client(context)
    client.load_arrays(initial_arrays())
    inputs, _ = client.sample_batch(derive_seed(derive_seed(derive_seed(17, 4, 2), 1), 0))
    with torch.no_grad():
        expected = client.model.conv1(inputs).mean(dim=(0, 2, 3)).numpy()  # SmallNet: conv1 feeds bn1
    assert abs(mean - expected).max() < 1e-12
    other, _ = client.sample_batch(derive_seed(derive_seed(derive_seed(17, 4, 1), 1), 0))  # another attempt
    with torch.no_grad():
        assert abs(mean - client.model.conv1(other).mean(dim=(0, 2, 3)).numpy()).max() > 1e-6


def test_a_begin_with_another_run_seed_or_a_stale_attempt_or_round_is_refused_by_name():
    app = fedtan_client_app(make_client)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    _deliver(app, _begin(1, 3), context)
    with pytest.raises(ServerMessageError, match="run seed 4, but this node's run began with run seed 3"):
        _deliver(app, _begin(2, 4), context)
    with pytest.raises(ServerMessageError, match="round 1, attempt 0, but this node already began attempt 0"):
        _deliver(app, _begin(1, 3, attempt=0), context)
    _deliver(app, _begin(1, 3, attempt=1), context)  # a restart goes forward
    _deliver(app, _begin(2, 3), context)
    with pytest.raises(ServerMessageError, match="round 1, but this node already began round 2"):
        _deliver(app, _begin(1, 3, attempt=5), context)
    stats_begin = wire.encode_stats_begin(initial_arrays(), 2, 9, 4)
    with pytest.raises(ServerMessageError, match="stats-begin of round 2 with run seed 9"):
        _deliver(app, stats_begin, context)


def test_an_aggregate_for_a_round_the_node_finished_is_refused_by_name():
    """A round that replied ``done`` dropped its replay log: a late aggregate that claims the
    next point of it is a ServerMessageError naming the node, not a crash on the missing log."""
    import numpy as np

    from flwr_fedtan.aggregation import ForwardStats, SyncPoint
    from flwr_fedtan.node import state

    grid = LocalGrid(fedtan_client_app(make_client), 2, {})
    FedTAN(statistics="running", min_available_nodes=2, fraction_evaluate=0.0).start(
        grid, initial_arrays(), num_rounds=1)
    node = grid.node_ids[0]
    context = grid.contexts[node]
    finished = state.load(context).round
    assert finished is not None and finished.round == 1 and finished.log is None
    pooled = ForwardStats(count=12.0, num_examples=12, mean=np.zeros(4), var=np.ones(4))
    late = wire.encode_aggregate(1, 0, finished.received, SyncPoint(finished.received, "forward", 0, 4), pooled,
                                   1, 0)
    with pytest.raises(ServerMessageError, match=f"node {node}: aggregate of round 1, which this node has already "
                                                 "finished"):
        _deliver(fedtan_client_app(make_client), late, context)
