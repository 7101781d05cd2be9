"""Models and habits users bring: every case exact against centralised PyTorch on the pooled
batch (gradients, BatchNorm buffers, loss), or refused before its statistics leave a client.

Three clients with batches of 3, 7 and 5 and non-IID inputs, float64. The reference is the
unmodified model trained centrally on the concatenated batch.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flwr_fedtan import SyncStep, UnsupportedModelError, convert_batchnorm, pooled_backward
from flwr_fedtan.reference import aggregate_requests, drive_steps

from tests._models import grad_vector, rel_err, single_thread  # noqa: F401 (an autouse fixture)

SIZES = [3, 7, 5]
CLASSES = 4
TOL = 1e-11


def non_iid_batches(shape=(3, 8, 8), sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k, n in enumerate(sizes):
        x = torch.randn((n, *shape), generator=g, dtype=torch.float64) * (0.5 + 0.5 * k) + 0.8 * (k - 1)
        y = (torch.randint(0, 2, (n,), generator=g) + 2 * k) % CLASSES
        batches.append((x, y))
    return batches


def centralised(model: nn.Module, batches, loss_fn: Callable, reduce: Callable = lambda loss: loss) -> float:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    model.zero_grad(set_to_none=True)
    loss = reduce(loss_fn(model(x), y))
    loss.backward()
    return float(loss.detach())


def assert_exact(
    model: nn.Module,
    batches=None,
    loss_fn: Callable = F.cross_entropy,
    reduce: Callable = lambda loss: loss,
    prepare: Optional[Callable[[nn.Module], nn.Module]] = None,
    tol: float = TOL,
) -> list[nn.Module]:
    """pooled_backward over copies of ``model`` equals centralised training of ``model``."""
    batches = batches or non_iid_batches()
    clients = [copy.deepcopy(model) for _ in batches]
    if prepare is not None:
        clients = [prepare(c) for c in clients]
    central = copy.deepcopy(model)
    expected = centralised(central, batches, loss_fn, reduce)
    got = pooled_backward(clients, batches, loss_fn)
    assert got == pytest.approx(expected, rel=tol, abs=tol)
    assert rel_err(grad_vector(clients), grad_vector([central])) < tol
    reference = dict(central.named_buffers())
    for client in clients:
        for name, value in client.named_buffers():
            name = name.removeprefix("_orig_mod.")  # torch.compile's wrapper
            torch.testing.assert_close(value, reference[name], rtol=tol, atol=tol, msg=name)
    return clients


# ---------------------------------------------------------------------------------- layers
class BatchNormAct(nn.BatchNorm2d):
    """The shape of timm's BatchNormAct2d: activation (and dropout) after normalising."""

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(channels, **kwargs)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(super().forward(x))


class HandWrittenNorm(nn.Module):
    """A hand-written BatchNorm calling F.batch_norm with a cumulative-average momentum."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.3, channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("calls", torch.tensor(0))

    def forward(self, x):
        if self.training:
            self.calls += 1
        factor = 1.0 / float(self.calls) if self.training else 0.0
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, factor, 1e-3)


class AtenNorm(nn.Module):
    """Calls torch.batch_norm directly, batch statistics only (no running statistics)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(1.2, 0.7, channels))

    def forward(self, x):
        return torch.batch_norm(x, self.weight, None, None, None, True, 0.0, 1e-5, False)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_act = BatchNormAct(6, momentum=0.3)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.hand = HandWrittenNorm(6)
        self.conv3 = nn.Conv2d(6, 5, 3, stride=2)
        self.aten = AtenNorm(5)
        self.plain = nn.BatchNorm2d(5, momentum=None)
        self.frozen = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x):
        x = self.bn_act(self.conv1(x))
        x = F.relu(self.hand(self.conv2(x)))
        x = self.frozen(self.plain(self.aten(self.conv3(x))))
        return self.head(x.mean((2, 3)))


def mixed_model() -> nn.Module:
    torch.manual_seed(3)
    model = Mixed().double().train()
    with torch.no_grad():
        model.frozen.running_mean.uniform_(-0.5, 0.5)
        model.frozen.running_var.uniform_(0.5, 2.0)
    model.frozen.eval()
    return model


def test_subclasses_and_hand_written_batch_norm_are_exact_unconverted():
    clients = assert_exact(mixed_model())
    assert all(int(c.hand.calls) == 1 and int(c.plain.num_batches_tracked) == 1 for c in clients)


def test_conversion_keeps_a_subclass_behaviour_exactly():
    model = mixed_model()
    with torch.no_grad():  # evaluation too: the activation must survive conversion
        model.eval()
        x = non_iid_batches()[0][0]
        expected = model(x)
        assert torch.equal(convert_batchnorm(copy.deepcopy(model))(x), expected)
        model.train()
        model.frozen.eval()
    assert_exact(model, prepare=convert_batchnorm)


