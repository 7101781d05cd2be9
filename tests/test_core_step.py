"""SyncStep: exchange count and order, replay (in-process and in a fresh process), robustness."""

from __future__ import annotations

import copy
import os
import pathlib
import gc
import subprocess
import sys
import threading

import greenlet
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flwr_fedtan import StepProtocolError, SyncStep, convert_batchnorm, pooled_backward
from flwr_fedtan.reference import aggregate_requests, drive_steps

from tests._models import (
    single_thread,  # noqa: F401 (autouse fixture)
    MODELS,
    Recorder,
    bn_modules,
    build,
    buffers,
    centralised_step,
    disable_dropout,
    grad_vector,
    make_batches,
    make_steps,
    payload_arrays,
    rel_err,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = [7, 16, 33]


def _runs_step_forward(g: greenlet.greenlet) -> bool:
    frame = g.gr_frame
    while frame is not None:
        if frame.f_code.co_name == "_forward_body":
            return True
        frame = frame.f_back
    return False


def paused_forwards() -> list:
    """Step forwards (greenlets) that started and have not ended: each holds a graph."""
    return [
        g for g in gc.get_objects()
        if type(g) is greenlet.greenlet and bool(g) and not g.dead and _runs_step_forward(g)
    ]


@pytest.fixture
def new_paused_forwards():
    """Paused step forwards left by the test (a leak elsewhere doesn't count)."""
    before = {id(g) for g in paused_forwards()}
    return lambda: [g for g in paused_forwards() if id(g) not in before]


def clients_for(name, sizes=SIZES, dtype=torch.float64, dropout=False):
    central = build(name, dtype)
    if not dropout:
        disable_dropout(central)
    return central, [convert_batchnorm(copy.deepcopy(central)) for _ in sizes]


def assert_same_grads_and_buffers(a: nn.Module, b: nn.Module, tol: float = 1e-12) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad) or rel_err(q.grad, p.grad) <= tol, n
    for (n, u), v in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(u, v), n


# --------------------------------------------------------------------------- exchange count
@pytest.mark.parametrize("name", ["resnet20", "vgg", "mlp", "twice-bn"])
def test_two_exchanges_per_bn_call_in_order(name):
    central, clients = clients_for(name)
    batches = make_batches(name, SIZES)
    n_calls = MODELS[name][3]
    # channels of every BN call, in execution order, from the unconverted model
    channels = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: channels.append(a[0].shape[1]))
             for _, m in bn_modules(central)]
    centralised_step(central, batches)
    for h in hooks:
        h.remove()
    assert len(channels) == n_calls

    steps = make_steps(clients, batches)
    assert drive_steps(steps) == 2 * n_calls
    assert all(s.done and s.num_sync_points == 2 * n_calls for s in steps)

    rec = Recorder(make_steps(clients, batches))
    rec.run()
    pts = rec.points
    assert [p.index for p in pts] == list(range(2 * n_calls))
    assert [p.phase for p in pts] == ["forward"] * n_calls + ["backward"] * n_calls
    assert [p.call for p in pts] == list(range(n_calls)) + list(reversed(range(n_calls)))
    assert [p.channels for p in pts] == channels + channels[::-1]
    for exchange in rec.requests:  # every client at the same point each time
        assert len({p for p, _ in exchange.values()}) == 1


def test_twice_called_module_counts_two_calls():
    _, clients = clients_for("twice-bn")
    model = clients[0]
    assert len(bn_modules(model)) == 1
    x, y = make_batches("twice-bn", [9])[0]
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), num_examples=9)
    assert drive_steps([step]) == 4
    assert int(model.bn.num_batches_tracked) == 3 + 2


@pytest.mark.parametrize("total", [True, False])
def test_model_without_bn_needs_no_exchange(total):
    central, clients = clients_for("nobn")
    batches = make_batches("nobn", SIZES)
    centralised_step(central, batches)
    steps = make_steps(clients, batches, total=total)
    assert drive_steps(steps) == 0
    n_total = sum(SIZES)
    for model, (x, y), step in zip(clients, batches, steps):
        local = copy.deepcopy(model)
        local.zero_grad()
        F.cross_entropy(local(x), y).backward()
        share = len(x) / n_total if total else 1.0
        for p, q in zip(model.parameters(), local.parameters()):
            assert rel_err(p.grad, q.grad * share) <= 1e-14
        assert step.local_gradient_scale == (n_total / len(x) if total else 1.0)
    if total:
        assert rel_err(grad_vector(clients), grad_vector([central])) <= 1e-12


