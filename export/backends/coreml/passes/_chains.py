"""The chain canonicaliser of ``ane_cancel_transposes``: a chain of pure data-movement ops (transpose,
permute, squeeze, unsqueeze, reshape, flatten, slice, select, split items) is run on an index tensor
and replaced by its shortest equivalent form ``slice* -> [reshape] -> permute? -> reshape?``.

A self-contained algorithm on index tensors and FX nodes, kept apart from the pass that uses it.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import fx

from edgevit.export.passes.base import aten, is_op

# Ops that only move data: their output is a fixed gather of their single tensor input.
_MOVES = (aten.transpose, aten.permute, aten.squeeze, aten.unsqueeze, aten.reshape, aten.view,
          aten._unsafe_view, aten.flatten, aten.unflatten, aten.slice, aten.select)
_SPLITS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unbind)


@dataclass
class _Step:
    out: fx.Node  # the node whose value the step produces
    src: fx.Node  # its tensor input
    cost: int  # layout ops it contributes (a split + getitem pair counts 1)
    private: bool  # True if removing the chain end also removes this step


def _step(node: fx.Node) -> _Step | None:
    """The data-movement step producing ``node``, or None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        split = node.args[0]
        if not (is_op(split, *_SPLITS) and isinstance(split.args[0], fx.Node)):
            return None
        if any(isinstance(a, fx.Node) for a in split.args[1:]):
            return None
        return _Step(node, split.args[0], 1, len(split.users) == 1)
    if not is_op(node, *_MOVES) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.all_input_nodes != [node.args[0]] or node.target is aten.view.dtype:
        return None  # x.view(torch.int32) reinterprets the bits: not a move of the elements
    return _Step(node, node.args[0], 1, True)


def _chain(end: fx.Node, limit: int = 12) -> list[_Step]:
    """The data-movement steps ending at ``end``, last step first."""
    steps: list[_Step] = []
    node = end
    while len(steps) < limit:
        step = _step(node)
        if step is None or not isinstance(step.src.meta.get("val"), torch.Tensor):
            break
        steps.append(step)
        node = step.src
    return steps


def _run_steps(index: torch.Tensor, steps: Sequence[_Step]) -> torch.Tensor:
    """Apply ``steps`` (first step first) to an index tensor: where each output element comes from."""
    for step in steps:
        node = step.out
        if node.target is operator.getitem:
            split = node.args[0]
            index = split.target(index, *split.args[1:], **split.kwargs)[node.args[1]]
        else:
            index = node.target(index, *node.args[1:], **node.kwargs)
    return index


def _try_run_steps(index: torch.Tensor, steps: Sequence[_Step]) -> torch.Tensor | None:
    try:  # a ``view`` that worked on the real (differently strided) input may refuse the index
        return _run_steps(index, steps)
    except RuntimeError:
        return None


_Instr = tuple[Any, tuple]


def _canonical(src_shape: tuple[int, ...], index: torch.Tensor) -> list[_Instr] | None:
    """The shortest ``slice* -> [reshape] -> permute? -> reshape?`` form of a gather, or None."""
    out_shape = tuple(index.shape)
    flat = index.flatten().long()
    if flat.numel() == 0:  # every chain step is an injective gather, so no duplicate check is needed
        return None
    coords = torch.unravel_index(flat, src_shape)
    lows = [int(c.min()) for c in coords]
    counts = [int(c.max()) - lo + 1 for c, lo in zip(coords, lows)]
    if math.prod(counts) != flat.numel():  # not a box of the source
        return None
    code: list[_Instr] = [(aten.slice.Tensor, (d, lows[d], lows[d] + counts[d]))
                          for d in range(len(src_shape)) if counts[d] != src_shape[d]]
    strides = [math.prod(counts[d + 1:]) for d in range(len(counts))]
    local = sum((c - lo) * s for c, lo, s in zip(coords, lows, strides))
    if torch.equal(local, torch.arange(flat.numel())):
        if tuple(counts) != out_shape:
            code.append((aten.reshape.default, (list(out_shape),)))
        return code
    forms: list[list[_Instr]] = []
    big = [d for d in range(len(counts)) if counts[d] > 1]
    perm = _find_permutation([counts[d] for d in big], local)
    if perm is not None:
        forms.append(_permute_code(counts, [big[i] for i in perm], out_shape))
    split = _split_permutation(local.reshape(out_shape), out_shape)
    if split is not None:
        sizes, order = split
        pre = [] if sizes == counts else [(aten.reshape.default, (sizes,))]
        forms.append(pre + _permute_code(sizes, order, out_shape))
    return code + min(forms, key=len) if forms else None