def test_two_steps_in_a_row_keep_the_cumulative_running_averages_exact():
    model = mixed_model()
    batches = non_iid_batches()
    clients = [copy.deepcopy(model) for _ in batches]
    central = copy.deepcopy(model)
    for seed in (0, 1):
        batches = non_iid_batches(seed=seed)
        centralised(central, batches, F.cross_entropy)
        pooled_backward(clients, batches, F.cross_entropy)
    reference = dict(central.named_buffers())
    for client in clients:
        for name, value in client.named_buffers():
            torch.testing.assert_close(value, reference[name], rtol=TOL, atol=TOL, msg=name)


# ---------------------------------------------------------------------------------- losses
def small_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, CLASSES)
    ).double().train()


@pytest.mark.parametrize(
    "loss_fn, reduce",
    [
        (nn.CrossEntropyLoss(reduction="none"), torch.mean),
        (lambda out, y: F.cross_entropy(out, y, reduction="none"), torch.mean),  # plain per-sample
        (nn.CrossEntropyLoss(reduction="sum"), lambda loss: loss),
        (functools.partial(F.cross_entropy, reduction="sum"), lambda loss: loss),
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64),
                             reduction="sum"), lambda loss: loss),
        (lambda out, y: F.mse_loss(out, F.one_hot(y, CLASSES).double(), reduction="none"), torch.mean),
    ],
    ids=["module-none", "callable-none", "module-sum", "partial-sum", "weighted-sum", "elementwise-none"],
)
def test_loss_reductions_are_exact(loss_fn, reduce):
    assert_exact(small_model(), loss_fn=loss_fn, reduce=reduce)


def test_sum_loss_local_gradient_scale_and_client_round():
    """With a sum objective each client's share is the gradient of its own sum: no rescaling."""
    from flwr_fedtan.training import ClientRound

    batches = non_iid_batches()
    model = small_model()
    rounds = [
        ClientRound(copy.deepcopy(model), lambda seed, b=b: b, nn.CrossEntropyLoss(reduction="sum"),
                    lambda params: torch.optim.SGD(params, lr=0.01), 1, 1, seed=k)
        for k, b in enumerate(batches)
    ]
    requests = {k: r.start() for k, r in enumerate(rounds)}
    while requests[0] is not None:
        _, aggregate = aggregate_requests(requests)
        requests = {k: rounds[k].resume(aggregate) for k in requests}
    central = copy.deepcopy(model)
    centralised(central, batches, nn.CrossEntropyLoss(reduction="sum"))
    with torch.no_grad():
        for p in central.parameters():
            p -= 0.01 * p.grad
    # sum_k theta_k - (K - 1) theta = theta - lr * sum_k grad_k: the centralised sum step
    for name, p in central.named_parameters():
        stepped = sum(dict(r.model.named_parameters())[name] for r in rounds) - 2 * dict(model.named_parameters())[name]
        torch.testing.assert_close(stepped.detach(), p.detach(), rtol=TOL, atol=TOL)


def test_class_weighted_mean_loss_is_refused_with_the_fix():
    weighted = nn.CrossEntropyLoss(weight=torch.ones(CLASSES, dtype=torch.float64))
    with pytest.raises(UnsupportedModelError, match="reduction='sum'"):
        pooled_backward([small_model() for _ in SIZES], non_iid_batches(), weighted)


def test_loss_of_a_wrong_shape_is_refused():
    model = small_model()
    x, y = non_iid_batches()[1]
    step = SyncStep(model, lambda: model(x)[:, :2], num_examples=len(x) - 1)
    with pytest.raises(TypeError, match="per-sample losses"):
        drive_steps([step])


# ---------------------------------------------------------------------------- checkpointing
class CheckpointedBlock(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, CLASSES)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        x = checkpoint(lambda t: F.relu(self.norm(self.conv(t))), x, use_reentrant=self.use_reentrant)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_is_refused_before_statistics_leave(use_reentrant):
    torch.manual_seed(0)
    model = CheckpointedBlock(use_reentrant).double().train()
    x, y = non_iid_batches()[2]
    x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input requiring grad
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), num_examples=len(x))
    with pytest.raises(UnsupportedModelError, match=r"checkpointing \(torch.utils.checkpoint\)"):
        step.start()  # the first BatchNorm call: refused before its payload is handed out
    assert step.num_sync_points == 0
    assert int(model.norm.num_batches_tracked) == 1 and float(model.norm.running_mean.abs().sum()) == 0


# ---------------------------------------------------------------- thread-local torch state
def no_thread_state_left() -> None:
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._dynamo.eval_frame.get_eval_frame_callback() is None


