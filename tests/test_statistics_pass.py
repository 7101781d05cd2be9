"""The statistics pass (federated precise-BN) against central precise-BN in float64.

Reference, independent of the pass: the model in training mode with every BatchNorm's
``momentum=None`` (cumulative average) and reset buffers, one forward of the concatenated
examples of all clients. Its running buffers are what the pass must give, to 1e-10.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flwr_fedtan import convert_batchnorm
from flwr_fedtan.aggregation import ForwardStats, exact_running_statistics
from flwr_fedtan.reference import pooled_statistics
from flwr_fedtan.statistics_pass import StatisticsPass
from simulations.app.models import build_model
from tests._models import build, make_batches, single_thread  # noqa: F401 (an autouse fixture)

SIZES = [7, 3, 12]  # unequal client sizes


def central_precise_bn(model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Precise-BN on the concatenated examples: train mode, momentum=None, reset buffers."""
    reference = copy.deepcopy(model).double().train()
    for module in reference.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        reference(torch.cat([x.double() for x in inputs]))
    return {k: v for k, v in reference.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def assert_matches_precise_bn(model: nn.Module, inputs: list[torch.Tensor], tol: float = 1e-10) -> dict:
    expected = central_precise_bn(model, inputs)
    models = [copy.deepcopy(model) for _ in inputs]
    params_before = {k: v.clone() for k, v in models[0].state_dict().items()}
    got = pooled_statistics(models, inputs)
    assert set(got) == set(expected), f"buffers set {sorted(got)[:4]}, expected {sorted(expected)[:4]}"
    for key, value in expected.items():
        # A mean's scale is its layer's spread too: some means are 0 up to rounding (a
        # 1x1 convolution of normalised features), where a plain relative error is noise.
        scale = np.abs(value.numpy()).max()
        if key.endswith("running_mean"):
            scale = max(scale, float(expected[key[: -len("mean")] + "var"].sqrt().max()))
        err = np.abs(got[key] - value.numpy()).max() / max(scale, 1e-12)
        assert err < tol, f"{key}: relative error {err:.2e}"
    for m in models:  # loaded into every model; nothing else changed
        state = m.state_dict()
        for key, before in params_before.items():
            if key in got:
                assert torch.equal(state[key], torch.as_tensor(got[key]))
            else:
                assert torch.equal(state[key], before), key
    return got


@pytest.mark.parametrize("name", ["resnet20", "mlp", "twice-bn"])
def test_pass_equals_central_precise_bn(name):
    model = build(name)  # non-trivial affine parameters and running statistics
    inputs = [x for x, _ in make_batches(name, SIZES)]
    got = assert_matches_precise_bn(model, inputs)
    if name == "twice-bn":  # one layer called twice: the mean of its two calls' statistics
        assert set(got) == {"bn.running_mean", "bn.running_var"}


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_pass_on_the_apps_models(name):
    torch.manual_seed(0)
    model = convert_batchnorm(build_model(name, num_classes=10, in_channels=1)).double()
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64) * (1 + k) + k for k, n in enumerate(SIZES)]
    assert_matches_precise_bn(model, inputs)


def test_pass_on_a_timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=5, drop_rate=0.0).double()
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64) + k for k, n in enumerate([4, 2, 5])]
    assert_matches_precise_bn(model, inputs)


def test_batchnorm1d_on_three_dimensional_input_and_affine_free_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_seq = nn.BatchNorm1d(4)  # (N, C, L)
            self.bn_free = nn.BatchNorm1d(4, affine=False)
            self.bn_untracked = nn.BatchNorm1d(4, track_running_stats=False)  # normalises, no buffers
            self.lin = nn.Linear(4, 4)
            self.bn_last = nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.bn_free(self.bn_untracked(self.bn_seq(x)).relu()).mean(dim=2)
            return self.bn_last(self.lin(h))

    torch.manual_seed(0)
    model = Net().double()
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(n, 4, 6, generator=g, dtype=torch.float64) * (k + 1) for k, n in enumerate(SIZES)]
    got = assert_matches_precise_bn(model, inputs)
    assert not any(k.startswith("bn_untracked") for k in got)