def test_total_examples_learned_from_first_aggregate():
    _, clients = clients_for("mlp")
    batches = make_batches("mlp", SIZES)
    twins = [copy.deepcopy(m) for m in clients]
    drive_steps(make_steps(clients, batches, total=True))
    steps = make_steps(twins, batches, total=False)
    drive_steps(steps)
    assert [s.total_examples for s in steps] == [sum(SIZES)] * 3
    for a, b in zip(clients, twins):
        assert_same_grads_and_buffers(a, b)


@pytest.mark.parametrize("count", [float("nan"), 0.5, "own-minus-one"])
def test_a_pooled_count_below_the_clients_own_is_refused(count):
    """A NaN count, or a pooled count smaller than the count this client itself sent for
    that call, cannot come from a real aggregation: refused, naming both counts."""
    _, clients = clients_for("mlp")
    (x, y), = make_batches("mlp", [6])
    step = SyncStep(clients[0], lambda: F.cross_entropy(clients[0](x), y), num_examples=6)
    point, own = step.start()
    bad = own.count - 1 if count == "own-minus-one" else count
    aggregate = type(own)(count=bad, num_examples=6, mean=own.mean, var=own.var)
    with pytest.raises(StepProtocolError, match=r"smaller than this client's own \(6 / 6\)"):
        step.resume(aggregate)
    step.close()


# --------------------------------------------------------------------------- replay
def _live(name, seeds=None, dropout=False, perturb_rng=False):
    central, clients = clients_for(name, dropout=dropout)
    batches = make_batches(name, SIZES)
    start_state = copy.deepcopy(clients[0].state_dict())
    steps = make_steps(clients, batches, seeds=seeds)
    requests, aggregates = [], []
    reqs = {k: s.start() for k, s in enumerate(steps)}
    while reqs[0] is not None:
        requests.append((reqs[0][0], {k: v.copy() for k, v in payload_arrays(reqs[0][1]).items()}))
        _, agg = aggregate_requests(reqs)
        aggregates.append(agg)
        if perturb_rng:
            torch.rand(17)  # other code using the global RNG between messages
        reqs = {k: s.resume(agg) for k, s in enumerate(steps)}
    return central, clients[0], batches[0], start_state, requests, aggregates