def drive_checking_between(steps):
    requests = {k: s.start() for k, s in enumerate(steps)}
    while requests[0] is not None:
        no_thread_state_left()
        _, aggregate = aggregate_requests(requests)
        requests = {k: steps[k].resume(aggregate) for k in requests}
    no_thread_state_left()


def test_saved_tensor_hooks_and_modes_stay_with_their_own_forward():
    """Client 0's forward holds a saved-tensor hook, a torch function mode and a dispatch
    mode across its pauses: none of them sees another client's tensors or the driver's
    code, and nothing remains active afterwards."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    batches = non_iid_batches()
    packed_batch_sizes: set[int] = set()
    seen_by_modes: set[int] = set()

    def pack(t):
        if t.dim() == 4 and t.shape[0] in SIZES:  # an activation (weights have 4 out-channels)
            packed_batch_sizes.add(t.shape[0])
        return t

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[0] in SIZES:
                    seen_by_modes.add(a.shape[0])
            return func(*args, **(kwargs or {}))

    class WatchDispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[0] in SIZES:
                    seen_by_modes.add(a.shape[0])
            return func(*args, **(kwargs or {}))

    model = small_model()
    clients = [copy.deepcopy(model) for _ in batches]

    def forward_with_hooks(m, x, y):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Watch(), WatchDispatch():
            return F.cross_entropy(m(x), y)

    steps = [
        SyncStep(m, (lambda m=m, x=x, y=y: forward_with_hooks(m, x, y)) if k == 0
                 else (lambda m=m, x=x, y=y: F.cross_entropy(m(x), y)),
                 num_examples=len(x), total_examples=sum(SIZES))
        for k, (m, (x, y)) in enumerate(zip(clients, batches))
    ]
    drive_checking_between(steps)
    assert packed_batch_sizes == {SIZES[0]} and seen_by_modes == {SIZES[0]}
    central = copy.deepcopy(model)
    centralised(central, batches, F.cross_entropy)
    assert rel_err(grad_vector(clients), grad_vector([central])) < TOL


def test_autocast_of_every_device_type_stays_in_the_forward():
    model = small_model().float()
    batches = [(x.float(), y) for x, y in non_iid_batches()]
    clients = [copy.deepcopy(model) for _ in batches]

    def forward(m, x, y):
        torch.set_autocast_dtype("xpu", torch.bfloat16)  # a non-default dtype on another device
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return F.cross_entropy(out.float(), y)

    default_xpu_dtype = torch.get_autocast_dtype("xpu")
    steps = [SyncStep(m, lambda m=m, x=x, y=y: forward(m, x, y), num_examples=len(x)) for m, (x, y)
             in zip(clients, batches)]
    requests = {k: s.start() for k, s in enumerate(steps)}
    while requests[0] is not None:
        assert not torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("xpu") == default_xpu_dtype
        _, aggregate = aggregate_requests(requests)
        requests = {k: steps[k].resume(aggregate) for k in requests}


@pytest.mark.slow
def test_torch_compile_is_exact_and_leaves_no_trace():
    from torch._dynamo.utils import counters

    model = mixed_model()
    assert_exact(model, prepare=lambda m: torch.compile(m, backend="eager"))
    no_thread_state_left()

    def fresh(a):
        return a * 2 + 1

    frames = counters["frames"]["total"]
    fresh(torch.ones(3))
    assert counters["frames"]["total"] == frames  # not compiled: no compiler hook left on


def _small_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, CLASSES)
    ).double()


def test_fedtan_client_refuses_an_unsupported_loss_up_front():
    from torch.utils.data import TensorDataset

    from flwr_fedtan import FedTANClient

    x, y = non_iid_batches()[1]
    weighted = nn.CrossEntropyLoss(weight=torch.ones(CLASSES, dtype=torch.float64))
    with pytest.raises(UnsupportedModelError, match="reduction='sum'"):
        FedTANClient(_small_bn_net(), TensorDataset(x, y), weighted, batch_size=4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fedtan_client_evaluates_the_mean_loss_per_sample_whatever_the_reduction(reduction):
    from torch.utils.data import TensorDataset

    from flwr_fedtan import FedTANClient

    x, y = torch.cat([b[0] for b in non_iid_batches()]), torch.cat([b[1] for b in non_iid_batches()])
    model = _small_bn_net().eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))  # mean over all 15 samples
    client = FedTANClient(
        copy.deepcopy(model), TensorDataset(x, y), nn.CrossEntropyLoss(reduction=reduction),
        batch_size=4, eval_batch_size=4,  # 4 batches, the last one short
    )
    loss, count, metrics = client.evaluate(client.get_parameters({}), {})
    assert count == len(y)
    assert abs(loss - expected) < 1e-12
