"""Cleanups: graph artefacts that converters trip on, removed before any other pass runs."""

from __future__ import annotations

from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, downstream, is_op

# Ops that only re-label their input in an inference graph.
_NO_OPS = (aten.alias, aten.detach, aten.lift_fresh_copy, aten.clone, aten.contiguous, aten.dropout,
           aten.feature_dropout, aten.alpha_dropout, aten._assert_tensor_metadata)
# Ops that need their input's strides to be compatible (they raise otherwise): after a copy is removed,
# the ones downstream of it become ``reshape``, which gives the same values whatever the strides.
_STRIDE_BOUND = (aten.view, aten._unsafe_view)
# Ops whose values depend on their input's strides: a copy upstream of one of them is kept.
_STRIDE_READERS = (aten.as_strided, aten.as_strided_, aten.as_strided_scatter, aten.set_)


@register_pass
class StripAliases(GraphPass):
    """Remove alias / detach / clone / contiguous / dropout (eval) / no-op ``to`` nodes.

    Why: coremltools rejects graphs that keep ``alias`` nodes ("Unsupported fx node alias"),
    training-IR captures keep ``dropout`` (a no-op at inference that some converters lower to a random
    op) and ``_assert_tensor_metadata`` guards, and every extra copy is a node an accelerator
    partitioner must place. All of these return their input's values unchanged.

    ATen semantics kept (strides and aliasing, not only values):

    * a removed copy (``contiguous``, ``clone``, ``to``) changes the strides of what follows it, and
      not only of its direct users (element-wise ops propagate their input's layout). Real code does
      ``x.transpose(1, 2).contiguous().view(...)``; so every ``view`` downstream of a removed node
      becomes ``reshape`` (same values, any strides);
    * a copy is kept when its input or output is written in place (``y = x.clone(); y.add_(1)`` must
      not modify ``x``), when a downstream ``view`` shares storage with a tensor written in place (a
      ``reshape`` could copy and lose the write), or when an op downstream reads strides
      (``as_strided``).

    Before::

        t = transpose(x, 1, 2); c = contiguous(t); v = view(c, [B, -1])

    After::

        t = transpose(x, 1, 2); v = reshape(t, [B, -1])
    """

    name = "strip_aliases"
    fixes = ("alias", "aten.alias", "Identity", "Dropout")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if is_op(node, aten._assert_tensor_metadata):
            return True
        if is_op(node, aten.to, aten._to_copy):
            src = node.args[0]
            return ctx.shape(src) is not None and ctx.val(src).dtype == ctx.val(node).dtype
        if is_op(node, aten.dropout, aten.feature_dropout, aten.alpha_dropout):
            return True
        return is_op(node, *_NO_OPS) and isinstance(node.args[0], fx.Node)

    def run(self, ctx: PassContext) -> int:
        self.notes: list[str] = []
        aliasing = Aliasing(ctx.graph)
        sites, kept, views = 0, 0, {}
        for node in list(ctx.graph.nodes):
            if node.op != "call_function" or not self.matches(ctx, node):
                continue
            if is_op(node, aten._assert_tensor_metadata):
                ctx.graph.erase_node(node)
                sites += 1
                continue
            cone = downstream(node)
            if not self._removable(node, cone, aliasing):
                kept += 1
                continue
            views.update(dict.fromkeys(n for n in cone if is_op(n, *_STRIDE_BOUND)))
            ctx.replace(node, node.args[0])
            # FX counts dropout as impure, so dead-code elimination would keep the orphan: erase it here.
            ctx.graph.erase_node(node)
            sites += 1
        for view in views:
            with ctx.graph.inserting_before(view):
                ctx.replace(view, ctx.call(aten.reshape.default, view.args[0], _view_shape(view)))
            ctx.graph.erase_node(view)
        if kept:
            self.notes.append(f"kept {kept} copies: written in place, or strides read downstream")
        if views:
            self.notes.append(f"{len(views)} view(s) after a removed copy became reshape")
        return sites

    @staticmethod
    def _removable(node: fx.Node, cone: list[fx.Node], aliasing: Aliasing) -> bool:
        if aliasing.written(node) or aliasing.written(node.args[0]):
            return False
        if any(is_op(n, *_STRIDE_READERS) for n in cone):
            return False
        return not any(is_op(n, *_STRIDE_BOUND) and aliasing.written(n) for n in cone)


def _view_shape(view: fx.Node) -> object:
    return view.args[1] if len(view.args) > 1 else view.kwargs["size"]


@register_pass
class SelectToSlice(GraphPass):
    """``select(x, dim, i)`` (the class-token read ``x[:, 0]``) → ``slice`` + ``squeeze``.

    Why: ``select`` exports as ONNX ``Gather`` with a scalar index; the Core ML execution provider has
    no ``Gather`` in its MLProgram op list (so the class-token read splits the graph into two
    partitions), and ``gather`` is not an ANE op. A static ``Slice`` is supported everywhere.
    Exact: the same elements are read.
    """

    name = "select_to_slice"
    fixes = ("Gather", "gather", "GATHER")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return is_op(node, aten.select) and ctx.shape(node.args[0]) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        src, dim, index = node.args[0], node.args[1], node.args[2]
        size = ctx.shape(src)[dim]
        index = index + size if index < 0 else index
        sliced = ctx.call(aten.slice.Tensor, src, dim, index, index + 1)
        ctx.replace(node, ctx.call(aten.squeeze.dim, sliced, dim))
