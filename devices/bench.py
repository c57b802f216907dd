"""``edgevit bench``: export (cached), measure interleaved against PyTorch eager, and place on a roofline.

For each model, every chosen device's artifact is exported in a child process (or taken from the
cache: the key hashes model, input size, target, accelerator, export precision, pass pipeline, seed
and tool versions), then all configurations of that model — the eager baseline first — are measured
together by :func:`edgevit.devices.harness.measure` (one process each, timed blocks interleaved).
The same run measures the device's sustained matrix-multiply throughput (a square GEMM on all
threads, per precision benchmarked) as the roofline: a model's bound is ``2 * MACs / GEMM FLOP/s``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgevit.devices import stats
from edgevit.devices.harness import Config, Measurement, Protocol, WorkerProcess, measure
from edgevit.devices.remote import RemoteError, RemoteHost, RemoteSpec
from edgevit.devices.table import (BASELINE, Device, Facts, check_device_names, local_facts, missing_runtimes,
                                   resolve_devices)
from edgevit.devices.worker import package_version
from edgevit.errors import EdgevitError

DEFAULT_MODELS = ("deit_tiny", "mobilevit_v2_050")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZED_PRECISIONS = ("int8", "w8", "w4")  # artifacts of the quantization pipeline (export/quantization)
BENCH_PRECISIONS = FLOAT_PRECISIONS + QUANTIZED_PRECISIONS
GEMM_PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # precisions with a GEMM probe; w8/w4 multiply in float
GEMM_N = 2048
SCHEMA = 1


@dataclass
class BenchOptions:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    device: str = "cpu"
    targets: list[str] | None = None
    precision: str = "fp32"  # one precision or a comma list (fp32,int8): measured in one interleaved run
    runs: int = 40
    rounds: int = 10  # 10 round medians give a 95 % median interval inside the extremes ([x2, x9])
    warmup: int = 5
    threads: int | None = None  # default: every core of the device
    passes: str = "auto"
    input_size: int | None = None
    out: Path = Path("bench")
    cache: Path | None = None  # default: OUT/cache
    profile: bool = False
    roofline: bool = True
    budget_s: float | None = None  # stop a configuration's timed runs once this much time is spent
    export_timeout_s: float = 1800
    detached_exports: bool = False  # export children in their own session (a sweep lets them finish on Ctrl-C)
    run_timeout_s: float = 300
    input_shape: tuple[int, ...] | None = None  # of the references in ``models`` (zoo models: input_size)
    remotes: list[RemoteSpec] = field(default_factory=list)  # measure there instead of here (one after another)
    # quantized precisions: the export's quantization settings (docs/quantization.md); without calibration data
    # the artifacts calibrate on seeded inputs: their speed is that of a real calibration, their accuracy is not
    calibration: Path | None = None
    quant_scheme: str = "safe"
    calibration_method: str = "auto"

    @property
    def precisions(self) -> list[str]:
        """The precisions of ``precision`` (a comma list), each once; a quantized precision brings fp32 along
        (first): a quantized row is judged against its own runtime's fp32 row of the same run."""
        asked = list(dict.fromkeys(p.strip() for p in self.precision.split(",") if p.strip()))
        if any(p in QUANTIZED_PRECISIONS for p in asked) and "fp32" not in asked:
            asked.insert(0, "fp32")
        return asked

    @property
    def quantized(self) -> list[str]:
        return [p for p in self.precisions if p in QUANTIZED_PRECISIONS]

    def protocol(self) -> Protocol:
        return Protocol(runs=self.runs, rounds=self.rounds, warmup=self.warmup, budget_s=self.budget_s,
                        load_timeout_s=self.run_timeout_s, run_timeout_s=self.run_timeout_s)

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.out / "cache"


Progress = Callable[[str, float], None]  # (message, units of work done)


