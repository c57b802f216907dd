"""The options of one export, in one typed object shared by the CLI, the export child and the Python API.

``edgevit export`` builds an :class:`ExportOptions` from its flags, checks it once with
:meth:`ExportOptions.check` (every argument error as a one-line :class:`~edgevit.errors.EdgevitError`,
before any child process starts) and hands it to each per-target export child as JSON
(:meth:`~ExportOptions.to_json`, through :func:`edgevit.export.isolated.export_in_child`); the child
rebuilds it with :meth:`~ExportOptions.from_json` and exports without checking again.
:func:`edgevit.api.export_model` builds one from its keyword arguments. Either way the pipeline
(:func:`edgevit.export.pipeline.run_export`) reads its options from this object only.

This module imports nothing heavy: ``edgevit --version`` and argument errors do not pay for torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from edgevit.errors import EdgevitError

STRICT_PASSES_ENV = "EDGEVIT_STRICT_PASSES"  # "1": strict_passes defaults to True


@dataclass
class ExportOptions:
    """How to export (the defaults are :func:`edgevit.api.export_model`'s; what to export and where are
    arguments of the pipeline, not options)."""

    input_size: int | None = None  # zoo models: square input size (default: the model's)
    precision: str | None = None  # default: the target's
    verify: bool = True  # False: parity not checked (the manifest says "skipped")
    latency_runs: int = 0  # timed runs for the median latency in the parity report
    weights: str | os.PathLike | None = None  # checkpoint for a zoo model or a folder
    passes: str | Sequence[str] | None = "auto"  # "auto", "none", "a,b" or a sequence of pass names
    accelerator: str | None = None  # whose pass pipeline runs (default: the target's first)
    compare_without_passes: bool = False  # also convert without passes and record that parity
    input_shape: tuple[int, ...] | None = None  # references only: the full input shape to build at
    init: str = "keep"  # "keep" the weights, or "exercise" (re-initialise so every layer passes signal)
    strict_passes: bool | None = None  # None: True when the environment sets EDGEVIT_STRICT_PASSES=1
    verbose: bool = False  # show the converters' own output
    # quantized precisions (int8, w8, w4): see edgevit/export/quantization/
    quant_scheme: str = "safe"  # int8: "safe" (transformer-safe preset) or "full" (every op the tool can)
    calibration_method: str = "auto"  # int8: how activation ranges are calibrated (auto: the backend's default)
    calibration: str | None = None  # a folder of images to calibrate with (int8: required)
    evaluation: str | None = None  # a labelled folder (ImageFolder layout): accuracy of fp32 and the artifact
    max_drop: float = 1.0  # with evaluation: a larger top-1 drop (points) fails the export
    mean: tuple[float, ...] | None = None  # image normalisation for those folders (default: the model's metadata)
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None  # resize shorter side to size/crop_pct, centre crop (default 0.875)

    def strict(self) -> bool:
        """Whether a pass that fails or breaks parity is an error (instead of being rolled back)."""
        if self.strict_passes is None:
            return os.environ.get(STRICT_PASSES_ENV) == "1"
        return self.strict_passes

    # --- serialisation (parent -> export child) ---------------------------------------------------

    def to_json(self) -> str:
        data = asdict(self)
        if data["weights"] is not None:
            data["weights"] = os.fspath(data["weights"])
        if data["passes"] is not None and not isinstance(data["passes"], str):
            data["passes"] = list(data["passes"])
        for key in ("input_shape", "mean", "std"):
            if data[key] is not None:
                data[key] = list(data[key])
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExportOptions":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown export options: {', '.join(sorted(unknown))}")
        if data.get("weights") is not None:
            data["weights"] = Path(data["weights"])
        if isinstance(data.get("passes"), list):
            data["passes"] = tuple(data["passes"])
        for key in ("input_shape", "mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    # --- the command line's checks ------------------------------------------------------------------

    def check(self, model: str, target: str, build_reference: bool = True) -> "Checked":
        """Every argument error of ``edgevit export MODEL --target TARGET`` (or ``inspect``) as a one-line
        EdgevitError naming the flag, before any child process starts.

        ``target`` is a target name or ``"all"``. Pins what the children must share: ``weights`` becomes
        an absolute path, and a reference (folder, ``module:factory``) is built once, run on its input
        and its full input shape stored in ``input_shape`` (``build_reference=False`` skips that: for an
        export child started with flags, which builds it next anyway).
        """
        from edgevit.export.passes import resolve_passes
        from edgevit.export.targets import PRECISIONS, TARGETS, get_target, resolve_precision
        from edgevit.references import is_reference
        from edgevit.registry import check_input_memory, check_requested_size
        from edgevit.weights import INIT_MODES

        check_requested_size(self.input_size)  # 0 is not "the model's size"; a huge size fails here, not in malloc
        if self.input_shape is not None:
            check_input_memory(self.input_shape, f"--input-shape {','.join(map(str, self.input_shape))}")
        reference = is_reference(model)
        info = None if reference else self._zoo_info(model)
        if self.init not in INIT_MODES:
            raise EdgevitError(f"unknown --init '{self.init}'; choose one of: {', '.join(INIT_MODES)}")
        targets = list(TARGETS) if target == "all" else [get_target(target).name]
        if self.precision is not None and self.precision not in PRECISIONS:
            raise EdgevitError(f"unknown precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        if self.accelerator is not None and target == "all":
            raise EdgevitError("--accelerator applies to one target; pick it with --target")
        for t in targets:
            resolve_passes(self.passes, t, TARGETS[t].accelerator(self.accelerator).name)
        if self.weights is not None:
            self.weights = Path(self.weights).resolve()  # the child may not share our idea of relative paths
        if info is not None and self.weights is not None:
            from edgevit.registry import create_model

            create_model(info.name, weights=self.weights, img_size=self.input_size or info.input_size)  # fail early
        for t in targets:
            resolve_precision(TARGETS[t], self.precision)
        if target != "all":
            TARGETS[targets[0]].check_installed()
        self._check_quantization()
        if info is not None:
            return Checked(info.name, info.name, targets)
        return Checked(*self._check_reference(model, build_reference), targets)

    def _check_quantization(self) -> None:
        """The quantization flags' errors that need no model: what the flags mean, folders that exist."""
        from edgevit.export.quantization import QuantSpec, check_request, is_quantized
        from edgevit.export.quantization.data import check_calibration_source, scan_folder

        precision = self.precision or "fp32"
        if not is_quantized(precision):
            if self.calibration is not None or self.evaluation is not None:
                raise EdgevitError(f"--calibration/--eval apply to the quantized precisions (int8, w8, w4), "
                                   f"not {precision}")
            return
        check_request(QuantSpec(precision, self.quant_scheme, self.calibration_method),  # unknown scheme/method too
                      self.calibration is not None, self.max_drop)
        if self.compare_without_passes:
            raise EdgevitError("--compare-without-passes applies to fp32/fp16 exports")
        # missing, empty, malformed, no class folders: fail before any child
        if self.calibration is not None:
            check_calibration_source(self.calibration)
        if self.evaluation is not None:
            scan_folder(self.evaluation, "--eval", labelled=True)
        self.calibration = str(Path(self.calibration).resolve()) if self.calibration else None
        self.evaluation = str(Path(self.evaluation).resolve()) if self.evaluation else None

    def _zoo_info(self, model: str) -> Any:
        """The zoo entry of ``model`` (unknown names: the 'did you mean' error), its input size checked."""
        from edgevit.registry import check_input_size, model_info

        info = model_info(model)
        if self.input_shape is not None:
            raise EdgevitError(f"--input-shape applies to a Hugging Face folder or a module:factory; "
                               f"zoo model '{info.name}' takes --input-size")
        check_input_size(info, self.input_size or info.input_size)
        return info

    def _check_reference(self, model: str, build: bool) -> tuple[str, str]:
        """Build a folder or factory once (bad references fail here, in one line), run it on its input,
        and pin the full input shape, so that children rebuild exactly this model."""
        from edgevit.references import check_forward, resolve_model

        if not build:
            return model, model
        resolved = resolve_model(model, self.input_shape, self.weights, self.input_size)
        check_forward(resolved)
        self.input_shape = resolved.input_shape
        return resolved.name, resolved.reference


class Checked(NamedTuple):
    """What :meth:`ExportOptions.check` found: names and targets of the export."""

    name: str  # the model's name, for paths and titles
    model: str  # what the export children build: the canonical zoo name, or the reference
    targets: list[str]
