"""Bit-identical reruns: the server's reductions do not depend on node ids or reply order.

Flower draws node ids at random in every ``flwr run``; the server adds contributions up in
canonical order (:mod:`flwr_fedtan.ordering`), so the same seed gives the same model byte
for byte. The end-to-end reruns through Flower's runtimes are in tests/test_e2e_flower.py.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, convert_batchnorm, fedtan_client_app
from flwr_fedtan.aggregation import BackwardSums, ForwardStats, aggregate_arrays, pool_forward_stats, sum_backward_sums
from flwr_fedtan.client import clear_live_rounds

from _grid import LocalGrid
from _runtime_app import SmallNet, client_data

NODES = 4
BATCH_SIZES = [5, 8, 11, 7]
IN_ORDER = [1000 + 7 * i for i in range(NODES)]  # partition i on the i-th smallest node id
REVERSED = list(reversed(IN_ORDER))  # partition i on the i-th largest
SHUFFLED = [88_001, 12, 5_000_000_017, 640]


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


def float_client(context) -> FedTANClient:
    """A float32 client (float64 would hide most reordering differences)."""
    partition = int(context.node_config["partition-id"])
    data = client_data(partition)
    x, y = data.tensors
    torch.manual_seed(999)
    return FedTANClient(SmallNet(), TensorDataset(x.float(), y), batch_size=BATCH_SIZES[partition], lr=0.1,
                        local_steps=2)


class ShuffledRepliesGrid(LocalGrid):
    """Replies come back in a random order (as they do from real nodes)."""

    def __init__(self, *args, order_seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._order = random.Random(order_seed)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self._order.shuffle(replies)
        return replies


def digest(arrays: ArrayRecord) -> str:
    h = hashlib.sha256()
    for key, value in sorted(arrays.to_torch_state_dict().items()):
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def run(node_ids, *, seed=0, wrapped=None, order_seed=0, evaluate=False, **options):
    clear_live_rounds()
    grid = ShuffledRepliesGrid(fedtan_client_app(float_client), NODES, {}, node_ids=node_ids, order_seed=order_seed)
    torch.manual_seed(0)
    initial = ArrayRecord(convert_batchnorm(SmallNet()).state_dict())
    fraction_evaluate = 1.0 if evaluate else 0.0
    if wrapped is None:
        strategy = FedTAN(seed=seed, min_available_nodes=NODES, fraction_evaluate=fraction_evaluate, **options)
    else:
        strategy = FedTAN(strategy=wrapped(fraction_evaluate), seed=seed, **options)
    result = strategy.start(grid, initial, num_rounds=2)
    return digest(result.arrays), result


CASES = {
    "fedavg": dict(),
    "fedadam": dict(wrapped=lambda fe: FedAdam(eta=0.02, fraction_evaluate=fe, min_available_nodes=NODES)),
    "running-statistics-2-sync-steps": dict(statistics="running", sync_steps=2),
    "secure-stats": dict(secure_stats=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_node_ids_and_reply_order_do_not_change_the_model(case):
    options = CASES[case]
    first, _ = run(IN_ORDER, **options)
    assert run(REVERSED, order_seed=1, **options)[0] == first
    assert run(SHUFFLED, order_seed=2, **options)[0] == first
    assert run(IN_ORDER, seed=1, **options)[0] != first  # the seed does decide the model


def test_evaluation_metrics_do_not_depend_on_node_ids():
    _, a = run(IN_ORDER, evaluate=True)
    _, b = run(SHUFFLED, order_seed=3, evaluate=True)
    assert a.evaluate_metrics_clientapp and a.evaluate_metrics_clientapp == b.evaluate_metrics_clientapp
    assert a.train_metrics_clientapp[2]["train-loss"] == b.train_metrics_clientapp[2]["train-loss"]


# ------------------------------------------------------------------------ the pure functions
# Values whose float sum depends on the order: (1e16 + 1) - 1e16 = 0 but (1e16 - 1e16) + 1 = 1.
ORDER_SENSITIVE = [1e16, 1.0, -1e16, 3.0]


def _permutations_of(mapping: dict) -> list[dict]:
    keys = list(mapping)
    orders = [keys, keys[::-1], keys[1:] + keys[:1], [keys[i] for i in (2, 0, 3, 1)]]
    return [{k: mapping[k] for k in order} for order in orders]


def test_pooled_statistics_and_sums_are_the_same_in_any_client_order():
    stats = {f"client-{i}": ForwardStats(count=2.0, num_examples=2, mean=np.array([v, -v]), var=np.array([1.0, 2.0]))
             for i, v in enumerate(ORDER_SENSITIVE)}
    pooled = [pool_forward_stats(p) for p in _permutations_of(stats)]
    assert all(p.mean.tobytes() == pooled[0].mean.tobytes() and p.var.tobytes() == pooled[0].var.tobytes()
               for p in pooled)
    # Without the canonical order these sums would differ: the values were chosen so.
    naive = {float(np.sum([s.mean[0] for s in p.values()])) for p in _permutations_of(stats)}
    assert len(naive) > 1

    sums = {i: BackwardSums(sum_grad=np.array([v]), sum_grad_xhat=np.array([-v]))
            for i, v in enumerate(ORDER_SENSITIVE)}
    summed = [sum_backward_sums(p) for p in _permutations_of(sums)]
    assert all(s.sum_grad.tobytes() == summed[0].sum_grad.tobytes() for s in summed)


def test_model_average_is_the_same_in_any_client_order():
    models = {i: ({"w": np.array([v], dtype=np.float64), "bn.num_batches_tracked": np.array(i, dtype=np.int64)}, 1.0)
              for i, v in enumerate(ORDER_SENSITIVE)}
    averages = [aggregate_arrays(p) for p in _permutations_of(models)]
    assert all(a["w"].tobytes() == averages[0]["w"].tobytes() for a in averages)
    assert averages[0]["bn.num_batches_tracked"].dtype == np.int64


def test_wrapped_strategy_sees_replies_in_canonical_order():
    """FedAvg adds replies up in the order it gets them: FedTAN gives them in content order."""
    from flwr.app import Message, RecordDict

    from flwr_fedtan.round_models import canonical_replies

    def reply(value: float, node: int) -> Message:
        content = RecordDict({"metrics": MetricRecord({"loss": value, "num-examples": 3})})
        message = Message(content=content, dst_node_id=node, message_type="evaluate")
        return message

    replies = [reply(v, 10 + i) for i, v in enumerate(ORDER_SENSITIVE)]
    expected = [m.content["metrics"]["loss"] for m in canonical_replies(replies)]
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        again = canonical_replies([replies[i] for i in order])
        assert [m.content["metrics"]["loss"] for m in again] == expected
    aggregated = {FedAvg().aggregate_evaluate(1, canonical_replies([replies[i] for i in order]))["loss"]
                  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1])}
    assert len(aggregated) == 1
