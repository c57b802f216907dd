"""Activations: one GELU op where a backend has it, explicit primitives where it has neither GELU nor Erf."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op

SQRT_HALF = math.sqrt(0.5)  # erf GELU: erf(x / sqrt(2))
TANH_C1 = math.sqrt(2.0 / math.pi)  # tanh GELU: tanh(sqrt(2/pi) * (x + 0.044715 x^3))
TANH_C2 = 0.044715

#: max |gelu_tanh(x) - gelu(x)| over x (float64, dense grid of [-12, 12] at step 1e-5; the two agree
#: to < 1e-12 outside it). Attained at |x| ~ 2.699; the measured value is 4.7324e-4.
GELU_TANH_MAX_ABS_ERROR = 4.74e-4

# Relative tolerance on the constants of a hand-written GELU (people write 0.7978845608 or 1.41421356).
# Scaling erf's argument by (1 + d) moves 0.5*x*(1+erf(x/sqrt(2))) by 0.5*x^2*phi(x)*sqrt(2)*d <= 0.3 d,
# so a constant within 1e-5 relative changes the output by < 3e-6 absolute (similarly for tanh).
_CONST_RTOL = 1e-5
_MAX_DEPTH = 8  # how deep the argument / other-operand expressions are searched

Poly = dict[int, float]  # a polynomial in x: power -> coefficient


# --- polynomial algebra over the candidate input x --------------------------------------------------

def _clean(p: Poly) -> Poly:
    return {k: v for k, v in p.items() if v != 0.0}


def _padd(a: Poly, b: Poly, alpha: float = 1.0) -> Poly:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + alpha * v
    return _clean(out)


def _pmul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, va in a.items():
        for kb, vb in b.items():
            out[ka + kb] = out.get(ka + kb, 0.0) + va * vb
    return _clean(out)


def _pscale(a: Poly, s: float) -> Poly:
    return _clean({k: v * s for k, v in a.items()})


def _pclose(a: Poly, b: Poly) -> bool:
    """Same powers, coefficients equal to ``_CONST_RTOL`` relative."""
    if set(a) != set(b):
        return False
    return all(abs(a[k] - b[k]) <= _CONST_RTOL * max(abs(a[k]), abs(b[k])) for k in a)


def _scalar(ctx: PassContext, arg: Any) -> float | None:
    """A Python number, or the value of a 0-d constant tensor, else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    value = ctx.constant(arg)
    if value is not None and value.dim() == 0 and value.is_floating_point():
        return float(value)
    return None


def _alpha(node: fx.Node) -> float | None:
    """The ``alpha`` of add/sub/rsub (1 for other ops); None when it is not a plain number."""
    if not is_op(node, aten.add, aten.sub, aten.rsub):
        return 1.0
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None


_ARITH = (aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.neg, aten.pow, aten.square)


def _poly(ctx: PassContext, arg: Any, x: fx.Node, depth: int = 0) -> Poly | None:
    """``arg`` as a polynomial in ``x`` built from scalars and add/sub/mul/div/neg/pow, else None."""
    if arg is x:
        return {1: 1.0}
    s = _scalar(ctx, arg)
    if s is not None:
        return _clean({0: s})
    if not is_op(arg, *_ARITH) or depth > _MAX_DEPTH:
        return None
    a = _poly(ctx, arg.args[0], x, depth + 1)
    if a is None:
        return None
    if is_op(arg, aten.neg):
        return _pscale(a, -1.0)
    if is_op(arg, aten.square):
        return _pmul(a, a)
    if is_op(arg, aten.pow):
        n = arg.args[1]
        if isinstance(n, (int, float)) and not isinstance(n, bool) and float(n).is_integer() and 0 <= n <= 4:
            out: Poly = {0: 1.0}
            for _ in range(int(n)):
                out = _pmul(out, a)
            return out
        return None
    b = _poly(ctx, arg.args[1], x, depth + 1)
    alpha = _alpha(arg)
    if b is None or alpha is None:
        return None
    if is_op(arg, aten.add):
        return _padd(a, b, alpha)
    if is_op(arg, aten.sub):
        return _padd(a, b, -alpha)
    if is_op(arg, aten.rsub):  # rsub(a, b) = b - alpha * a
        return _padd(b, a, -alpha)
    if is_op(arg, aten.mul):
        return _pmul(a, b)
    if set(b) == {0} and not arg.kwargs.get("rounding_mode"):  # div by a nonzero scalar only
        return _pscale(a, 1.0 / b[0])
    return None