def check_options(opts: BenchOptions) -> list[Device]:
    """Every argument error as a one-line EdgevitError before anything runs; the devices to measure."""
    from edgevit.export.passes import resolve_passes
    from edgevit.references import is_reference
    from edgevit.registry import check_input_memory, check_requested_size

    _check_precisions(opts)
    if opts.runs < 1 or opts.rounds < 1 or opts.warmup < 0:
        raise EdgevitError("--runs and --rounds must be >= 1 and --warmup >= 0")
    if opts.runs < opts.rounds:
        raise EdgevitError(f"--runs {opts.runs} is fewer than --rounds {opts.rounds}: every round needs at least "
                           f"one run; raise --runs to {opts.rounds} or lower --rounds to {opts.runs}")
    if not opts.run_timeout_s > 0 or not opts.export_timeout_s > 0:
        raise EdgevitError(f"--timeout must be > 0 seconds, got {opts.run_timeout_s:g}")
    check_requested_size(opts.input_size)
    if opts.input_shape is not None:
        check_input_memory(tuple(opts.input_shape), f"--input-shape {','.join(map(str, opts.input_shape))}")
    for flag, path in (("--out", opts.out), ("--cache", opts.cache_dir)):
        _check_dir_path(flag, path)
    if opts.budget_s is not None and opts.budget_s <= 0:
        raise EdgevitError("--budget must be > 0 seconds")
    if opts.threads is not None and opts.threads < 1:
        raise EdgevitError("--threads must be >= 1")
    if not opts.models:
        raise EdgevitError("no models given")
    for name in opts.models:
        bench_model(name, opts)  # zoo: name and input size; reference: built once, run, MACs counted
    if opts.input_shape is not None and not any(is_reference(m) for m in opts.models):
        raise EdgevitError("--input-shape applies to Hugging Face folders and module:factory references in "
                           "--models; zoo models take --input-size")
    if opts.remotes:  # which rows exist there is known once connected; the names are checked now
        for spec in opts.remotes:
            check_device_names(spec.devices or opts.device)
        _check_passes(opts)
        return []
    devices = [d for d in resolve_devices(opts.device, opts.targets) if _measures(d, opts) or d.name == BASELINE]
    for d in devices:
        if d.target is not None:
            resolve_passes(opts.passes, d.target, d.accelerator)
            _check_quant_method(d.target, opts)
    if not [d for d in devices if d.name != BASELINE]:
        raise EdgevitError(f"no runtime on '{opts.device}' measures {opts.precision}"
                           + (f" for targets {','.join(opts.targets)}" if opts.targets else ""))
    return devices


def _measures(device: Device, opts: BenchOptions) -> list[str]:
    """The requested precisions ``device`` measures (eager: its own, else fp32, the baseline)."""
    mine = [p for p in opts.precisions if p in device.precisions]
    if device.name == BASELINE:
        return mine or ["fp32"]
    return mine


def _check_precisions(opts: BenchOptions) -> None:
    """Known precisions; for quantized ones, the quantization flags and the calibration data."""
    from edgevit.export.quantization import QuantSpec, check_request

    if not opts.precisions:
        raise EdgevitError(f"--precision is empty; choose from: {', '.join(BENCH_PRECISIONS)}")
    for p in opts.precisions:
        if p not in BENCH_PRECISIONS:
            raise EdgevitError(f"unknown precision '{p}'; choose from: {', '.join(BENCH_PRECISIONS)} "
                               "(several: a comma list, e.g. fp32,int8)")
    for p in opts.quantized:
        check_request(QuantSpec(p, opts.quant_scheme, opts.calibration_method), True, 1.0)
    if not opts.quantized and (opts.calibration is not None or opts.quant_scheme != "safe"
                               or opts.calibration_method != "auto"):
        raise EdgevitError("--calibration, --quant-scheme and --calibration-method apply to the quantized "
                           f"precisions ({', '.join(QUANTIZED_PRECISIONS)}), not {opts.precision}")
    if opts.calibration is not None:
        from edgevit.export.quantization.data import check_calibration_source

        check_calibration_source(opts.calibration)


def _check_quant_method(target: str, opts: BenchOptions) -> None:
    """A calibration method the target's quantizer lacks is refused before any export."""
    from edgevit.export.quantization import QuantSpec
    from edgevit.export.quantization.step import resolved_spec
    from edgevit.export.targets import get_target

    if "int8" in opts.quantized:
        resolved_spec(get_target(target), QuantSpec("int8", opts.quant_scheme, opts.calibration_method))


def _check_passes(opts: BenchOptions) -> None:
    from edgevit.devices.table import DEVICES
    from edgevit.export.passes import resolve_passes

    for d in DEVICES.values():
        if d.target is not None and (not opts.targets or d.target in opts.targets):
            resolve_passes(opts.passes, d.target, d.accelerator)


