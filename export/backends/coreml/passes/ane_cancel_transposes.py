"""``ane_cancel_transposes``: keep the tokens in (B, C, 1, S) between the ANE ops.

``ane_linear_to_conv`` / ``ane_channel_layer_norm`` wrap every op they rewrite in a (B, S, C) <->
(B, C, 1, S) change, and ``ane_split_heads`` reads and writes each head through slices and permutes;
this pass runs whole regions of element-wise ops (residual adds, GELU, ...) in (B, C, 1, S) and
cancels every chain of layout ops that composes to nothing (or shortens it, with the canonicaliser of
:mod:`._chains`), so an MLP fc1 -> gelu -> fc2 and the residual stream stay in (B, C, 1, S) throughout.
See the package docstring for the whole ANE layout.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from edgevit.export.backends.coreml.passes._chains import (
    _SPLITS,
    _canonical,
    _chain,
    _Instr,
    _single_thread,
    _step,
    _try_run_steps,
)
from edgevit.export.backends.coreml.passes._layout import (
    _MAX_INDEX_NUMEL,
    _const_value,
    _dims,
    _flippable,
    _from_bc1s,
    _from_source,
    _PruningPass,
    _to_bc1s,
    _to_chain_end,
)
from edgevit.export.passes import register_pass
from edgevit.export.passes.base import Aliasing, PassContext, aten, is_op
from edgevit.export.passes.repairs import ViewRepairing


_DIM_MAP = {0: 0, 1: 3, 2: 1}  # (B, S, C) axis -> (B, C, 1, S) axis


def _const_to_bc1s(value: torch.Tensor) -> torch.Tensor:
    """A constant operand broadcast against (B, S, C), re-laid out to broadcast against (B, C, 1, S)."""
    if value.numel() == 1:
        return value
    v3 = value.reshape((1,) * (3 - value.dim()) + tuple(value.shape))
    return v3.transpose(1, 2).unsqueeze(2)


@dataclass
class _Region:
    nodes: list[fx.Node]


def _regions(ctx: PassContext) -> list[_Region]:
    """Connected groups of flippable ops (connected through producer -> consumer edges)."""
    members = [n for n in ctx.graph.nodes if _flippable(ctx, n)]
    parent = {n: n for n in members}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in members:
        for a in n.all_input_nodes:
            if a in parent:
                parent[find(a)] = find(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in members:
        groups.setdefault(find(n), []).append(n)
    return [_Region(g) for g in groups.values()]


def _token_mean(ctx: PassContext, user: fx.Node, n: fx.Node) -> bool:
    """``mean(n, [1])`` without keepdim: global average pooling over the tokens of (B, S, C)."""
    if not is_op(user, aten.mean) or user.args[0] is not n or len(user.args) < 2 or user.kwargs:
        return False
    dims, keep = user.args[1], (user.args[2] if len(user.args) > 2 else False)
    return isinstance(dims, (list, tuple)) and [d % 3 for d in dims] == [1] and not keep


def _flip_gain(ctx: PassContext, region: _Region) -> int:
    """Layout ops saved (positive) or added (negative) by running ``region`` in BC1S.

    Counted per boundary: an input that is a ``from_bc1s`` chain used only inside the region or by
    ``to_bc1s`` chains disappears (+2); a constant input is re-laid out for free; any other input
    needs a ``to_bc1s`` (-2, or -1 for a plain (1, 2) transpose that then folds into a reshape, 0 if
    it already has one). An output read by a ``to_bc1s`` chain cancels it (+2); an output read by
    anything else needs one ``from_bc1s`` (-2).
    """
    inside = set(region.nodes)
    gain = 0
    seen_inputs: set[fx.Node] = set()
    for n in region.nodes:
        for a in n.all_input_nodes:
            if a in inside or a in seen_inputs or ctx.shape(a) is None:
                continue
            seen_inputs.add(a)
            if _from_source(ctx, a) is not None:
                dies = all(u in inside or _to_chain_end(ctx, u) is not None for u in a.users)
                gain += 2 if dies else 0
            elif ctx.val(a).dim() == 0 or _const_value(ctx, a) is not None:
                continue
            elif any(_to_chain_end(ctx, u) is not None for u in a.users):
                continue
            elif is_op(a, aten.transpose) and _dims(a, 3) == (1, 2):
                gain -= 1
            else:
                gain -= 2
        outside = [u for u in n.users if u not in inside]
        to_users = [u for u in outside if _to_chain_end(ctx, u) is not None]
        pools = [u for u in outside if _token_mean(ctx, u, n)]
        others = [u for u in outside if u not in to_users and u not in pools]
        gain += 2 * len(to_users) - len(pools)  # a pooled (B, C, 1, 1) leaves with one reshape
        if len(others) == 1:  # the from_bc1s may fold into the layout ops that follow
            absorbed = _absorb_gain(ctx, n, others[0])
            gain += -2 if absorbed is None else max(-2, absorbed)
        elif others:
            gain -= 2
    return gain


def _absorb_gain(ctx: PassContext, n: fx.Node, user: fx.Node) -> int | None:
    """Ops saved if ``from_bc1s(n')`` and the layout ops after it (``user`` on) are canonicalised
    together, compared with those ops alone (None when they do not combine)."""
    b, s, c = ctx.shape(n)  # type: ignore[misc]
    if b * s * c > _MAX_INDEX_NUMEL:
        return None
    chain: list[fx.Node] = []
    prev, cur = n, user
    while len(chain) < 6:
        step = _step(cur)
        if step is None or step.src is not prev or cur.target is operator.getitem:
            break
        chain.append(cur)
        if len(cur.users) != 1:
            break
        prev, cur = cur, next(iter(cur.users))
    best: int | None = None
    with _single_thread():
        index = torch.arange(b * c * s, dtype=torch.int32).reshape(b, c, 1, s).squeeze(2).transpose(1, 2)
        for j, node in enumerate(chain, start=1):
            try:
                index = node.target(index, *node.args[1:], **node.kwargs)
            except RuntimeError:
                break
            code = _canonical((b, c, 1, s), index)
            if code is not None and (best is None or j - len(code) > best):
                best = j - len(code)
    return best


def _flip(ctx: PassContext, region: _Region) -> None:
    """Rebuild ``region`` on (B, C, 1, S) tensors and reconnect its boundary."""
    inside = set(region.nodes)
    new: dict[fx.Node, fx.Node] = {}
    converted: dict[fx.Node, fx.Node] = {}

    def to_bc1s(a: fx.Node) -> fx.Node:
        if a in new:
            return new[a]
        if a in converted:
            return converted[a]
        src = _from_source(ctx, a)
        if src is not None:
            converted[a] = src
        elif ctx.val(a).dim() == 0:
            converted[a] = a
        elif (value := _const_value(ctx, a)) is not None:
            with ctx.graph.inserting_before(a.next):
                converted[a] = ctx.add_constant(_const_to_bc1s(value), "ane_bc1s_const")
        else:
            with ctx.graph.inserting_before(a.next):  # right after a: before every user of a
                converted[a] = _to_bc1s(ctx, a)
            for u in list(a.users):  # existing to_bc1s chains of a: share the new one
                end = _to_chain_end(ctx, u)
                if end is not None and end is not converted[a]:
                    ctx.replace(end, converted[a])
        return converted[a]

    for n in region.nodes:  # graph order, so every member input is rebuilt before its users
        with ctx.graph.inserting_before(n):
            args = fx.node.map_arg(n.args, to_bc1s)
            if is_op(n, aten.cat):
                dim = n.args[1] if len(n.args) > 1 else 0
                args = (args[0], _DIM_MAP[dim % 3])
            elif is_op(n, aten.slice):
                dim = n.args[1] if len(n.args) > 1 else 0
                args = (args[0], _DIM_MAP[dim % 3], *args[2:])
            elif is_op(n, aten.split, aten.split_with_sizes):
                dim = n.args[2] if len(n.args) > 2 else 0
                args = (args[0], args[1], _DIM_MAP[dim % 3])
            new[n] = ctx.call(n.target, *args, **dict(n.kwargs))
    for n in region.nodes:
        back: fx.Node | None = None
        for u in list(n.users):
            if u in inside:
                continue
            end = _to_chain_end(ctx, u)
            if end is not None:
                ctx.replace(end, new[n])
                continue
            if _token_mean(ctx, u, n):  # pool over S on (B, C, 1, S), leave as (B, C)
                with ctx.graph.inserting_before(u):
                    pooled = ctx.call(aten.mean.dim, new[n], [3], True)
                    ctx.replace(u, ctx.call(aten.reshape.default, pooled, list(ctx.shape(u))))
                continue
            if back is None:
                with ctx.graph.inserting_before(new[n].next):
                    back = _from_bc1s(ctx, new[n])
            u.replace_input_with(n, back)


@register_pass
class AneCancelTransposes(ViewRepairing, _PruningPass):
    """Cancel inverse layout changes: run element-wise regions in (B, C, 1, S), then shorten layout chains.

    Why: ``ane_linear_to_conv`` / ``ane_channel_layer_norm`` wrap every op in a (B, S, C) <-> (B, C, 1, S)
    change; the ANE layout pays off only if the tokens stay in (B, C, 1, S) between those ops
    (convert once after the patch embedding, keep the layout through all blocks; ml-ane-transformers'
    "Principle 3: Minimizing Memory Copies – avoid as many transposes and reshapes as possible").
    Two steps:
    1. a connected region of ops on (B, S, C) tensors that only need their axes renamed (unary
       activations; add/mul/... with a same-layout, scalar or constant operand; ``cat``/``slice``/
       ``split`` on the token or channel axis) is rebuilt on (B, C, 1, S) tensors when that removes
       more layout ops at its boundary than it adds (constants are re-laid out at export time) — so
       fc1 -> gelu -> fc2, the residual stream x + attn(x) + mlp(x) and the q/k/v split of a fused
       projection stay in BC1S. A token mean ``x.mean(1)`` (global average pooling) pools dim 3
       instead, and a reduction whose result is reshaped back to its keepdim shape keeps its dims;
    2. every chain of pure data-movement ops (transpose, permute, squeeze, unsqueeze, reshape,
       flatten, slice, select, split items) is replaced by its shortest equivalent form
       ``slice* -> [reshape] -> permute? -> reshape?`` (found by running the chain on an index
       tensor; the optional first reshape only splits dims, e.g. C -> heads x head_dim) when that has
       fewer ops: ``transpose(1,2).unsqueeze(2)`` after ``squeeze(2).transpose(1,2)`` becomes nothing.
       No intermediate has a higher rank than the chain's own ends. This runs on the graph as it is
       and on a copy where chain prefixes shared by several readers are duplicated per reader (then
       merged again where they stay identical); the result with fewer layout ops is kept.
    Exact: the same elements go through the same element-wise ops; only the layout moves
    (``torch.equal`` in the tests where the other ops are layout-independent; PyTorch's own CPU
    kernels may differ in the last bit on a contiguous vs strided input, e.g. GELU's vectorised erf
    or a conv's summation order).
    """

    name = "ane_cancel_transposes"
    exact = True
    fixes = ("transpose", "Transpose", "TRANSPOSE")

    def _run(self, ctx: PassContext) -> int:
        _erase_dead_dropouts(ctx)
        sites = 0
        for region in _regions(ctx):
            if _flip_gain(ctx, region) > 0:
                _flip(ctx, region)
                sites += 1
        for node in list(ctx.graph.nodes):  # mean over the tokens of from_bc1s(y): pool y directly
            if is_op(node, aten.mean) and node.args and (src := _from_source(ctx, node.args[0])) is not None \
                    and _token_mean(ctx, node, node.args[0]):
                with ctx.graph.inserting_before(node):
                    pooled = ctx.call(aten.mean.dim, src, [3], True)
                    ctx.replace(node, ctx.call(aten.reshape.default, pooled, list(ctx.shape(node))))
                sites += 1
        sites += _keepdim_reductions(ctx)
        if sites:
            ctx.graph.eliminate_dead_code()
            Aliasing.forget(ctx)  # the flipped regions' new views join the storage groups they read
        return sites + self._canonicalize_best(ctx)

    def _canonicalize_best(self, ctx: PassContext) -> int:
        """Canonicalise the chains as they are, and on a copy whose shared chain prefixes are first
        duplicated per reader (so q, k and v can each be read straight from the qkv conv); keep the
        graph with fewer layout ops."""
        trial = copy.copy(ctx)
        trial.graph = copy.deepcopy(ctx.graph)
        trial.graph.owning_module = ctx.gm  # for eliminate_dead_code's purity check of call_module
        _duplicate_shared_moves(trial.graph)
        trial_sites = self._canonicalize(trial)
        _merge_duplicate_moves(trial.graph)
        sites = self._canonicalize(ctx)
        if _layout_count(trial.graph) < _layout_count(ctx.graph):
            ctx.gm.graph = trial.graph
            ctx.graph = ctx.gm.graph
            return max(trial_sites, 1)  # merged duplicates alone are a rewrite too: the pipeline checks it
        return sites

    def _canonicalize(self, ctx: PassContext) -> int:
        sites = 0
        for _ in range(8):  # each rewrite strictly shortens its chain; a few sweeps reach the fixpoint
            done = 0
            for node in reversed(list(ctx.graph.nodes)):
                if node.graph is ctx.graph and node.users and self.matches(ctx, node):
                    with ctx.graph.inserting_before(node):
                        done += self.rewrite(ctx, node) is not False
            if not done:
                break
            sites += done
            ctx.graph.eliminate_dead_code()
        return sites

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        # Not in storage an in-place op writes: the rebuilt chain may copy where the chain viewed (or read
        # the source directly where it read a written intermediate), and the write would not reach it.
        return (_step(node) is not None and isinstance(ctx.val(node), torch.Tensor)
                and not Aliasing.of(ctx).written(node))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool:
        best = self._best(ctx, node)
        if best is None:
            return False
        src, code = best
        out = src
        for op, args in code:
            out = ctx.call(op, out, *args)
        ctx.replace(node, out)
        return True

    @staticmethod
    def _best(ctx: PassContext, end: fx.Node) -> tuple[fx.Node, list[_Instr]] | None:
        """The source and canonical code saving the most ops over the chain ending at ``end``."""
        steps = _chain(end)
        best: tuple[int, fx.Node, list[_Instr]] | None = None
        removed, prev_dead = 0, True
        for k, step in enumerate(steps, start=1):
            # a step disappears with the chain end if everything after it did and it has no other user
            out_dies = prev_dead and (k == 1 or len(step.out.users) == 1)
            prev_dead = out_dies and step.private
            removed += step.cost if prev_dead else 0
            if removed <= (best[0] if best else 0):
                if not prev_dead:
                    break  # nothing further back can save more
                continue
            src, shape = step.src, ctx.shape(step.src)
            if k == 1 and shape != ctx.shape(end):
                continue  # one op is already the shortest form unless it is a no-op
            if shape is None or not shape or math.prod(shape) > _MAX_INDEX_NUMEL:
                continue
            with _single_thread():
                index = _try_run_steps(torch.arange(math.prod(shape), dtype=torch.int32).reshape(shape),
                                       steps[:k][::-1])
                code = None if index is None else _canonical(shape, index)
            if code is not None and removed - len(code) > (best[0] if best else 0):
                best = (removed - len(code), src, code)
        return None if best is None else (best[1], best[2])


def _keepdim_reductions(ctx: PassContext) -> int:
    """``mean(x, dims)`` whose only reader re-inserts the reduced dims (``reshape`` to the keepdim
    shape, e.g. pooled features into a (B, C, 1, 1) head conv) → ``mean(x, dims, keepdim=True)``."""
    sites = 0
    for node in list(ctx.graph.nodes):
        if not (is_op(node, aten.mean, aten.sum, aten.amax, aten.amin) and len(node.users) == 1
                and len(node.args) in (2, 3) and not node.kwargs and not (node.args[2:] and node.args[2])):
            continue
        (user,) = node.users
        src, dims = node.args[0], node.args[1]
        shape = ctx.shape(src)
        if shape is None or not isinstance(dims, (list, tuple)) or not is_op(user, aten.reshape, aten.view):
            continue
        kept = [1 if d in {x % len(shape) for x in dims} else n for d, n in enumerate(shape)]
        if ctx.shape(user) != tuple(kept):
            continue
        with ctx.graph.inserting_before(user):
            ctx.replace(user, ctx.call(node.target, src, dims, True))
        sites += 1
    return sites


def _is_move(node: fx.Node) -> bool:
    step = _step(node)
    return step is not None and node.target is not operator.getitem


def _layout_count(graph: fx.Graph) -> int:
    """Layout ops of a graph: data-movement ops and splits (their items are free)."""
    return sum(1 for n in graph.nodes if _is_move(n) or is_op(n, *_SPLITS))


def _duplicate_shared_moves(graph: fx.Graph) -> None:
    """Give every reader of a shared data-movement op its own copy (when all readers are data-movement
    ops too), so each chain can be canonicalised from its real source; copies left identical are
    merged again afterwards. Not where an in-place op writes the storage: a ``reshape`` may copy, and
    readers of two copies would no longer see each other's writes."""
    writes = Aliasing(graph)
    for node in reversed(list(graph.nodes)):
        users = list(node.users)
        if not _is_move(node) or len(users) < 2 or not all(_is_move(u) for u in users) or writes.written(node):
            continue
        for user in users[1:]:
            with graph.inserting_before(user):
                twin = graph.node_copy(node)
            user.replace_input_with(node, twin)


def _merge_duplicate_moves(graph: fx.Graph) -> None:
    """Common-subexpression elimination over data-movement ops and splits (all pure), except where an
    in-place op writes the storage (two ``reshape`` copies written apart must stay two tensors)."""
    writes = Aliasing(graph)
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if not (_is_move(node) or is_op(node, *_SPLITS) or node.target is operator.getitem) or writes.written(node):
            continue
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_freeze(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _erase_dead_dropouts(ctx: PassContext) -> None:
    """Erase inference-mode dropouts nobody reads: FX keeps them (``dropout`` is a seeded random op,
    so ``eliminate_dead_code`` treats it as impure) and they would keep layout changes alive."""
    for node in list(ctx.graph.nodes):
        if (is_op(node, aten.dropout, aten.feature_dropout, aten.alpha_dropout) and not node.users
                and len(node.args) > 2 and node.args[2] is False):
            ctx.graph.erase_node(node)
