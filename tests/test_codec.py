"""One encoding of FedTAN's payloads (flwr_fedtan.protocol.codec) for the wire and the node's
replay log: every payload type survives both bit for bit, and a corrupt log entry is refused
with the same error class, for the same reason, as the same corruption in a message."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from flwr_fedtan import secure
from flwr_fedtan.protocol import wire
from flwr_fedtan.aggregation import BackwardSums, ForwardStats, SyncPoint
from flwr_fedtan.node import state as node_state
from flwr_fedtan.node.state import NodeState, ReplayLog, RoundProgress, SecureKey
from flwr_fedtan.errors import ServerMessageError

CHANNELS = 5
RNG = np.random.default_rng(7)


def forward() -> ForwardStats:
    return ForwardStats(count=96.0, num_examples=12, mean=RNG.normal(size=CHANNELS), var=RNG.random(CHANNELS) + 0.1)


def backward() -> BackwardSums:
    return BackwardSums(sum_grad=RNG.normal(size=CHANNELS), sum_grad_xhat=RNG.normal(size=CHANNELS))


def same(a, b) -> bool:
    """Equal type, scalars and arrays, bit for bit (dtype included)."""
    if type(a) is not type(b):
        return False
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            if value.dtype != other.dtype or value.tobytes() != np.asarray(other).tobytes():
                return False
        elif value != other:
            return False
    return True


def point_of(aggregate, index: int = 0) -> SyncPoint:
    phase = "forward" if isinstance(aggregate, ForwardStats) else "backward"
    return SyncPoint(index, phase, index, CHANNELS)


def through_wire(aggregate):
    """Server -> client: the aggregate of an ``aggregate`` message."""
    content = wire.encode_aggregate(3, 0, 0, point_of(aggregate), aggregate, 1, 11)
    return wire.decode_control(content).aggregate


def through_log(aggregates):
    log = ReplayLog()
    for index, aggregate in enumerate(aggregates):
        log.append(index, aggregate)
    return log.read(len(aggregates), "test log")


def test_aggregates_round_trip_through_the_wire_and_the_replay_log():
    aggregates = [forward(), backward(), forward(), backward()]
    assert all(same(through_wire(a), a) for a in aggregates)
    assert all(same(b, a) for a, b in zip(aggregates, through_log(aggregates)))


def test_aggregates_round_trip_through_the_stored_node_state():
    """The log as it rides in ``context.state`` between two messages (another process
    rebuilds the round from it)."""
    aggregates = [forward(), backward()]
    node = NodeState(round=RoundProgress(round=2, seed=5, sync_steps=1, local_steps=1))
    for index, aggregate in enumerate(aggregates):
        node.round.log.append(index, aggregate)
    node.round.received = len(aggregates)
    context = Context(run_id=1, node_id=4, node_config={}, state=RecordDict(), run_config={})
    node_state.store(context, node)
    loaded = node_state.load(context).round
    assert loaded.received == 2 and (loaded.round, loaded.seed) == (2, 5)
    assert all(same(b, a) for a, b in zip(aggregates, loaded.log.read(2, "stored log")))


@pytest.mark.parametrize("payload", [forward(), backward()], ids=["forward", "backward"])
def test_client_payloads_round_trip_through_the_wire(payload):
    content = wire.encode_request(3, 0, point_of(payload), payload)
    status = wire.decode_reply(content, sender=9, weighted_by_key="num-examples")
    assert same(status.payload, payload)


def _keys(count: int = 3) -> tuple[dict, dict]:
    pairs = {node: secure.generate_key_pair() for node in range(1, count + 1)}
    return pairs, {node: pair.public for node, pair in pairs.items()}


@pytest.mark.parametrize("make", [forward, backward], ids=["forward", "backward"])
def test_masked_payloads_round_trip_through_the_wire(make):
    pairs, public = _keys()
    roster = secure.Roster.from_keys(public)
    payload = make()
    shift = RNG.normal(size=CHANNELS) if isinstance(payload, ForwardStats) else None
    masked = secure.client_encode(payload, node_id=1, private_key=pairs[1].private, roster=roster, round=3,
                                  attempt=0, exchange=0, shift=shift)
    content = wire.encode_request(3, 0, point_of(payload), masked)
    decoded = wire.decode_reply(content, sender=1, weighted_by_key="num-examples").payload
    assert same(decoded, masked)


def test_rosters_and_shifts_round_trip_through_the_wire_and_the_node_state():
    _, public = _keys(4)
    roster = secure.Roster.from_keys(public)
    shifts = {0: RNG.normal(size=CHANNELS), 2: RNG.normal(size=3)}
    arrays = ArrayRecord({"w": Array(np.zeros(2))})
    control = wire.decode_control(wire.encode_begin(arrays, ConfigRecord(), 3, 1, 11, 1, roster, shifts))
    context = Context(run_id=1, node_id=4, node_config={}, state=RecordDict(), run_config={})
    node_state.store(context, NodeState(round_key=SecureKey(round=3, private_key=b"k" * 32, attempt=1, begun=1,
                                                            roster=roster, shifts=shifts)))
    stored = node_state.load(context).round_key
    for decoded_roster, decoded_shifts in ((control.roster, control.shifts), (stored.roster, stored.shifts)):
        assert decoded_roster == roster
        assert sorted(decoded_shifts) == [0, 2]
        assert all(decoded_shifts[i].tobytes() == shifts[i].tobytes() for i in shifts)


# ---------------------------------------------------------------------- corruption
def _nan(arrays: dict) -> None:
    name = next(iter(arrays))
    value = arrays[name].copy()
    value[1] = np.nan
    arrays[name] = value


def _float32(arrays: dict) -> None:
    name = next(iter(arrays))
    arrays[name] = arrays[name].astype(np.float32)


def _missing(arrays: dict) -> None:
    del arrays[next(reversed(list(arrays)))]


def _short(arrays: dict) -> None:
    name = next(reversed(list(arrays)))
    arrays[name] = arrays[name][:-1]


CORRUPTIONS = {
    "nan": (_nan, "contains NaN or Inf"),
    "float32": (_float32, "has dtype float32"),
    "missing array": (_missing, "holds"),
    "fewer channels": (_short, "channels but"),
}


@pytest.mark.parametrize("make", [forward, backward], ids=["forward", "backward"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_log_entry_fails_like_a_corrupt_message(case, make):
    corrupt, reason = CORRUPTIONS[case]
    aggregate = make()

    message = wire.encode_aggregate(3, 0, 0, point_of(aggregate), aggregate, 1, 11)
    record = message.array_records[wire.STATS]
    arrays = {name: record[name].numpy() for name in record.keys()}
    corrupt(arrays)
    message[wire.STATS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    with pytest.raises(ServerMessageError, match=reason) as from_message:
        wire.decode_control(message)

    log = ReplayLog()
    log.append(0, forward())
    log.append(1, aggregate)
    entry = {name.partition(".")[2]: log.arrays[name].numpy() for name in log.arrays.keys() if name.startswith("1.")}
    corrupt(entry)
    for name in [n for n in log.arrays.keys() if n.startswith("1.")]:
        del log.arrays[name]
    for name, value in entry.items():
        log.arrays[f"1.{name}"] = Array(value)
    with pytest.raises(ServerMessageError, match=reason) as from_log:
        log.read(2, "node 4's replay log")
    assert type(from_log.value) is type(from_message.value)
    assert "node 4's replay log, aggregate 1" in str(from_log.value)


def test_a_log_entry_with_a_bad_count_or_missing_entry_is_refused():
    log = ReplayLog()
    log.append(0, forward())
    log.scalars["0.count"] = 0.0
    with pytest.raises(ServerMessageError, match="pooled 'count' must be a finite number >= 1"):
        log.read(1, "log")
    one_entry = ReplayLog()
    one_entry.append(0, backward())
    with pytest.raises(ServerMessageError, match="aggregate 1.*'sync-phase'"):
        one_entry.read(2, "log")


def test_the_backward_array_names_are_spelled_once_in_the_package():
    package = pathlib.Path(wire.__file__).parents[1]
    spelled = sum(path.read_text().count('"sum-grad"') for path in package.rglob("*.py"))
    assert spelled == 1


ARRAY_CASES = [np.arange(16, dtype=np.float64), np.ones((3, 4), np.float32), np.array(3.5), np.zeros(0),
               np.arange(5, dtype=">i4"), np.arange(6.0).reshape(2, 3).T]  # the last one Fortran-ordered


@pytest.mark.parametrize("values", ARRAY_CASES, ids=lambda v: f"{v.dtype.str}{v.shape}")
def test_payload_arrays_are_flowers_arrays_byte_for_byte_however_often_encoded(values):
    """The reused headers change no byte: each encoding equals Flower's own, and decodes to
    the same values, as a writable array, the first time and the later ones."""
    from flwr_fedtan.protocol.codec import array_values, to_array

    for _ in range(3):
        ours, flowers = to_array(values), Array(values)
        assert ours.__dict__ == flowers.__dict__
        for array in (ours, flowers):
            decoded, reference = array_values(array), array.numpy()
            assert decoded.dtype == reference.dtype and decoded.shape == reference.shape
            assert np.array_equal(decoded, reference) and decoded.flags.writeable


def test_a_truncated_or_padded_array_decodes_as_flowers_numpy_would():
    from flwr_fedtan.protocol.codec import array_values, to_array

    good = to_array(np.arange(8, dtype=np.float64))
    array_values(good)  # its header is known from now on
    short = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-8])
    with pytest.raises(Exception) as ours:
        array_values(short)
    with pytest.raises(Exception) as flowers:
        short.numpy()
    assert type(ours.value) is type(flowers.value) and str(ours.value) == str(flowers.value)
    padded = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + b"\0" * 8)
    assert np.array_equal(array_values(padded), padded.numpy())