def _replay(name, state, batch, aggregates, seed=None, dropout=False, dtype=torch.float64):
    model = build(name, dtype)
    if not dropout:
        disable_dropout(model)
    model = convert_batchnorm(model)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    x, y = batch
    return model, lambda: F.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    "name,dropout,seeds",
    [("resnet20", False, None), ("twice-bn", False, None), ("vgg", True, [123, 124, 125])],
)
def test_replay_in_process(name, dropout, seeds):
    _, live, batch, state, requests, aggregates = _live(name, seeds, dropout, perturb_rng=True)
    n_calls = MODELS[name][3]
    assert len(aggregates) == 2 * n_calls
    seed = None if seeds is None else seeds[0]
    for j in sorted({0, n_calls // 2, n_calls, n_calls + n_calls // 2, 2 * n_calls - 1}):
        model, fn = _replay(name, state, batch, aggregates, dropout=dropout)
        step, request = SyncStep.replay(
            model, fn, len(batch[0]), aggregates[:j], total_examples=sum(SIZES), seed=seed
        )
        assert request is not None and step.pending == request[0]
        point, payload = request
        assert point == requests[j][0]
        got = payload_arrays(payload)
        assert got.keys() == requests[j][1].keys()
        for key, value in got.items():
            np.testing.assert_array_equal(value, requests[j][1][key], err_msg=f"{j} {key}")
        for agg in aggregates[j:]:
            request = step.resume(agg)
        assert request is None and step.done
        assert len(step.received) == len(aggregates)
        assert_same_grads_and_buffers(live, model)
    # the complete log: replay finishes the step
    model, fn = _replay(name, state, batch, aggregates, dropout=dropout)
    step, request = SyncStep.replay(model, fn, len(batch[0]), aggregates, sum(SIZES), seed=seed)
    assert request is None and step.done
    assert_same_grads_and_buffers(live, model)


def test_replay_too_many_aggregates_raises(new_paused_forwards):
    _, _, batch, state, _, aggregates = _live("mlp")
    model, fn = _replay("mlp", state, batch, aggregates)
    with pytest.raises(StepProtocolError, match="replay log"):
        SyncStep.replay(model, fn, len(batch[0]), aggregates + [aggregates[-1]], sum(SIZES))
    assert not new_paused_forwards()


@pytest.mark.parametrize("cut", ["forward", "backward"])
def test_replay_with_a_log_that_does_not_fit_raises_and_leaves_no_paused_forward(cut, new_paused_forwards):
    """A log that does not fit the step (here: shifted by one aggregate) raises
    StepProtocolError; the step replay built internally must not be left paused with a live
    forward (a greenlet) holding the graph (the caller never gets the step to close it)."""
    _, _, batch, state, _, aggregates = _live("mlp")
    model, fn = _replay("mlp", state, batch, aggregates)
    log = aggregates[1:3] if cut == "forward" else aggregates[:3] + aggregates[:1]
    with pytest.raises(StepProtocolError):
        SyncStep.replay(model, fn, len(batch[0]), log, sum(SIZES))
    assert not new_paused_forwards()


def test_seeded_step_leaves_global_rng_untouched_and_is_deterministic():
    _, clients = clients_for("vgg", dropout=True)
    a, b = clients[0], copy.deepcopy(clients[0])
    x, y = make_batches("vgg", [12])[0]
    torch.manual_seed(99)
    before = torch.get_rng_state()
    drive_steps([SyncStep(a, lambda: F.cross_entropy(a(x), y), 12, seed=123)])
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)
    drive_steps([SyncStep(b, lambda: F.cross_entropy(b(x), y), 12, seed=123)])
    assert_same_grads_and_buffers(a, b)
    # dropout is really active: another seed gives another gradient
    c = copy.deepcopy(clients[1])
    drive_steps([SyncStep(c, lambda: F.cross_entropy(c(x), y), 12, seed=7)])
    assert rel_err(grad_vector([c]), grad_vector([a])) > 1e-3


_CHILD = r"""
import sys, torch, numpy as np
import torch.nn.functional as F
from flwr_fedtan import SyncStep, convert_batchnorm
from tests._models import build, disable_dropout, payload_arrays
blob = torch.load(sys.argv[1], weights_only=False)
out = {}
for j in blob["cuts"]:
    model = build(blob["name"], torch.float64)
    if not blob["dropout"]:
        disable_dropout(model)
    model = convert_batchnorm(model)
    model.load_state_dict(blob["state"])
    x, y = blob["batch"]
    step, request = SyncStep.replay(model, lambda: F.cross_entropy(model(x), y), len(x),
                                    blob["aggregates"][:j], blob["total"], seed=blob["seed"])
    point, payload = request
    res = {"point": point, "payload": payload_arrays(payload)}
    for agg in blob["aggregates"][j:]:
        request = step.resume(agg)
    assert request is None
    res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    res["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
    out[j] = res
torch.save(out, sys.argv[2])
"""


def test_replay_in_fresh_process(tmp_path):
    name, seeds = "vgg", [123, 124, 125]
    _, live, batch, state, requests, aggregates = _live(name, seeds, dropout=True)
    n_calls = MODELS[name][3]
    cuts = [n_calls // 2, n_calls + n_calls // 2]
    blob = dict(name=name, dropout=True, state=state, batch=batch, aggregates=aggregates,
                total=sum(SIZES), seed=seeds[0], cuts=cuts)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(blob, src)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = torch.load(dst, weights_only=False)
    for j in cuts:
        res = out[j]
        assert res["point"] == requests[j][0]
        # the child runs torch's default thread count, the parent one thread: reductions may
        # differ in the last bit, so <= 1e-12 (norm-relative) rather than bitwise
        for key, value in res["payload"].items():
            assert rel_err(torch.from_numpy(value), torch.from_numpy(requests[j][1][key])) <= 1e-12, key
        for n, p in live.named_parameters():
            assert torch.equal(res["grads"][n], p.grad) or rel_err(res["grads"][n], p.grad) <= 1e-12, n
        for n, b in live.named_buffers():
            assert torch.equal(res["buffers"][n], b) or rel_err(res["buffers"][n], b) <= 1e-12, n


# --------------------------------------------------------------------------- robustness
class Boom(Exception):
    pass


@pytest.mark.parametrize("when", ["before", "after"])
def test_forward_error_propagates_and_leaves_no_paused_forward(when, new_paused_forwards):
    _, clients = clients_for("mlp")
    model = clients[0]
    x, y = make_batches("mlp", [8])[0]

    def fn():
        if when == "before":
            raise Boom("before any BN")
        model(x)
        raise Boom("after the BN calls")

    step = SyncStep(model, fn, num_examples=8)
    if when == "before":
        with pytest.raises(Boom):
            step.start()
    else:
        request = step.start()
        assert request is not None
        with pytest.raises(Boom, match="after"):
            while request is not None:
                request = step.resume(aggregate_requests({0: request})[1])
    assert step.done and step.pending is None
    step.close()
    assert not new_paused_forwards()


def test_error_in_drive_closes_every_step(new_paused_forwards):
    _, a = clients_for("mlp")
    _, b = clients_for("twice-bn")
    batches = make_batches("mlp", [5, 6])
    steps = make_steps([a[0], b[0]], batches)
    with pytest.raises((StepProtocolError, Exception)):
        drive_steps(steps)
    assert not new_paused_forwards()


@pytest.mark.parametrize("pause", ["forward", "backward", "unstarted"])
def test_close_paused_step_ends_its_forward(pause, new_paused_forwards):
    _, clients = clients_for("resnet20")
    model = clients[0]
    x, y = make_batches("resnet20", [6])[0]
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), num_examples=6)
    if pause != "unstarted":
        request = step.start()
        target = 5 if pause == "forward" else 19 + 3
        for _ in range(target):
            request = step.resume(aggregate_requests({0: request})[1])
        assert step.pending.phase == pause
        assert (pause == "forward") == bool(new_paused_forwards())
    step.close()
    assert step.done and step.pending is None
    assert not new_paused_forwards()
    with pytest.raises(StepProtocolError):
        step.resume(None)  # type: ignore[arg-type]


