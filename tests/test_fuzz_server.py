"""Seeded fuzzing of FedTAN's server side through the real strategy and Flower's round loop.

The clients are NumPy stand-ins that speak FedTAN's wire protocol exactly (the real
``wire`` encoders and decoders, the real ``secure`` masking): their statistics are
random but well-formed, their models the global one plus a little noise. In every case
one reply of one node (chosen at random: a key, a forward or backward payload, masked or
clear, the final model and metrics, or a reply in the statistics pass after the round) is
mutated once: a field deleted, replaced by a
value of another type, NaN, Inf, a huge or negative number, an array of another dtype or
shape, an unknown field or record added, the whole reply turned into an error, or no reply
at all. The run must never end with an exception, the global model must stay finite and
bounded, and every drop must name a node of the round and give a reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.serverapp.strategy import FedAdam

from flwr_fedtan import FedTAN, secure
from flwr_fedtan.protocol import wire
from flwr_fedtan.aggregation import BackwardSums, ForwardStats, SyncPoint

from _grid import LocalGrid

SEED = 22
CASES = 2000
NODES = [1000, 1007, 1014]
CHANNELS = [4, 3]  # two BatchNorm calls
POSITIONS = [9, 1]  # values per example at each call (a 3x3 map, then a vector)
EXAMPLES = {1000: 5, 1007: 8, 1014: 11}


def initial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)),
        "fc.weight": rng.normal(size=(3, 4)),
        "head.bias": np.zeros(2),
    }
    for i, channels in enumerate(CHANNELS):
        arrays.update({f"bn{i}.weight": np.ones(channels), f"bn{i}.bias": np.zeros(channels),
                       f"bn{i}.running_mean": np.zeros(channels), f"bn{i}.running_var": np.ones(channels)})
    out = {k: v.astype(np.float32) for k, v in arrays.items()}
    out.update({f"bn{i}.num_batches_tracked": np.array(0, dtype=np.int64) for i in range(len(CHANNELS))})
    return out


# ---------------------------------------------------------------------- honest stand-in clients
@dataclass
class FakeClient:
    """One node's side of the protocol, in NumPy."""

    node: int
    rng: np.random.Generator
    key: Optional[secure.KeyPair] = None
    roster: Optional[secure.Roster] = None
    shifts: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    round: int = 0
    attempt: int = 0
    received: int = 0
    lengths: list = field(default_factory=list)  # of the masked payloads sent in the attempt
    in_pass: bool = False  # answering the statistics pass (forward only), not a round

    def handle(self, content: RecordDict) -> RecordDict:
        control = wire.decode_control(content)  # the clients' own checks of server messages
        if control.phase in (wire.PHASE_KEYS, wire.PHASE_STATS_KEYS):
            self.key = secure.generate_key_pair()
            return wire.encode_public_key(control.round, self.key.public)
        if control.phase == wire.PHASE_BLAME:  # reveal the canary masks of a payload it sent
            if not 0 <= control.exchange < len(self.lengths) or self.lengths[control.exchange] != control.length:
                raise RuntimeError(f"blame for exchange {control.exchange} of length {control.length}")
            masks = secure.canary_masks(self.key.private, self.node, self.roster, self.round, self.attempt,
                                        control.exchange, control.length)
            return wire.encode_canary_masks(self.round, masks)
        if control.phase in (wire.PHASE_BEGIN, wire.PHASE_STATS_BEGIN):
            self.round, self.attempt, self.received, self.lengths = control.round, control.attempt, 0, []
            self.roster, self.shifts = control.roster, control.shifts or {}
            self.in_pass = control.phase == wire.PHASE_STATS_BEGIN
            if not self.in_pass:
                self.model = {k: v.numpy() for k, v in content.array_records[wire.ARRAYS].items()}
        else:
            if control.point != self.received:
                raise RuntimeError(f"aggregate {control.point}, expected {self.received}")
            self.received += 1
        if self.in_pass and self.received == len(CHANNELS):
            buffers = {f"bn{i}.running_{kind}": (kind, [i]) for i in range(len(CHANNELS)) for kind in ("mean", "var")}
            return wire.encode_stats_done(self.round, buffers, EXAMPLES[self.node])
        if self.received == 2 * len(CHANNELS):
            return self.done()
        return self.request()

    def request(self) -> RecordDict:
        index, layers = self.received, len(CHANNELS)
        call = index if index < layers else 2 * layers - 1 - index
        channels = CHANNELS[call]
        if index < layers:
            n = EXAMPLES[self.node]
            payload: Any = ForwardStats(count=float(n * POSITIONS[call]), num_examples=n,
                                        mean=self.rng.normal(size=channels), var=self.rng.uniform(0.5, 2, channels))
            phase = "forward"
        else:
            payload = BackwardSums(sum_grad=self.rng.normal(0, 0.1, channels),
                                   sum_grad_xhat=self.rng.normal(0, 0.1, channels))
            phase = "backward"
        point = SyncPoint(index, phase, call, channels)
        if self.roster is not None:
            shift = secure.shift_for(self.shifts, index, channels) if phase == "forward" else None
            payload = secure.client_encode(payload, node_id=self.node, private_key=self.key.private,
                                           roster=self.roster, round=self.round, attempt=self.attempt,
                                           exchange=self.received, shift=shift)
            self.lengths = self.lengths[:self.received] + [payload.masked.shape[1]]
        return wire.encode_request(self.round, 0, point, payload)

    def done(self) -> RecordDict:
        trained = {}
        for key, value in self.model.items():
            if value.dtype.kind == "f":
                noise = self.rng.normal(0, 0.01, value.shape).astype(value.dtype)
                trained[key] = np.abs(value + noise) if key.endswith("running_var") else value + noise
            else:
                trained[key] = np.asarray(value + 1, dtype=value.dtype)
        metrics = MetricRecord({"num-examples": EXAMPLES[self.node], "train-loss": float(self.rng.uniform(0, 2))})
        return wire.encode_done(self.round, ArrayRecord({k: Array(v) for k, v in trained.items()}), metrics)


