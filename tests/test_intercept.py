"""The two routes by which a step catches BatchNorm (:mod:`flwr_fedtan.intercept`): the
torch function mode for a forward's first step, the ``torch.batch_norm`` wrapper after it.
Every step of every case is exact against centralised PyTorch on the pooled batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flwr_fedtan import intercept

from tests._models import single_thread  # noqa: F401 (an autouse fixture)
from tests.test_any_model import CLASSES, assert_exact, no_thread_state_left, non_iid_batches

# What `from torch import batch_norm` in a user module imported before flwr_fedtan binds.
_BOUND_BATCH_NORM = intercept._TORCH_BATCH_NORM


def _model(norm: type[nn.Module]) -> tuple[nn.Module, list[int]]:
    """conv -> BatchNorm2d -> ``norm`` -> head; the list collects, per forward, how many
    torch function modes were active (a class of its own per call: a fresh route key)."""
    modes_seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x):
            modes_seen.append(torch._C._len_torch_function_stack())
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.bn = nn.BatchNorm2d(5, momentum=0.2)
            self.norm = norm(5)
            self.probe = Probe()
            self.head = nn.Linear(5, CLASSES)

        def forward(self, x):
            x = self.probe(self.norm(F.relu(self.bn(self.conv(x)))))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(1)
    return Net().double().train(), modes_seen


class AttributeNorm(nn.Module):
    """Calls ``torch.batch_norm`` by attribute, as ``F.batch_norm`` does."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.6, 1.4, channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return torch.batch_norm(x, self.weight, None, self.running_mean, self.running_var, True, 0.1, 1e-5, False)


class BoundNorm(AttributeNorm):
    """Calls a reference to PyTorch's ``torch.batch_norm`` bound before flwr_fedtan was imported."""

    def forward(self, x):
        return _BOUND_BATCH_NORM(x, self.weight, None, self.running_mean, self.running_var, True, 0.1, 1e-5, False)


def _forget_compiled_frames() -> None:
    """As in a fresh process: an earlier test's torch.compile keeps every later step of this
    process on the mode (``torch._dynamo.reset`` keeps the frame counters)."""
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()


@pytest.mark.parametrize("norm, later_steps_use_the_mode", [
    (AttributeNorm, False),  # every call went through the wrapper: fast from the second step
    (BoundNorm, True),  # the wrapper would miss the bound call: never fast
])
def test_the_first_step_decides_the_route_and_every_step_is_exact(norm, later_steps_use_the_mode):
    _forget_compiled_frames()
    model, modes_seen = _model(norm)
    for seed in range(3):
        modes_seen.clear()
        assert_exact(model, non_iid_batches(seed=seed))
        no_thread_state_left()
        mode = int(seed == 0 or later_steps_use_the_mode)
        # the centralised reference's forward (no step: no mode), then the 3 clients'
        assert modes_seen == [0, mode, mode, mode]