def test_resume_without_pending_and_double_start(new_paused_forwards):
    _, clients = clients_for("mlp")
    model = clients[0]
    x, y = make_batches("mlp", [6])[0]
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), num_examples=6)
    with pytest.raises(StepProtocolError):
        step.resume(None)  # type: ignore[arg-type]
    request = step.start()
    with pytest.raises(StepProtocolError):
        step.start()
    with pytest.raises(StepProtocolError):  # backward sums at a forward point
        step.resume(_fake_backward(request[0].channels))
    assert step.pending == request[0]  # a rejected aggregate leaves the step waiting
    request = step.resume(aggregate_requests({0: request})[1])
    assert request[0].index == 1
    step.close()
    assert not new_paused_forwards()


def _fake_backward(c):
    from flwr_fedtan import BackwardSums

    return BackwardSums(np.zeros(c), np.zeros(c))


class NoGradNet(nn.Module):
    """A BN call under torch.no_grad() inside the step: it updates running stats and feeds
    the loss as a constant."""

    def __init__(self):
        super().__init__()
        self.lin1, self.bn1 = nn.Linear(12, 10), nn.BatchNorm1d(10)
        self.lin2, self.bn2 = nn.Linear(10, 10), nn.BatchNorm1d(10)
        self.out = nn.Linear(10, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.lin1(x)))
        z = self.lin2(h)  # requires grad, but only feeds the no_grad BN call
        with torch.no_grad():
            s = self.bn2(z)
        return self.out(h * torch.sigmoid(s))


class InplaceReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
            nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(6 * 8 * 8, 12), nn.BatchNorm1d(12), nn.ReLU(inplace=True),
            nn.Linear(12, 10),
        )

    def forward(self, x):
        return self.net(x)


def _bn_variant(**opts):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.bn1 = nn.Linear(12, 10), nn.BatchNorm1d(10, **opts)
            self.lin2, self.bn2 = nn.Linear(10, 10), nn.BatchNorm1d(10, **opts)
            self.out = nn.Linear(10, 5)

        def forward(self, x):
            return self.out(torch.relu(self.bn2(self.lin2(torch.relu(self.bn1(self.lin1(x)))))))

    return Net


