"""A model's matrix-multiply floors (benchmark code: ``benchmarks/speedup_ceiling.py`` uses it), at the shapes and in the order they run in the exported artifact
(after the export passes): the *linear floor* (its Linear layers alone) and the *matmul floor* (those
plus its activation-by-activation matrix multiplies, e.g. attention's q k^T and softmax(.) v).

Why: no runtime runs a model faster than it runs that model's own matrix multiplies. Timing a floor in
each runtime, interleaved with the whole model and with PyTorch eager, tells two things the large-GEMM
roofline cannot: how much of a runtime's time is its GEMMs at these (small, skinny) shapes, and the
largest speed-up over eager a runtime could reach even if every other op were free —
``eager(model) / runtime(floor)``. ``benchmarks/speedup_ceiling.py`` reports both, for both floors.

The chain is a real module (exportable to every target). Each recorded Linear call becomes an
``nn.Linear`` with the same in/out features and bias, applied to a (1, rows, in_features) tensor, rows
being the call's leading dimensions flattened. Each recorded matmul (batch, m, k) @ (batch, k, n) becomes
the previous output reshaped to (batch, m, k) times a constant (batch, k, n) operand: a runtime may
pre-pack a constant, so this can only be cheaper than the model's matmul of two activations, and the
chain stays a floor. Between Linear calls the previous output is sliced (or tiled, when it is smaller)
to the next call's shape; next to a matmul it is reshaped, with a flat slice or tile only when the
element counts differ. :func:`adapters` counts those slice/tile steps so a report can say how far the
chain is from pure GEMMs.
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

    @property
    def in_numel(self) -> int:
        return self.rows * self.in_features

    @property
    def out_numel(self) -> int:
        return self.rows * self.out_features

    def to_list(self) -> list:
        """[rows, in, out, bias]: how a call travels to a worker or child process (JSON)."""
        return [self.rows, self.in_features, self.out_features, self.bias]


@dataclass(frozen=True)
class MatmulCall:
    """``(batch, m, k) @ (batch, k, n)``: a matrix multiply whose operands are both activations."""

    batch: int  # the output's leading dimensions, flattened (batch x heads)
    m: int
    k: int
    n: int

    @property
    def macs(self) -> int:
        return self.batch * self.m * self.k * self.n

    @property
    def in_numel(self) -> int:
        return self.batch * self.m * self.k

    @property
    def out_numel(self) -> int:
        return self.batch * self.m * self.n

    def to_list(self) -> list:
        """["matmul", batch, m, k, n] (JSON)."""
        return ["matmul", self.batch, self.m, self.k, self.n]


FloorCall = LinearCall | MatmulCall


def call_from_list(item: Sequence) -> FloorCall:
    """The inverse of ``to_list`` for either kind of call."""
    if item and item[0] == "matmul":
        return MatmulCall(*item[1:])
    return LinearCall(*item)


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


_MATMULS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def exported_linear_calls(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                          passes: Sequence[str] | None = None, matmuls: bool = False) -> list[FloorCall]:
    """The Linear calls of ``model``'s captured graph after ``passes`` (default: the onnx:cpu pipeline,
    whose shape-changing passes every CPU target shares), in graph order; with ``matmuls`` also its
    matmul/bmm calls of two operands of rank >= 2 (:class:`MatmulCall`).

    Why not the module's own calls: a pass can drop rows (``sink_slices`` runs DeiT-Tiny's last block
    for the class token only), and a floor above what the artifact computes is no floor.
    """
    from edgevit.export.passes import default_pipeline, run_pipeline

    names = default_pipeline("onnx", "cpu") if passes is None else passes
    graph = run_pipeline(model.eval(), tuple(example_inputs), names).program.graph
    calls: list[FloorCall] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.linear.default:
            x, weight = node.args[0].meta["val"], node.args[1].meta["val"]
            bias = len(node.args) > 2 and node.args[2] is not None
            calls.append(LinearCall(math.prod(x.shape[:-1]), weight.shape[1], weight.shape[0], bias))
        elif matmuls and node.target in _MATMULS:
            a, b, out = node.args[0].meta["val"], node.args[1].meta["val"], node.meta["val"]
            if a.dim() >= 2 and b.dim() >= 2:  # a matrix-vector product is no GEMM
                calls.append(MatmulCall(math.prod(out.shape[:-2]), a.shape[-2], a.shape[-1], b.shape[-1]))
    if not any(isinstance(c, LinearCall) for c in calls):
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


def _fit_flat(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x`` reshaped to ``shape``; flattened and sliced (or tiled, when smaller) first if the counts differ."""
    need = math.prod(shape)
    if x.numel() != need:
        flat = x.reshape(-1)
        if flat.numel() < need:
            flat = flat.repeat(-(-need // flat.numel()))
        x = flat[:need]
    return x.reshape(*shape)


def adapters(calls: Sequence[FloorCall]) -> int:
    """How many slice/tile steps the chain inserts between its GEMMs (0: a pure GEMM chain)."""
    count = 0
    for prev, call in pairwise(calls):
        if isinstance(prev, LinearCall) and isinstance(call, LinearCall):
            count += (prev.rows != call.rows) + (prev.out_features != call.in_features)
        else:
            count += prev.out_numel != call.in_numel
    return count


class LinearChain(nn.Module):
    """The recorded calls as one chain; input (1, rows, in_features) of the first call, a Linear call.

    A :class:`MatmulCall`'s second operand is a seeded constant (see the module docstring: still a floor).
    """

    def __init__(self, calls: Sequence[FloorCall], seed: int = 0) -> None:
        super().__init__()
        self.calls = list(calls)
        if not self.calls or not isinstance(self.calls[0], LinearCall):
            raise ValueError("a floor chain starts with a Linear call")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(self._layer(c) for c in self.calls)

    @staticmethod
    def _layer(call: FloorCall) -> nn.Module:
        if isinstance(call, LinearCall):
            return nn.Linear(call.in_features, call.out_features, bias=call.bias)
        return _ConstantMatmul(call)

    def example_input(self, seed: int = 0) -> torch.Tensor:
        first = self.calls[0]
        return torch.randn(1, first.rows, first.in_features, generator=torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev: FloorCall | None = None
        for call, layer in zip(self.calls, self.layers):
            if isinstance(call, MatmulCall):
                x = layer(_fit_flat(x, (call.batch, call.m, call.k)))
            elif isinstance(prev, MatmulCall):
                x = layer(_fit_flat(x, (1, call.rows, call.in_features)))
            else:
                x = layer(_fit(x, call.rows, call.in_features))
            prev = call
        return x


class _ConstantMatmul(nn.Module):
    """(batch, m, k) @ a constant (batch, k, n), flattened back to (1, batch * m, n) for the next call.
    The constant is scaled by 1/sqrt(k) so a long chain keeps its activations in range."""

    def __init__(self, call: MatmulCall) -> None:
        super().__init__()
        self.register_buffer("rhs", torch.randn(call.batch, call.k, call.n) / math.sqrt(call.k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.rhs)
        return out.reshape(1, -1, out.shape[-1])


def linear_floor(model: nn.Module, example_inputs: Sequence[torch.Tensor], seed: int = 0,
                 matmuls: bool = False) -> LinearChain:
    """The :class:`LinearChain` of the Linear calls ``model``'s exported CPU artifacts run; with ``matmuls``
    (the matmul floor) also of their activation-by-activation matrix multiplies."""
    return LinearChain(exported_linear_calls(model, example_inputs, matmuls=matmuls), seed).eval()


def chain_from_options(options: dict) -> LinearChain:
    """The worker's ``builder`` for a floor: ``options["floor"]`` (recorded calls as lists) replayed with
    weights seeded by ``options["seed"]`` (the calls were recorded once; rebuilding them means a capture)."""
    return LinearChain([call_from_list(c) for c in options["floor"]], int(options.get("seed", 0)))


def builder_options(chain: LinearChain) -> dict:
    """Worker options that make the eager session time ``chain`` (see :func:`chain_from_options`)."""
    from pathlib import Path

    return {"builder": "floor:chain_from_options", "builder_path": str(Path(__file__).parent),
            "floor": [c.to_list() for c in chain.calls]}
