"""The pass framework: registered graph rewrites over the captured ``torch.export`` program.

A pass is a small class (the coremltools-MIL / ExecuTorch habit): a ``name``, a docstring saying what
it rewrites and which backend limit it works around (which pipelines run it is each backend's explicit
list, in the one order of ``export/passes/__init__.py: ORDER``), and a ``matches(node)`` / ``rewrite(ctx, node)`` pair. Passes work on the unlifted
ATen graph of ``ExportedProgram.module()`` (parameters are ``get_attr`` nodes), which any model
captured by :func:`edgevit.export.capture.capture` has, zoo or not; the pipeline re-exports the
rewritten graph so every converter still receives an ``ExportedProgram``.

Where a graph rewrite is impractical a pass may instead be a :class:`ModulePass` that swaps modules
before capture; it is registered, named, listed and reported the same way.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import fx, nn

aten = torch.ops.aten


@dataclass
class PassReport:
    """What one pass did: sites rewritten and the numerical change it made (max |Δ| of the outputs)."""

    name: str
    sites: int
    exact: bool
    max_abs_change: float | None = None
    notes: list[str] = field(default_factory=list)
    reason: str | None = None  # set when the pass was rolled back: why

    def roll_back(self, why: str) -> None:
        """Record that this pass's rewrite was undone (it then counts no sites and no change)."""
        self.reason = f"{why} ({self.sites} site(s) undone)" if self.sites else why
        self.sites, self.max_abs_change = 0, None

    @property
    def status(self) -> str:
        """``applied``, ``not applicable`` (no site matched) or ``rolled back`` (see ``reason``)."""
        return "rolled back" if self.reason else ("applied" if self.sites else "not applicable")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "sites": self.sites, "exact": self.exact,
                "max_abs_change": self.max_abs_change, "notes": self.notes, "reason": self.reason}


