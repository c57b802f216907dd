"""Run a saved ML Program (.mlpackage) op by op in numpy: Core ML numbers on a machine without Core ML.

Loading: coremltools' own milproto loader rebuilds the MIL program from the package's spec and weight
blob (the converter's inverse, so the program executed is the one Core ML would compile). It is then
flattened into :class:`Step` records, the const values materialised as numpy arrays; execution needs
numpy only.

Two modes, both computing every op in float32 arithmetic:

- ``fp32``: every float tensor is float32, including the ones the program types as fp16 (fp16 weights
  are exact in float32; ``cast`` to fp16 keeps the value). This isolates the converter's graph from
  rounding: it is the mode compared with PyTorch at the fp32 bound for an fp32 program.
- ``fp16``: every float value an op consumes or produces (program inputs, constants, op outputs) is
  rounded to IEEE float16 (round to nearest even, overflow to inf, subnormals kept), while each op
  computes internally in float32. That is the Neural Engine's model of computation: fp16 storage
  between ops, wider accumulation inside them (Apple documents fp16 as the ANE's only precision; the
  internal accumulator width is not published, float32 is the common assumption).

An op the table does not implement is a one-line :class:`UnsupportedOpError` naming the op and the
model, raised before anything runs; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgevit.export.backends.coreml.mil.registry import OPS, UnsupportedOpError

MODES = ("fp32", "fp16")


@dataclass(frozen=True)
class Ref:
    """A reference to a value produced earlier (a program input, a const or an op output)."""

    name: str


@dataclass
class Step:
    """One MIL operation: its type, inputs (Ref, list of Refs, or an inline value) and output names."""

    op_type: str
    name: str
    inputs: dict[str, Any]
    outputs: list[str]
    output_shapes: list[tuple] = field(default_factory=list)


@dataclass
class MILProgram:
    """The ``main`` function of an ML Program, flattened for execution."""

    source: str
    inputs: list[str]
    input_shapes: list[tuple]
    outputs: list[str]
    consts: dict[str, np.ndarray]
    steps: list[Step]
    opset: str = ""

    def op_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.op_type] = counts.get(step.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def check_supported(self) -> None:
        """Raise on the first op type without an implementation (before running anything)."""
        missing = sorted({s.op_type for s in self.steps} - set(OPS))
        if missing:
            raise UnsupportedOpError(
                f"MIL op{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} in "
                f"{self.source} not implemented by the reference executor"
            )


def _as_array(value: Any) -> Any:
    """Const values as numpy: float consts in float32 (fp16 is exact in it), strings and bools as is."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "US":
        return str(arr)
    return arr


def load_program(path: str | Path) -> MILProgram:
    """Rebuild the ML Program of a saved ``.mlpackage`` with coremltools' milproto loader."""
    path = Path(path)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    if not path.exists():
        raise FileNotFoundError(f"no Core ML package at {path}")
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise UnsupportedOpError(f"{path} is a {spec.WhichOneof('Type')} model, not an ML Program")
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    prog = load_milproto(spec, spec.specificationVersion, str(weights) + os.sep)
    func = prog.functions["main"]
    consts: dict[str, np.ndarray] = {}
    steps: list[Step] = []
    for op in func.operations:
        if op.blocks:
            raise UnsupportedOpError(f"MIL control-flow op '{op.op_type}' ({op.name}) in {path} not implemented "
                                     "by the reference executor")
        if op.op_type == "const":
            consts[op.outputs[0].name] = _as_array(op.outputs[0].val)
            continue
        inputs = {}
        for key, var in op.inputs.items():
            inputs[key] = [Ref(v.name) for v in var] if isinstance(var, (list, tuple)) else Ref(var.name)
        steps.append(Step(op.op_type, op.name, inputs, [o.name for o in op.outputs],
                          [tuple(o.shape) for o in op.outputs]))
    # the loader turns every bound value into a const op; a reference to nothing is a broken package
    known = set(consts) | set(func.inputs) | {name for step in steps for name in step.outputs}
    for step in steps:
        for value in step.inputs.values():
            for ref in value if isinstance(value, list) else [value]:
                if ref.name not in known:
                    raise UnsupportedOpError(f"{step.op_type} '{step.name}' in {path} reads '{ref.name}', "
                                             "which nothing in the program produces")
    return MILProgram(
        source=str(path),
        inputs=list(func.inputs),
        input_shapes=[tuple(v.shape) for v in func.inputs.values()],
        outputs=[v.name for v in func.outputs],
        consts=consts,
        steps=steps,
        opset=str(func.opset_version),
    )


def round_fp16(value: Any) -> Any:
    """Round a float array to float16 and hold it in float32 (overflow becomes inf, as on the device)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        with np.errstate(over="ignore"):
            return value.astype(np.float16).astype(np.float32)
    return value


def _normalise(value: Any) -> Any:
    """Op results as arrays; float64 (from numpy scalar promotion) back to float32."""
    arr = np.asarray(value)
    return arr.astype(np.float32) if arr.dtype == np.float64 else arr


class MILExecutor:
    """Execute a :class:`MILProgram` in ``fp32`` or ``fp16`` mode (see the module docstring).

    ``observer(step, inputs, outputs)`` is called after every op (the fp16 range report uses it).
    """

    def __init__(self, program: MILProgram, mode: str = "fp32") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown executor mode '{mode}'; choose one of: {', '.join(MODES)}")
        program.check_supported()
        self.program = program
        self.mode = mode
        rounding = round_fp16 if mode == "fp16" else (lambda v: v)
        self._round: Callable[[Any], Any] = rounding
        self.consts = {k: rounding(v) for k, v in program.consts.items()}

    def run(self, inputs: list[np.ndarray] | dict[str, np.ndarray],
            observer: Callable[[Step, dict[str, Any], list[Any]], None] | None = None) -> list[np.ndarray]:
        feeds = inputs if isinstance(inputs, dict) else dict(zip(self.program.inputs, inputs))
        missing = [n for n in self.program.inputs if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}; the program takes {self.program.inputs}")
        env: dict[str, Any] = dict(self.consts)
        for name in self.program.inputs:
            value = np.asarray(feeds[name])
            env[name] = self._round(value.astype(np.float32) if value.dtype.kind == "f" else value)
        for step in self.program.steps:
            kwargs = {k: _resolve(v, env) for k, v in step.inputs.items()}
            try:
                result = OPS[step.op_type](**kwargs)
            except Exception as exc:  # name the op: a wrong shape deep in a model is otherwise unreadable
                raise RuntimeError(f"{step.op_type} '{step.name}' failed: {exc}") from exc
            outs = list(result) if isinstance(result, tuple) else [result]
            if len(outs) != len(step.outputs):
                raise RuntimeError(f"{step.op_type} '{step.name}' gave {len(outs)} outputs, MIL declares "
                                   f"{len(step.outputs)}")
            outs = [self._round(_normalise(o)) for o in outs]
            for name, value in zip(step.outputs, outs):
                env[name] = value
            if observer is not None:
                observer(step, kwargs, outs)
        outputs = [np.asarray(env[name]) for name in self.program.outputs]
        return [o.astype(np.float32) if o.dtype.kind == "f" else o for o in outputs]


def _resolve(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, Ref):
        return _scalar(env[value.name])
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    return value


def _scalar(value: Any) -> Any:
    """0-d string/bool consts as Python values (pad_type, mode, flags); arrays stay arrays."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "bUS":
        return value.item()
    return value
