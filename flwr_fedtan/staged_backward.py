"""A backward pass run in stages, between which the caller may pause (and talk to a server).

A synchronised step cuts the autograd graph at every BatchNorm output. Its backward then
consists of stages: first from the loss, then from each BatchNorm call's input (with the
gradient that only the server's sums complete) in reverse call order. A stage stops at
the cuts: the gradient arriving at a BatchNorm output is *captured* there (as an input
``GradientEdge`` of ``torch.autograd.grad``) and the node behind it never runs.

Starting a plain backward from each root would re-run every op shared by several roots
once per root: in a ResNet the whole residual stream below each BatchNorm input (the
*fan-out* cost). :class:`StagedBackward` runs each autograd node exactly once instead.
Before the first stage it assigns every node to the *last* stage whose root reaches it; a
stage executes only its own nodes, with ``torch.autograd.grad`` from its root and from the
gradients earlier stages left at its nodes' edges, and it stops at the edges into later
stages' nodes, where it leaves the gradient for them. Leaves (parameters) and cuts are
sinks any stage may add to.

Where that is not possible (a stage would have to execute another stage's node to reach
its own sinks, e.g. a weight shared across a skip connection, or DenseNet-like graphs),
the plan falls back to one backward per root, down to the sinks that root reaches, which
is still exact but pays the fan-out.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["StagedBackward"]

_EdgeKey = tuple[Any, int]  # (autograd node, output_nr)
_Input = tuple[str, Any, Any]  # (kind, what autograd.grad gets as input, its key)


def _is_leaf_node(node: Any) -> bool:
    return hasattr(node, "variable")  # AccumulateGrad


class StagedBackward:
    """Backward from a loss and from ``roots`` in order, each graph node run once.

    Parameters
    ----------
    loss : Tensor
        Scalar; its stage (stage 0) runs first, seeded with ``loss_grad``.
    roots : Sequence[Optional[Tensor]]
        Stage ``k`` (``k = 1 .. len(roots)``) starts from ``roots[k - 1]`` with a gradient
        given to :meth:`run_stage`; ``None`` entries (nothing to backpropagate) are skipped.
        Stages run in order 0, 1, 2, ...; a later root must not depend on an earlier one
        except through ``cuts``.
    cuts : Sequence[Optional[GradientEdge]]
        Edges where the backward stops, each capturing the gradient that arrives there
        (:meth:`cut_gradient`). Nothing may need the node behind a cut: the graph below it
        is reached only through the stages' own roots.
    """

    def __init__(
        self,
        loss: torch.Tensor,
        roots: Sequence[Optional[torch.Tensor]],
        cuts: Sequence[Optional[GradientEdge]],
    ) -> None:
        self._cut_of: dict[_EdgeKey, int] = {
            (edge.node, edge.output_nr): i for i, edge in enumerate(cuts) if edge is not None
        }
        self._cut_nodes = {node for node, _ in self._cut_of}
        self._cut_grads: dict[int, torch.Tensor] = {}
        self._root_edges: list[Optional[GradientEdge]] = [get_gradient_edge(loss)]
        self._root_edges += [None if r is None or not r.requires_grad else get_gradient_edge(r) for r in roots]
        self._root_tensors: list[Optional[torch.Tensor]] = [loss, *roots]
        self._pending: dict[int, dict[_EdgeKey, torch.Tensor]] = {}
        self._owner: dict[Any, int] = {}
        self._stage_inputs: dict[int, list[_Input]] = {}
        self.fallback = not self._plan()

    # ------------------------------------------------------------------ planning
    def _is_sink(self, node: Any) -> bool:
        return node in self._cut_nodes or _is_leaf_node(node)

    def _sink_input(self, node: Any, nr: int) -> Optional[_Input]:
        if (node, nr) in self._cut_of:
            return ("cut", GradientEdge(node, nr), (node, nr))
        if _is_leaf_node(node):
            return ("leaf", node.variable, node)
        return None  # another output of a cut node: no gradient ever arrives there

    def _record_sink(self, inputs: dict[Any, _Input], node: Any, nr: int) -> bool:
        """If ``node`` is a sink, record it as an input and return True."""
        if not self._is_sink(node):
            return False
        sink = self._sink_input(node, nr)
        if sink is not None:
            inputs[sink[2]] = sink
        return True

    def _plan(self) -> bool:
        """Assign nodes to stages; return False if the graph needs the fallback."""
        # Mark from the last stage backwards: a node belongs to the last stage reaching it.
        for stage in reversed(range(len(self._root_edges))):
            edge = self._root_edges[stage]
            if edge is None:
                continue
            stack: list[Any] = [edge.node]  # next_functions hold None for inputs without grad
            while stack:
                node = stack.pop()
                if node is None or node in self._owner or self._is_sink(node):
                    continue
                self._owner[node] = stage
                stack.extend(child for child, _ in node.next_functions)
        owned: dict[int, list[Any]] = {stage: [] for stage in range(len(self._root_edges))}
        for node, stage in self._owner.items():
            owned[stage].append(node)
        for stage, nodes in owned.items():
            self._stage_inputs[stage] = self._inputs_of(stage, nodes)
        if all(self._isolated(stage) for stage in self._stage_inputs):
            return True
        for stage in range(len(self._root_edges)):
            self._stage_inputs[stage] = self._sinks_below(stage)
        return False

    def _inputs_of(self, stage: int, nodes: Sequence[Any]) -> list[_Input]:
        """The sinks and frontier edges of ``stage``, which owns ``nodes``."""
        inputs: dict[Any, _Input] = {}
        for node in nodes:
            for child, nr in node.next_functions:
                if child is None or self._record_sink(inputs, child, nr):
                    continue
                if self._owner[child] != stage:
                    inputs[(child, nr)] = ("edge", GradientEdge(child, nr), (child, nr))
        return list(inputs.values())

    def _sinks_below(self, stage: int) -> list[_Input]:
        """Fallback: every sink a plain backward from the stage's root reaches."""
        edge = self._root_edges[stage]
        if edge is None or self._is_sink(edge.node):
            return []
        inputs: dict[Any, _Input] = {}
        seen: set = set()
        stack = [edge.node]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            for child, nr in node.next_functions:
                if child is not None and not self._record_sink(inputs, child, nr):
                    stack.append(child)
        return list(inputs.values())

    def _isolated(self, stage: int) -> bool:
        """No input of ``stage`` lies below one of its frontier nodes (else it would run twice)."""
        inputs = self._stage_inputs[stage]
        frontier = {key[0] for kind, _, key in inputs if kind == "edge"}
        if not frontier:
            return True
        own_sinks = {key if kind == "leaf" else key[0] for kind, _, key in inputs}
        seen: set = set()
        stack = [child for node in frontier for child, _ in node.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in own_sinks:
                return False
            if not self._is_sink(node):
                stack.extend(child for child, _ in node.next_functions)
        return True

    # ------------------------------------------------------------------ running
    def run_loss_stage(self, loss_grad: torch.Tensor) -> None:
        """Stage 0: backward from the loss."""
        self.run_stage(0, loss_grad)

    def run_stage(self, stage: int, grad: Optional[torch.Tensor]) -> None:
        """Run stage ``stage`` (in order) with ``grad`` at its root."""
        edge = self._root_edges[stage]
        if self.fallback:
            if edge is None or grad is None:
                return
            pending = {(edge.node, edge.output_nr): grad}
        else:
            if edge is not None and grad is not None:
                self._add_pending((edge.node, edge.output_nr), grad)
            pending = self._pending.pop(stage, {})
        # A root that is itself a sink (a parameter, or another BatchNorm's output) takes
        # its gradient directly.
        for key in [key for key in pending if self._is_sink(key[0])]:
            self._deliver(self._sink_input(*key), pending.pop(key))
        inputs = self._stage_inputs[stage]
        if not pending or not inputs:
            return
        grads = torch.autograd.grad(
            [GradientEdge(node, nr) for node, nr in pending],
            [obj for _, obj, _ in inputs],
            grad_outputs=list(pending.values()),
            allow_unused=True,
            retain_graph=self.fallback,
        )
        del pending
        for sink, value in zip(inputs, grads):
            if value is not None:
                self._deliver(sink, value)

    def cut_gradient(self, index: int) -> Optional[torch.Tensor]:
        """The gradient captured at ``cuts[index]`` so far (``None`` if none arrived);
        handed over once."""
        return self._cut_grads.pop(index, None)

    def _deliver(self, sink: Optional[_Input], grad: torch.Tensor) -> None:
        if sink is None:
            return
        kind, obj, key = sink
        if kind == "leaf":
            self._accumulate_leaf(obj, grad)
        elif kind == "cut":
            index = self._cut_of[key]
            known = self._cut_grads.get(index)
            self._cut_grads[index] = grad if known is None else known + grad
        else:
            self._add_pending(key, grad)

    def _add_pending(self, key: _EdgeKey, grad: torch.Tensor) -> None:
        owner = self._owner.get(key[0])
        if owner is None:  # a sink as a root: no stage owns it
            self._deliver(self._sink_input(*key), grad)
            return
        bucket = self._pending.setdefault(owner, {})
        if key in bucket:
            bucket[key] = bucket[key] + grad
        else:
            bucket[key] = grad

    @staticmethod
    def _accumulate_leaf(leaf: torch.Tensor, grad: torch.Tensor) -> None:
        if leaf.grad is None:
            leaf.grad = grad.detach()
        else:
            leaf.grad.add_(grad.detach())
