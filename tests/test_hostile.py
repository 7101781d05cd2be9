"""One hostile party never takes the federation down (issue 22).

Each test plays one attack through the real strategy, the real ClientApp and the in-process
grid (or, for the node side, the real handler), and checks what the issue asks for: the
offending client is dropped with its node and a reason, charged, and the run goes on with
a finite global model; the other side refuses what it must refuse.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flwr_fedtan import FedTAN, fedtan_client_app
from flwr_fedtan.protocol import wire
from flwr_fedtan.aggregation import aggregate_arrays
from flwr_fedtan.errors import PayloadError
from flwr_fedtan.client import clear_live_rounds

from test_flower_protocol import initial_arrays as initial_arrays64
from test_flower_protocol import make_client as protocol_client
from test_strategy_composition import (
    RecordingGrid,
    initial_arrays,
    make_client,
    max_diff,
    pooled_buffers,
    to_numpy,
    weighted_params,
)

BAD = 1007  # the second of the grid's nodes 1000, 1007, 1014
HONEST = [1000, 1014]


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


def make_client64(context):
    return protocol_client(context, local_steps=2)


def run(alter, rounds=1, nodes=3, client=make_client, start=initial_arrays, **options):
    """One or more rounds with ``alter`` applied to every reply. The round's own pooled
    buffers are what these tests check: the statistics pass is off unless asked for."""
    grid = RecordingGrid(fedtan_client_app(client), nodes, {}, alter=alter)
    options = {"fraction_evaluate": 0.0, "min_available_nodes": nodes, "min_train_nodes": 2,
               "statistics": "running", **options}
    strategy = FedTAN(**{k: v for k, v in options.items() if v is not None})
    result = strategy.start(grid, start(), num_rounds=rounds)
    return grid, strategy, result


def all_finite(arrays) -> bool:
    return all(np.isfinite(v).all() for v in to_numpy(arrays).values() if v.dtype.kind == "f")


def first_forward_reply(node, control, reply, bad=BAD):
    status = reply.content.config_records.get(wire.STATUS)
    return node == bad and status is not None and status["phase"] == "forward" and status["point"] == 0


def final_reply(node, reply, bad=BAD):
    return node == bad and wire.ARRAYS in reply.content.array_records


# ---------------------------------------------------------------------- 1: crash-proof server
def test_secure_forward_payload_without_clear_counts_drops_that_client_not_the_run(caplog):
    """Item 1: a masked forward payload whose clear count and num-examples are removed used to
    pass decoding and raise a TypeError out of strategy.start."""
    def strip_counts(node, control, reply):
        if first_forward_reply(node, control, reply):
            status = reply.content.config_records[wire.STATUS]
            del status["count"]
            del status["num-examples"]

    with caplog.at_level(logging.WARNING):
        grid, strategy, result = run(strip_counts, secure_stats=True)
    assert "lacks its clear 'count' or 'num-examples'" in strategy.dropped[1][BAD]
    assert any(f"dropping node {BAD}" in r.getMessage() for r in caplog.records)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 1
    assert sorted(grid.finals[1]) == HONEST and all_finite(result.arrays)


def test_an_unexpected_exception_reading_one_reply_drops_that_client_not_the_run(monkeypatch):
    """The general rule: whatever goes wrong while handling one client's reply (here the
    decoder itself raises for that node) drops that client, named, and the round goes on."""
    real = wire.decode_reply

    def decode(content, sender, key):
        if sender == BAD:
            raise RuntimeError("boom in the decoder")
        return real(content, sender, key)

    monkeypatch.setattr(wire, "decode_reply", decode)
    grid, strategy, result = run(None)
    assert strategy.dropped[1][BAD] == "its reply could not be handled (RuntimeError: boom in the decoder)"
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2 and sorted(grid.finals[1]) == HONEST


def test_a_client_whose_metrics_differ_from_the_others_does_not_end_the_run(caplog):
    """Flower's FedAvg raises on replies whose metrics have different keys: one client adding
    a metric (or sending a non-finite one) used to end the run from aggregate_train."""
    def odd_metrics(node, control, reply):
        metrics = reply.content.metric_records.get(wire.METRICS)
        if node == BAD and metrics is not None:
            metrics["extra"] = 1.0
            metrics["train-loss"] = float("nan")

    with caplog.at_level(logging.WARNING):
        grid, strategy, result = run(odd_metrics)
    assert not strategy.dropped[1]  # its model is fine: only the odd metrics are left out
    assert any(f"node {BAD}'s metrics ['extra', 'train-loss'] left out" in r.getMessage() for r in caplog.records)
    finals = grid.finals[1]
    expected = {**weighted_params(finals, sorted(finals)), **pooled_buffers(finals, sorted(finals))}
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-6


# ---------------------------------------------------------------------- 2-3: bounded, finite aggregates
def poison_running_mean(value, key="bn1.running_mean", rounds=(1,)):
    def alter(node, control, reply):
        if final_reply(node, reply) and int(control["round"]) in rounds:
            arrays = reply.content.array_records[wire.ARRAYS]
            mean = arrays[key].numpy().copy()
            mean[0] = value
            arrays[key] = Array(mean)
    return alter


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_huge_finite_running_mean_is_refused_and_charged_and_later_rounds_go_on(dtype):
    """Item 2: one running_mean entry of 1e160 in a float64 model (1e20 in float32, with
    this node's weight of 1/3) made the pooled running_var Inf for good: every later model was refused and
    every round skipped, nobody charged. Now the client is dropped by the magnitude bound
    relative to the global model, charged, and the next round runs with everyone."""
    value = 1e20 if dtype == "float32" else 1e160
    client, start = (make_client, initial_arrays) if dtype == "float32" else (make_client64, initial_arrays64)
    grid, strategy, result = run(poison_running_mean(value), rounds=2, client=client, start=start)
    assert "bn1.running_mean reaches" in strategy.dropped[1][BAD] and "beyond its limit" in strategy.dropped[1][BAD]
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2
    assert result.train_metrics_clientapp[2]["fedtan-clients"] == 3  # not skipped: nobody refused the model
    assert BAD not in strategy.failures  # charged in round 1, cleared by its clean round 2
    assert all_finite(result.arrays)
    finals = grid.finals[2]
    expected = {**weighted_params(finals, sorted(finals)), **pooled_buffers(finals, sorted(finals))}
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-6


def test_a_huge_running_mean_is_charged_to_its_node():
    _, strategy, _ = run(poison_running_mean(1e20), rounds=1)
    assert strategy.failures[BAD].consecutive == 1 and "bn1.running_mean" in strategy.failures[BAD].reason


class SumThenDivide(FedAvg):
    """A plausible wrapped strategy: sums ``n_k * x_k`` in the arrays' dtype, then divides
    (float32 overflows at 3.4e38); it counts the rounds it aggregated (its state)."""

    aggregated_rounds = 0

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
        keys = list(replies[0].content["arrays"].keys())
        with np.errstate(over="ignore"):
            total = {k: sum(w * r.content["arrays"][k].numpy() for w, r in zip(weights, replies)) for k in keys}
        self.aggregated_rounds += 1
        return ArrayRecord({k: Array(np.asarray(v / sum(weights), dtype=np.float32)) for k, v in total.items()}), None


def test_an_aggregated_model_that_is_not_finite_is_never_used_its_cause_is_dropped():
    """The last line of defence: with the magnitude bound relaxed (max_growth=1e300), a
    parameter of 5e37 passes the per-client checks, but the wrapped strategy's sum overflows
    float32. The aggregated model is checked before it is used: the client with the
    largest values there is dropped and charged, the wrapped strategy's state restored,
    and the aggregation redone without it."""
    def poison(node, control, reply):
        if final_reply(node, reply):
            arrays = reply.content.array_records[wire.ARRAYS]
            arrays["fc2.bias"] = Array(np.full_like(arrays["fc2.bias"].numpy(), 5e37))

    wrapped = SumThenDivide(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2)
    grid, strategy, result = run(poison, strategy=wrapped, max_growth=1e300, min_available_nodes=None,
                                 min_train_nodes=None, fraction_evaluate=None)
    assert "with it the aggregated fc2.bias holds NaN or Inf" in strategy.dropped[1][BAD]
    assert strategy.failures[BAD].consecutive == 1
    assert wrapped.aggregated_rounds == 1  # the failed aggregation's state change was undone
    assert all_finite(result.arrays) and result.train_metrics_clientapp[1]["fedtan-clients"] == 2
    finals = grid.finals[1]
    expected = {**weighted_params(finals, HONEST), **pooled_buffers(finals, HONEST)}
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-5


@pytest.mark.parametrize("where", ["forward-mean-1e300", "forward-mean-1e160", "backward-sum-1.7e308"])
def test_finite_payloads_whose_pooled_aggregate_would_be_inf_drop_that_client(where):
    """Item 3: finite inputs (means 1e300, a mean whose square overflows, sums 1.7e308)
    pooled to Inf, which was broadcast; every honest client refused it and was dropped,
    nobody charged. Now the aggregate is checked before it is sent and its cause named."""
    phase, _, value = where.split("-", 2)
    value = float(value)

    def inflate(node, control, reply):
        status = reply.content.config_records.get(wire.STATUS)
        if node != BAD or status is None or status["phase"] != phase:
            return
        stats = reply.content.array_records[wire.STATS]
        name = "mean" if phase == "forward" else "sum-grad"
        array = stats[name].numpy().copy()
        array[0] = value
        stats[name] = Array(array)

    grid, strategy, result = run(inflate)
    reason = strategy.dropped[1][BAD]
    assert f"payload rejected at {phase}" in reason and ("non-finite or larger than" in reason
                                                         or "times the other clients' largest" in reason)
    assert strategy.failures[BAD].consecutive == 1
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 1
    assert sorted(grid.finals[1]) == HONEST and all_finite(result.arrays)


def test_pooling_names_the_client_that_overflows_even_without_the_relative_bound():
    from flwr_fedtan.aggregation import BackwardSums, ForwardStats, pool_forward_stats, sum_backward_sums

    def stats(mean):
        return ForwardStats(count=4.0, num_examples=2, mean=np.array(mean), var=np.ones(2))

    with pytest.raises(PayloadError, match="client b: its statistics .*make the pooled moments non-finite"):
        pool_forward_stats({"a": stats([1.0, 2.0]), "b": stats([1e160, 0.0])})
    with pytest.raises(PayloadError, match="client b: .*larger than 3.4"):
        pool_forward_stats({"a": stats([1.0, 2.0]), "b": stats([1e20, 0.0])},
                           limit=float(np.finfo(np.float32).max))
    sums = {c: BackwardSums(sum_grad=np.array([v, 0.0]), sum_grad_xhat=np.zeros(2))
            for c, v in (("a", 1.7e308), ("b", 1.7e308), ("c", 1.0))}
    with pytest.raises(PayloadError, match="client a: its backward sums"):
        sum_backward_sums(sums)


def test_magnitude_bound_unit():
    from flwr_fedtan.aggregation import check_magnitudes

    reference = {"bn.running_mean": np.zeros(3, np.float32), "bn.running_var": np.ones(3, np.float32),
                 "w": np.full(3, 2.0, np.float32), "bn.num_batches_tracked": np.array(5, np.int64)}
    fine = {"bn.running_mean": np.full(3, 9e5, np.float32), "bn.running_var": np.full(3, 9e11, np.float32),
            "w": np.full(3, -1.9e6, np.float32), "bn.num_batches_tracked": np.array(4_000_000, np.int64)}
    check_magnitudes(0, fine, reference)
    for key, value in [("bn.running_mean", 2e19), ("bn.running_var", 2e12), ("w", 2.1e6),
                       ("bn.num_batches_tracked", 2**62)]:
        bad = {**fine, key: np.full_like(fine[key], value)}
        with pytest.raises(PayloadError, match=f"client 0: {key} reaches"):
            check_magnitudes(0, bad, reference)
    # what the bound prevents: the old average of a 2e19 float32 running mean
    poisoned = {**fine, "bn.running_mean": np.full(3, 4e19, np.float32)}
    with np.errstate(over="ignore"):
        average = aggregate_arrays({0: (fine, 1.0), 1: (poisoned, 1.0)}, reference)
    assert not np.isfinite(average["bn.running_var"]).all()


def test_wrapped_strategy_failing_keeps_the_model_and_the_run(caplog):
    class Broken(FedAdam):
        def aggregate_train(self, server_round, replies):
            raise RuntimeError("wrapped strategy bug")

    grid, strategy, result = run(None, strategy=Broken(fraction_evaluate=0.0, min_available_nodes=3),
                                 min_available_nodes=None, min_train_nodes=None, fraction_evaluate=None)
    assert result.train_metrics_clientapp[1]["fedtan-skipped"] == 1
    assert max_diff(to_numpy(result.arrays), to_numpy(initial_arrays())) == 0.0


def test_evaluation_metrics_that_differ_do_not_end_the_run(caplog):
    """Flower's FedAvg raises on evaluate replies whose metric keys differ; FedTAN logs it and
    the run goes on without that round's evaluation metrics."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    replies = [Message(RecordDict({"metrics": MetricRecord(m)}), dst_node_id=n, message_type="evaluate")
               for n, m in ((1, {"num-examples": 3, "eval-loss": 1.0}), (2, {"num-examples": 3, "odd": 1.0}))]
    with caplog.at_level(logging.WARNING):
        assert FedTAN().aggregate_evaluate(1, replies) is None
    assert any("aggregate_evaluate failed (InconsistentMessageReplies" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- 8: checkpoints
posix = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


def saved_run(folder, rounds=2, **options):
    grid = RecordingGrid(fedtan_client_app(make_client), 3, {})
    strategy = FedTAN(strategy=FedAdam(eta=0.02, fraction_evaluate=0.0, min_available_nodes=3), seed=3,
                      checkpoint_dir=folder, **options)
    return strategy, strategy.start(grid, initial_arrays(), num_rounds=rounds)


@posix
def test_checkpoints_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        saved_run(tmp_path / "ckpt")
    finally:
        os.umask(previous)
    folder = tmp_path / "ckpt"
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["round-00001.fedtan-ckpt", "round-00002.fedtan-ckpt"]
    assert {stat.S_IMODE(os.lstat(f).st_mode) for f in files} == {0o600}


@posix
def test_a_symlink_planted_at_a_checkpoint_name_is_not_followed(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (folder / "round-00001.fedtan-ckpt").symlink_to(victim)
    (folder / "round-00001.partial").symlink_to(victim)  # the old, predictable temporary name
    saved_run(folder, rounds=1)
    assert victim.read_bytes() == b"precious"
    assert not (folder / "round-00001.fedtan-ckpt").is_symlink()


class _RunsCode:
    """Unpickling this object creates a marker file: what a planted pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@posix
def test_a_planted_pickle_is_never_loaded_and_rounds_sort_by_number(tmp_path):
    """A checkpoint folder holding round 99999 (a planted pickle that would run code) and
    round 100000 (a real checkpoint): resuming from the folder takes round 100000 (by
    number; it sorts first by name), and loading the pickle itself runs nothing."""
    import pickle

    folder = tmp_path / "ckpt"
    strategy, result = saved_run(folder, rounds=1)
    real = folder / "round-00001.fedtan-ckpt"
    real.rename(folder / "round-100000.fedtan-ckpt")
    marker = tmp_path / "code-ran"
    planted = folder / "round-99999.fedtan-ckpt"
    planted.write_bytes(pickle.dumps({"format": 1, "x": _RunsCode(marker)}))
    planted.chmod(0o600)

    fresh = FedTAN(strategy=FedAdam(eta=0.02, fraction_evaluate=0.0, min_available_nodes=3), seed=3)
    done, arrays = fresh.load_checkpoint(folder)
    assert done == 1  # the round recorded inside round-100000's file
    assert max_diff(to_numpy(arrays), to_numpy(result.arrays)) == 0
    assert max_diff(fresh.strategy.m_t, strategy.strategy.m_t) == 0  # FedAdam's state restored
    with pytest.raises(ValueError, match="not a FedTAN checkpoint of format 2"):
        fresh.load_checkpoint(planted)
    assert not marker.exists()


def test_old_checkpoints_are_deleted_by_round_number(tmp_path):
    strategy = FedTAN(keep_checkpoints=1)
    arrays = initial_arrays()
    for server_round in (99999, 100000):
        strategy.save_checkpoint(tmp_path / "ckpt", server_round, arrays)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["round-100000.fedtan-ckpt"]


@posix
def test_a_checkpoint_readable_by_others_or_in_an_open_folder_is_refused(tmp_path):
    from flwr_fedtan.errors import UnsafePathError

    folder = tmp_path / "ckpt"
    saved_run(folder, rounds=1)
    file = folder / "round-00001.fedtan-ckpt"
    file.chmod(0o644)
    with pytest.raises(UnsafePathError, match="not private to this user"):
        FedTAN(strategy=FedAdam(fraction_evaluate=0.0)).load_checkpoint(file)
    file.chmod(0o600)
    folder.chmod(0o755)
    with pytest.raises(UnsafePathError, match="accessible to its group or to others"):
        saved_run(folder, rounds=1)


# ---------------------------------------------------------------------- 11: the node worker's socket
def test_node_worker_survives_a_huge_frame_claim_and_a_silent_peer(tmp_path_factory, monkeypatch):
    """A same-user peer that claims a 2**64-byte frame used to kill the worker (it allocated
    the claim), and one that connects and says nothing blocked it for good (no receive
    timeout). Now both connections are dropped and the next request is served."""
    import socket
    import struct
    import subprocess
    import sys
    import time

    from flwr_fedtan.runtime import worker as worker_mod
    from flwr_fedtan.runtime.private import private_folder

    folder = Path(tmp_path_factory.mktemp("rt")) / "sockets"
    monkeypatch.setenv("FEDTAN_RUNTIME_DIR", str(folder))
    path = private_folder() / "hostile.sock"
    repo = Path(worker_mod.__file__).resolve().parents[2]  # the flwr_fedtan under test
    process = subprocess.Popen([sys.executable, "-m", "flwr_fedtan.runtime.worker", "serve", "--socket", str(path),
                                "--idle-timeout", "0", "--receive-timeout", "1"],
                               env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        claim.connect(str(path))
        claim.sendall(struct.pack("!Q", 2**64 - 1))
        claim.close()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(path))  # says nothing and keeps the connection open
        started = time.monotonic()
        stats = worker_mod.worker_request(path, "stats", timeout=20)
        assert stats["pid"] == process.pid and time.monotonic() - started < 15
        assert process.poll() is None
        silent.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------- 12: what a reply is checked for
def test_a_reply_for_another_round_drops_its_client():
    def other_round(node, control, reply):
        if first_forward_reply(node, control, reply):
            reply.content.config_records[wire.STATUS]["round"] = 7

    grid, strategy, result = run(other_round)
    assert strategy.dropped[1][BAD].endswith("replied for round 7 during round 1")
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2 and sorted(grid.finals[1]) == HONEST


def test_unknown_arrays_in_a_masked_payload_are_refused_before_anything_is_decoded(monkeypatch):
    """An extra array in a masked payload was decoded (any size, any content) before the
    payload's keys were checked. Now the keys are checked first: nothing is decoded."""
    decoded = []
    real_numpy = Array.numpy

    def spying_numpy(self):
        decoded.append(self.shape)
        return real_numpy(self)

    def junk(node, control, reply):
        if first_forward_reply(node, control, reply):
            reply.content.array_records[wire.STATS]["junk"] = Array(
                dtype="float64", shape=(2**30,), stype="numpy.ndarray", data=b"junk")
            monkeypatch.setattr(Array, "numpy", spying_numpy)

    grid, strategy, result = run(junk, secure_stats=True)
    assert "masked payload holds ['junk', 'masked', 'roster-digest', 'shift']" in strategy.dropped[1][BAD]
    assert (2**30,) not in decoded
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2


# ---------------------------------------------------------------------- 13: what the docstrings promise
def test_every_promise_that_the_server_learns_only_sums_names_the_honest_but_curious_server():
    import flwr_fedtan.secure as secure_module
    from flwr_fedtan import strategy as strategy_module

    texts = {"secure": secure_module.__doc__, "FedTAN": strategy_module.FedTAN.__doc__}
    for name, text in texts.items():
        flat = " ".join(text.split())
        assert "learns only the sums" in flat, name
        for at in [i for i in range(len(flat)) if flat.startswith("learns only the sums", i)]:
            assert "honest-but-curious" in flat[max(0, at - 120):at], (name, flat[max(0, at - 120):at + 30])


# ---------------------------------------------------------------------- 5, 6, 10, 4: the secure protocol's gaps
def test_a_small_order_public_key_is_refused_on_receipt_and_the_others_finish():
    """Item 5: an all-zero X25519 key was relayed in the roster; every honest client then
    failed its key agreement and was dropped, nobody charged. Now the server refuses the
    key on receipt and drops its sender."""
    def zero_key(node, control, reply):
        record = reply.content.array_records.get(wire.SECURE)
        if node == BAD and record is not None:
            record["public-key"] = Array(np.zeros(32, dtype=np.uint8))

    grid, strategy, result = run(zero_key, secure_stats=True)
    assert "public key is a point of small order" in strategy.dropped[1][BAD]
    assert set(strategy.dropped[1]) == {BAD} and strategy.failures[BAD].consecutive == 1
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2 and sorted(grid.finals[1]) == HONEST


def test_no_key_material_is_left_in_the_node_state_after_a_secure_round():
    """Item 10: the round's private key, roster and shifts stayed in context.state."""
    grid, strategy, result = run(None, secure_stats=True)
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 3
    for node, context in grid.contexts.items():
        left = [name for name in context.state.keys() if name.startswith("fedtan.secure")]
        assert not left, (node, left)


class _HandDriven:
    """Two nodes driven message by message through the real ClientApp (a malicious server)."""

    def __init__(self, **app_options):
        from _grid import LocalGrid

        self.grid = LocalGrid(fedtan_client_app(make_client, **app_options), 2, {})
        self.nodes = self.grid.node_ids

    def send(self, node, content):
        (reply,) = self.grid.send_and_receive([Message(content, dst_node_id=node, message_type=wire.MESSAGE_TYPE)])
        return reply

    def roster(self):
        from flwr_fedtan.secure import Roster

        keys = {}
        for node in self.nodes:
            reply = self.send(node, wire.encode_keys(1, 1))
            keys[node] = reply.content.array_records[wire.SECURE]["public-key"].numpy().tobytes()
        return Roster.from_keys(keys)

    def begin(self, node, attempt=0, roster=None, shifts=None, seed=5):
        from flwr.app import ConfigRecord

        return self.send(node, wire.encode_begin(initial_arrays(), ConfigRecord(), 1, 1, seed, attempt, roster,
                                                   shifts))


def test_a_repeated_begin_with_the_same_attempt_is_refused_so_masks_are_never_reused():
    """Item 6: a second begin with the same attempt and roster but another shift made the
    client mask other sums with the same masks; the difference gave its mean."""
    driven = _HandDriven()
    roster = driven.roster()
    node = driven.nodes[0]
    first = driven.begin(node, 0, roster, {0: np.zeros(6)})
    assert not first.has_error() and first.content.config_records[wire.STATUS]["phase"] == "forward"
    again = driven.begin(node, 0, roster, {0: np.ones(6)})
    assert again.has_error() and "already began attempt 0 with this key" in again.error.reason
    assert driven.begin(node, 1, roster, {0: np.ones(6)}).has_error() is False  # a later attempt is fine


def test_a_begin_in_the_clear_after_the_key_exchange_is_refused():
    driven = _HandDriven()
    driven.roster()
    reply = driven.begin(driven.nodes[0])
    assert reply.has_error() and "without a roster after this round's key exchange" in reply.error.reason


def test_nodes_that_require_secure_statistics_refuse_a_clear_round():
    grid = RecordingGrid(fedtan_client_app(make_client, require_secure_stats=True), 3, {})
    strategy = FedTAN(fraction_evaluate=0.0, min_available_nodes=3)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert result.train_metrics_clientapp[1]["fedtan-skipped"] == 1
    assert all("requires secure statistics (require_secure_stats=True)" in why for why in strategy.dropped[1].values())
    secure_grid = RecordingGrid(fedtan_client_app(make_client, require_secure_stats=True), 3, {})
    secure_result = FedTAN(fraction_evaluate=0.0, min_available_nodes=3, secure_stats=True).start(
        secure_grid, initial_arrays(), num_rounds=1)
    assert secure_result.train_metrics_clientapp[1]["fedtan-clients"] == 3


def make_whole_data_client(context):
    """Each step's batch is all of the node's data (64 samples)."""
    from flwr_fedtan import FedTANClient
    from test_strategy_composition import Net, client_data

    return FedTANClient(Net(), client_data(int(context.node_config["partition-id"])), batch_size=64, lr=0.1)


def test_a_restart_on_the_same_samples_is_refused_so_sums_cannot_be_differenced():
    """Item 4: with batches that are the clients' whole data, a restart without a dropped
    client pooled the same samples; the difference of the two sums was the dropped
    client's statistics. Now a survivor whose first step would use the same samples again
    after it received the superset's aggregates refuses the restart."""
    def break_second_payload(node, control, reply):
        status = reply.content.config_records.get(wire.STATUS)
        if node == BAD and status is not None and status["phase"] == "forward" and status["point"] == 1:
            stats = reply.content.array_records[wire.STATS]
            stats["masked"] = Array(stats["masked"].numpy()[:, :-1].copy())

    grid = RecordingGrid(fedtan_client_app(make_whole_data_client), 3, {}, alter=break_second_payload)
    strategy = FedTAN(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2, secure_stats=True)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert "masked payload is uint64" in strategy.dropped[1][BAD]
    for node in HONEST:
        assert "restarted (attempt 1) on the same samples" in strategy.dropped[1][node]
    assert result.train_metrics_clientapp[1]["fedtan-skipped"] == 1
    assert max_diff(to_numpy(result.arrays), to_numpy(initial_arrays())) == 0.0


# ---------------------------------------------------------------------- 9: a corrupted canary is named
def corrupt_canary(cover_with_peer=None):
    """Node BAD adds 1 to its first payload's canary; with ``cover_with_peer`` it also lies
    about its canary mask with that peer, so that its canary matches what it reveals."""
    def alter(node, control, reply):
        if node != BAD:
            return
        status = reply.content.config_records.get(wire.STATUS)
        if first_forward_reply(node, control, reply):
            stats = reply.content.array_records[wire.STATS]
            masked = stats["masked"].numpy().copy()
            masked[0, -1] += np.uint64(1)
            stats["masked"] = Array(masked)
        elif status is not None and status["phase"] == "blame" and cover_with_peer is not None:
            record = reply.content.array_records[wire.SECURE]
            peers, masks = list(record["peers"].numpy()), record["masks"].numpy().copy()
            column = peers.index(cover_with_peer)
            masks[0, column] += np.uint64(1) if BAD < cover_with_peer else np.uint64(2**64 - 1)
            record["masks"] = Array(masks)
    return alter


def test_a_corrupted_canary_is_traced_to_its_client_which_is_dropped_and_charged():
    """Item 9: a corrupted canary restarted the round anonymously until it was skipped. Now
    every client reveals its pair masks of that canary (nothing else), and the client
    whose canary is not their signed sum is named."""
    grid, strategy, result = run(corrupt_canary(), secure_stats=True)
    assert list(strategy.dropped[1]) == [BAD]
    assert "masks did not cancel at exchange 0: its canary is not the sum" in strategy.dropped[1][BAD]
    assert strategy.failures[BAD].consecutive == 1
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2 and sorted(grid.finals[1]) == HONEST


def test_a_client_that_lies_about_a_pair_mask_goes_down_with_at_most_that_peer():
    """Covering a corrupted canary needs a false mask with some peer: that pair disagrees,
    and the server, which cannot tell which of the two lies, drops both; the rest finish."""
    peer = 1014
    grid, strategy, result = run(corrupt_canary(cover_with_peer=peer), nodes=4, secure_stats=True)
    assert sorted(strategy.dropped[1]) == [BAD, peer]
    assert "(one of the two lies)" in strategy.dropped[1][BAD]
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2 and sorted(grid.finals[1]) == [1000, 1021]


def test_a_client_reveals_only_the_canary_of_a_payload_it_sent():
    """A malicious server asking for the 'canary' at another length would get an element
    that masks a statistic: the client answers only for a payload it sent, at its length."""
    driven = _HandDriven()
    roster = driven.roster()
    node = driven.nodes[0]
    first = driven.begin(node, 0, roster, {})
    length = first.content.array_records[wire.STATS]["masked"].numpy().shape[1]
    wrong = driven.send(node, wire.encode_blame(1, 1, 0, length - 1))
    assert wrong.has_error() and "reveals only the canary of a payload it sent" in wrong.error.reason
    later = driven.send(node, wire.encode_blame(1, 1, 1, length))
    assert later.has_error()
    right = driven.send(node, wire.encode_blame(1, 1, 0, length))
    assert not right.has_error()
    record = right.content.array_records[wire.SECURE]
    assert list(record["peers"].numpy()) == [driven.nodes[1]] and record["masks"].numpy().shape == (2, 1)


# ---------------------------------------------------------------------- 7: what the weight check is
def test_the_weight_check_is_consistency_not_truth_and_the_readme_says_so():
    """Item 7: a client that scales all its counts by 1000, consistently, is not caught; it
    weighs 1000 times its batch in the average. The README used to say a client "cannot buy
    a larger share"; the protocol page (docs/protocol.md) now says what is checked."""
    def scale(node, control, reply):
        if node != BAD:
            return
        status = reply.content.config_records.get(wire.STATUS)
        if status is not None and status["phase"] == "forward":
            status["count"] = float(status["count"]) * 1000
            status["num-examples"] = int(status["num-examples"]) * 1000
        metrics = reply.content.metric_records.get(wire.METRICS)
        if metrics is not None:
            metrics["num-examples"] = int(metrics["num-examples"]) * 1000

    grid, strategy, result = run(scale)
    assert not strategy.dropped[1]
    finals = grid.finals[1]
    assert finals[BAD][1]["num-examples"] == 9000
    expected = {**weighted_params(finals, sorted(finals)), **pooled_buffers(finals, sorted(finals))}
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-6
    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    docs = " ".join(" ".join(page.read_text().split()) for page in pages)
    protocol = " ".join((repo / "docs" / "protocol.md").read_text().split())
    assert "cannot buy a larger share" not in docs
    assert "These checks are consistency, not truth" in protocol


def test_a_restart_back_on_an_earlier_attempts_samples_is_refused_too():
    """A server that restarts twice, the second time with the first attempt's seed, would
    get the same samples pooled again. The node derives each attempt's seed itself (run seed,
    round, attempt), so the only way left is to change the run seed, which it refuses by
    name; restarts with the run seed draw other samples."""
    from flwr_fedtan.aggregation import ForwardStats, SyncPoint

    driven = _HandDriven()
    roster = driven.roster()
    node = driven.nodes[0]
    status = driven.begin(node, 0, roster, {}, seed=5).content.config_records[wire.STATUS]
    pooled = ForwardStats(count=2 * status["count"], num_examples=2 * status["num-examples"],
                          mean=np.zeros(status["channels"]), var=np.ones(status["channels"]))
    point = SyncPoint(0, "forward", 0, status["channels"])
    assert not driven.send(node, wire.encode_aggregate(1, 0, 0, point, pooled, 1, 5)).has_error()
    switched = driven.begin(node, 1, roster, {}, seed=6)
    assert switched.has_error() and "run seed 6, but this node's run began with run seed 5" in switched.error.reason
    assert not driven.begin(node, 1, roster, {}, seed=5).has_error()  # other samples: fine
    assert not driven.begin(node, 2, roster, {}, seed=5).has_error()


def test_unknown_arrays_in_a_final_model_are_refused_before_anything_is_decoded(monkeypatch):
    from _grid import LocalGrid

    decoded = []
    real_numpy = Array.numpy

    def spying_numpy(self):
        decoded.append(self.shape)
        return real_numpy(self)

    class JunkGrid(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            ids = super().push_messages(messages)
            for msg, mid in zip(messages, ids):
                reply = self._replies.get(mid)
                if msg.metadata.dst_node_id == BAD and reply is not None and not reply.has_error() \
                        and wire.ARRAYS in reply.content.array_records:
                    reply.content.array_records[wire.ARRAYS]["junk"] = Array(
                        dtype="float64", shape=(2**30,), stype="numpy.ndarray", data=b"junk")
                    monkeypatch.setattr(Array, "numpy", spying_numpy)
            return ids

    grid = JunkGrid(fedtan_client_app(make_client), 3, {})
    strategy = FedTAN(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert "unexpected ['junk']" in strategy.dropped[1][BAD]
    assert (2**30,) not in decoded
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2