# ---------------------------------------------------------------------- mutations
_CONFIG_VALUES = [-1, 0, 1, 2**62, -(2**62), 1.5, float("nan"), float("inf"), -float("inf"), 1e308, -1e300,
                  "x", "", True, False, b"\x00", [1, 2], [1.0], ["a"]]
_METRIC_VALUES = [-1, 0, 2**62, 1.5, float("nan"), float("inf"), -float("inf"), 1e308, 1e160, [1.0, 2.0], [1]]


def _mutated_array(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    choice = int(rng.integers(12))
    flat = value.astype(np.float64).ravel() if value.dtype.kind in "fiub" else np.zeros(1)
    if choice < 5 and value.size:
        out = value.copy()
        special = [np.nan, np.inf, -np.inf, 1e300, 1e160][choice] if value.dtype.kind == "f" else \
            [0, 2**63 - 1, -1, 255, 7][choice]
        try:
            with np.errstate(over="ignore"):  # 1e300 in a float32 array becomes Inf: also a mutation
                out.flat[int(rng.integers(value.size))] = special
        except (OverflowError, ValueError):
            out = out.astype(np.float64)
            out.flat[0] = special
        return out
    if choice == 5:
        return value.astype(np.float32)
    if choice == 6:
        return value.astype(np.int64) if value.dtype.kind == "f" else value.astype(np.float64)
    if choice == 7:
        return flat[:-1] if flat.size > 1 else np.zeros(0)
    if choice == 8:
        return np.concatenate([flat, flat])
    if choice == 9:
        return flat.reshape(1, -1)
    if choice == 10:
        return np.full(value.shape, float(rng.choice([2e19, -3e38, 1e30, 6e4])), dtype=value.dtype) \
            if value.dtype.kind == "f" else np.zeros_like(value)
    return np.frombuffer(rng.bytes(max(8, value.nbytes)), dtype=np.uint8).copy()


def mutate(content: RecordDict, rng: np.random.Generator) -> str:
    """Change one thing of a reply; returns what was done."""
    records = list(content.keys())
    action = int(rng.integers(10))
    if action == 0 and records:
        name = str(rng.choice(records))
        del content[name]
        return f"deleted record {name}"
    if action == 1:
        content[str(rng.choice(["fedtan.extra", wire.STATS, wire.SECURE, wire.ARRAYS]))] = ArrayRecord(
            {"junk": Array(np.arange(3.0))})
        return "added or replaced an array record"
    if action == 2:
        content[str(rng.choice(["fedtan.other", wire.STATUS, wire.METRICS]))] = ConfigRecord({"phase": "done"})
        return "added or replaced a config record"
    name = str(rng.choice(records))
    record = content[name]
    keys = list(record.keys())
    if isinstance(record, ArrayRecord):
        if not keys or action == 3:
            record[f"unknown-{action}"] = Array(np.zeros(2))
            return f"{name}: unknown array added"
        key = str(rng.choice(keys))
        if action == 4:
            del record[key]
            return f"{name}.{key}: deleted"
        record[key] = Array(_mutated_array(record[key].numpy(), rng))
        return f"{name}.{key}: array mutated"
    values = _METRIC_VALUES if isinstance(record, MetricRecord) else _CONFIG_VALUES
    if not keys or action == 3:
        record[f"unknown-{action}"] = values[int(rng.integers(len(values)))]
        return f"{name}: unknown field added"
    key = str(rng.choice(keys))
    if action == 4:
        del record[key]
        return f"{name}.{key}: deleted"
    try:
        record[key] = values[int(rng.integers(len(values)))]
    except (TypeError, ValueError):  # a type the record cannot hold
        del record[key]
    return f"{name}.{key}: replaced"


class FuzzedFederation:
    """The stand-in clients behind the tests' in-process Grid; one node's ``target``-th
    reply is mutated (or turned into an error, or never sent)."""

    def __init__(self, rng: np.random.Generator, target: Optional[tuple[int, int]]):
        self.rng = rng
        self.clients = {n: FakeClient(n, np.random.default_rng(int(rng.integers(2**32)))) for n in NODES}
        self.target = target
        self.replies = {n: 0 for n in NODES}
        self.mutation = ""
        self.grid = LocalGrid(self.app, len(NODES), {}, node_ids=list(NODES), intercept=self.intercept)

    def intercept(self, node: int, msg: Message):
        if self.target == (node, self.replies[node]) and self.rng.random() < 0.03:
            self.replies[node] += 1
            self.mutation = "no reply"
            return False
        return None

    def app(self, msg: Message, context) -> Message:
        node = context.node_id
        index = self.replies[node]
        self.replies[node] += 1
        content = self.clients[node].handle(msg.content)
        if self.target == (node, index):
            if self.rng.random() < 0.04:
                self.mutation = "error reply"
                return Message(Error(code=0, reason="client failed " * 100), reply_to=msg)
            self.mutation = mutate(content, self.rng)
        return Message(content, reply_to=msg)


# ---------------------------------------------------------------------- the fuzz test
def test_fuzzed_replies_never_crash_the_server_nor_poison_the_model(capsys):
    rng = np.random.default_rng(SEED)
    start = initial_arrays()
    # FedTAN(max_growth=1e6)'s bound: 1e6 times the array's scale, squared for running variances.
    bound = {k: 1e6 * (1e6 if k.endswith("running_var") else 1.0) * max(1.0, float(np.abs(v).max()))
             for k, v in start.items()}
    counts = {"cases": 0, "crashes": 0, "poisoned": 0, "unnamed drops": 0, "drops": 0, "drops of the mutated node": 0,
              "other nodes dropped": 0, "skipped rounds": 0, "secure cases": 0, "unmutated cases": 0}
    failures = []
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    flower_logger.setLevel(logging.CRITICAL)
    began = time.perf_counter()
    try:
        for case in range(CASES):
            secure_stats = bool(rng.random() < 0.5)
            # The round (2L + 1 exchanges), then the statistics pass (L + 1), each with its key exchange if secure.
            messages_per_node = 2 * len(CHANNELS) + 1 + len(CHANNELS) + 1 + 2 * int(secure_stats)
            target = None if case % 50 == 0 else (int(rng.choice(NODES)), int(rng.integers(messages_per_node)))
            federation = FuzzedFederation(rng, target)
            wrapped = FedAdam(eta=0.01, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2) \
                if rng.random() < 0.25 else None
            options = {"strategy": wrapped} if wrapped else {"fraction_evaluate": 0.0, "min_available_nodes": 3,
                                                              "min_train_nodes": 2}
            strategy = FedTAN(**options, secure_stats=secure_stats, exchange_timeout=0.05, poll_interval=0.001,
                              seed=case)
            counts["cases"] += 1
            counts["secure cases"] += secure_stats
            counts["unmutated cases"] += target is None
            try:
                result = strategy.start(federation.grid, ArrayRecord({k: Array(v) for k, v in start.items()}),
                                        num_rounds=1)
            except Exception as error:  # noqa: BLE001 - what the test counts
                counts["crashes"] += 1
                failures.append((case, federation.mutation, f"crash: {type(error).__name__}: {error}"))
                continue
            final = {k: v.numpy() for k, v in result.arrays.items()}
            if set(final) != set(start) or any(
                not np.isfinite(v).all() or np.abs(v.astype(np.float64)).max() > bound[k] for k, v in final.items()
            ):
                counts["poisoned"] += 1
                failures.append((case, federation.mutation, "non-finite or unbounded global model"))
            dropped = strategy.dropped.get(1, {})
            counts["skipped rounds"] += int(result.train_metrics_clientapp.get(1, {}).get("fedtan-skipped", 0))
            for node, reason in dropped.items():
                counts["drops"] += 1
                if node not in NODES or not isinstance(reason, str) or not reason.strip():
                    counts["unnamed drops"] += 1
                    failures.append((case, federation.mutation, f"drop without node or reason: {node!r}: {reason!r}"))
                if target is not None and node == target[0]:
                    counts["drops of the mutated node"] += 1
                else:
                    counts["other nodes dropped"] += 1
                    failures.append((case, federation.mutation, f"node {node} dropped, {target} mutated: {reason}"))
            if target is None and (dropped or result.train_metrics_clientapp[1]["fedtan-clients"] != 3):
                failures.append((case, "none", f"an unmutated round lost clients: {dropped}"))
    finally:
        flower_logger.setLevel(level)
    counts["seconds"] = round(time.perf_counter() - began, 1)
    with capsys.disabled():
        print(f"\nFedTAN server fuzz (seed {SEED}): {counts}")
    assert not failures, failures[:10]
    assert counts["crashes"] == counts["poisoned"] == counts["unnamed drops"] == 0
    assert counts["other nodes dropped"] == 0  # every drop named the node whose reply was mutated
    assert counts["drops of the mutated node"] > CASES // 4  # the mutations do bite
