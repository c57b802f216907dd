"""``edgevit bench``: latency of models on every runtime of a device, against PyTorch eager, and its renderer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgevit.cli import REMOTE_HELP, err_console, fail, out_console, parse_shape
from edgevit.errors import EdgevitError
from edgevit.export.manifest import prepare_out_dir, to_json


def bench_cmd(
    device: str = typer.Option("cpu", "--device", "-d", help="'cpu' (every CPU runtime here) or device names, comma-separated."),
    models: Optional[str] = typer.Option(None, "--models", "-m", help="Zoo models, Hugging Face folders or module:factory references, comma-separated [default: deit_tiny,mobilevit_v2_050]."),
    targets: Optional[str] = typer.Option(None, "--targets", "-t", help="Keep these targets' runtimes (eager stays)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16, bf16 (each runtime's way of running it), or the quantized int8, w8, w4 (the export's artifacts; fp32 comes along to compare); several: a comma list, e.g. fp32,int8."),
    runs: int = typer.Option(40, "--runs", help="Timed inferences per configuration."),
    rounds: int = typer.Option(10, "--rounds", help="Interleaved rounds the runs are split into (>= 6 for a noise verdict from the spread)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed inferences after the first one."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Seconds of timed runs per configuration (stops early)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads per runtime [default: all cores]."),
    passes: str = typer.Option("auto", "--passes", help="Export pass pipeline: auto, none, or names."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size [default: each model's]."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape of the folders and module:factory references in --models, e.g. 1,3,224,224."),
    profile: bool = typer.Option(False, "--profile", help="Also collect each runtime's per-op profile (top ops)."),
    no_roofline: bool = typer.Option(False, "--no-roofline", help="Skip the GEMM throughput measurement."),
    out: Path = typer.Option(Path("bench"), "--out", "-o", help="Report directory (exports cached in OUT/cache)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Export cache directory [default: OUT/cache]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON result here ('-': stdout only)."),
    timeout: float = typer.Option(300, "--timeout", help="Seconds a runtime may take to load or to run one block."),
    remote: Optional[str] = typer.Option(None, "--remote", "-r", help=REMOTE_HELP),
    remote_python: Optional[str] = typer.Option(None, "--remote-python", help="Python on the remote [default: python3, or the devices file's]."),
    devices_file: Optional[Path] = typer.Option(None, "--devices-file", help="Devices file [default: edgevit-devices.toml or pyproject.toml here]."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="int8: images (a folder) or a .npz of inputs to calibrate with [default: 32 seeded inputs: right speed, not accuracy]."),
    quant_scheme: str = typer.Option("safe", "--quant-scheme", help="int8: safe (matmuls/convs; on LiteRT/XNNPACK also the ops between them when measured harmless) or full (every op the tool can)."),
    calibration_method: str = typer.Option("auto", "--calibration-method", help="int8: auto (the backend's default), percentile, entropy or minmax."),
) -> None:
    """Measure inference latency of models (zoo or references) on every runtime of a device, against PyTorch eager.

    Exports are cached by content hash, so re-runs only measure. With --remote, exports are made here and
    measured there (ssh or adb), with the same protocol. Writes OUT/bench.json, bench.csv,
    latency_vs_macs.png and report.md, and prints the table.
    """
    from edgevit.devices.bench import DEFAULT_MODELS, BenchOptions, check_file_path, check_options, run_bench
    from edgevit.devices.report import finding_lines, gemm_lines, machine_lines, table_header, table_rows, write_all
    from edgevit.references import split_model_list

    model_list = list(DEFAULT_MODELS) if models is None else split_model_list(models)
    if not model_list:
        fail(f"--models '{models}' names no model; give model names, comma-separated, or leave it out")
    opts = BenchOptions(models=model_list, device=device,
                        targets=_split(targets), precision=precision, runs=runs, rounds=rounds, warmup=warmup,
                        threads=threads, passes=passes, input_size=input_size, out=out, cache=cache, profile=profile,
                        roofline=not no_roofline, budget_s=budget, run_timeout_s=timeout, calibration=calibration,
                        quant_scheme=quant_scheme, calibration_method=calibration_method)
    to_stdout = json_path is not None and str(json_path) == "-"
    try:
        from edgevit.devices.inventory import resolve_remotes

        if remote is not None:
            opts.remotes = resolve_remotes(remote, devices_file, remote_python)
        elif remote_python is not None:
            raise EdgevitError("--remote-python needs --remote")
        opts.input_shape = parse_shape(input_shape)
        if json_path is not None and not to_stdout:
            check_file_path("--json", json_path)
        devices = check_options(opts)
        prepare_out_dir(out)
        prepare_out_dir(opts.cache_dir)
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    result = _bench_with_progress(opts, devices, quiet=to_stdout,
                                  run=lambda o, note: run_bench(o, note, devices=devices))
    paths = write_all(result, out, None if to_stdout else json_path)
    if to_stdout:
        out_console.file.write(to_json(result, default=str) + "\n")
    else:
        for line in machine_lines(result) + gemm_lines(result):
            out_console.print(line, highlight=False)
        where = ", ".join(r.name for r in opts.remotes) if opts.remotes else "this machine"
        table = Table(title=f"edgevit bench on {where}: {device} ({','.join(opts.precisions)}, batch 1)")
        for col in table_header(result):
            table.add_column(col, justify="right" if col not in ("host", "model", "runtime", "status") else "left")
        for row in table_rows(result):
            table.add_row(*(escape(c) for c in row))
        out_console.print(table)
        for line in finding_lines(result):
            out_console.print(line, highlight=False)
        written = ", ".join(str(p) for p in paths.values() if p is not None)
        out_console.print(f"written: {written}", highlight=False)
        if paths["png"] is None:
            err_console.print("no plot: matplotlib is not installed (pip install -c constraints.txt -e \".[bench]\")")
    # a runtime missing on a remote is listed for information; only what was asked for and failed counts
    failed = [r for r in result["rows"] if r.get("status") != "ok" and r.get("requested", True)]
    raise typer.Exit(1 if failed else 0)


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _bench_with_progress(opts: Any, devices: list, quiet: bool, run: Any) -> dict[str, Any]:
    """``run(opts, note)`` under a rich progress bar: exports, then per configuration load + rounds."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgevit.devices.bench import gemm_precisions

    probes = len(gemm_precisions(opts)) + ("int8" in opts.precisions)  # int8: one probe per runtime (~2)
    gemm_steps = (1 + min(opts.rounds, 4)) * probes if opts.roofline else 0
    per_host = len(devices) * len(opts.precisions) or 4  # a remote's devices are known once probed: a guess
    hosts = max(1, len(opts.remotes))
    total = hosts * (gemm_steps + len(opts.models) * per_host * (opts.rounds + 1))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err_console, disable=quiet, transient=True) as progress:
        task = progress.add_task("bench", total=total)

        def note(message: str, done: float) -> None:
            progress.update(task, description=message[:60], advance=done)

        return run(opts, note)