def _compare_with_centralised(factory, name, train=True, steps=1, check_none=False):
    torch.manual_seed(0)
    central = factory().double().train(train)
    clients = [convert_batchnorm(copy.deepcopy(central)) for _ in SIZES]
    for _ in range(steps):
        batches = make_batches(name, SIZES)
        loss_c, _ = centralised_step(central, batches)
        loss_f = pooled_backward(clients, batches, F.cross_entropy)
        assert loss_f == pytest.approx(loss_c, rel=1e-12)
        assert rel_err(grad_vector(clients), grad_vector([central])) <= 1e-10
        ref = buffers(central)
        for c in clients:
            for key, value in buffers(c).items():
                assert rel_err(value, ref[key]) <= 1e-12 if value.is_floating_point() \
                    else torch.equal(value, ref[key]), key
    if check_none:
        for (n, p), q in zip(central.named_parameters(), clients[0].parameters()):
            assert (p.grad is None) == (q.grad is None), f"{n}: centralised grad is {p.grad}, fedtan {q.grad}"
    return central, clients


def test_no_grad_bn_inside_step_matches_centralised():
    central, clients = _compare_with_centralised(NoGradNet, "mlp")
    assert central.bn2.weight.grad is None  # the centralised model never touched it
    assert central.lin2.weight.grad is None
    assert int(clients[0].bn2.num_batches_tracked) == 1


def test_no_grad_bn_params_keep_grad_none_like_centralised():
    """A BN call under no_grad contributes no gradient: its parameters' .grad must stay None
    as in centralised training (a zero tensor instead changes what optimisers with weight
    decay or momentum do, e.g. SGD(weight_decay=...) would decay a parameter centralised
    training does not touch)."""
    _compare_with_centralised(NoGradNet, "mlp", check_none=True)


def test_inplace_relu_after_bn_matches_centralised():
    _compare_with_centralised(InplaceReluNet, "vgg")


@pytest.mark.parametrize("train", [True, False])
def test_track_running_stats_false_matches_centralised(train):
    # batch statistics in train and in eval mode: synchronised either way
    _compare_with_centralised(_bn_variant(track_running_stats=False), "mlp", train=train)


@pytest.mark.parametrize("affine", [True, False])
def test_momentum_none_matches_centralised(affine):
    central, clients = _compare_with_centralised(
        _bn_variant(momentum=None, affine=affine), "mlp", steps=3
    )
    assert int(clients[0].bn1.num_batches_tracked) == 3


def test_eval_mode_bn_is_not_synchronised():
    central, clients = clients_for("mlp")
    for m in [central] + clients:
        m.eval()
    batches = make_batches("mlp", SIZES)
    centralised_step(central, batches)
    steps = make_steps(clients, batches)
    assert drive_steps(steps) == 0
    assert rel_err(grad_vector(clients), grad_vector([central])) <= 1e-12


def test_payload_arrays_not_aliased_with_gradients():
    """The arrays a step hands out are the caller's: finishing the step, or touching
    .grad afterwards, must not change them (and vice versa)."""
    _, clients = clients_for("twice-bn")
    model = clients[0]
    x, y = make_batches("twice-bn", [9])[0]
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), num_examples=9)
    handed_out = []
    request = step.start()
    while request is not None:
        handed_out.append((payload_arrays(request[1]), {k: v.copy() for k, v in payload_arrays(request[1]).items()}))
        request = step.resume(aggregate_requests({0: request})[1])
    for live, snap in handed_out:
        for key in snap:
            np.testing.assert_array_equal(live[key], snap[key], err_msg=key)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for live, _ in handed_out:
        for v in live.values():
            v[...] = np.nan
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