def _check_dir_path(flag: str, path: Path, shown: Path | None = None) -> None:
    """A directory the bench will create or write into: no part of it may be an existing file."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise EdgevitError(f"{flag} '{shown or path}': '{p}' is a file, not a directory")
            return


def check_file_path(flag: str, path: Path) -> None:
    """A file the bench will write at the end (``--json``): refused now, before any measuring."""
    if path.is_dir():
        raise EdgevitError(f"{flag} '{path}' is a directory; give a file name")
    _check_dir_path(flag, path.parent, path)


@dataclass(frozen=True)
class BenchModel:
    """One entry of ``--models``: a zoo model or a reference (Hugging Face folder, ``module:factory``)."""

    name: str  # rows, labels and file names
    arg: str  # what export children and the eager worker rebuild it from
    input_size: int
    input_shape: tuple[int, ...] | None  # references only: the full shape they are exported at
    params: int
    macs: int


def bench_model(model: str, opts: BenchOptions) -> BenchModel:
    """Name, input and size of ``model``; a one-line error if it is unknown or does not build."""
    from edgevit.references import is_reference
    from edgevit.registry import check_input_size, model_info

    if is_reference(model):
        return _reference_model(model, tuple(opts.input_shape) if opts.input_shape else None, opts.input_size)
    info = model_info(model)
    size = check_input_size(info, opts.input_size or info.input_size)
    info = model_info(info.name, size)
    return BenchModel(info.name, info.name, size, None, info.params, info.macs)


@lru_cache(maxsize=None)  # check_options and run_bench both ask: build a reference once per process
def _reference_model(ref: str, input_shape: tuple[int, ...] | None, input_size: int | None) -> BenchModel:
    """A reference has no zoo metadata: built, run once, MACs counted like the zoo's (count_macs)."""
    from edgevit.references import check_forward, resolve_model
    from edgevit.registry import count_macs

    resolved = resolve_model(ref, input_shape, None, input_size)
    check_forward(resolved)
    params = sum(p.numel() for p in resolved.module.parameters())
    macs = count_macs(resolved.module, *resolved.example_inputs)
    return BenchModel(resolved.name, resolved.reference, resolved.input_shape[-1], resolved.input_shape, params, macs)


# --- exports, cached ----------------------------------------------------------------------------

def cache_key(model: str, input_size: int, device: Device, precision: str, passes: str,
              input_shape: tuple[int, ...] | None = None, quant: dict[str, Any] | None = None) -> dict[str, Any]:
    """What decides the artifact's bytes: the cache directory is a hash of this.

    For a reference that is the reference, its input shape and a hash of its content (a folder's config
    and weight files, a factory's source file), so an edited model is exported again.
    """
    from edgevit.export.passes import resolve_passes
    from edgevit.export.targets import get_target
    from edgevit.references import fingerprint, is_reference

    target = get_target(device.target)
    key = {"model": model, "input_size": input_size, "target": target.name, "accelerator": device.accelerator,
           "precision": precision, "passes": list(resolve_passes(passes, target.name, device.accelerator)),
           "seed": 0, "versions": _versions(["edgevit", "torch", *_converter_packages(target.name)]),
           "export_code": export_code_fingerprint()}
    if is_reference(model):
        key |= {"input_shape": list(input_shape or ()), "content": fingerprint(model),
                "transformers": package_version("transformers")}
    if quant is not None:  # quantized: the settings and the data decide the bytes, and the quantizer's version
        key |= {"quantization": quant, "quantizer": _versions(_quantizer_packages(target.name))}
    return key


