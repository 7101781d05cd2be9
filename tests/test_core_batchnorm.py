"""convert_batchnorm / FedTANBatchNorm outside a synchronised step: a drop-in replacement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flwr_fedtan import FedTANBatchNorm, SyncStep, UnsupportedModelError, convert_batchnorm
from flwr_fedtan.batchnorm import check_model, validate

from tests._models import MODELS, bn_modules, build, single_thread  # noqa: F401 (autouse fixture)

BN_CASES = [
    (nn.BatchNorm1d, (6, 4)),
    (nn.BatchNorm1d, (6, 4, 5)),
    (nn.BatchNorm2d, (6, 4, 3, 3)),
    (nn.BatchNorm3d, (6, 4, 2, 3, 2)),
    (nn.SyncBatchNorm, (6, 4, 3)),
]
OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(track_running_stats=False),
    dict(affine=False),
    dict(affine=False, track_running_stats=False, momentum=None),
    dict(eps=1e-3, momentum=0.3),
]


class Wrap(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Identity()
        self.bn = bn

    def forward(self, x):
        return self.bn(x)


@pytest.mark.parametrize("cls,shape", BN_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_convert_is_drop_in(cls, shape, opts):
    torch.manual_seed(0)
    orig = Wrap(cls(4, **opts).double())
    if orig.bn.affine:
        with torch.no_grad():
            orig.bn.weight.uniform_(0.5, 1.5)
            orig.bn.bias.uniform_(-1, 1)
    ref = copy.deepcopy(orig)
    sd_before = {k: (v.shape, v.dtype) for k, v in orig.state_dict().items()}
    params_before = {n: p for n, p in orig.named_parameters()}
    opt = torch.optim.SGD(orig.parameters(), lr=0.1) if orig.bn.affine else None

    model = convert_batchnorm(orig)
    assert model is orig
    assert isinstance(model.bn, FedTANBatchNorm)
    assert not any(type(m) is cls for m in model.modules())
    # same keys, shapes, dtypes; same Parameter objects
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == sd_before
    assert list(model.state_dict()) == list(ref.state_dict())
    for n, p in model.named_parameters():
        assert p is params_before[n]
    check_model(model)

    # outside a synchronised step: identical outputs and running-stat updates
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        for mode in ("train", "eval"):
            model.train(mode == "train")
            ref.train(mode == "train")
            out, out_ref = model(x), ref(x)
            assert torch.equal(out, out_ref), mode
            for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
                assert torch.equal(a, b), (mode, k)
    if orig.bn.affine:
        model.train()
        ref.train()
        x = torch.randn(shape, dtype=torch.float64)
        model(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
        # the optimiser built before conversion still updates the converted layer
        before = model.bn.weight.detach().clone()
        opt.step()
        assert not torch.equal(model.bn.weight.detach(), before)

    # load_state_dict both ways with the unconverted model
    fresh = Wrap(cls(4, **opts).double())
    fresh.load_state_dict(model.state_dict())
    for (k, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    other = convert_batchnorm(Wrap(cls(4, **opts).double()))
    other.load_state_dict(ref.state_dict())
    for (k, a), (_, b) in zip(other.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "cls,bad",
    [(nn.BatchNorm2d, (4, 4, 3)), (nn.BatchNorm2d, (4, 4)), (nn.BatchNorm1d, (4, 4, 3, 3)),
     (nn.BatchNorm3d, (4, 4, 3, 3)), (nn.SyncBatchNorm, (4,))],
)
def test_input_rank_checks_as_original(cls, bad):
    orig = cls(4)
    conv = convert_batchnorm(copy.deepcopy(orig))
    x = torch.randn(bad)
    with pytest.raises(ValueError) as e_orig:
        orig(x)
    with pytest.raises(ValueError) as e_conv:
        conv(x)
    assert str(e_conv.value) == str(e_orig.value)
    assert f"got {len(bad)}D input" in str(e_conv.value)


def test_batchnorm2d_rejects_3d_input_inside_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (4, 1)))
    model.append(nn.BatchNorm2d(4))
    model = convert_batchnorm(model)
    x = torch.randn(5, 3)
    step = SyncStep(model, lambda: model(x).sum(), num_examples=5)
    with pytest.raises(ValueError, match="expected 4D input"):
        step.start()
    step.close()


@pytest.mark.parametrize("name", ["resnet20", "vgg", "mlp", "twice-bn"])
def test_convert_models_keeps_state_dict(name):
    orig = build(name)
    n_bn = len(bn_modules(orig))
    ref_sd = copy.deepcopy(orig.state_dict())
    model = convert_batchnorm(orig)
    assert sum(isinstance(m, FedTANBatchNorm) for m in model.modules()) == n_bn
    sd = model.state_dict()
    assert list(sd) == list(ref_sd)
    for k in sd:
        assert sd[k].shape == ref_sd[k].shape and sd[k].dtype == ref_sd[k].dtype
        assert torch.equal(sd[k], ref_sd[k])
    plain = build(name, seed=7)
    plain.load_state_dict(sd)
    convert_batchnorm(build(name, seed=9)).load_state_dict(plain.state_dict())
    if name == "resnet20":
        assert n_bn == 19
    # outputs identical to the unconverted model, train and eval, outside a step
    ref = build(name)
    shape = MODELS[name][1]
    x = torch.randn(9, *shape, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        ref.train(train)
        torch.manual_seed(3)
        a = model(x)
        torch.manual_seed(3)
        b = ref(x)
        assert torch.equal(a, b)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_convert_single_layer_and_idempotent():
    bn = nn.BatchNorm2d(3)
    new = convert_batchnorm(bn)
    assert isinstance(new, FedTANBatchNorm) and new.weight is bn.weight
    assert new.running_mean is bn.running_mean
    assert convert_batchnorm(new) is new
    bn.eval()
    assert not convert_batchnorm(bn).training


def test_validate_lists_every_issue_with_module_names_and_fixes():
    class ManualNorm(nn.BatchNorm2d):  # normalises by hand: nothing to intercept
        def forward(self, x):
            return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.grad_checkpointing = True  # timm's switch
            self.norm = nn.BatchNorm1d(4)

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LazyBatchNorm1d())
    model.add_module("manual", ManualNorm(4))
    model.add_module("backbone", Backbone())
    loss = nn.CrossEntropyLoss(weight=torch.ones(4))
    issues = validate(model, loss)
    assert [i.module for i in issues] == ["2", "manual", "backbone", "loss_fn"]
    assert "uninitialised" in issues[0].problem and "forward pass" in issues[0].fix
    assert "F.batch_norm" in issues[1].problem and "functional.batch_norm" in issues[1].fix
    assert "checkpointing" in issues[2].problem and "set_grad_checkpointing(False)" in issues[2].fix
    assert "weight" in issues[3].problem and "reduction='sum'" in issues[3].fix
    with pytest.raises(UnsupportedModelError) as raised:
        validate(model, loss, strict=True)
    message = str(raised.value)
    assert "4 issues" in message and "- 2:" in message and "- manual:" in message
    assert raised.value.issues == issues
    with pytest.raises(UnsupportedModelError, match="manual"):
        SyncStep(model, lambda: model(torch.randn(4, 3)).sum(), num_examples=4)
    # Unconverted BatchNorm layers and their subclasses calling F.batch_norm are fine.
    assert validate(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.CrossEntropyLoss(), strict=True) == []


def test_lazy_batchnorm():
    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    with pytest.raises(UnsupportedModelError, match="uninitialised"):
        convert_batchnorm(lazy)
    lazy(torch.randn(5, 3))  # initialised: now a plain BatchNorm1d
    model = convert_batchnorm(lazy)
    assert isinstance(model[1], FedTANBatchNorm) and model[1].num_features == 4


def test_subclasses_are_kept_by_conversion():
    from torch.nn.modules.batchnorm import _BatchNorm

    class Custom(_BatchNorm):
        def _check_input_dim(self, input):
            pass

    class WithActivation(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = convert_batchnorm(nn.Sequential(Custom(3), WithActivation(3)))
    assert type(model[0]) is Custom and type(model[1]) is WithActivation