def _split_permutation(local: torch.Tensor, out_shape: tuple[int, ...]) -> tuple[list[int], list[int]] | None:
    """``(sizes, order)`` with ``arange(n).reshape(sizes).permute(...)`` equal to ``local``, where the
    source dims may first be split (e.g. channels C -> heads x head_dim), if the map is one.

    Each output dim advances the source by a fixed stride; sorted by stride they must tile the
    source contiguously. ``sizes`` are those dims in source order (leading 1s for the output's
    singleton dims), ``order`` the output's non-singleton dims as indices into ``sizes``.
    """
    dims = [j for j, size in enumerate(out_shape) if size > 1]
    flat = local.flatten()
    if flat[0] != 0:
        return None
    strides = {j: int(flat[math.prod(out_shape[j + 1:])]) for j in dims}
    rebuilt = torch.zeros(out_shape, dtype=flat.dtype)
    for j in dims:
        view = [1] * len(out_shape)
        view[j] = out_shape[j]
        rebuilt = rebuilt + torch.arange(out_shape[j]).reshape(view) * strides[j]
    if not torch.equal(rebuilt, local):
        return None
    memory = sorted(dims, key=lambda j: -strides[j])
    expected = 1
    for j in reversed(memory):
        if strides[j] != expected:
            return None
        expected *= out_shape[j]
    ones = len(out_shape) - len(dims)
    sizes = [1] * ones + [out_shape[j] for j in memory]
    return sizes, [ones + memory.index(j) for j in dims]


def _find_permutation(sizes: list[int], local: torch.Tensor) -> list[int] | None:
    """The ``p`` with ``arange(n).reshape(sizes).permute(p).flatten() == local``, if there is one.

    Read from the inside out: flat position 1 holds the stride of the innermost permuted dim, the
    position after a full run of it the stride of the next one, and so on; then check the whole map.
    """
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    inner_first: list[int] = []
    pos = 1
    for _ in sizes:
        if pos >= local.numel():
            return None
        step = int(local[pos]) - int(local[0])
        dim = next((i for i, st in enumerate(strides) if st == step and i not in inner_first), None)
        if dim is None:
            return None
        inner_first.append(dim)
        pos *= sizes[dim]
    perm = inner_first[::-1]
    base = torch.arange(local.numel()).reshape(sizes) if sizes else torch.arange(local.numel())
    return perm if torch.equal(base.permute(perm).flatten(), local) else None


def _permute_code(counts: list[int], order: list[int], out_shape: tuple[int, ...]) -> list[_Instr]:
    """Permute the non-singleton dims into ``order``; singletons go where ``out_shape`` has 1s, else
    first (never last: a trailing singleton axis is padded to 64 bytes on the ANE)."""
    ones = [d for d in range(len(counts)) if counts[d] == 1]
    perm: list[int] | None = None
    if len(out_shape) == len(counts) and [s for s in out_shape if s != 1] == [counts[d] for d in order]:
        big_iter, one_iter = iter(order), iter(ones)
        perm = [next(big_iter) if s != 1 else next(one_iter) for s in out_shape]
    if perm is None:
        perm = ones + order
    moved = [i for i, d in enumerate(perm) if d != i]
    if not moved:
        code: list[_Instr] = []
    elif len(moved) == 2:
        code = [(aten.transpose.int, (moved[0], moved[1]))]
    else:
        code = [(aten.permute.default, (perm,))]
    if tuple(counts[d] for d in perm) != out_shape:
        code.append((aten.reshape.default, (list(out_shape),)))
    return code


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Index bookkeeping on small int tensors: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