@lru_cache(maxsize=1)
def export_code_fingerprint() -> str:
    """A hash of edgevit's export code (every .py under ``edgevit.export``): a pass, recipe or converter edit
    changes an artifact's bytes without changing a version number, so it must change the cache key too."""
    import edgevit.export

    root = Path(edgevit.export.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _quantizer_packages(target: str) -> list[str]:
    from edgevit.export.backends import get_backend

    return list(getattr(get_backend(target).module("quantize"), "PACKAGES", ()))


def calibration_method(opts: BenchOptions) -> str:
    """The int8 calibration method: the one asked for; with seeded inputs and "auto", minmax, which every
    backend has and which cannot fail on the near-constant tensors arbitrary inputs give (onnxruntime's
    histogram calibrators stop with "too many bins" on MobileViT's GroupNorm statistics)."""
    if opts.calibration is None and opts.calibration_method == "auto":
        return "minmax"
    return opts.calibration_method


def quant_settings(opts: BenchOptions, calibration: Path | None) -> dict[str, Any]:
    """What a quantized export is made with, for the cache key and the rows: scheme, method, data."""
    return {"scheme": opts.quant_scheme, "method": calibration_method(opts),
            "calibration": _data_fingerprint(calibration) if calibration is not None else None}


def _data_fingerprint(path: Path) -> dict[str, Any]:
    """A calibration folder or file by its files' names, sizes and modification times (not their bytes)."""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    listing = "\n".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return {"path": str(path.resolve()), "files": len(files), "digest": hashlib.sha256(listing.encode()).hexdigest()[:16]}


def _converter_packages(target: str) -> list[str]:
    from edgevit.export.backends import get_backend

    return list(get_backend(target).packages)


def _versions(packages: list[str]) -> dict[str, str]:
    return {p: package_version(p) for p in packages}


def export_cached(model: str, input_size: int, device: Device, precision: str, opts: BenchOptions,
                  input_shape: tuple[int, ...] | None = None, name: str | None = None,
                  calibration: Path | None = None) -> dict[str, Any]:
    """The manifest of a cached export of ``model`` for ``device`` (exported now if missing), with
    ``artifact_path`` and ``cached``; or an error row ``{"status": "error", ...}``. A reference gives its
    ``input_shape`` and a file-name-safe ``name``; a quantized precision its ``calibration`` data."""
    from edgevit.export.isolated import export_in_child
    from edgevit.export.options import ExportOptions
    from edgevit.export.quantization import is_quantized

    quantized = is_quantized(precision)
    quant = quant_settings(opts, calibration if precision == "int8" else None) if quantized else None
    key = cache_key(model, input_size, device, precision, opts.passes, input_shape, quant)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    where = opts.cache_dir / f"{name or model}-{device.target}-{device.accelerator}-{precision}-{digest}"
    manifest_path = where / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        artifact = where / manifest["artifact"]["file"]
        if artifact.exists():
            return manifest | {"artifact_path": str(artifact), "cached": True, "cache_key": key}
    options = ExportOptions(precision=precision, latency_runs=0, passes=opts.passes, accelerator=device.accelerator,
                            input_shape=tuple(input_shape) if input_shape else None,
                            input_size=None if input_shape else input_size)
    if quantized:
        options.quant_scheme, options.calibration_method = opts.quant_scheme, calibration_method(opts)
        options.calibration = str(calibration) if precision == "int8" and calibration is not None else None
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=where.parent))
    try:
        row = export_in_child(model, device.target, staging, options, opts.export_timeout_s,
                              detached=opts.detached_exports)
    except BaseException:  # Ctrl-C, SIGTERM: the child is stopped; its half-made cache entry goes too
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if row.get("status") in ("passed", "converted-not-verified", "skipped", "degenerate"):  # timing needs no values
        shutil.rmtree(where, ignore_errors=True)
        staging.rename(where)  # the cache entry appears whole or not at all
        artifact = where / Path(row["artifact_path"]).name
        return row | {"artifact_path": str(artifact), "cached": False, "cache_key": key}
    shutil.rmtree(staging, ignore_errors=True)
    if row.get("status") == "failed":  # parity failed: a wrong artifact is not worth timing
        gate = " (the quantization gate)" if quantized else ""
        return {"status": "error", "error": f"parity failed{gate}; see 'edgevit export' for the figures",
                "parity_failed": True, "parity": row.get("parity")}  # the figures, for a sweep's reason
    return row


# --- configurations ------------------------------------------------------------------------------

def _config(label: str, device: Device, precision: str, opts: BenchOptions, artifact: str | None,
            inputs: Path | str, model: str, input_size: int, meta: dict[str, Any],
            input_shape: tuple[int, ...] | None = None, place: "_Place | None" = None) -> Config:
    place = place or _Place(None, local_facts(), opts.threads)
    options = device.worker_options(precision, place.facts)
    if device.runtime == "torch":
        options |= {"model": model, "input_size": input_size, "seed": 0}
        if input_shape:  # a reference: the eager worker rebuilds it at this shape
            options["input_shape"] = list(input_shape)
        if place.host is not None:  # the model code travels as edgevit's source
            options["pythonpath"] = place.host.push_edgevit()
    worker = {"runtime": device.runtime, "artifact": artifact, "inputs": str(inputs), "threads": place.threads,
              "options": options, "profile": opts.profile}
    return Config(label, worker, meta)


@dataclass
class _Place:
    """Where a bench measures: here (``host`` None) or on a remote host, with that machine's facts."""

    host: RemoteHost | None
    facts: Facts
    threads: int | None

    @property
    def name(self) -> str:
        return self.host.spec.name if self.host else "local"

    def spawn(self, label: str) -> WorkerProcess:
        return self.host.spawn(label) if self.host else WorkerProcess(label)


def _save_inputs(model: str, input_size: int, where: Path, input_shape: tuple[int, ...] | None = None,
                 name: str | None = None) -> tuple[Path, int]:
    """The seeded example batch the exports were made with, as the workers' inputs.npz; the batch size.
    A reference gives its ``input_shape`` (and a file-name-safe ``name``): its batch needs no model."""
    from edgevit.export.subject import prepare_subject
    from edgevit.references import example_inputs

    if input_shape is not None:
        tensors = example_inputs(model, input_shape)
        path = where / f"{name or model}-{'x'.join(map(str, input_shape))}.npz"
    else:
        tensors = prepare_subject(model, None, input_size, None, 0).example_inputs
        path = where / f"{model}-{input_size}.npz"
    where.mkdir(parents=True, exist_ok=True)
    arrays = [t.detach().numpy() for t in tensors]
    np.savez(path, *arrays)
    return path, int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1


