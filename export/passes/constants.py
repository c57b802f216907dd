"""Constant folding: subgraphs that read only parameters/buffers become one precomputed constant."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op

# Cheap, deterministic, functional ops (no randomness, no in-place writes, output shape known from the
# inputs). A node is folded only when it is one of these and every tensor it reads is constant.
_FOLDABLE_OPS = (
    # gathers: the reason for the pass
    aten.index, aten.index_select, aten.gather, aten.take, aten.embedding,
    # data movement
    aten.reshape, aten.view, aten._unsafe_view, aten.permute, aten.transpose, aten.t, aten.unsqueeze,
    aten.squeeze, aten.flatten, aten.unflatten, aten.slice, aten.select, aten.narrow, aten.expand,
    aten.repeat, aten.repeat_interleave, aten.tile, aten.cat, aten.stack, aten.split, aten.split_with_sizes,
    aten.chunk, aten.unbind, aten.flip, aten.roll, aten.movedim, aten.diagonal, aten.tril, aten.triu,
    aten.constant_pad_nd, aten.pad, aten.contiguous, aten.clone, aten.alias, aten.detach,
    aten.lift_fresh_copy, aten._to_copy, aten.to,
    # elementwise arithmetic and small reductions
    aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.neg, aten.pow, aten.exp, aten.log, aten.sqrt,
    aten.rsqrt, aten.reciprocal, aten.abs, aten.sin, aten.cos, aten.sigmoid, aten.tanh, aten.relu,
    aten.clamp, aten.where, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not,
    aten.logical_and, aten.logical_or, aten.sum, aten.mean, aten.amax, aten.amin, aten.cumsum,
    aten.softmax, aten._softmax, aten.matmul, aten.mm, aten.bmm,
    # factories (no tensor inputs at all)
    aten.arange, aten.zeros, aten.ones, aten.full, aten.eye, aten.scalar_tensor, aten.linspace,
)

_BLOWUP_RATIO = 4  # a stored constant this many times larger than what it reads ...
_BLOWUP_BYTES = 1 << 20  # ... and above 1 MB stays computed (an expand/repeat is cheaper than its bytes)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class _Folder:
    """Decides which nodes compute a constant and which of them to store, and computes them."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.mutated = _mutated_attributes(ctx.graph)
        # A tensor an in-place op writes (``acc = zeros(..); acc += x``, ``m = ones(..); m[:, 2:] = 0``)
        # is not a constant: a stored copy would be written on every run, or miss the write.
        self.writes = Aliasing(ctx.graph)
        self._foldable: dict[fx.Node, bool] = {}
        self._leaves: dict[fx.Node, frozenset[fx.Node]] = {}
        self._values: dict[fx.Node, Any] = {}
        self.roots = self._roots()

    def is_leaf(self, node: fx.Node) -> bool:
        return (self.ctx.constant(node) is not None and str(node.target) not in self.mutated
                and not self.writes.written(node))

    def leaves(self, node: fx.Node) -> frozenset[fx.Node]:
        if node not in self._leaves:
            if self.is_leaf(node):
                self._leaves[node] = frozenset((node,))
            else:
                self._leaves[node] = frozenset().union(*(self.leaves(a) for a in node.all_input_nodes))
        return self._leaves[node]

    def foldable(self, node: fx.Node) -> bool:
        """A call of an allowed op whose every input is a constant or itself foldable."""
        if node not in self._foldable:
            self._foldable[node] = self._check(node)
        return self._foldable[node]

    def _check(self, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem:
            src = node.args[0]
            return isinstance(src, fx.Node) and self.foldable(src)
        if not is_op(node, *_FOLDABLE_OPS) or self.ctx.val(node) is None or self.writes.written(node):
            return False
        return all(self.is_leaf(a) or self.foldable(a) for a in node.all_input_nodes)

    def _storable(self, node: fx.Node) -> bool:
        """A tensor within the size guard: not a blow-up of what it reads, no second copy of a big weight."""
        out = _nbytes(self.ctx.val(node))
        if not isinstance(self.ctx.val(node), torch.Tensor):
            return False
        if out <= _BLOWUP_BYTES:
            return True
        read = sum(_nbytes(self.ctx.constant(leaf)) for leaf in self.leaves(node))
        if out > _BLOWUP_RATIO * read:
            return False
        # the inputs stay in the graph if anything else reads them: folding would store them twice
        return all(u.op == "call_function" and self.foldable(u) for leaf in self.leaves(node) for u in leaf.users)

    def _roots(self) -> set[fx.Node]:
        """The constants to store: for every foldable input of a non-foldable node, the input itself if
        it is storable, else (an expand/repeat too large to store) the storable nodes it is computed from."""
        roots: set[fx.Node] = set()
        seen: set[fx.Node] = set()

        def want(node: fx.Node) -> None:
            if node in seen or not self.foldable(node):
                return
            seen.add(node)
            if self._storable(node):
                roots.add(node)
            else:
                for arg in node.all_input_nodes:
                    want(arg)

        for user in self.ctx.graph.nodes:
            # a graph output that is a bare constant trips converters; it stays computed
            if user.op != "output" and not self.foldable(user):
                for arg in user.all_input_nodes:
                    want(arg)
        return roots

    def value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self._values:
            if self.is_leaf(node):
                self._values[node] = self.ctx.constant(node)
            else:
                args = fx.node.map_arg(node.args, self.value)
                kwargs = fx.node.map_arg(node.kwargs, self.value)
                with torch.no_grad():
                    self._values[node] = node.target(*args, **kwargs)
        return self._values[node]


def _mutated_attributes(graph: fx.Graph) -> set[str]:
    """Targets of every get_attr upstream of an in-place op: their value changes at run time."""
    mutated: set[str] = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        stack, seen = list(node.all_input_nodes), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                mutated.add(str(n.target))
            stack.extend(n.all_input_nodes)
    return mutated


@register_pass
class FoldConstantGathers(GraphPass):
    """Fold every subgraph that reads only parameters/buffers (gathers, reshapes, arithmetic) into one constant.

    Why: ``attention_biases[:, attention_bias_idxs]`` (EfficientViT-M, Swin relative-position bias;
    a known non-ANE op) and ``table.index_select(0, fixed_index)`` (DropoutViT's positional code) are
    gathers of a parameter by a constant index, recomputed on every inference; timm caches the bias in
    ``eval()``. ``gather`` is not an ANE op (§3) and ONNX ``Gather`` is not in the Core ML EP list (§6.4).
    Converters fold the simple spellings themselves (ORT at load, coremltools, the TFLite converter),
    but not all: the ``torch.gather(table.expand(...), dim, index.expand(...))`` spelling reaches the
    .tflite as BROADCAST_TO + SELECT_V2 + GATHER_ND, none of which the XNNPACK delegate handles (§4.3;
    BROADCAST_TO not the GPU delegate either, §4.4), and the raw ONNX file keeps a Gather for tables
    above the exporter's 8192-element folding limit. Folding in the graph makes every artifact carry
    the constant, whatever the converter does; any cheap deterministic op chain on constants qualifies.
    Size guard: a constant above 1 MB is stored only if it is at most 4x the bytes it reads and its
    inputs are read by nothing else (no blown-up expand, no second copy of a weight); otherwise the
    largest storable nodes under it are folded. A bare constant graph output stays computed, and so does
    a tensor an in-place op writes (``acc = zeros(..); acc += x``: stored, it would be written every run).
    Exact: the folded value is computed by the same PyTorch kernels (``torch.equal``); a matmul that read
    a transposed view now reads a contiguous copy and may re-associate its sums (fp32 rounding).
    """

    name = "fold_constant_gathers"
    fixes = ("Gather", "GatherND", "gather", "GATHER", "GATHER_ND")

    def run(self, ctx: PassContext) -> int:
        self._folder = _Folder(ctx)
        read = {str(n.target) for n in ctx.graph.nodes if n.op == "get_attr"}
        sites = super().run(ctx)
        if sites:
            _drop_unused_attributes(ctx, read)
        del self._folder
        return sites

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return node in self._folder.roots

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        value = self._folder.value(node)
        ctx.replace(node, ctx.add_constant(value, "folded"))


def _drop_unused_attributes(ctx: PassContext, candidates: set[str]) -> None:
    """Delete the parameters/buffers that only fed folded subgraphs, so the artifact does not carry them."""
    ctx.graph.eliminate_dead_code()
    still_read = {str(n.target) for n in ctx.graph.nodes if n.op == "get_attr"}
    called = [str(n.target) for n in ctx.graph.nodes if n.op == "call_module"]
    for target in sorted(candidates - still_read):
        owner_path, _, attr = target.rpartition(".")
        if any(target.startswith(f"{m}.") for m in called):  # a called submodule may read it itself
            continue
        owner = ctx.gm.get_submodule(owner_path) if owner_path else ctx.gm
        if attr in owner._parameters or attr in owner._buffers:
            delattr(owner, attr)