def _subtree(arg: Any) -> list[fx.Node]:
    """The arithmetic nodes under ``arg`` and their operands (breadth-first): the candidates for x."""
    out: list[fx.Node] = []
    frontier = [arg] if isinstance(arg, fx.Node) else []
    for _ in range(_MAX_DEPTH + 1):
        nxt = []
        for n in frontier:
            if n in out:
                continue
            out.append(n)
            if is_op(n, *_ARITH):
                nxt += [a for a in n.args if isinstance(a, fx.Node)]
        frontier = nxt
    return out


# --- the hand-written GELU matcher ----------------------------------------------------------------

def _find_x(ctx: PassContext, arg: fx.Node, target: Poly) -> fx.Node | None:
    """The floating-point node x such that ``arg`` == target(x), searched in ``arg``'s subtree."""
    for cand in _subtree(arg):
        if cand is arg or cand.op == "get_attr":
            continue
        v = ctx.val(cand)
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            continue
        p = _poly(ctx, arg, cand)
        if p is not None and _pclose(p, target):
            return cand
    return None


def _step(ctx: PassContext, cur: fx.Node, user: fx.Node, pq: tuple[Poly, Poly], x: fx.Node
          ) -> tuple[Poly, Poly] | None:
    """The value of ``user`` as P(x) + Q(x)*T, given ``cur`` = P + Q*T (T the erf/tanh node)."""
    p, q = pq
    if not is_op(user, *_ARITH) or is_op(user, aten.pow, aten.square):
        return None
    rest = list(user.args[1:]) + list(user.kwargs.values())
    if is_op(user, aten.neg):
        return (_pscale(p, -1.0), _pscale(q, -1.0)) if user.args[0] is cur else None
    if len(user.args) < 2 or sum(a is cur for a in [user.args[0], *rest]) != 1:
        return None
    first = user.args[0] is cur
    other = _poly(ctx, user.args[1] if first else user.args[0], x)
    alpha = _alpha(user)
    if other is None or alpha is None:
        return None
    if is_op(user, aten.mul):
        return _pmul(p, other), _pmul(q, other)
    if is_op(user, aten.div):
        if first and set(other) == {0} and not user.kwargs.get("rounding_mode"):
            return _pscale(p, 1.0 / other[0]), _pscale(q, 1.0 / other[0])
        return None
    # add: a + alpha*b; sub: a - alpha*b; rsub(a, b): b - alpha*a. Signs of (chain term, other term):
    if is_op(user, aten.add):
        s_cur, s_other = (1.0, alpha) if first else (alpha, 1.0)
    elif is_op(user, aten.sub):
        s_cur, s_other = (1.0, -alpha) if first else (-alpha, 1.0)
    else:
        s_cur, s_other = (-alpha, 1.0) if first else (1.0, -alpha)
    return _padd(_pscale(p, s_cur), other, s_other), _pscale(q, s_cur)


_GELU_OUT = ({1: 0.5}, {1: 0.5})  # 0.5 x + 0.5 x T


def match_gelu(ctx: PassContext, node: fx.Node) -> tuple[fx.Node, fx.Node, str] | None:
    """For an erf/tanh node inside a hand-written GELU: (x, last node of the formula, approximate)."""
    if is_op(node, aten.erf):
        approximate, target = "none", {1: SQRT_HALF}
    elif is_op(node, aten.tanh):
        approximate, target = "tanh", {1: TANH_C1, 3: TANH_C1 * TANH_C2}
    else:
        return None
    x = _find_x(ctx, node.args[0], target)
    if x is None:
        return None
    cur, pq = node, ({}, {0: 1.0})
    for _ in range(_MAX_DEPTH):
        if len(cur.users) != 1:  # an intermediate used elsewhere: fusing would not remove the erf/tanh
            return None
        (user,) = cur.users
        nxt = _step(ctx, cur, user, pq, x) if user.op == "call_function" else None
        if nxt is None:
            return None
        cur, pq = user, nxt
        if _pclose(pq[0], _GELU_OUT[0]) and _pclose(pq[1], _GELU_OUT[1]):
            vx, vo = ctx.val(x), ctx.val(cur)
            if isinstance(vo, torch.Tensor) and vo.shape == vx.shape and vo.dtype == vx.dtype:
                return x, cur, approximate
            return None
    return None