# --- the run -------------------------------------------------------------------------------------

def roofline(precisions: list[str], opts: BenchOptions, note: Progress, place: _Place | None = None) -> list[dict[str, Any]]:
    """Sustained GEMM throughput per precision, measured like any configuration (its own process).

    Float precisions: torch's GEMM. int8: each runtime's own integer matmul (its session module's
    ``INT8_GEMM`` probe, where that runtime is installed on the measuring machine); the int8 bound is
    the fastest of them."""
    place = place or _Place(None, local_facts(), opts.threads)
    configs = [Config(f"gemm {p}", {"runtime": "gemm", "threads": place.threads,
                                    "options": {"n": GEMM_N, "precision": p}}, {"precision": p})
               for p in precisions if p != "int8"]
    if "int8" in precisions:
        configs += [Config(f"gemm int8 {key.split(':')[-1]}", {"runtime": key, "threads": place.threads,
                                                               "options": {"n": GEMM_N}}, {"precision": "int8"})
                    for key in int8_gemm_probes(place.facts)]
    protocol = Protocol(runs=max(8, opts.rounds), rounds=min(opts.rounds, 4), warmup=2,
                        load_timeout_s=opts.run_timeout_s, run_timeout_s=opts.run_timeout_s)
    rows = []
    for m in measure(configs, protocol, lambda msg: note(msg, 1), place.spawn):
        row = {"host": place.name, "precision": m.meta["precision"], "status": m.status, "detail": m.detail, "n": m.info.get("n"),
               "engine": m.info.get("engine"), "threads": m.info.get("threads"), "native": m.info.get("native")}
        summary = m.summary()
        if summary:
            row |= {"median_ms": summary.median_ms, "gflops": m.info["flop"] / summary.median_ms / 1e6,
                    "best_gflops": m.info["flop"] / summary.min_ms / 1e6}
        rows.append(row)
    return rows


def int8_gemm_probes(facts: Facts) -> list[str]:
    """The worker runtimes that measure an integer GEMM on the machine ``facts`` describe."""
    from edgevit.devices.worker import SESSION_MODULES

    probes = []
    for module in SESSION_MODULES:
        key = getattr(module, "INT8_GEMM", None)
        installed = any("version" in facts["packages"].get(package, {}) for _, package, _ in module.PACKAGES)
        if key and installed:
            probes.append(key)
    return probes


def gemm_bounds(gemm: list[dict[str, Any]]) -> dict[str, float]:
    """GOP/s per precision: the fastest probe of each (int8 has one per runtime)."""
    bounds: dict[str, float] = {}
    for g in gemm:
        if g.get("gflops"):
            bounds[g["precision"]] = max(bounds.get(g["precision"], 0.0), g["gflops"])
    return bounds


def run_bench(opts: BenchOptions, note: Progress = lambda msg, n: None,
              devices: list[Device] | None = None) -> dict[str, Any]:
    """The whole bench; returns the result document (see ``devices/report.py`` for its writers).

    Here, or on each of ``opts.remotes`` in turn: rounds interleave between the configurations of one
    machine, never across machines (their ratios are not comparable side by side). ``devices``: what
    :func:`check_options` returned, when the caller checked the options already."""
    devices = check_options(opts) if devices is None else devices  # the CLI checked them already
    opts.out.mkdir(parents=True, exist_ok=True)
    hosts, gemm, rows = [], [], []
    if not opts.remotes:
        place = _Place(None, local_facts(), opts.threads)
        gemm, rows = _bench_place(opts, devices, place, note)
        hosts.append(_host_entry(place.name, "local", place.facts))
    for spec in opts.remotes:
        entry, host_gemm, host_rows = _bench_remote(spec, opts, note)
        hosts.append(entry)
        gemm += host_gemm
        rows += host_rows
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": _machine(), "hosts": hosts, "versions": _versions(_all_packages()),
            "options": _options_record(opts), "protocol": asdict(opts.protocol()), "gemm": gemm, "rows": rows}


def _options_record(opts: BenchOptions) -> dict[str, Any]:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "remotes"}
    record["remotes"] = [{"name": r.name, "address": r.address, "python": r.python, "threads": r.threads,
                          "devices": r.devices} for r in opts.remotes]
    return record