def test_single_example_clients_stay_exact_on_every_step():
    """F.batch_norm refuses a one-sample batch in BatchNorm1d before the wrapper sees it: the
    pooled batch has three samples, so such steps keep the mode."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, CLASSES)).double()
    for seed in range(3):
        batches = non_iid_batches(shape=(6,), sizes=[1, 1, 1], seed=seed)
        assert_exact(model, batches)


def test_outside_a_step_torch_batch_norm_is_pytorchs_own():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    args = (x, w, None, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), True, 0.1, 1e-5)
    assert torch.equal(torch.batch_norm(*args, False), _BOUND_BATCH_NORM(*args, False))
    assert torch.equal(F.batch_norm(x, None, None, training=True), _BOUND_BATCH_NORM(x, None, None, None, None,
                                                                                   True, 0.1, 1e-5, False))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_still_compiles_batch_norm():
    bn = nn.BatchNorm2d(3).double()
    scripted = torch.jit.script(bn)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(scripted(x), nn.BatchNorm2d(3).double()(x))

    @torch.jit.script
    def hand_written(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, w, None, None, None, True, 0.0, 1e-5, False)

    w = torch.rand(3, dtype=torch.float64)
    assert torch.equal(hand_written(x, w), F.batch_norm(x, None, None, w, training=True))


def test_a_model_compiled_after_its_code_took_the_fast_route_goes_back_to_the_mode():
    """torch.compile's graphs are guarded on the mode stack, not on the wrapper: a compiled
    model must run its steps under the mode even when its code was cleared for the fast route."""
    _forget_compiled_frames()
    model, modes_seen = _model(AttributeNorm)
    assert_exact(model, non_iid_batches(seed=0))
    assert_exact(model, non_iid_batches(seed=1))
    assert modes_seen[-3:] == [0, 0, 0]

    def compile_in_place(client: nn.Module) -> nn.Module:
        client.compile(backend="aot_eager")  # module classes, hence the route key, unchanged
        return client

    assert_exact(model, non_iid_batches(seed=2), prepare=compile_in_place)
    no_thread_state_left()


def test_torch_compile_traces_the_wrapper_as_the_batch_norm_op():
    """Outside a step, a compiled BatchNorm model has no graph break at the wrapper."""
    import torch._dynamo

    intercept.install()
    assert torch.batch_norm is intercept.fedtan_batch_norm
    _forget_compiled_frames()
    model, _ = _model(AttributeNorm)
    explanation = torch._dynamo.explain(model)(non_iid_batches()[0][0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


_FRESH_PROCESS = textwrap.dedent("""
    import importlib, pkgutil
    import torch
    import torch.nn.functional as F
    from torch import nn

    pytorchs = torch.batch_norm, F.batch_norm
    import flwr_fedtan
    for module in pkgutil.walk_packages(flwr_fedtan.__path__, "flwr_fedtan."):
        importlib.import_module(module.name)
    for name in flwr_fedtan.__all__:
        getattr(flwr_fedtan, name)
    assert (torch.batch_norm, F.batch_norm) == pytorchs, "importing flwr_fedtan changed torch"

    from flwr_fedtan import SyncStep, intercept, pooled_backward
    assert not intercept.installed()
    from torch._dynamo import trace_rules  # torch.compile's in-graph table, built before the wrapper
    assert trace_rules.get_torch_obj_rule_map().get(torch.batch_norm) is not None
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)) for _ in range(2)]
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(2)]
    pooled_backward(models, batches, F.cross_entropy)
    wrapper = torch.batch_norm
    assert wrapper is intercept.fedtan_batch_norm and intercept.installed()
    assert trace_rules.get_torch_obj_rule_map().get(wrapper) is not None  # traced as the op, as before
    print(wrapper.__module__, wrapper.__name__, wrapper.__qualname__)

    x, y = batches[0]
    step = SyncStep(models[0], lambda: F.cross_entropy(models[0](x), y), num_examples=5, total_examples=10)
    assert step.start() is not None  # paused at its first sync point
    try:
        intercept.uninstall()
        raise AssertionError("uninstalled under a paused step")
    except RuntimeError as error:
        assert "close" in str(error), error
    assert intercept.installed()
    step.close()
    intercept.uninstall()
    assert torch.batch_norm is pytorchs[0] and not intercept.installed()
    assert trace_rules.get_torch_obj_rule_map().get(wrapper) is None
    intercept.uninstall()  # idempotent
    pooled_backward(models, batches, F.cross_entropy)  # the next step installs it again
    assert torch.batch_norm is wrapper
    print("ok")
""")


def test_importing_fedtan_leaves_torch_alone_until_a_step_installs_its_own_wrapper():
    """Interception is opt-in: importing every module of the package changes nothing in
    torch; the first synchronised step installs ``fedtan_batch_norm`` under its own name,
    :func:`intercept.uninstall` gives PyTorch's function back (not under a running step).
    torch.compile's table of in-graph functions follows both."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [
        "flwr_fedtan.intercept", "fedtan_batch_norm", "fedtan_batch_norm", "ok",
    ], done.stdout