@register_pass
class FuseGelu(GraphPass):
    """A hand-written GELU (``0.5*x*(1+erf(x/sqrt(2)))`` or the tanh formula) → one ``aten.gelu``.

    Why: TFLite has a GELU builtin (``kTfLiteBuiltinGelu``) but no ERF builtin, so
    litert-torch lowers a hand-written erf GELU to a ~29-op polynomial (MUL/ADD/MINIMUM/MAXIMUM/DIV)
    while ``aten.gelu`` becomes a single GELU op; Core ML has MIL ``gelu`` (EXACT / TANH_APPROXIMATION),
    OpenVINO a Gelu op, and ORT fuses its own Erf chain only at the extended optimisation level.
    Not for NNAPI: it has neither GELU nor Erf, see ``gelu_tanh``.

    Matched symbolically: from the ``erf``/``tanh`` node, its argument must be x/sqrt(2) (resp.
    sqrt(2/pi)*(x+0.044715x^3), in any arrangement of add/sub/mul/div/pow/neg with scalars) and the
    single-user chain after it must reach 0.5*x*(1+T) (e.g. ``x*0.5*(1+T)``, ``x*(1+T)/2``,
    ``0.5*x*(T+1)``). Constants must agree to 1e-5 relative. Exact up to rounding.
    """

    name = "fuse_gelu"
    exact = True
    fixes = ("erf", "aten.erf", "ERF")

    def __init__(self) -> None:
        self._sites: dict[fx.Node, tuple[fx.Node, fx.Node, str]] = {}

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        found = match_gelu(ctx, node)
        if found is not None:
            self._sites[node] = found
        return found is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, last, approximate = self._sites.pop(node)
        # Inserted before the erf/tanh node, which x precedes.
        ctx.replace(last, ctx.call(aten.gelu.default, x, approximate=approximate))


def gelu_tanh_primitives(ctx: PassContext, x: fx.Node) -> fx.Node:
    """``0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))`` from mul/add/tanh, the inner term as
    ``x*(c1 + c1*c2*x*x)`` (one multiply fewer than expanding x^3)."""
    x2 = ctx.call(aten.mul.Tensor, x, x)
    poly = ctx.call(aten.add.Tensor, ctx.call(aten.mul.Tensor, x2, TANH_C1 * TANH_C2), TANH_C1)
    t = ctx.call(aten.tanh.default, ctx.call(aten.mul.Tensor, x, poly))
    half_x = ctx.call(aten.mul.Tensor, x, 0.5)
    return ctx.call(aten.mul.Tensor, half_x, ctx.call(aten.add.Tensor, t, 1.0))


@register_pass
class GeluTanh(GraphPass):
    """``aten.gelu`` → the tanh formula in mul/add/tanh primitives.

    Why: NNAPI has neither GELU nor Erf. The ONNX exporter (opset 18) writes an exact GELU as
    Div→Erf→Add→Mul→Mul and ORT's NNAPI op list (nnapi_supported_ops.md) has no Erf, so every GELU
    cuts the graph into another NNAPI partition; TFLite's NNAPI delegate has no GELU case at all
    Mul/Add/Tanh are all in both lists (no Pow: x^3 is two Muls).

    Not exact for approximate='none' sites: |gelu_tanh(x) - gelu(x)| <= GELU_TANH_MAX_ABS_ERROR
    (4.74e-4 absolute, measured on a dense float64 grid; largest at |x| ~ 2.7), plus fp32 rounding.
    Sites that already are approximate='tanh' are rewritten exactly (up to rounding).
    """

    name = "gelu_tanh"
    exact = False
    fixes = ("Erf", "Gelu", "GELU", "gelu")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.gelu) or len(node.args) != 1:
            return False
        v = ctx.val(node.args[0])
        return isinstance(v, torch.Tensor) and v.is_floating_point() and \
            node.kwargs.get("approximate", "none") in ("none", "tanh")

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        ctx.replace(node, gelu_tanh_primitives(ctx, node.args[0]))