def _bench_remote(spec: RemoteSpec, opts: BenchOptions, note: Progress) -> tuple[dict[str, Any], list, list]:
    """Connect, probe, measure every model there, clean up; a host that fails gives one row per model."""
    host = RemoteHost(spec)
    try:
        note(f"connecting to {spec.address}", 0)
        facts = host.open(opts.run_timeout_s)
        place = _Place(host, facts, spec.threads or opts.threads)
        devices, absent = _remote_devices(spec, opts, facts)
        gemm, rows = _bench_place(opts, devices, place, note)
        rows += [_absent_row(bench_model(m, opts).name, d, reason, requested, spec.name, opts)
                 for m in opts.models for d, reason, requested in absent]
        return _host_entry(spec.name, spec.address, facts), gemm, rows
    except RemoteError as exc:
        rows = [{"model": bench_model(m, opts).name, "device": spec.devices or opts.device, "host": spec.name,
                 "precision": opts.precision, "status": exc.kind, "detail": str(exc)} for m in opts.models]
        return {"name": spec.name, "address": spec.address, "status": exc.kind, "reason": str(exc)}, [], rows
    finally:
        host.close()


def _remote_devices(spec: RemoteSpec, opts: BenchOptions, facts: Facts) -> tuple[list[Device], list]:
    """The devices to measure there, and (device, reason, requested) for those that cannot be: named ones
    that are unavailable, and (for 'cpu') each CPU runtime whose package is missing there."""
    wanted = spec.devices or opts.device
    chosen = [d for d in resolve_devices(wanted, opts.targets, facts, strict=False) if _measures(d, opts)]
    reasons = {d.name: d.unavailable_reason(facts) for d in chosen}  # a probe reads facts: once per device
    absent = [(d, reasons[d.name], True) for d in chosen if reasons[d.name]]
    if "cpu" in check_device_names(wanted):
        absent += [(d, d.unavailable_reason(facts), False) for d in missing_runtimes(facts)
                   if d not in chosen and (not opts.targets or d.target is None or d.target in opts.targets)]
    return [d for d in chosen if not reasons[d.name]], absent


def _absent_row(model: str, device: Device, reason: str | None, requested: bool, host: str,
                opts: BenchOptions) -> dict[str, Any]:
    """A device that cannot measure there; ``requested`` rows (named in --device) fail the bench."""
    return {"model": model, "device": device.name, "host": host, "precision": ",".join(_measures(device, opts)),
            "status": "unavailable", "detail": reason or "", "requested": requested}


def _bench_place(opts: BenchOptions, devices: list[Device], place: _Place, note: Progress) -> tuple[list, list]:
    """Roofline and every model on one machine (here or a remote host)."""
    gemm = roofline(gemm_precisions(opts), opts, note, place) if opts.roofline else []
    bound = gemm_bounds(gemm)
    rows: list[dict[str, Any]] = []
    for model in opts.models:
        configs, skipped = _model_configs(model, opts, devices, place, note)
        measured = measure(configs, opts.protocol(), lambda msg: note(msg, 1), place.spawn) if configs else []
        rows += _rows(measured, bound) + skipped
    return gemm, rows


def gemm_precisions(opts: BenchOptions) -> list[str]:
    """fp32 always (the eager baseline and w8/w4 multiply in it), then each requested precision with a probe."""
    return ["fp32"] + [p for p in opts.precisions if p in GEMM_PRECISIONS and p != "fp32"]


def _model_configs(model: str, opts: BenchOptions, devices: list[Device], place: _Place,
                   note: Progress) -> tuple[list[Config], list[dict[str, Any]]]:
    """One configuration per device (exports cached here; on a remote host, the files pushed there)."""
    bm = bench_model(model, opts)
    size, shape = bm.input_size, bm.input_shape
    inputs, batch = _save_inputs(bm.arg, size, opts.out / "inputs", shape, bm.name)
    files: dict[str, Path] = {}
    inputs_at: Path | str = inputs
    if place.host is not None:
        inputs_at = f"inputs/{inputs.name}"
        files[inputs_at] = inputs
    configs, skipped = [], []
    calibration = _calibration_for(bm, opts) if "int8" in opts.quantized else None
    pairs = [(device, precision) for device in devices for precision in _measures(device, opts)]
    for index, (device, precision) in enumerate(pairs):
        meta = {"model": bm.name, "input_size": size, "device": device.name, "precision": precision,
                "params": bm.params, "macs": bm.macs, "batch": batch, "host": place.name}
        if place.host is not None and device.runtime == "torch" and shape is not None:
            skipped.append(meta | {"status": "unavailable", "requested": False, "detail": (
                "PyTorch eager of a Hugging Face folder or module:factory needs its code on the device; "
                "ratios are against the fastest runtime there")})
            continue
        artifact = None
        if device.target is not None:
            note(f"export {bm.name} -> {device.name} {precision}", 0)
            exported = export_cached(bm.arg, size, device, device.export_precision(precision), opts,
                                     shape, bm.name, calibration)
            if exported.get("status") == "error":
                skipped.append(meta | {"status": "export-failed", "detail": exported.get("error", "")})
                note(f"export {bm.name} -> {device.name} failed", opts.rounds + 1)
                continue
            artifact = exported["artifact_path"]
            meta |= {"artifact": artifact, "export_cached": exported["cached"], "parity": exported.get("status"),
                     "passes": exported.get("passes", {}).get("pipeline"),
                     "artifact_bytes": artifact_bytes(device.target, Path(artifact))}
            if exported.get("quantization"):
                meta["quantization"] = quant_summary(exported["quantization"])
            if place.host is not None:
                local = Path(artifact)
                artifact = f"a{index}/{local.name}"
                files |= {f"a{index}/{p.name}": p for p in (local, *_companions(device.target, local))}
        label = f"{bm.name} {device.name}" + (f" {precision}" if len(opts.precisions) > 1 else "")
        try:
            configs.append(_config(label, device, precision, opts, artifact, inputs_at, bm.arg, size, meta, shape,
                                   place))
        except RemoteError as exc:  # edgevit's source could not be pushed for eager
            skipped.append(meta | {"status": exc.kind, "detail": str(exc)})
    if place.host is not None and configs:
        try:
            note(f"copying {bm.name} to {place.host.spec.address}", 0)
            place.host.push(files)
        except RemoteError as exc:
            skipped += [c.meta | {"status": exc.kind, "detail": str(exc)} for c in configs]
            configs = []
    return configs, skipped


