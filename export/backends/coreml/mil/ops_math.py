"""Elementwise, comparison, reduction and cast ops (coremltools ``elementwise_binary``,
``elementwise_unary``, ``reduction`` definitions). Broadcasting is numpy's, which is MIL's."""

from __future__ import annotations

import math

import numpy as np

from edgevit.export.backends.coreml.mil.registry import mil_op

# --- binary -----------------------------------------------------------------------------------------

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum, "minimum": np.minimum,
    "floor_div": np.floor_divide, "mod": np.mod, "pow": np.power,
    "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "less": np.less, "less_equal": np.less_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _binary(fn):
    return lambda x, y: fn(np.asarray(x), np.asarray(y))


for _name, _fn in _BINARY.items():
    mil_op(_name)(_binary(_fn))


@mil_op("real_div")
def real_div(x, y):
    x, y = np.asarray(x), np.asarray(y)
    out = np.true_divide(x, y)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":  # MIL keeps the input dtype: integer division truncates
        return out.astype(np.result_type(x, y))
    return out


# --- unary ------------------------------------------------------------------------------------------

_erf64 = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """erf in double precision (math.erf per element; numpy has no erf and the executor needs no scipy)."""
    x = np.asarray(x)
    return _erf64(x.astype(np.float64)).astype(np.float64).astype(x.dtype if x.dtype.kind == "f" else np.float32)


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor,
    "logical_not": np.logical_not, "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh,
    "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh, "erf": erf,
}

for _name, _fn in _UNARY.items():
    mil_op(_name)((lambda fn: lambda x: fn(np.asarray(x)))(_fn))


@mil_op("log")
def log(x, epsilon=1e-45):
    return np.log(np.asarray(x) + np.asarray(epsilon, dtype=np.asarray(x).dtype))


@mil_op("rsqrt")
def rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(np.asarray(x) + np.float32(epsilon))


@mil_op("inverse")
def inverse(x, epsilon=1e-4):
    return 1.0 / (np.asarray(x) + np.float32(epsilon))


@mil_op("clip")
def clip(x, alpha, beta):
    return np.minimum(np.maximum(x, np.float32(alpha)), np.float32(beta))


@mil_op("threshold")
def threshold(x, alpha):
    return np.maximum(x, np.float32(alpha))


@mil_op("select")
def select(cond, a, b):
    return np.where(np.asarray(cond).astype(bool), a, b)


_DTYPES = {"fp16": np.float32, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int16": np.int16,
           "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "int64": np.int64, "bool": np.bool_}


@mil_op("cast")
def cast(x, dtype):
    """fp16 is held in float32 arrays: the executor's fp16 mode rounds every float value to float16,
    its fp32 mode computes the program's fp16 tensors in float32 (see executor)."""
    if dtype not in _DTYPES:
        raise ValueError(f"cast to unsupported dtype '{dtype}'")
    x = np.asarray(x)
    target = _DTYPES[dtype]
    if np.dtype(target).kind in "iu" and x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(target)


@mil_op("identity")
def identity(x):
    return np.asarray(x)


# --- reductions -------------------------------------------------------------------------------------

def _axes(x: np.ndarray, axes) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(int(a) % x.ndim for a in np.atleast_1d(axes))


def _reduction(fn):
    def reduce(x, axes=None, keep_dims=False):
        x = np.asarray(x)
        return fn(x, axis=_axes(x, axes), keepdims=bool(keep_dims))

    return reduce


_REDUCTIONS = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: _log_sum_exp(x, axis, keepdims),
}


def _log_sum_exp(x: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return out if keepdims else np.squeeze(out, axis=axis)


for _name, _fn in _REDUCTIONS.items():
    mil_op(_name)(_reduction(_fn))


def _arg_reduction(fn):
    def reduce(x, axis=-1, keep_dims=False, output_dtype="int32"):
        out = fn(np.asarray(x), axis=int(axis), keepdims=bool(keep_dims))
        return out.astype(_DTYPES[output_dtype])

    return reduce


mil_op("reduce_argmax")(_arg_reduction(np.argmax))
mil_op("reduce_argmin")(_arg_reduction(np.argmin))
