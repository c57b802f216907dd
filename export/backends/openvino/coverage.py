"""OpenVINO coverage: what an OpenVINO device plugin would take of an IR model.

``Core.query_model`` on the devices present (the CPU here), plus the NPU's static-shape rule; a
device whose plugin is absent gets only the rules checked. :func:`coverage` is the backend's entry
point (``export/backends/__init__.py``); the shared verdict machinery is in :mod:`edgevit.export.coverage`.
"""

from __future__ import annotations

import pathlib
from typing import Any

from edgevit.errors import EdgevitError
from edgevit.export.coverage import Coverage, _prod, _producers, _Verdicts


def coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """The coverage of the IR at ``path`` on the OpenVINO device ``accelerator`` (cpu, gpu, npu)."""
    return openvino_coverage(path, accelerator)


_OV_SKIP = frozenset({"Parameter", "Result", "Constant"})


def _ov_macs(op: Any) -> int | None:
    kind = op.get_type_name()
    if kind not in ("MatMul", "Convolution", "GroupConvolution"):
        return 0
    shapes = [op.input(i).get_partial_shape() for i in range(2)] + [op.output(0).get_partial_shape()]
    if any(s.is_dynamic for s in shapes):
        return None
    x, w, y = ([d.get_length() for d in s] for s in shapes)
    if kind == "MatMul":
        transpose_a = bool(op.get_attributes().get("transpose_a", False))
        return _prod(y) * (x[-2] if transpose_a and len(x) > 1 else x[-1])
    if kind == "Convolution":  # weights (Cout, Cin, *kernel)
        return _prod(y) * _prod(w[1:])
    return _prod(y) * _prod(w[2:])  # GroupConvolution: (groups, Cout/g, Cin/g, *kernel)


def openvino_coverage(path: str | pathlib.Path, device: str) -> Coverage:
    """``Core.query_model`` on ``device`` where the plugin is present, plus the NPU's static-shape rule.

    A device whose plugin is absent (the GPU and NPU here) gets a problem saying so: only the rules
    are checked, not OpenVINO's op support.
    """
    import openvino as ov

    path = pathlib.Path(path)
    if not path.is_file():
        raise EdgevitError(f"no OpenVINO IR at {path}")
    core = ov.Core()
    model = core.read_model(str(path))
    dev = device.upper()
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in _OV_SKIP]
    names = [op.get_friendly_name() for op in ops]
    extra: list[str] = []
    checker = f"OpenVINO Core.query_model({dev})"
    if dev in core.available_devices:
        placed = core.query_model(model, dev)
        reasons = [[] if n in placed else [("op", f"not supported by the {dev} plugin")] for n in names]
    else:
        extra.append(f"device absent: no {dev} plugin/device on this machine "
                     f"(available: {', '.join(core.available_devices) or 'none'}); op support unchecked")
        checker = f"OpenVINO rules only ({dev} absent)"
        reasons = [[] for _ in names]
    if dev == "NPU":  # "only models with static shapes are supported on NPU" (npu-device.rst)
        for op, r in zip(ops, reasons):
            dyn = [str(o.get_partial_shape()) for o in op.outputs() if o.get_partial_shape().is_dynamic]
            if dyn:
                r.append(("dynamic shape", f"output {dyn[0]}"))
        dyn_inputs = [f"{p.get_friendly_name()} {p.get_partial_shape()}" for p in model.get_parameters()
                      if p.get_partial_shape().is_dynamic]
        if dyn_inputs:
            extra.append(f"dynamic shape: inputs {', '.join(dyn_inputs)} (the NPU needs static shapes; "
                         "reshape the model or convert with fixed input shapes)")
        checker += " + static-shape rule"
    # producers by the nodes' unique names (friendly names, which query_model reports, may repeat)
    producers = _producers([[i.get_source_output().get_node().get_name() for i in op.inputs()] for op in ops],
                           [[op.get_name()] for op in ops])
    verdicts = _Verdicts([op.get_type_name() for op in ops], producers, reasons, [_ov_macs(op) for op in ops])
    return verdicts.coverage(f"openvino:{device}", checker, extra_problems=extra)
