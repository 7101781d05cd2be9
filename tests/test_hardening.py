"""Hostile setups against a node's private files and against a client's message handler.

Each test builds the attack itself: a state folder created first by another user (the
tests run as root here and hand it to uid 65534) or left open to everyone, a symbolic
link planted where the node writes, stale folders of crashed runs, and aggregates a
buggy or hostile server could send. The expected outcome is a refusal with a message that
says what to fix, and a victim file that is never touched.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, convert_batchnorm, fedtan_client_app, private_files
from flwr_fedtan.protocol import wire
from flwr_fedtan.aggregation import BackwardSums, ForwardStats, SyncPoint
from flwr_fedtan.client import clear_live_rounds, client_seed_key
from flwr_fedtan.private_files import private_dir, read_private_file, write_private_file
from flwr_fedtan.errors import ServerMessageError, UnsafePathError
from flwr_fedtan.reference import fedtan_round_in_process
from flwr_fedtan.node.state import NodeState
from flwr_fedtan.node.weights import ReplayWeightsMissing
from flwr_fedtan.training import derive_seed

from _grid import LocalGrid

OTHER_UID = 65534  # "nobody"
as_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root to chown")
posix = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


class TinyNet(nn.Module):
    """Conv - BatchNorm(4) - ReLU - pool - Linear: one BatchNorm call, two sync points."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


CHANNELS = 4


