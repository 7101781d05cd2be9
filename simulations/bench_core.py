"""Benchmark of FedTAN's core step against centralised training (no Flower, CPU).

    python -m simulations.bench_core [--model resnet20|vgg] [--clients 5] [--batch 32]
                                     [--repeats 15] [--threads N]

Measures, in one run, median wall times of

(a) ``pooled_backward`` over K in-process clients, batch B each (Fashion-MNIST-sized
    1x28x28 random inputs, two classes per client);
(b) one centralised forward + backward of the unconverted model on the pooled K*B batch;
(c) the replay a fresh process does per message: rebuilding one client's step with
    ``SyncStep.replay`` from the log up to mid-backward (model copy + weights included);
(d) process start + ``import torch`` (``python -c "import torch"``), the floor of a
    fresh-process replay;
(e) fan-out: one client's staged backward (all backward sync points, aggregation by the
    in-process reference) against a plain ``loss.backward()`` of the unconverted model on
    the same batch.

Repetitions of (a)-(e) are interleaved so that load on the machine hits all of them alike.
Target: (a)/(b) <= 1.3, judged on the median of the ratios of each repetition's (a) and
(b), which ran back to back (in alternating order): on a shared machine that cancels most
of the slow drift in speed that the ratio of two separate medians picks up.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flwr_fedtan import SyncStep, convert_batchnorm, pooled_backward
from flwr_fedtan.reference import aggregate_requests

from .app.models import build_model

TARGET_RATIO = 1.3


def build(name: str) -> tuple[nn.Module, str]:
    """The named model of simulations.app.models (Fashion-MNIST shaped: 1 channel, 10 classes)."""
    return build_model(name, num_classes=10, in_channels=1), "simulations.app.models"


# ----------------------------------------------------------------------------- helpers
def make_batches(k: int, b: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 1, 28, 28, generator=g) * (0.5 + 0.2 * i) + 0.3 * i,
         torch.randint(0, 2, (b,), generator=g) + (2 * i) % 9)
        for i in range(k)
    ]


def live_log(models, batches) -> tuple[list, int]:
    """Run one synchronised step over K clients; return the aggregates and BN call count."""
    n = [len(x) for x, _ in batches]
    steps = [
        SyncStep(m, (lambda m=m, x=x, y=y: F.cross_entropy(m(x), y)), len(x), sum(n))
        for m, (x, y) in zip(models, batches)
    ]
    aggregates = []
    try:
        requests = {i: s.start() for i, s in enumerate(steps)}
        while requests[0] is not None:
            _, agg = aggregate_requests(requests)
            aggregates.append(agg)
            requests = {i: s.resume(agg) for i, s in enumerate(steps)}
    finally:
        for s in steps:
            s.close()
    return aggregates, len(aggregates) // 2


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def staged_vs_plain(model: nn.Module, plain: nn.Module, batch) -> tuple[float, float, float, float]:
    """(forward phase, staged backward) of one client's step alone (K=1) and (forward,
    backward) of the unconverted model on the same batch."""
    x, y = batch
    model.zero_grad(set_to_none=True)
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), len(x))
    t0 = time.perf_counter()
    request = step.start()
    t_back = None
    while request is not None:
        if t_back is None and request[0].phase == "backward":
            t_back = time.perf_counter()
        request = step.resume(aggregate_requests({0: request})[1])
    t_end = time.perf_counter()
    step.close()
    plain.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    loss = F.cross_entropy(plain(x), y)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    return t_back - t0, t_end - t_back, t2 - t1, t3 - t2


def fan_out(model: nn.Module, batch) -> tuple[int, int, object] | None:
    """Fan-out of the graph, from the step's internals (None if they are not available):
    autograd nodes a plain backward from every BN input would visit (repeats counted), the
    unique nodes, and whether the step fell back to such per-root backwards."""
    x, y = batch
    step = SyncStep(model, lambda: F.cross_entropy(model(x), y), len(x))
    try:
        request = step.start()
        while request is not None and request[0].phase == "forward":
            request = step.resume(aggregate_requests({0: request})[1])
        calls = getattr(step, "_calls", None)
        fallback = getattr(step, "used_fallback_backward", "n/a")
        if not calls or request is None:
            return None
        cuts = {call.cut.node for call in calls if getattr(call, "cut", None) is not None}
        visits, unique = 0, set()
        for call in calls:
            inp = getattr(call, "input", None)
            if inp is None or inp.grad_fn is None:
                continue
            stack, seen = [inp.grad_fn], set()
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                if node in cuts:
                    continue  # a BatchNorm output: the stage stops here
                stack.extend(fn for fn, _ in node.next_functions)
            visits += len(seen)
            unique |= seen
        return visits, len(unique), fallback
    except Exception:  # noqa: BLE001 - diagnostics only
        return None
    finally:
        step.close()


def median(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet20", "vgg"], default="resnet20")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--routes", type=int, default=0, metavar="PAIRS",
                        help="also time (a)/(b) with the torch function mode on every step against "
                             "the default routing, alternated over PAIRS pairs each")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    plain, source = build(args.model)
    plain.train()
    models = [convert_batchnorm(copy.deepcopy(plain)) for _ in range(args.clients)]
    start_state = copy.deepcopy(models[0].state_dict())
    batches = make_batches(args.clients, args.batch)
    pooled_x = torch.cat([x for x, _ in batches])
    pooled_y = torch.cat([y for _, y in batches])

    # The replay log of client 0 (from a step on the same starting weights).
    log_models = [convert_batchnorm(copy.deepcopy(plain)) for _ in range(args.clients)]
    aggregates, n_calls = live_log(log_models, batches)
    cut = n_calls + n_calls // 2  # mid-backward
    x0, y0 = batches[0]
    template = convert_batchnorm(copy.deepcopy(plain))

    def run_pooled() -> None:
        pooled_backward(models, batches, F.cross_entropy)

    def run_central() -> None:
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(pooled_x), pooled_y).backward()

    def run_replay() -> None:
        model = copy.deepcopy(template)
        model.load_state_dict(start_state)
        step, request = SyncStep.replay(
            model, lambda: F.cross_entropy(model(x0), y0), len(x0), aggregates[:cut],
            total_examples=len(pooled_x),
        )
        assert request is not None and request[0].phase == "backward"
        step.close()

    def run_import() -> None:
        subprocess.run([sys.executable, "-c", "import torch"], check=True)

    staged_model = convert_batchnorm(copy.deepcopy(plain))
    plain_one = copy.deepcopy(plain)

    # warm-up (allocator, oneDNN primitives, thread pools)
    for fn in (run_pooled, run_central, run_replay):
        fn()
    staged_vs_plain(staged_model, plain_one, batches[0])

    times: dict[str, list[float]] = {k: [] for k in "abcd"}
    phases: list[tuple[float, float, float, float]] = []
    for i in range(args.repeats):
        if i % 2:  # alternate the order within a pair, so that drift does not favour either
            times["b"].append(timed(run_central))
            times["a"].append(timed(run_pooled))
        else:
            times["a"].append(timed(run_pooled))
            times["b"].append(timed(run_central))
        times["c"].append(timed(run_replay))
        times["d"].append(timed(run_import))
        phases.append(staged_vs_plain(staged_model, plain_one, batches[0]))

    a, b, c, d = (median(times[k]) for k in "abcd")
    fwd_s, bwd_s, fwd_p, bwd_p = (median([p[i] for p in phases]) for i in range(4))
    fan = fan_out(convert_batchnorm(copy.deepcopy(plain)), batches[0])

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"model {args.model} ({source}), K={args.clients} clients x B={args.batch}, "
        f"1x28x28 inputs, {n_calls} BN calls -> {2 * n_calls} exchanges per step; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load avg {load[0]:.2f}; median of {args.repeats}"
    )
    rows = [
        ("(a) pooled_backward, K clients", a, a / b),
        ("(b) centralised fwd+bwd, K*B batch", b, 1.0),
        (f"(c) replay 1 client to mid-backward ({cut}/{2 * n_calls} aggregates)", c, c / b),
        ("(d) process start + import torch", d, d / b),
        ("(e) staged backward, 1 client (B)", bwd_s, bwd_s / b),
        ("    plain backward, same batch", bwd_p, bwd_p / b),
        ("    step forward phase, 1 client (B)", fwd_s, fwd_s / b),
        ("    plain forward, same batch", fwd_p, fwd_p / b),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'median ms':>10}  {'/ (b)':>7}")
    for label, value, ratio in rows:
        print(f"{label:<{width}}  {value * 1e3:10.1f}  {ratio:7.2f}")
    print()
    paired = sorted(x / y for x, y in zip(times["a"], times["b"]))
    ratio = median(paired)
    verdict = "OK" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"pooled / centralised = {ratio:.2f}, median of {len(paired)} back-to-back pairs "
          f"(range {paired[0]:.2f}-{paired[-1]:.2f}; ratio of medians {a / b:.2f}) "
          f"(target <= {TARGET_RATIO}: {verdict}); "
          f"per exchange overhead ~ {(a - b) / (2 * n_calls) * 1e3:.2f} ms")
    print(f"replay to mid-backward = {c / b:.2f} x centralised step; "
          f"fresh process floor (start + import torch) = {d / b:.2f} x")
    print(f"fan-out: staged backward / plain backward = {bwd_s / bwd_p:.2f}", end="")
    if fan is not None:
        visits, unique, fallback = fan
        print(f"; one plain backward per BN input would visit {visits} autograd nodes for "
              f"{unique} unique ({visits / max(unique, 1):.2f} per node); step fell back to "
              f"per-root backwards: {fallback}")
    else:
        print()
    if args.routes:
        compare_routes(args.routes, run_pooled, run_central)
    return 0


def compare_routes(pairs: int, run_pooled: Callable[[], None], run_central: Callable[[], None]) -> None:
    """(a)/(b) with the step's BatchNorm calls caught by the torch function mode on every
    step, against the default (the mode on a forward code's first step, the torch.batch_norm
    wrapper after it; see flwr_fedtan.intercept), interleaved."""
    from flwr_fedtan import intercept

    fast_keys = intercept._FAST_ROUTE_KEYS
    ratios: dict[str, list[float]] = {"mode on every step": [], "default": []}
    for i in range(2 * pairs):
        route = list(ratios)[i % 2]
        intercept._FAST_ROUTE_KEYS = set() if route == "mode on every step" else fast_keys
        try:
            if i % 4 < 2:
                a, b = timed(run_pooled), timed(run_central)
            else:
                b, a = timed(run_central), timed(run_pooled)
        finally:
            intercept._FAST_ROUTE_KEYS = fast_keys
        ratios[route].append(a / b)
    print("routes: " + "; ".join(f"{route} {median(r):.2f}" for route, r in ratios.items())
          + f" (median (a)/(b) of {pairs} back-to-back pairs each, alternated)")


if __name__ == "__main__":
    sys.exit(main())
