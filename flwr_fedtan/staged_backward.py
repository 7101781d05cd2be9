"""A backward pass run in stages, between which the caller may pause (and talk to a server).

A synchronised step cuts the autograd graph at every BatchNorm output. Its backward then
consists of stages: first from the loss, then from each BatchNorm call's input (with the
gradient that only the server's sums complete) in reverse call order. Starting a plain
``backward`` from each root would re-run every op shared by several roots once per root:
in a ResNet the whole residual stream below each BatchNorm input (the *fan-out* cost).

:class:`StagedBackward` runs each autograd node exactly once instead. Before the first
stage it assigns every node to the *last* stage whose root reaches it; a stage executes
only its own nodes, with ``torch.autograd.grad`` from its root and from the gradients
earlier stages left at its nodes' edges, and it stops at the edges into later stages'
nodes (``GradientEdge`` inputs), where it leaves the gradient for them. Leaves
(parameters) and graph cuts are sinks any stage may add to.

Where that is not possible (a stage would have to execute another stage's node to reach
its own sinks, as in DenseNet-like graphs), the plan falls back to one full backward per
root, which is still exact but pays the fan-out.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["StagedBackward"]

_EdgeKey = tuple[Any, int]  # (autograd node, output_nr)


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
        except through ``cut_nodes``.
    cut_nodes : Sequence[(node, anchor)]
        Graph-cut nodes (sinks) and the dummy leaf each hangs from; reaching a cut node
        runs its backward (which records its gradient) and stops there.
    """

    def __init__(
        self,
        loss: torch.Tensor,
        roots: Sequence[Optional[torch.Tensor]],
        cut_nodes: Sequence[tuple[Any, torch.Tensor]],
    ) -> None:
        self._anchors = {node: anchor for node, anchor in cut_nodes}
        self._root_edges: list[Optional[GradientEdge]] = [get_gradient_edge(loss)] + [
            None if r is None or not r.requires_grad else get_gradient_edge(r) for r in roots
        ]
        self._root_tensors = [loss] + list(roots)
        self._pending: dict[int, dict[_EdgeKey, torch.Tensor]] = {}
        self._owner: dict[Any, int] = {}
        self._stage_inputs: dict[int, list[tuple[str, Any, Any]]] = {}
        self.fallback = not self._plan()
        self.nodes_planned = len(self._owner)

    # ------------------------------------------------------------------ planning
    def _is_sink(self, node: Any) -> bool:
        return node in self._anchors or _is_leaf_node(node)

    def _plan(self) -> bool:
        """Assign nodes to stages; return False if the graph needs the fallback."""
        # Mark from the last stage backwards: a node belongs to the last stage reaching it.
        for stage in reversed(range(len(self._root_edges))):
            edge = self._root_edges[stage]
            if edge is None:
                continue
            stack = [edge.node]
            while stack:
                node = stack.pop()
                if node is None or node in self._owner or self._is_sink(node):
                    continue
                self._owner[node] = stage
                stack.extend(child for child, _ in node.next_functions)
        for stage in range(len(self._root_edges)):
            self._stage_inputs[stage] = self._inputs_of(stage)
        return all(self._isolated(stage) for stage in self._stage_inputs)

    def _inputs_of(self, stage: int) -> list[tuple[str, Any, Any]]:
        """The stage's sinks and frontier edges, as ``(kind, input, node)``."""
        inputs: dict[Any, tuple[str, Any, Any]] = {}
        for node, owner in self._owner.items():
            if owner != stage:
                continue
            for child, nr in node.next_functions:
                if child is None:
                    continue
                if child in self._anchors:
                    inputs[child] = ("cut", self._anchors[child], child)
                elif _is_leaf_node(child):
                    inputs[child] = ("leaf", child.variable, child)
                elif self._owner[child] != stage:
                    inputs[(child, nr)] = ("edge", (child, nr), child)
        return list(inputs.values())

    def _isolated(self, stage: int) -> bool:
        """No input of ``stage`` lies below one of its frontier nodes (else it would run twice)."""
        inputs = self._stage_inputs[stage]
        frontier = {node for kind, _, node in inputs if kind == "edge"}
        if not frontier:
            return True
        own_inputs = {node for _, _, node in inputs}
        seen: set = set()
        stack = [child for node in frontier for child, _ in node.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in own_inputs:
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
        root = self._root_tensors[stage]
        edge = self._root_edges[stage]
        if self.fallback:
            if edge is not None and grad is not None:
                torch.autograd.backward(root, grad, retain_graph=True)
            return
        if edge is not None and grad is not None:
            if self._is_sink(edge.node):
                self._accumulate_leaf(root, grad)
            else:
                self._add_pending((edge.node, edge.output_nr), grad)
        pending = self._pending.pop(stage, {})
        if not pending:
            return
        inputs = self._stage_inputs[stage]
        if not inputs:
            return
        grads = torch.autograd.grad(
            [GradientEdge(node, nr) for node, nr in pending],
            [GradientEdge(*obj) if kind == "edge" else obj for kind, obj, _ in inputs],
            grad_outputs=list(pending.values()),
            allow_unused=True,
        )
        for (kind, obj, _), value in zip(inputs, grads):
            if value is None:
                continue
            if kind == "leaf":
                self._accumulate_leaf(obj, value)
            elif kind == "edge":
                self._add_pending(obj, value)
        del pending

    def _add_pending(self, key: _EdgeKey, grad: torch.Tensor) -> None:
        bucket = self._pending.setdefault(self._owner[key[0]], {})
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
