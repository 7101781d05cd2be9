"""A synchronised step over K clients equals centralised training on the pooled batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flwr_fedtan import SyncStep, aggregate_arrays, convert_batchnorm, pooled_backward
from flwr_fedtan.reference import drive_steps

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
    rel_err,
)

SIZES = {1: [16], 3: [7, 16, 33], 5: [7, 16, 33, 5, 12]}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def setup(name, k, dtype, momentum=None, set_momentum=False):
    central = disable_dropout(build(name, dtype))
    if set_momentum:
        for _, m in bn_modules(central):
            m.momentum = momentum
    clients = [convert_batchnorm(copy.deepcopy(central)) for _ in range(k)]
    batches = make_batches(name, SIZES[k], dtype)
    return central, clients, batches


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize(
    "name", ["resnet20", "vgg", "mlp", "twice-bn", "chained-bn", "tied-weights"]
)
def test_step_equals_centralised(name, k, dtype):
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    central, clients, batches = setup(name, k, dtype)
    n_calls = MODELS[name][3]

    loss_c, inputs = centralised_step(central, batches, record_inputs=True)
    assert len(inputs) == n_calls

    steps = make_steps(clients, batches)
    rec = Recorder(steps)
    assert rec.run() == 2 * n_calls

    # pooled statistics of every BN call == moments of the concatenated batch's BN input
    fwd = [(p, a) for p, a in zip(rec.points, rec.aggregates) if p.phase == "forward"]
    assert [p.call for p, _ in fwd] == list(range(n_calls))
    n_total = sum(SIZES[k])
    for (point, agg), x in zip(fwd, inputs):
        x = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1).numpy()
        assert point.channels == x.shape[0]
        assert agg.count == x.shape[1] and agg.num_examples == n_total
        scale = np.abs(x).max() + 1
        np.testing.assert_allclose(agg.mean, x.mean(axis=1), rtol=0, atol=tol * scale)
        np.testing.assert_allclose(agg.var, x.var(axis=1), rtol=tol, atol=tol * scale**2)

    # F == centralised mean loss
    fed_loss = sum(s.loss * s.num_examples for s in steps) / n_total
    assert fed_loss == pytest.approx(loss_c, rel=tol, abs=tol)

    # sum of the clients' gradients == centralised gradient (norm-relative)
    g_c = grad_vector([central])
    g_f = grad_vector(clients)
    assert rel_err(g_f, g_c) <= tol
    # per parameter, relative to the global gradient norm
    gnorm = g_c.norm()
    for (pn, p), *qs in zip(central.named_parameters(), *[c.parameters() for c in clients]):
        fed = sum(q.grad.to(torch.float64) for q in qs if q.grad is not None)
        assert float((fed - p.grad.to(torch.float64)).norm() / gnorm) <= tol, pn

    # running statistics, every client equal to the centralised model's
    ref = buffers(central)
    for c in clients:
        for key, value in buffers(c).items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(value, ref[key]), key
                assert value.dtype == torch.int64
            else:
                assert rel_err(value, ref[key]) <= tol, key


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("name", ["resnet20", "twice-bn"])
def test_running_stats_momentum_one_are_pooled_stats(name, dtype):
    """With momentum=1 the running stats after one step are the pooled batch's own."""
    dtype = DTYPES[dtype]
    central, clients, batches = setup(name, 5, dtype, momentum=1.0, set_momentum=True)
    _, inputs = centralised_step(central, batches, record_inputs=True)
    pooled_backward(clients, batches, F.cross_entropy)
    calls = {}  # module -> its last BN input (momentum 1: the last call wins)
    for x, m in zip(inputs, _call_order(central, batches)):
        calls[m] = x
    assert set(calls) == {m for _, m in bn_modules(central)}
    tol = TOL[dtype]
    for (name_c, m), *cms in zip(bn_modules(central), *[bn_modules(c) for c in clients]):
        x = calls[m].to(torch.float64).transpose(0, 1).reshape(m.num_features, -1)
        for _, cm in cms:
            assert rel_err(cm.running_mean, x.mean(1)) <= tol * 10, name_c
            assert rel_err(cm.running_var, x.var(1, correction=1)) <= tol * 10, name_c


