"""Cleanups: graph artefacts that converters trip on, removed before any other pass runs."""

from __future__ import annotations

from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op

# Ops that only re-label their input in an inference graph.
_NO_OPS = (aten.alias, aten.detach, aten.lift_fresh_copy, aten.clone, aten.contiguous, aten.dropout,
           aten.feature_dropout, aten.alpha_dropout, aten._assert_tensor_metadata)


@register_pass
class StripAliases(GraphPass):
    """Remove alias / detach / clone / contiguous / dropout (eval) / no-op ``to`` nodes.

    Why: coremltools rejects graphs that keep ``alias`` nodes ("Core ML rejects graphs with `alias`
    nodes", issue 4), training-IR captures keep ``dropout`` (a no-op at inference that some
    converters lower to a random op) and ``_assert_tensor_metadata`` guards, and every extra copy is
    a node an accelerator partitioner must place. All of these return their input unchanged here.
    """

    name = "strip_aliases"
    wanted_by = ("*",)
    fixes = ("alias", "aten.alias", "Identity", "Dropout")
    order = 0

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if is_op(node, aten._assert_tensor_metadata):
            return True
        if is_op(node, aten.to, aten._to_copy):
            src = node.args[0]
            return ctx.shape(src) is not None and ctx.val(src).dtype == ctx.val(node).dtype
        if is_op(node, aten.dropout, aten.feature_dropout, aten.alpha_dropout):
            return True
        return is_op(node, *_NO_OPS) and isinstance(node.args[0], fx.Node)

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        if is_op(node, aten._assert_tensor_metadata):
            ctx.graph.erase_node(node)
            return
        ctx.replace(node, node.args[0])
        # FX counts dropout as impure, so dead-code elimination would keep the orphan: erase it here.
        ctx.graph.erase_node(node)


@register_pass
class SelectToSlice(GraphPass):
    """``select(x, dim, i)`` (the class-token read ``x[:, 0]``) → ``slice`` + ``squeeze``.

    Why: ``select`` exports as ONNX ``Gather`` with a scalar index; the Core ML execution provider has
    no ``Gather`` in its MLProgram op list (so the class-token read splits the graph into two
    partitions), and ``gather`` is not an ANE op. A static ``Slice`` is supported everywhere.
    Exact: the same elements are read.
    """

    name = "select_to_slice"
    wanted_by = ("*",)
    fixes = ("Gather", "gather", "GATHER")
    order = 10

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return is_op(node, aten.select) and ctx.shape(node.args[0]) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        src, dim, index = node.args[0], node.args[1], node.args[2]
        size = ctx.shape(src)[dim]
        index = index + size if index < 0 else index
        sliced = ctx.call(aten.slice.Tensor, src, dim, index, index + 1)
        ctx.replace(node, ctx.call(aten.squeeze.dim, sliced, dim))