def _calibration_for(bm: BenchModel, opts: BenchOptions) -> Path:
    """The int8 calibration data: the user's, else seeded inputs written once per model and shape."""
    from edgevit.export.quantization.data import SEEDED_CALIBRATION, seeded_calibration

    if opts.calibration is not None:
        return opts.calibration.resolve()
    shape = "x".join(map(str, bm.input_shape)) if bm.input_shape else str(bm.input_size)
    path = opts.out / "inputs" / f"calibration-{bm.name}-{shape}-seeded{SEEDED_CALIBRATION}.npz"
    if not path.exists():
        seeded_calibration(bm.arg, None if bm.input_shape else bm.input_size, bm.input_shape, path)
    return path.resolve()


def artifact_bytes(target: str, artifact: Path) -> int:
    """The artifact's size on disk: the file (a package: its tree) and the files it needs beside it."""
    files = [artifact, *_companions(target, artifact)]
    return sum(sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else f.stat().st_size
               for f in files if f.exists())


def quant_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a bench row keeps of an export's quantization record: how it was made, what stayed float."""
    keep = ("precision", "scheme", "method", "tool", "quantized_ops", "float_ops", "size_ratio")
    summary = {k: record[k] for k in keep if k in record}
    calibration = record.get("calibration") or {}
    summary["calibration"] = {k: calibration.get(k) for k in ("source", "images") if k in calibration}
    return summary


def _companions(target: str, artifact: Path) -> list[Path]:
    """Files an artifact needs beside it (its backend's ``devices.companions``, e.g. weights next to a graph)."""
    from edgevit.export.backends import get_backend

    companions = getattr(get_backend(target).module("devices"), "companions", None)
    return companions(artifact) if companions else []


def _host_entry(name: str, address: str, facts: Facts) -> dict[str, Any]:
    """A measuring machine as the reports print it: CPU, cores, the flags that decide kernels, runtimes."""
    runtimes = {p: s["version"] for p, s in facts["packages"].items() if "version" in s}
    return {"name": name, "address": address, "status": "ok", "reason": "",
            "machine": {"system": facts["platform"]["system"], "machine": facts["platform"]["machine"],
                        "python": facts["platform"]["python"], "cpu": facts["cpu"]["model"],
                        "cores": facts["cpu"]["cores"], "cpu_flags": facts["cpu"]["flags"],
                        "accelerator_nodes": facts.get("accelerator_nodes", {})},
            "runtimes": runtimes}


def _all_packages() -> list[str]:
    """The packages whose versions a bench report records: edgevit's own, then each backend's."""
    from edgevit.export.backends import BACKENDS

    packages = ["edgevit", "torch", "numpy",
                *(p for backend in BACKENDS.values() for p in backend.module("devices").REPORTED_PACKAGES)]
    quantizers = [p for backend in BACKENDS.values() for p in _quantizer_packages(backend.name)]
    return list(dict.fromkeys(packages + quantizers))  # the quantizers made the int8/w8/w4 artifacts