def _call_order(model, batches):
    order = []
    hs = [m.register_forward_pre_hook(lambda mod, a: order.append(mod)) for _, m in bn_modules(model)]
    with torch.no_grad():
        model.eval()
        model(batches[0][0])
        model.train()
    for h in hs:
        h.remove()
    return order


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(
    "name", ["resnet20", "vgg", "mlp", "twice-bn", "chained-bn", "tied-weights", "nobn"]
)
def test_one_round_e1_equals_centralised_sgd(name, dtype):
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    k = 5
    central, clients, batches = setup(name, k, dtype)
    sizes = SIZES[k]
    n_total = sum(sizes)
    lr = 0.1

    centralised_step(central, batches)
    with torch.no_grad():
        for p in central.parameters():
            p -= lr * p.grad

    pooled_backward(clients, batches, F.cross_entropy)
    contributions = {}
    for cid, (model, n) in enumerate(zip(clients, sizes)):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for p in model.parameters():  # gradient of the client's own mean loss
            p.grad.mul_(n_total / n)
        opt.step()
        arrays = {key: v.detach().cpu().numpy() for key, v in model.state_dict().items()}
        contributions[f"node-{cid}"] = (arrays, n)
    result = aggregate_arrays(contributions)

    expected = central.state_dict()
    assert list(result) == list(expected)
    for key, value in expected.items():
        got = result[key]
        assert got.dtype == value.cpu().numpy().dtype, key
        if key.endswith("num_batches_tracked"):
            assert got.dtype == np.int64 and int(got) == int(value), key
        else:
            assert rel_err(torch.from_numpy(got), value) <= tol, key
    # parameters as one vector too
    flat_c = torch.cat([p.detach().flatten().double() for p in central.parameters()])
    names = [n for n, _ in central.named_parameters()]
    flat_f = torch.cat([torch.from_numpy(result[n]).flatten().double() for n in names])
    assert rel_err(flat_f, flat_c) <= tol



@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "far-from-zero"])
def test_float32_is_as_accurate_as_pytorch_batchnorm(offset):
    """Against float64 truth, a float32 FedTAN step is as accurate as float32 PyTorch on the
    pooled batch, also for BatchNorm inputs whose mean is hundreds of standard deviations
    from zero (where rounding of x itself limits both)."""
    torch.manual_seed(3)
    truth = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.SiLU(), torch.nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        truth[0].bias.fill_(offset)
    central = copy.deepcopy(truth).float()
    clients = [convert_batchnorm(copy.deepcopy(central)) for _ in range(3)]
    batches = [(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in (7, 16, 33)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    F.cross_entropy(truth(x.double()), y).backward()
    F.cross_entropy(central(x), y).backward()
    pooled_backward(clients, batches, F.cross_entropy)
    g = grad_vector([truth])
    pytorch_error = rel_err(grad_vector([central]), g)
    assert rel_err(grad_vector(clients), g) <= 2 * pytorch_error + 1e-6


def test_channels_last_model_and_inputs_equal_centralised():
    """Channels-last activations take other kernels (statistics, normalisation, backward
    sums); the result must not change."""
    central, clients, batches = setup("resnet20", 3, torch.float64)
    central = central.to(memory_format=torch.channels_last)
    clients = [c.to(memory_format=torch.channels_last) for c in clients]
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    loss_c, _ = centralised_step(central, batches)
    loss_f = pooled_backward(clients, batches, F.cross_entropy)
    assert loss_f == pytest.approx(loss_c, rel=1e-12)
    assert rel_err(grad_vector(clients), grad_vector([central])) <= 1e-10
    ref = buffers(central)
    for c in clients:
        for key, value in buffers(c).items():
            assert torch.equal(value, ref[key]) or rel_err(value, ref[key]) <= 1e-10


def _bf16_autocast_loss(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return F.cross_entropy(out.float(), y)


@pytest.mark.parametrize("case", ["bfloat16-model", "autocast"])
def test_reduced_precision_matches_centralised_to_its_precision(case):
    """bfloat16 BatchNorm inputs with bfloat16 parameters, and under CPU autocast with
    float32 parameters (chained-bn: one affine and one non-affine layer). bfloat16 keeps 8
    bits of mantissa, so the comparison is at that precision: a wrong formula would be off
    by order one."""
    central = build("chained-bn", torch.float32)
    batches = make_batches("chained-bn", SIZES[3], torch.float32)
    if case == "bfloat16-model":
        central = central.to(torch.bfloat16)
        batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    clients = [convert_batchnorm(copy.deepcopy(central)) for _ in batches]
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    central.zero_grad(set_to_none=True)
    if case == "autocast":
        _bf16_autocast_loss(central, x, y).backward()
        total = len(y)
        steps = [
            SyncStep(m, (lambda m=m, xb=xb, yb=yb: _bf16_autocast_loss(m, xb, yb)), len(xb), total)
            for m, (xb, yb) in zip(clients, batches)
        ]
        drive_steps(steps)
    else:
        F.cross_entropy(central(x), y).backward()
        pooled_backward(clients, batches, F.cross_entropy)
    fed = grad_vector(clients).double()
    ref = grad_vector([central]).double()
    assert torch.isfinite(fed).all()
    assert rel_err(fed, ref) <= 0.05