# --------------------------------------------------------------------------- thread-local state
def test_driver_grad_mode_and_forward_grad_mode_stay_apart():
    """The paused forward and its driver share one OS thread: the driver may run under
    no_grad (as Flower client code may) without the forward losing its graph, and sees its
    own grad mode again after every pause."""
    central, clients = clients_for("resnet20", sizes=[6, 9])
    batches = make_batches("resnet20", [6, 9])
    reference = [copy.deepcopy(c) for c in clients]
    drive_steps(make_steps(reference, batches))

    steps = make_steps(clients, batches)
    with torch.no_grad():
        requests = {i: s.start() for i, s in enumerate(steps)}
        while requests[0] is not None:
            assert not torch.is_grad_enabled()
            _, agg = aggregate_requests(requests)
            requests = {i: s.resume(agg) for i, s in enumerate(steps)}
    assert torch.is_grad_enabled()  # the no_grad block above has ended
    for a, b in zip(clients, reference):
        assert_same_grads_and_buffers(a, b, tol=0)


def test_autocast_entered_in_the_forward_does_not_leak_into_the_driver():
    _, clients = clients_for("mlp", sizes=[8], dtype=torch.float32)
    model = clients[0]
    x, y = make_batches("mlp", [8], torch.float32)[0]

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    step = SyncStep(model, forward, num_examples=8)
    request = step.start()
    while request is not None:
        assert not torch.is_autocast_enabled("cpu")
        request = step.resume(aggregate_requests({0: request})[1])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resume_from_another_thread_raises_a_clear_error(new_paused_forwards):
    _, clients = clients_for("mlp")
    model = clients[0]
    x, y = make_batches("mlp", [6])[0]
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), num_examples=6)
    request = step.start()
    errors = []

    def other_thread():
        try:
            step.resume(aggregate_requests({0: request})[1])
        except StepProtocolError as error:
            errors.append(error)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "thread that started it" in str(errors[0])
    assert step.pending == request[0]  # still usable from its own thread
    step.resume(aggregate_requests({0: request})[1])
    step.close()
    assert not new_paused_forwards()


@pytest.mark.parametrize(
    "name, fallback", [("resnet20", False), ("chained-bn", False), ("tied-weights", True)]
)
def test_staged_backward_falls_back_only_where_stages_cannot_be_kept_apart(name, fallback):
    central, clients = clients_for(name)
    batches = make_batches(name, SIZES)
    centralised_step(central, batches)
    steps = make_steps(clients, batches)
    drive_steps(steps)
    assert [s.used_fallback_backward for s in steps] == [fallback] * len(steps)
    assert rel_err(grad_vector(clients), grad_vector([central])) <= 1e-10


@pytest.mark.parametrize("name", ["mlp", "chained-bn"])
def test_input_that_requires_grad_gets_the_centralised_input_gradient(name):
    """A BatchNorm applied directly to a leaf input that requires grad (the mlp's first
    layer) or to the input of a Linear: the input's gradient is a backward stage's output."""
    central, clients = clients_for(name)
    batches = [(x.clone().requires_grad_(), y) for x, y in make_batches(name, SIZES)]
    pooled = torch.cat([x.detach() for x, _ in batches]).requires_grad_()
    targets = torch.cat([y for _, y in batches])
    central.zero_grad(set_to_none=True)
    F.cross_entropy(central(pooled), targets).backward()
    drive_steps(make_steps(clients, batches))
    federated = torch.cat([x.grad for x, _ in batches])
    assert rel_err(federated, pooled.grad) <= 1e-10
    assert rel_err(grad_vector(clients), grad_vector([central])) <= 1e-10


def test_hooks_on_batchnorm_outputs_see_the_centralised_gradient():
    """A tensor hook on a BatchNorm output (as a user's gradient probe would register)
    fires although the step captures that gradient and never runs the output's node;
    the clients' hooked gradients, stacked, are the centralised ones."""
    central, clients = clients_for("resnet20")
    batches = make_batches("resnet20", SIZES)

    def probe(model):
        seen: dict[int, torch.Tensor] = {}
        for i, (_, m) in enumerate(bn_modules(model)):
            def keep(mod, args, out, i=i):
                def add(grad):
                    seen[i] = grad.detach().clone() if i not in seen else seen[i] + grad
                out.register_hook(add)
            m.register_forward_hook(keep)
        return seen

    expected = probe(central)
    centralised_step(central, batches)
    seen = [probe(c) for c in clients]
    drive_steps(make_steps(clients, batches))
    assert len(expected) == MODELS["resnet20"][3]
    for i, grad in expected.items():
        assert rel_err(torch.cat([s[i] for s in seen]), grad) <= 1e-10, i