def _rows(measured: list[Measurement], gemm_gflops: dict[str, float]) -> list[dict[str, Any]]:
    """One row per configuration: the measurement, speed-up vs the baseline (interleaved), roofline placement.

    The baseline is PyTorch eager (its fp32 row when several precisions were measured); where eager was not
    measured (a remote device without torch), it is the fastest runtime of the run, and the rows say so
    (``baseline``, ``speedup_vs_baseline``). A row of another precision also gets ``speedup_vs_fp32``: over the
    same runtime's fp32 row of the same run (interleaved, like every ratio here)."""
    eager = [m for m in measured if m.meta["device"] == BASELINE and m.ok]
    baseline = next((m for m in eager if m.meta["precision"] == "fp32"), eager[0] if eager else None)
    key = "speedup_vs_eager"
    if baseline is None:
        timed = [m for m in measured if m.ok and m.summary() is not None]
        baseline = min(timed, key=lambda m: m.summary().median_ms, default=None)  # type: ignore[union-attr]
        key = "speedup_vs_baseline"
    rows = []
    for m in measured:
        row = m.to_dict()
        summary = m.summary()
        if summary is not None:
            macs = m.meta.get("macs") or 0
            row["gmacs_per_s"] = macs * m.meta.get("batch", 1) / summary.median_ms / 1e6
            row["roofline"] = _roofline(m, summary.median_ms, macs * m.meta.get("batch", 1), gemm_gflops)
            if baseline is not None:
                row["baseline"] = baseline.meta["device"]
                if m is not baseline:
                    row[key] = stats.interleaved_ratio(baseline.rounds, m.rounds).to_dict()
            fp32 = _same_runtime_fp32(m, measured)
            if fp32 is not None:
                row["speedup_vs_fp32"] = stats.interleaved_ratio(fp32.rounds, m.rounds).to_dict()
        rows.append(row)
    return rows


def _same_runtime_fp32(m: Measurement, measured: list[Measurement]) -> Measurement | None:
    """The fp32 measurement of ``m``'s model on ``m``'s device, when ``m`` is of another precision."""
    if m.meta["precision"] == "fp32":
        return None
    return next((o for o in measured if o.ok and o.summary() is not None and o.meta["precision"] == "fp32"
                 and o.meta["device"] == m.meta["device"] and o.meta["model"] == m.meta["model"]), None)


def _roofline(m: Measurement, median_ms: float, macs: float, gemm_gflops: dict[str, float]) -> dict[str, Any]:
    """The run against the GEMM bound of the precision its matrix multiplies *ran* in (the runtime's
    report), so a bf16 request that OpenVINO computed in f32 meets the fp32 bound, not the bf16 one."""
    computed = m.info.get("compute_precision") or m.meta["precision"]
    mixed = m.info.get("matmul_precisions") if computed == "mixed" else None
    if mixed:  # e.g. an int8 graph whose attention matmuls stayed float: the bound of most of its matmul kernels
        computed = max(mixed, key=mixed.get)
    gflops = gemm_gflops.get(computed)
    if not gflops:
        why = ("the runtime does not say what it computed in" if computed.startswith("unknown")
               else f"no {computed} GEMM measured in this run")
        return {"precision": computed, "note": f"no bound: {why}"}
    bound_ms = 2 * macs / (gflops * 1e9) * 1e3
    kernels = gemm_kernels_ms(m.profile or [], median_ms)
    return {"precision": computed, "gemm_gflops": gflops, "bound_ms": bound_ms,
            "median_over_bound": median_ms / bound_ms, "fraction_of_peak": bound_ms / median_ms,
            **({"mixed": mixed} if mixed else {}),
            **({"gemm_kernels_ms": kernels, "gemm_kernels_over_bound": kernels / bound_ms} if kernels else {})}


def gemm_kernels_ms(profile: list[dict[str, Any]], median_ms: float) -> float | None:
    """The part of ``median_ms`` the model's matrix-multiplying kernels (matmuls, convolutions: the profile rows
    marked ``gemm``) took, by their share of the profiled time; None without such a profile.

    Why: the bound prices every MAC at the large-square GEMM's rate, while the model runs its GEMMs at its own
    (small, skinny) shapes. Their measured time over the bound is the lowest ``median / bound`` any rewrite of
    the *other* ops could reach on this runtime: a goal below it asks for faster kernels, not a better graph."""
    if not any("gemm" in row for row in profile):
        return None
    whole = sum(row["ms_per_run"] for row in profile)
    share = sum(row["ms_per_run"] for row in profile if row.get("gemm")) / whole if whole else 0.0
    return share * median_ms if share else None


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu or platform.processor(),
            "cores": os.cpu_count(), "cpu_flags": local_facts()["cpu"]["flags"], "python": platform.python_version(),
            "load_avg_at_start": load}


def fastest(rows: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The non-eager configuration of ``model`` with the smallest median."""
    candidates = [r for r in rows if r.get("model") == model and r.get("device") != BASELINE and r.get("summary")]
    return min(candidates, key=lambda r: r["summary"]["median_ms"], default=None)