def test_pass_leaves_training_flags_and_parameters_alone():
    model = build("resnet20")
    model.eval()
    model.layer1[0].train() if hasattr(model, "layer1") else None
    flags = [m.training for m in model.modules()]
    inputs = [x for x, _ in make_batches("resnet20", SIZES)]
    models = [copy.deepcopy(model) for _ in inputs]
    pooled_statistics(models, inputs)
    assert [m.training for m in models[0].modules()] == flags


def test_one_client_is_precise_bn_on_its_own_examples():
    model = build("mlp")
    x = make_batches("mlp", [9])[0][0]
    assert_matches_precise_bn(model, [x])


def test_replay_rebuilds_a_paused_pass():
    model = build("resnet20")
    inputs = [x for x, _ in make_batches("resnet20", SIZES)]
    models = [copy.deepcopy(model) for _ in inputs]
    passes = [StatisticsPass(m, x) for m, x in zip(models, inputs)]
    from flwr_fedtan.reference import aggregate_requests

    requests = {k: p.start() for k, p in enumerate(passes)}
    received = []
    for _ in range(5):
        _, aggregate = aggregate_requests(requests)
        received.append(aggregate)
        requests = {k: passes[k].resume(aggregate) for k in requests}
    rebuilt, request = StatisticsPass.replay(copy.deepcopy(model), inputs[1], received)
    assert request[0] == requests[1][0]
    np.testing.assert_array_equal(request[1].mean, requests[1][1].mean)
    np.testing.assert_array_equal(request[1].var, requests[1][1].var)
    for p in passes + [rebuilt]:
        p.close()


def test_a_pooled_aggregate_that_does_not_fit_is_refused():
    model = build("mlp")
    x = make_batches("mlp", [6])[0][0]
    stats_pass = StatisticsPass(model, x)
    point, payload = stats_pass.start()
    bad = ForwardStats(count=payload.count, num_examples=6, mean=np.full(point.channels, np.nan), var=payload.var)
    with pytest.raises(Exception, match="non-finite"):
        stats_pass.resume(bad)
    stats_pass.close()
    stats_pass = StatisticsPass(model, x)
    point, payload = stats_pass.start()
    small = ForwardStats(count=1.0, num_examples=1, mean=payload.mean, var=payload.var)
    with pytest.raises(Exception, match="smaller than this client's own"):
        stats_pass.resume(small)
    stats_pass.close()


def test_exact_running_statistics_is_the_unbiased_mean_over_calls():
    reference = {"bn.running_mean": np.zeros(2, np.float32), "bn.running_var": np.ones(2, np.float32)}
    pooled = [
        ForwardStats(count=4.0, num_examples=4, mean=np.array([1.0, 2.0]), var=np.array([3.0, 6.0])),
        ForwardStats(count=10.0, num_examples=4, mean=np.array([3.0, 0.0]), var=np.array([9.0, 0.0])),
    ]
    calls = {"bn.running_mean": ("mean", [0, 1]), "bn.running_var": ("var", [0, 1])}
    out = exact_running_statistics(pooled, calls, reference)
    np.testing.assert_allclose(out["bn.running_mean"], [2.0, 1.0])
    np.testing.assert_allclose(out["bn.running_var"], [(3 * 4 / 3 + 9 * 10 / 9) / 2, (6 * 4 / 3) / 2], rtol=1e-6)
    assert out["bn.running_var"].dtype == np.float32
    for bad, match in [
        ({"other": ("mean", [0])}, "not an array"),
        ({"bn.running_mean": ("mean", [2])}, "outside"),
        ({"bn.running_mean": ("mean", [])}, "outside"),
        ({"bn.running_mean": ("std", [0])}, "kind"),
    ]:
        with pytest.raises(ValueError, match=match):
            exact_running_statistics(pooled, bad, reference)
    huge = [ForwardStats(count=4.0, num_examples=4, mean=np.array([1e308, 1e308]), var=np.array([1e308, 1e308]))]
    with pytest.raises(ValueError, match="non-finite"):
        exact_running_statistics(huge, {"bn.running_var": ("var", [0])}, reference)