def make_client(context) -> FedTANClient:
    pid = int(context.node_config["partition-id"])
    g = torch.Generator().manual_seed(10 + pid)
    x = torch.randn(20, 1, 5, 5, generator=g, dtype=torch.float64) + pid
    y = torch.randint(0, 3, (20,), generator=g)
    return FedTANClient(TinyNet().double(), TensorDataset(x, y), batch_size=4 + pid, lr=0.1)


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(convert_batchnorm(TinyNet().double()).state_dict())


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own state folder (under pytest's 0700 tmp_path) and no live rounds."""
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("FEDTAN_STATE_MAX_AGE_HOURS", raising=False)
    clear_live_rounds()
    yield
    clear_live_rounds()


def a_state_with_weights(run_id=1, node_id=3):
    state = NodeState()
    state.save_weights(initial_arrays(), "disk", run_id, node_id)
    return state


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---------------------------------------------------------------------- private folders
@as_root
def test_state_folder_created_first_by_another_user_is_refused(tmp_path):
    base = tmp_path / "state"
    base.mkdir(mode=0o700)
    os.chown(base, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePathError) as error:
        a_state_with_weights()
    message = str(error.value)
    assert f"{base} is owned by uid {OTHER_UID}, not by this user (uid 0)" in message
    assert "Remove" in message and "FEDTAN_STATE_DIR" in message
    assert not list(base.iterdir())  # nothing written into the other user's folder


@as_root
def test_default_folder_name_taken_by_another_user_is_refused(tmp_path, monkeypatch):
    """The attack on the old, predictable ``<tempdir>/flwr-fedtan-state-<uid>``: another
    user creates the per-user folder before the node does (world-readable, theirs)."""
    monkeypatch.delenv("FEDTAN_STATE_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    shared_tmp.chmod(0o1777)  # like /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    planted = shared_tmp / f"flwr-fedtan-{os.geteuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    os.chown(planted, OTHER_UID, OTHER_UID)
    assert private_files.default_base() == planted
    with pytest.raises(UnsafePathError, match=f"owned by uid {OTHER_UID}, not by this user"):
        a_state_with_weights()
    # Fine once the planted folder is gone: the node creates its own, 0700.
    planted.rmdir()
    a_state_with_weights()
    assert mode_of(planted) == 0o700 and os.stat(planted).st_uid == os.geteuid()


@posix
@pytest.mark.parametrize("level", ["base", "replay", "run"])
def test_state_folder_open_to_others_is_refused(tmp_path, level):
    base = tmp_path / "state"
    folder = {"base": base, "replay": base / "replay", "run": base / "replay" / "run-1"}[level]
    folder.mkdir(parents=True)
    os.chmod(base, 0o700)
    if level != "base":
        os.chmod(base / "replay", 0o700)
    os.chmod(folder, 0o777)
    with pytest.raises(UnsafePathError) as error:
        a_state_with_weights()
    message = str(error.value)
    assert f"{folder} is accessible to its group or to others (mode 0777)" in message
    assert f"chmod 700 {folder}" in message
    os.chmod(folder, 0o700)  # the fix the message gives
    a_state_with_weights()


@posix
def test_state_folder_that_is_a_symlink_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="is a symbolic link, not a folder"):
        a_state_with_weights()
    assert not list(elsewhere.iterdir())


@posix
def test_base_in_a_folder_others_can_write_without_sticky_bit_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone could rename our folder and replace it
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(shared / "state"))
    with pytest.raises(UnsafePathError, match=r"writable by other users \(mode 0777\) without the sticky bit"):
        a_state_with_weights()


@posix
def test_folders_0700_and_file_0600_whatever_the_umask(tmp_path):
    previous = os.umask(0)  # the most permissive umask a user could have
    try:
        state = a_state_with_weights(run_id=4, node_id=9)
    finally:
        os.umask(previous)
    base = tmp_path / "state"
    file = base / "replay" / "run-4" / "node-9.npz"
    assert [mode_of(p) for p in (base, base / "replay", base / "replay" / "run-4")] == [0o700] * 3
    assert mode_of(file) == 0o600 and os.lstat(file).st_uid == os.geteuid()
    assert state.weights.path == str(file)
    assert not [p for p in file.parent.iterdir() if p.name.endswith(".partial")]


@posix
def test_xdg_runtime_dir_is_the_default_base_when_it_is_this_users(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDTAN_STATE_DIR")
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert private_files.default_base() == runtime / "flwr-fedtan"
    state = a_state_with_weights(run_id=2, node_id=5)
    assert Path(state.weights.path) == (
        runtime / "flwr-fedtan" / "replay" / "run-2" / "node-5.npz"
    )
    if os.geteuid() == 0:  # e.g. `sudo -E`: the variable names another user's folder
        os.chown(runtime, OTHER_UID, OTHER_UID)
        assert private_files.default_base() == Path(tempfile.gettempdir()) / "flwr-fedtan-0"


# ---------------------------------------------------------------------- planted links
@posix
def test_symlink_planted_at_the_partial_file_name_is_not_followed(tmp_path, monkeypatch):
    """The temporary name is random; the test pins it to a name where a link waits (as at
    the old ``node-<node>.<pid>.partial``). The open refuses the existing name, a fresh one
    is used, the victim keeps its bytes and the weights still load."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = private_dir("replay", "run-1", base=tmp_path / "state")
    final = folder / "node-3.npz"
    planted = folder / "node-3.npz.partial"
    planted.symlink_to(victim)
    names = iter([planted])
    real = private_files._partial_name
    monkeypatch.setattr(private_files, "_partial_name", lambda path: next(names, None) or real(path))

    state = a_state_with_weights(run_id=1, node_id=3)

    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink()  # left as it was; never opened
    assert final.is_file() and not final.is_symlink() and mode_of(final) == 0o600
    loaded = state.load_weights()
    expected = initial_arrays()
    assert all(np.array_equal(loaded[k].numpy(), expected[k].numpy()) for k in expected.keys())


@posix
def test_symlink_planted_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = private_dir("replay", "run-1", base=tmp_path / "state")
    (folder / "node-3.npz").symlink_to(victim)
    a_state_with_weights(run_id=1, node_id=3)
    assert victim.read_bytes() == b"precious"
    assert not (folder / "node-3.npz").is_symlink()


@posix
def test_replay_refuses_a_linked_or_readable_weights_file(tmp_path):
    state = a_state_with_weights()
    path = Path(state.weights.path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not weights")
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        state.load_weights()
    path.unlink()
    path.write_bytes(b"x")
    path.chmod(0o644)
    with pytest.raises(UnsafePathError, match=r"not private to this user .*mode 0644"):
        read_private_file(path)


def test_a_second_writer_of_the_same_file_replaces_it_atomically(tmp_path):
    folder = private_dir("x", base=tmp_path / "state")
    write_private_file(folder / "f", b"old")
    write_private_file(folder / "f", b"new")
    assert read_private_file(folder / "f") == b"new"
    assert [p.name for p in folder.iterdir()] == ["f"]


# ---------------------------------------------------------------------- lifetime
class ModeCheckingGrid(LocalGrid):
    """Records the replay folder's contents and modes whenever an aggregate is sent."""

    def __init__(self, *args, replay_root: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.replay_root = replay_root
        self.seen: list[tuple[str, int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        for path in self.replay_root.rglob("*"):
            self.seen.append((str(path.relative_to(self.replay_root)), mode_of(path)))
        return super().push_messages(messages)


def test_run_folders_are_gone_after_the_run(tmp_path):
    """Two rounds, every message in a 'fresh process' (replay from the node-local file):
    the files exist, private, during a round; after the run no run folder is left."""
    replay_root = tmp_path / "state" / "replay"
    grid = ModeCheckingGrid(fedtan_client_app(make_client, replay_store="disk"), 3, {},
                            separate_processes=True, replay_root=replay_root)
    strategy = FedTAN(statistics="running", min_available_nodes=3, fraction_evaluate=0.0)
    result = strategy.start(grid, initial_arrays(), num_rounds=2)
    assert result.train_metrics_clientapp[2]["fedtan-clients"] == 3
    assert result.train_metrics_clientapp[2]["replays"] == 2  # each of the 2 aggregates replayed
    during = dict(grid.seen)
    assert during["run-1"] == 0o700
    assert {during[f"run-1/node-{n}.npz"] for n in grid.node_ids} == {0o600}
    assert list(replay_root.iterdir()) == []


def _age(path: Path, hours: float) -> None:
    then = time.time() - hours * 3600
    for p in [path, *path.iterdir()]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_stale_run_folders_are_cleaned_when_a_round_begins(tmp_path, monkeypatch):
    """A process killed mid-round leaves its run folder: it goes once nothing in it changed
    for 24 hours (FEDTAN_STATE_MAX_AGE_HOURS overrides); a recent one, the current run's,
    and anything that is not a run folder stay."""
    replay = private_dir("replay", base=tmp_path / "state")
    crashed, recent = replay / "run-5", replay / "run-6"
    for folder in (crashed, recent):
        folder.mkdir(mode=0o700)
        write_private_file(folder / "node-1.npz", b"weights")
    _age(crashed, 25)
    _age(recent, 2)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_bytes(b"precious")
    (replay / "run-7").symlink_to(victim)  # a link is never followed nor removed
    current = replay / "run-1"
    current.mkdir(mode=0o700)
    _age(current, 48)

    a_state_with_weights(run_id=1)
    assert sorted(p.name for p in replay.iterdir()) == ["run-1", "run-6", "run-7"]
    assert (victim / "keep").read_bytes() == b"precious"

    monkeypatch.setenv("FEDTAN_STATE_MAX_AGE_HOURS", "1")
    a_state_with_weights(run_id=1)
    assert sorted(p.name for p in replay.iterdir()) == ["run-1", "run-7"]

    monkeypatch.setenv("FEDTAN_STATE_MAX_AGE_HOURS", "a day")
    with pytest.raises(ValueError, match="FEDTAN_STATE_MAX_AGE_HOURS must be a number of hours, got 'a day'"):
        a_state_with_weights(run_id=1)


def test_discarding_keeps_the_run_folder_while_another_node_uses_it(tmp_path):
    first, second = a_state_with_weights(node_id=1), a_state_with_weights(node_id=2)
    run = tmp_path / "state" / "replay" / "run-1"
    first.discard_weights()
    assert [p.name for p in run.iterdir()] == ["node-2.npz"]
    second.discard_weights()
    assert not run.exists()
    with pytest.raises(ReplayWeightsMissing, match="no starting weights"):
        second.load_weights()


# ---------------------------------------------------------------------- malformed aggregates
def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1},
                   state=RecordDict(), run_config={})


def _deliver(app, content: RecordDict, context: Context) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    message = Message(content, 5, wire.MESSAGE_TYPE, group_id="1")
    message.metadata.__dict__["_message_id"] = "m"
    return app(message, context)


def _forward_aggregate(status: ConfigRecord) -> ForwardStats:
    """A well-formed pooled aggregate for the client's first request (its own statistics
    with one more client of the same size: count and examples doubled)."""
    return ForwardStats(count=2 * status["count"], num_examples=2 * status["num-examples"],
                        mean=np.zeros(CHANNELS), var=np.ones(CHANNELS))


def _set(record: ArrayRecord, **arrays) -> None:
    for name, value in arrays.items():
        record[name] = Array(value)


MALFORMED = {
    # the wrong phase: backward sums where the step waits for forward statistics
    "phase": (lambda c: (c.config_records[wire.CONTROL].__setitem__("sync-phase", "backward"),
                         c.__setitem__(wire.STATS, ArrayRecord({"sum-grad": Array(np.zeros(CHANNELS)),
                                                                  "sum-grad-xhat": Array(np.zeros(CHANNELS))}))),
              "sync point 0 needs ForwardStats"),
    # an aggregate for a later sync point than the one the client waits at
    "sync-point": (lambda c: c.config_records[wire.CONTROL].__setitem__("point", 1),
                   "aggregate for point 1 of round 1, but 0 aggregates were received"),
    "round": (lambda c: c.config_records[wire.CONTROL].__setitem__("round", 2),
              "got an aggregate for round 2 but holds no state for it"),
    "channels": (lambda c: _set(c.array_records[wire.STATS], mean=np.zeros(7), var=np.ones(7)),
                 f"sync point 0: expected {CHANNELS} channels"),
    "channels-differ": (lambda c: _set(c.array_records[wire.STATS], var=np.ones(CHANNELS + 1)),
                        f"'mean' has {CHANNELS} channels but 'var' has {CHANNELS + 1}"),
    "dtype-float32": (lambda c: _set(c.array_records[wire.STATS], mean=np.zeros(CHANNELS, np.float32)),
                      "'mean' has dtype float32, FedTAN sends aggregates as float64"),
    "dtype-text": (lambda c: _set(c.array_records[wire.STATS], var=np.array(["1"] * CHANNELS)),
                   "'var' has dtype <U1"),
    "shape-2d": (lambda c: _set(c.array_records[wire.STATS], mean=np.zeros((CHANNELS, 1))),
                 f"'mean' has shape ({CHANNELS}, 1), expected one value per channel"),
    "nan": (lambda c: _set(c.array_records[wire.STATS], mean=np.array([0.0, np.nan, 0.0, 0.0])),
            "'mean' contains NaN or Inf"),
    "negative-var": (lambda c: _set(c.array_records[wire.STATS], var=-np.ones(CHANNELS)),
                     "pooled 'var' has negative entries"),
    "count-nan": (lambda c: c.config_records[wire.CONTROL].__setitem__("count", float("nan")),
                  "pooled 'count' must be a finite number >= 1, got nan"),
    "examples-zero": (lambda c: c.config_records[wire.CONTROL].__setitem__("num-examples", 0),
                      "pooled 'num-examples' must be an int >= 1, got 0"),
    "examples-fewer-than-own": (lambda c: c.config_records[wire.CONTROL].__setitem__("num-examples", 1),
                                "smaller than this client's own"),
    "missing-stats": (lambda c: c.__delitem__(wire.STATS), "no ArrayRecord 'fedtan.stats'"),
    "unknown-sync-phase": (lambda c: c.config_records[wire.CONTROL].__setitem__("sync-phase", "sideways"),
                           "'sync-phase' must be 'forward' or 'backward', got 'sideways'"),
    "unknown-phase": (lambda c: c.config_records[wire.CONTROL].__setitem__("phase", "abort"),
                      "unknown phase 'abort'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_aggregate_fails_on_the_client_with_a_clear_error(case):
    """The real ClientApp handler, messages built by hand: the round begins, then the
    server's first aggregate is tampered with. The handler raises at once (Flower turns it
    into an error reply and the server drops the node) and takes no step with it."""
    app = fedtan_client_app(make_client, replay_store="context")
    context = _context()
    reply = _deliver(app, wire.encode_begin(initial_arrays(), ConfigRecord({}), 1, 1, 3), context)
    status = reply.content.config_records[wire.STATUS]
    assert (status["phase"], status["point"], status["channels"]) == ("forward", 0, CHANNELS)

    content = wire.encode_aggregate(1, 0, 0, SyncPoint(0, "forward", 0, CHANNELS), _forward_aggregate(status), 1, 3)
    tamper, expected = MALFORMED[case]
    tamper(content)
    started = time.perf_counter()
    with pytest.raises(Exception) as error:
        _deliver(app, content, context)
    assert expected in str(error.value)
    assert time.perf_counter() - started < 30  # an error, not a wait
    assert context.state.config_records["fedtan.replay"]["received"] == 0  # nothing was taken


def test_well_formed_aggregates_complete_the_round_after_a_rejected_one():
    """The control case for the test above: the same hand-built messages, untampered, take
    the client through its round to ``done``, also after a malformed one was refused."""
    app = fedtan_client_app(make_client, replay_store="context")
    context = _context()
    reply = _deliver(app, wire.encode_begin(initial_arrays(), ConfigRecord({}), 1, 1, 3), context)
    status = reply.content.config_records[wire.STATUS]
    good = wire.encode_aggregate(1, 0, 0, SyncPoint(0, "forward", 0, CHANNELS), _forward_aggregate(status), 1, 3)
    bad = wire.encode_aggregate(1, 0, 0, SyncPoint(0, "forward", 0, CHANNELS), _forward_aggregate(status), 1, 3)
    _set(bad.array_records[wire.STATS], mean=np.zeros(CHANNELS, np.float32))
    with pytest.raises(ServerMessageError):
        _deliver(app, bad, context)
    reply = _deliver(app, good, context)
    status = reply.content.config_records[wire.STATUS]
    assert (status["phase"], status["point"]) == ("backward", 1)
    sums = BackwardSums(sum_grad=np.zeros(CHANNELS), sum_grad_xhat=np.zeros(CHANNELS))
    reply = _deliver(app, wire.encode_aggregate(1, 0, 1, SyncPoint(1, "backward", 0, CHANNELS), sums, 1, 3),
                     context)
    assert reply.content.config_records[wire.STATUS]["phase"] == "done"


def test_a_node_sent_a_malformed_aggregate_is_dropped_and_the_round_completes():
    """Through the strategy: the aggregate sent to one node is corrupted in transit (float32
    arrays). That node's handler fails, the server drops it with the client's own message
    as the reason, and the round finishes with the other two: no hang."""
    victim = 1007

    def corrupt(node, message):
        control = message.content.config_records.get(wire.CONTROL)
        if node == victim and control is not None and control["phase"] == wire.PHASE_AGGREGATE:
            # A new content for this node only: the server shares one aggregate among nodes.
            stats = message.content.array_records[wire.STATS]
            corrupted = ArrayRecord({k: Array(v.numpy().astype(np.float32)) for k, v in stats.items()})
            message.content = RecordDict({wire.CONTROL: ConfigRecord(dict(control)), wire.STATS: corrupted})
        return None  # let the ClientApp handle the (altered) message

    grid = LocalGrid(fedtan_client_app(make_client), 3, {}, intercept=corrupt)
    strategy = FedTAN(statistics="running", min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    reason = strategy.dropped[1][victim]
    assert "invalid train.fedtan message from the server" in reason and "dtype float32" in reason
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 1
    # The model is the honest pair's round (the restart's seed: attempt 1), computed without Flower.
    survivors = [n for n in grid.node_ids if n != victim]
    clients = [make_client(grid.contexts[n]) for n in survivors]
    keys = [client_seed_key(grid.contexts[n]) for n in survivors]
    start = {k: v.numpy() for k, v in initial_arrays().items()}
    expected = fedtan_round_in_process(clients, keys, start, derive_seed(strategy.seed, 1, 1), lr=0.1)
    final = {k: v.numpy() for k, v in result.arrays.items()}
    assert max(float(np.abs(final[k] - expected[k]).max()) for k in expected) <= 1e-10


def test_a_base_whose_parent_is_missing_is_not_created_blindly(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(tmp_path / "no" / "such" / "state"))
    with pytest.raises(FileNotFoundError, match=r"no/such does not exist\. Create it, or point FEDTAN_STATE_DIR"):
        a_state_with_weights()
