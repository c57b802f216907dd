"""Core ML coverage: what the Apple Neural Engine would run of an ML Program (.mlpackage).

Where each op really runs is MLComputePlan's answer, which needs macOS 14.4; on every platform this
module judges the MIL program by the documented ANE rules (rank <= 5, no gather/scatter/RNN ops, no
dilated convolution, pooling kernel <= 13 and stride <= 2, upsampling scale <= 2, static shapes, fp16
typing) and adds layout hints for patterns that run but slowly (batched multi-head attention).

:func:`coverage` is the backend's entry point (``export/backends/__init__.py``); the shared verdict
machinery is in :mod:`edgevit.export.coverage`.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

from edgevit.errors import EdgevitError
from edgevit.export.coverage import Coverage, _prod, _producers, _Verdicts, count_by_type, fixes_for


def coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """The coverage of the ML Program at ``path`` on ``accelerator`` (the Neural Engine, ``ane``, the
    target's only accelerator)."""
    return coreml_coverage(path)


def op_counts(artifact: pathlib.Path, accelerator: str | None = None) -> dict[str, int]:
    """MIL op type -> count of the ML Program at ``artifact``: the ops of its main function, nested
    blocks included and ``const`` ops left out, which the ANE checker counts in ``Coverage.nodes``
    (``accelerator``, default ``ane``, only validated)."""
    from edgevit.export.targets import get_target

    get_target("coreml").accelerator(accelerator)
    _, ops, _ = _read_program(artifact)
    return count_by_type(op.type for op in ops)


# Known non-ANE MIL ops (the community's list of layers the Neural Engine does not run: gather, RNNs,
# custom layers; scatter is gather's inverse and lowers the same way).
_NOT_ON_ANE = frozenset({
    "gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
    "lstm", "gru", "rnn", "custom_layer",
})
_POOLS = frozenset({"max_pool", "avg_pool", "l2_pool"})
_MIL_FP16, _MIL_FP32 = 10, 11  # coremltools.proto.MIL_pb2.DataType.FLOAT16 / FLOAT32


@dataclass
class _MilOp:
    type: str
    inputs: dict[str, list[str]]  # parameter -> argument value names
    outputs: list[tuple[str, int, tuple[int | None, ...] | None]]  # (name, dtype, dims; None dim: not static)


def _mil_ops(block: Any, out: list[_MilOp], consts: dict[str, Any]) -> None:
    """Flatten a MIL block (and nested blocks) into ops; record const values by output name."""
    for op in block.operations:
        outputs = [(o.name, o.type.tensorType.dataType, _mil_dims(o.type)) for o in op.outputs]
        if op.type == "const":
            consts[op.outputs[0].name] = _mil_value(op.attributes["val"])
            continue
        inputs = {k: [a.name for a in v.arguments if a.name] for k, v in op.inputs.items()}
        for k, v in op.inputs.items():  # inline (unnamed) values
            for j, a in enumerate(v.arguments):
                if not a.name and a.HasField("value"):
                    consts[f"{id(op)}:{k}:{j}"] = _mil_value(a.value)
                    inputs[k].append(f"{id(op)}:{k}:{j}")
        out.append(_MilOp(op.type, inputs, outputs))
        for nested in op.blocks:
            _mil_ops(nested, out, consts)


def _mil_dims(value_type: Any) -> tuple[int | None, ...] | None:
    if not value_type.HasField("tensorType"):
        return None
    return tuple(d.constant.size if d.HasField("constant") else None for d in value_type.tensorType.dimensions)


def _mil_value(value: Any) -> Any:
    """A small immediate value (ints, floats, bools, strings) of a MIL ``Value``; None for blobs."""
    if not value.HasField("immediateValue") or not value.immediateValue.HasField("tensor"):
        return None
    t = value.immediateValue.tensor
    for kind in ("ints", "floats", "bools", "strings", "longInts", "doubles"):
        if t.HasField(kind):
            return list(getattr(t, kind).values)
    return None


def _mil_const(consts: dict[str, Any], op: _MilOp, param: str) -> list[Any] | None:
    names = op.inputs.get(param) or []
    return consts.get(names[0]) if names else None


def _ane_reasons(op: _MilOp, consts: dict[str, Any], shapes: dict[str, tuple[int | None, ...] | None],
                 fp16: bool) -> list[tuple[str, str]]:
    """Why the Neural Engine would not run ``op``."""
    reasons: list[tuple[str, str]] = []
    if op.type in _NOT_ON_ANE:
        reasons.append(("op", "not on the Neural Engine"))
    for name, dtype, dims in op.outputs:
        if dims is not None and len(dims) > 5:  # Core ML itself rejects rank > 5
            reasons.append(("rank>5", f"output {list(dims)}"))
        if dims is not None and None in dims:
            reasons.append(("dynamic shape", f"output {name} has a non-static shape"))
        if fp16 and op.type != "cast" and dtype == _MIL_FP32:  # an fp32 op in an fp16 program: CPU/GPU
            reasons.append(("fp32 op", "kept in fp32; the Neural Engine computes fp16 only"))
    if op.type in ("conv", "conv_transpose") and any(d != 1 for d in (_mil_const(consts, op, "dilations") or [1])):
        reasons.append(("dilated conv", f"dilations {_mil_const(consts, op, 'dilations')}"))
    if op.type in _POOLS:
        kernel = _mil_const(consts, op, "kernel_sizes") or []
        strides = _mil_const(consts, op, "strides") or []
        if any(k > 13 for k in kernel) or any(s > 2 for s in strides):
            reasons.append(("pool kernel>13 or stride>2", f"kernel {kernel}, strides {strides}"))
    if op.type.startswith(("upsample", "resize", "resample")):
        scale = _upsample_scale(op, consts, shapes)
        if scale is not None and scale > 2:
            reasons.append(("upsample scale>2", f"scale {scale:g}"))
    return reasons


def _upsample_scale(op: _MilOp, consts: dict[str, Any], shapes: dict[str, Any]) -> float | None:
    factors = [v for p in ("scale_factor_height", "scale_factor_width")
               for v in (_mil_const(consts, op, p) or [])]
    if factors:
        return float(max(factors))
    src = (op.inputs.get("x") or [None])[0]
    x, y = shapes.get(src), op.outputs[0][2] if op.outputs else None
    if not x or not y or len(x) != len(y) or None in x or None in y:
        return None
    return max((b / a for a, b in zip(x[-2:], y[-2:]) if a), default=None)


def _mil_macs(op: _MilOp, consts: dict[str, Any], shapes: dict[str, Any]) -> int | None:
    """MACs of linear/matmul/conv from static shapes (0 for other ops, None when unknown)."""
    if op.type not in ("linear", "matmul", "conv", "conv_transpose"):
        return 0
    y = op.outputs[0][2] if op.outputs else None
    w = shapes.get((op.inputs.get("weight") or op.inputs.get("y") or [None])[0])
    x = shapes.get((op.inputs.get("x") or [None])[0])
    if not y or None in y or not w or None in w or not x or None in x:
        return None
    if op.type == "linear":  # weight (out, in)
        return _prod(y) * w[-1]
    if op.type == "matmul":
        transpose_x = bool((_mil_const(consts, op, "transpose_x") or [False])[0])
        return _prod(y) * (x[-2] if transpose_x else x[-1])
    if op.type == "conv":  # weight (Cout, Cin/groups, *kernel)
        return _prod(y) * _prod(w[1:])
    return _prod(x) * _prod(w[1:])  # conv_transpose: weight (Cin, Cout/groups, *kernel)


def coreml_coverage(path: str | pathlib.Path) -> Coverage:
    """Neural Engine coverage of an ML Program (.mlpackage) by the documented ANE rules.

    Rules: rank <= 5, no gather/scatter/RNN ops, no dilated convolution, pooling kernel <= 13 and
    stride <= 2, upsampling scale <= 2, static shapes, fp16 typing (an fp32-typed program never runs
    on the ANE). Where each op really runs is MLComputePlan's answer, which needs macOS 14.4.
    """
    main, ops, consts = _read_program(path)
    shapes = {name: dims for op in ops for name, _, dims in op.outputs}
    shapes |= {i.name: _mil_dims(i.type) for i in main.inputs}
    _const_shapes(main.block_specializations[main.opset], shapes)
    float_types = {dtype for op in ops for _, dtype, _ in op.outputs
                   if op.type != "cast" and dtype in (_MIL_FP16, _MIL_FP32)}
    fp16 = _MIL_FP16 in float_types  # fp16 somewhere: an fp16-typed program (boundary casts aside)
    reasons = [_ane_reasons(op, consts, shapes, fp16) for op in ops]
    extra = []
    if not fp16 and float_types:
        extra.append("fp32 program: typed float32, so the Neural Engine is barred; export at fp16")
        reasons = [r + [("_fp32", "")] for r in reasons]
    notes = ["compute plan: needs macOS (MLComputePlan, macOS >= 14.4); these are the documented ANE rules"]
    notes += _ane_layout_hints(ops, consts)
    verdicts = _Verdicts(
        ops=[op.type for op in ops],
        producers=_producers([[n for names in op.inputs.values() for n in names] for op in ops],
                             [[name for name, _, _ in op.outputs] for op in ops]),
        reasons=reasons,
        macs=[_mil_macs(op, consts, shapes) for op in ops],
    )
    return verdicts.coverage("coreml:ane", "edgevit ANE rules over the MIL program", extra_problems=extra, notes=notes)


def _read_program(path: str | pathlib.Path) -> tuple[Any, list[_MilOp], dict[str, Any]]:
    """The main function of the ML Program at ``path``, its ops (nested blocks flattened, ``const``
    ops left out) and the const values by output name."""
    import coremltools as ct

    path = pathlib.Path(path)
    if not path.exists():
        raise EdgevitError(f"no Core ML package at {path}")
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise EdgevitError(f"{path} is a {spec.WhichOneof('Type')} model; the ANE rules read ML Programs")
    main = spec.mlProgram.functions["main"]
    ops: list[_MilOp] = []
    consts: dict[str, Any] = {}
    _mil_ops(main.block_specializations[main.opset], ops, consts)
    return main, ops, consts


def _ane_layout_hints(ops: list[_MilOp], consts: dict[str, Any]) -> list[str]:
    """Runs-but-slowly patterns (not unsupported ops): batched multi-head attention, whose softmax
    is over the last axis of a (B, H, Sq, Sk) map, where Apple's ANE form is one head at a time with
    the softmax over dim 1 of (B, Sk, 1, Sq)."""
    batched = 0
    for op in ops:
        dims = op.outputs[0][2] if op.outputs else None
        axis = _mil_const(consts, op, "axis")
        if op.type == "softmax" and dims is not None and len(dims) == 4 and (dims[1] or 0) > 1 \
                and axis and axis[0] in (-1, 3):
            batched += 1
    if not batched:
        return []
    fix = ", ".join(fixes_for("batched attention")) or "none registered"
    return [f"batched attention: {batched} softmax over the last axis of (B, H, Sq, Sk) maps; "
            f"per-head form on the ANE (fix: {fix})"]


def _const_shapes(block: Any, shapes: dict[str, Any]) -> None:
    """Shapes of const ops (weights), which ``_mil_ops`` does not list as ops."""
    for op in block.operations:
        if op.type == "const":
            shapes[op.outputs[0].name] = _mil_dims(op.outputs[0].type)
        for nested in op.blocks:
            _const_shapes(nested, shapes)