class PassContext:
    """The graph under rewrite, with the helpers passes share (shapes, constants, node insertion)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]):
        self.gm = gm
        self.graph: fx.Graph = gm.graph
        self.example_inputs = example_inputs
        self._const_id = 0

    # --- facts about nodes -------------------------------------------------------------------
    @staticmethod
    def val(node: Any) -> Any:
        """The example value recorded for ``node`` by :func:`annotate` (a meta tensor, tuple, or scalar)."""
        return node.meta.get("val") if isinstance(node, fx.Node) else node

    def shape(self, node: Any) -> tuple[int, ...] | None:
        v = self.val(node)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def rank(self, node: Any) -> int | None:
        s = self.shape(node)
        return None if s is None else len(s)

    def constant(self, node: Any) -> torch.Tensor | None:
        """The value of a parameter/buffer/constant node (``get_attr``), else None."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj if isinstance(obj, torch.Tensor) else None
        return None

    @staticmethod
    def users(node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    # --- building -------------------------------------------------------------------------------
    def add_constant(self, value: torch.Tensor, hint: str = "const") -> fx.Node:
        """Register ``value`` as a buffer on the graph module and return a ``get_attr`` node for it.

        Insert it with ``graph.inserting_before(...)`` active, like any other node.
        """
        self._const_id += 1
        attr = f"_edgevit_{hint}_{self._const_id}"
        while hasattr(self.gm, attr):
            self._const_id += 1
            attr = f"_edgevit_{hint}_{self._const_id}"
        self.gm.register_buffer(attr, value.detach().clone().contiguous())
        node = self.graph.get_attr(attr)
        node.meta["val"] = _meta_like(value)
        return node

    def call(self, op: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        """Insert ``op(*args, **kwargs)`` at the current insertion point and record its shape."""
        node = self.graph.call_function(op, args, kwargs)
        node.meta["val"] = _infer_meta(op, args, kwargs)
        return node

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Point every user of ``old`` at ``new`` (``old`` is removed later as dead code)."""
        old.replace_all_uses_with(new)


class GraphPass:
    """Base class of graph passes. Subclasses set the class attributes and implement the pair below."""

    name: ClassVar[str] = ""
    #: True when the rewrite is exact up to float re-association; False for approximations.
    exact: ClassVar[bool] = True
    #: Op names (ONNX op types, TFLite/MIL op names, or problems such as "rank>4") this pass removes;
    #: ``edgevit inspect`` uses them to name the fix for an unsupported op.
    fixes: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "graph"

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        raise NotImplementedError

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool | None:
        """Rewrite the site at ``node``; return False if it turned out not to apply."""
        raise NotImplementedError

    def run(self, ctx: PassContext) -> int:
        """Apply the pass to every matching node once; returns the number of sites rewritten."""
        sites = 0
        for node in list(ctx.graph.nodes):
            if node.graph is not ctx.graph or node.op != "call_function":
                continue
            if not self.matches(ctx, node):
                continue
            with ctx.graph.inserting_before(node):
                done = self.rewrite(ctx, node)
            if done is not False:
                sites += 1
        return sites

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class ModulePass(GraphPass):
    """A module-level swap, applied to the ``nn.Module`` before capture (only where a graph rewrite
    is impractical). ``apply`` returns the number of modules swapped."""

    kind: ClassVar[str] = "module"

    def apply(self, model: nn.Module) -> int:
        raise NotImplementedError


# --- example values -----------------------------------------------------------------------------

def _meta_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta_like(v) for v in value)
    return value


def _infer_meta(op: Callable, args: tuple, kwargs: dict) -> Any:
    """Run ``op`` on meta tensors to learn the output shape of a node a pass just made."""
    def to_meta(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return a.meta.get("val")
        if isinstance(a, (list, tuple)):
            return type(a)(to_meta(x) for x in a)
        return a
    try:
        out = op(*to_meta(args), **{k: to_meta(v) for k, v in kwargs.items()})
    except Exception:  # some ops have no meta kernel; the next annotate() fills the value in
        return None
    return _meta_like(out)


class _Annotator(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = _meta_like(result)
        return result


def annotate(gm: fx.GraphModule, inputs: Iterable[torch.Tensor]) -> Any:
    """Run ``gm`` once on real inputs and record every node's output shape/dtype in ``meta['val']``."""
    with torch.no_grad():
        return _Annotator(gm).run(*inputs)


def is_op(node: Any, *ops: Any) -> bool:
    """True when ``node`` calls one of ``ops`` (OpOverloads or OpOverloadPackets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is op or packet is op for op in ops)


getitem = operator.getitem


def split_chunk(ctx: PassContext, item: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """``getitem(split(x, sizes, dim), i)`` as (x, dim, start, end): the slice of ``x`` it reads."""
    if item.target is not operator.getitem:
        return None
    split, index = item.args
    if not is_op(split, aten.split, aten.split_with_sizes) or ctx.shape(split.args[0]) is None:
        return None
    src = ctx.shape(split.args[0])
    dim = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % len(src)
    sizes = split.args[1]
    if isinstance(sizes, int):
        sizes = [min(sizes, src[dim] - s) for s in range(0, src[dim], sizes)]
    start = sum(sizes[:index])
    return split.args[0], dim, start, start + sizes[index]


def slice_bounds(ctx: PassContext, node: fx.Node) -> tuple[int, int, int, int] | None:
    """``slice(x, dim, start, end, step)`` as (dim, start, end, step), normalised against x's shape
    (negative dim and bounds, None and oversized ends, as Python's ``slice.indices``)."""
    shape = ctx.shape(node.args[0])
    if shape is None:
        return None
    given = dict(zip(("dim", "start", "end", "step"), node.args[1:])) | dict(node.kwargs)
    dim = (given.get("dim") or 0) % len(shape)
    start, end, step = slice(given.get("start"), given.get("end"), given.get("step") or 1).indices(shape[dim])
    return dim, start, end, step


# --- column readers of a Linear (shared by the scale-folding and projection-splitting passes) ---

_SPLITS = (aten.split, aten.split_with_sizes)


def split_columns(ctx: PassContext, item: fx.Node, dim: int = -1) -> tuple[fx.Node, int, int] | None:
    """(source, start, end) of ``getitem(split(source, sizes, dim), i)`` (default: along the last dim)."""
    chunk = split_chunk(ctx, item)
    if chunk is None or chunk[1] != dim % len(ctx.shape(chunk[0])):
        return None
    return chunk[0], chunk[2], chunk[3]


def slice_columns(ctx: PassContext, node: fx.Node, dim: int = -1) -> tuple[fx.Node, int, int] | None:
    """(source, start, end) of a step-1 ``slice`` along ``dim`` (default: the last dim)."""
    bounds = slice_bounds(ctx, node)
    if bounds is None or bounds[0] != dim % ctx.rank(node.args[0]) or bounds[3] != 1:
        return None
    return node.args[0], bounds[1], bounds[2]


def column_readers(ctx: PassContext, linear: fx.Node, dim: int = -1) -> list[tuple[fx.Node, int, int]] | None:
    """(reader, start, end) for each reader of ``linear``'s output when every one takes whole columns
    -- the chunks of one split along ``dim`` (default: the last), or step-1 slices along it that do not
    overlap -- so each column range reaches only its own reader; None otherwise."""
    users = list(linear.users)
    if len(users) == 1 and is_op(users[0], *_SPLITS):
        readers = list(users[0].users)
        found = [split_columns(ctx, u, dim) if u.target is operator.getitem else None for u in readers]
    else:
        readers = users
        found = [slice_columns(ctx, u, dim) if is_op(u, aten.slice) else None for u in readers]
    if not readers or any(cols is None for cols in found):
        return None
    spans = sorted((cols[1], cols[2]) for cols in found)
    if any(a[1] > b[0] for a, b in pairwise(spans)):
        return None
    return [(u, cols[1], cols[2]) for u, cols in zip(readers, found)]


def linear_constants(ctx: PassContext, linear: fx.Node) -> tuple[Any, Any]:
    """(weight, bias) tensors of a Linear whose weight and bias (if any) are constants, else (None, None)."""
    weight = ctx.constant(linear.args[1])
    bias_node = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    bias = ctx.constant(bias_node) if bias_node is not None else None
    if weight is None or (bias_node is not None and bias is None):
        return None, None
    return weight, bias


# --- aliasing and mutation (the training IR keeps in-place ops and views) ---------------------------

def schema_effects(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(inputs the output may alias, inputs written in place) of a call, read from its ATen schema.

    ``torch.export``'s training IR is not functional: ``x.add_(y)``, ``nn.ReLU(inplace=True)`` and
    ``x[:, 0] = v`` stay in-place ops, and views (``view``, ``transpose``, ``select``...) share storage
    with their input. ``getitem`` of a multi-output view (``split``) aliases its source.
    """
    if node.op != "call_function":
        return [], []
    if node.target is operator.getitem:
        return ([node.args[0]] if isinstance(node.args[0], fx.Node) else []), []
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return [], []
    aliased, written = [], []
    for i, arg in enumerate(schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if not isinstance(value, fx.Node) or arg.alias_info is None:
            continue
        (written if arg.alias_info.is_write else aliased).append(value)
    return aliased + written, written  # an in-place op's output is its written input


#: In-place ops that change no values (autograd metadata only).
_METADATA_ONLY = (aten.detach_.default, aten.requires_grad_.default)
_DROPOUTS_ = (aten.dropout_.default, aten.feature_dropout_.default, aten.alpha_dropout_.default,
              aten.feature_alpha_dropout_.default)


def _changes_nothing(node: fx.Node) -> bool:
    """``detach_``, or an in-place dropout at inference (``nn.Dropout(inplace=True)`` in eval)."""
    if node.target in _METADATA_ONLY:
        return True
    if node.target in _DROPOUTS_:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    return False


class Aliasing:
    """Storage groups of a graph (a node and every view of it, or of what it views) and which of them an
    in-place op writes. ``written(node)``: some in-place op changes the values ``node`` reads.

    A rewrite that turns a view into a copy (or drops a copy, or folds a computed tensor into a stored
    constant) is only sound in a group nobody writes: otherwise the in-place op would write to another
    tensor than before. Writes that change no values (the ``detach_`` torch.export puts after every
    ``torch.tensor(...)`` literal, an eval-mode in-place dropout) do not count.
    """

    def __init__(self, graph: fx.Graph):
        self._parent: dict[fx.Node, fx.Node] = {}
        written: list[tuple[fx.Node, fx.Node]] = []  # (written tensor, the in-place op)
        for node in graph.nodes:
            aliased, writes = schema_effects(node)
            for src in aliased:
                self._parent[self._find(node)] = self._find(src)
            if not _changes_nothing(node):
                written += [(w, node) for w in writes]
        self._writers: dict[fx.Node, list[fx.Node]] = {}
        for tensor, op in written:
            self._writers.setdefault(self._find(tensor), []).append(op)
        self._written = set(self._writers)

    def _find(self, node: fx.Node) -> fx.Node:
        root = node
        while self._parent.get(root, root) is not root:
            root = self._parent[root]
        self._parent[node] = root
        return root

    def written(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and self._find(node) in self._written

    def writers(self, node: Any) -> list[fx.Node]:
        """The in-place ops that write ``node``'s storage group."""
        return list(self._writers.get(self._find(node), ())) if isinstance(node, fx.Node) else []

    def closed(self, subgraph: Iterable[fx.Node]) -> bool:
        """True when evaluating ``subgraph`` (a node and what it is computed from) once gives the value
        its last node has in every run: every in-place write to storage it reads is inside it, and none
        writes a buffer (state kept across runs). False for ``m = ones(..); m[:, 2:] = 0; f(m)`` (``f``
        names the ``ones`` node, the write is elsewhere) and ``self.count.add_(1)``; True for
        ``zeros(..).masked_fill_(mask, v)`` read through the ``masked_fill_`` node."""
        nodes = set(subgraph)
        return all(w in nodes for n in nodes for w in self.writers(n)) and not any(
            n.op in ("get_attr", "placeholder") and self.written(n) for n in nodes)

    @staticmethod
    def of(ctx: PassContext) -> "Aliasing":
        """The groups of ``ctx``'s graph, computed once per pass run (passes add no in-place ops)."""
        cached = getattr(ctx, "_edgevit_writes", None)
        if cached is None or cached[0] is not ctx.graph:
            cached = (ctx.graph, Aliasing(ctx.graph))
            ctx._edgevit_writes = cached  # type: ignore[attr-defined]
        return cached[1]

    @staticmethod
    def forget(ctx: PassContext) -> None:
        """Drop the cached groups (after a rewrite that re-routed values through new views)."""
        ctx._edgevit_writes = None  # type: ignore[attr-defined]


def writes_values(node: Any) -> bool:
    """True when ``node`` is an in-place op that changes values (not ``detach_``, nor an eval dropout)."""
    return isinstance(node, fx.Node) and not _changes_nothing(node) and bool(schema_effects(node)[1])



def downstream(node: fx.Node) -> list[fx.Node]:
    """Every node that reads ``node``'s value, directly or through other nodes (its cone of influence)."""
    seen: dict[fx.Node, None] = {}
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen[n] = None
            stack.extend(n.users)
    return list(seen)
