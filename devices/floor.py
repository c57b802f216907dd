"""A model's matrix-multiply floor: its Linear layers alone, at the shapes and in the order they run
in the exported artifact (after the export passes).

Why: no runtime runs a model faster than it runs that model's own matrix multiplies. Timing this chain
in each runtime, interleaved with the whole model and with PyTorch eager, tells two things the
large-GEMM roofline cannot: how much of a runtime's time is its GEMMs at these (small, skinny) shapes,
and the largest speed-up over eager a runtime could reach even if every other op were free —
``eager(model) / runtime(linear floor)``. ``benchmarks/speedup_ceiling.py`` reports both.

The chain is a real module (exportable to every target): each recorded call becomes an ``nn.Linear``
with the same in/out features and bias, applied to a (1, rows, in_features) tensor, rows being the
call's leading dimensions flattened. Between calls the previous output is sliced (or tiled, when it is
smaller) to the next call's shape; :func:`adapters` counts those extra ops so a report can say how far
the chain is from pure GEMMs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn


@dataclass(frozen=True)
class LinearCall:
    rows: int  # the input's leading dimensions, flattened (batch x tokens)
    in_features: int
    out_features: int
    bias: bool

    @property
    def macs(self) -> int:
        return self.rows * self.in_features * self.out_features

    def to_list(self) -> list:
        """[rows, in, out, bias]: how a call travels to a worker or child process (JSON)."""
        return [self.rows, self.in_features, self.out_features, self.bias]


def record_linear_calls(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[LinearCall]:
    """Every ``nn.Linear`` call of one forward pass of ``model`` on ``example_inputs``, in call order."""
    calls: list[LinearCall] = []

    def hook(layer: nn.Linear, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = args[0]
        calls.append(LinearCall(math.prod(x.shape[:-1]), layer.in_features, layer.out_features,
                                layer.bias is not None))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ValueError(f"{type(model).__name__} calls no nn.Linear: it has no linear floor")
    return calls


def exported_linear_calls(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                          passes: Sequence[str] | None = None) -> list[LinearCall]:
    """The Linear calls of ``model``'s captured graph after ``passes`` (default: the onnx:cpu pipeline,
    whose shape-changing passes every CPU target shares), in graph order.

    Why not the module's own calls: a pass can drop rows (``sink_slices`` runs DeiT-Tiny's last block
    for the class token only), and a floor above what the artifact computes is no floor.
    """
    from edgevit.export.passes import default_pipeline, run_pipeline

    names = default_pipeline("onnx", "cpu") if passes is None else passes
    graph = run_pipeline(model.eval(), tuple(example_inputs), names).program.graph
    calls = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            x, weight = node.args[0].meta["val"], node.args[1].meta["val"]
            bias = len(node.args) > 2 and node.args[2] is not None
            calls.append(LinearCall(math.prod(x.shape[:-1]), weight.shape[1], weight.shape[0], bias))
    if not calls:
        raise ValueError(f"{type(model).__name__} calls no nn.Linear: it has no linear floor")
    return calls


def _fit(x: torch.Tensor, rows: int, features: int) -> torch.Tensor:
    """``x`` (1, r, f) sliced, or tiled then sliced, to (1, rows, features)."""
    _, r, f = x.shape
    if r < rows or f < features:
        x = x.repeat(1, -(-rows // r), -(-features // f))
    if x.shape[1] != rows:
        x = x[:, :rows]
    if x.shape[2] != features:
        x = x[:, :, :features]
    return x


def adapters(calls: Sequence[LinearCall]) -> int:
    """How many slice/tile steps the chain inserts between its GEMMs (0: a pure GEMM chain)."""
    count = 0
    for prev, call in pairwise(calls):
        count += (prev.rows != call.rows) + (prev.out_features != call.in_features)
    return count


class LinearChain(nn.Module):
    """The recorded Linear calls as one chain; input (1, rows, in_features) of the first call."""

    def __init__(self, calls: Sequence[LinearCall], seed: int = 0) -> None:
        super().__init__()
        self.calls = list(calls)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(nn.Linear(c.in_features, c.out_features, bias=c.bias) for c in self.calls)

    def example_input(self, seed: int = 0) -> torch.Tensor:
        first = self.calls[0]
        return torch.randn(1, first.rows, first.in_features, generator=torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for call, layer in zip(self.calls, self.layers):
            x = layer(_fit(x, call.rows, call.in_features))
        return x


def linear_floor(model: nn.Module, example_inputs: Sequence[torch.Tensor], seed: int = 0) -> LinearChain:
    """The :class:`LinearChain` of the Linear calls ``model``'s exported CPU artifacts run."""
    return LinearChain(exported_linear_calls(model, example_inputs), seed).eval()
