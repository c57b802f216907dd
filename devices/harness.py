"""The measurement harness: one worker process per configuration, timed blocks interleaved between them.

Protocol (per configuration, each in its own process, see ``devices/worker.py``, run bundled):
1. load the artifact (load time) and run it once (first-inference time);
2. ``warmup`` untimed inferences;
3. ``rounds`` rounds; in each, every live configuration runs one block (``block_warmup`` untimed
   inferences, and more for ``block_warmup_s``, then the timed ones; a ``gap_s`` pause before each block
   lets the previous runtime's spinning threads go to sleep), the order
   alternating A B C / C B A between rounds, so slow drifts of the machine (other jobs, clocks) hit all
   configurations alike and ratios are taken between blocks run side by side;
4. finish: peak RSS of the worker and, on request, the runtime's per-op profile.
Every request has a timeout: a worker that crashes (its pipe closes) or hangs (killed at the timeout)
is recorded as such and the other configurations go on.
"""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from edgevit.devices import stats
from edgevit.devices.worker_bundle import worker_file


class WorkerFailure(Exception):
    """A worker that crashed, hung or reported an error; ``kind`` is crashed / timeout / error."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def local_worker(label: str) -> list[str]:
    """The bundled worker (devices/worker_bundle.py), served by this Python."""
    return [sys.executable, str(worker_file()), "serve"]


class WorkerProcess:
    """``python worker.py serve`` in a child process, spoken to in JSON lines with timeouts.

    ``argv`` starts it: here by default; a remote device's launcher gives an ssh or adb command line
    whose stdin/stdout are the remote worker's (devices/remote.py), so the protocol is the same.
    ``explain`` turns a dead worker's exit code and last stderr lines into its one-line reason.
    """

    def __init__(self, label: str, argv: list[str] | None = None,
                 explain: Callable[[int | None, list[str]], str] | None = None) -> None:
        self.label = label
        self.explain = explain or _explain_exit
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv or local_worker(label), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)
        self._lines.put(None)  # EOF: the worker exited

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            raise self._crashed() from None
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self.kill()
            raise WorkerFailure("timeout", f"no answer to '{message['cmd']}' within {timeout_s:.0f} s; killed") from None
        if line is None:
            raise self._crashed()
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerFailure("error", reply.get("error", "unknown error"))
        return reply

    def _crashed(self) -> WorkerFailure:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        self._stderr.seek(0)
        tail = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()][-5:]
        return WorkerFailure("crashed", self.explain(code, tail))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._stderr.close()


def _explain_exit(code: int | None, lines: list[str]) -> str:
    signal = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"worker {signal}" + (f"; last stderr line: {lines[-1][:200]}" if lines else "")


@dataclass
class Config:
    """One thing to measure: a label, the worker config (runtime, artifact, inputs, options...)."""

    label: str
    worker: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # carried into the result (model, device, ...)


@dataclass
class Measurement:
    label: str
    meta: dict[str, Any]
    status: str = "pending"  # ok, crashed, timeout, error
    detail: str = ""
    load_ms: float | None = None
    first_ms: float | None = None
    rounds: list[list[float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    platform: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    profile: list[dict[str, Any]] = field(default_factory=list)

    @property
    def times_ms(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> stats.Summary | None:
        return stats.summarize(self.times_ms) if self.ok and self.times_ms else None

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary()
        rep = stats.repeatability(self.rounds) if self.ok else None
        return {"label": self.label, **self.meta, "status": self.status, "detail": self.detail,
                "load_ms": self.load_ms, "first_ms": self.first_ms,
                "summary": summary.to_dict() if summary else None,
                "repeatability": rep.to_dict() if rep else None,
                "runtime_info": self.info, "platform": self.platform, "peak_rss_mb": self.peak_rss_mb,
                "profile": self.profile, "times_ms": self.times_ms, "rounds": [len(r) for r in self.rounds]}


@dataclass(frozen=True)
class Protocol:
    runs: int = 40  # timed inferences per configuration, split over the rounds
    rounds: int = 8
    warmup: int = 5
    budget_s: float | None = None  # optional cap on the timed time of one configuration
    block_warmup: int = 1  # untimed inferences at the start of every block: caches and thread pools
                           # go cold while the other configurations run
    block_warmup_s: float = 0.05  # ... and more of them until this long has passed: after the gap's idle a
    # shared VM gives a 2-thread runtime both cores back at full speed only after tens of ms (LiteRT int8
    # MobileViT-v2-0.5, 2 threads, blocks of 5 after a 0.2 s pause: block medians 3.6-8.5 ms, median 7.25,
    # with one warm-up run; 3.3-4.1 ms, median 3.5-3.8, with 50 ms of warm-up; 3.35 ms run back to back)
    gap_s: float = 0.2  # pause between blocks: runtimes' worker threads spin-wait for a while after a
                        # run (OpenMP, onnxruntime); on 2 cores that would slow the next block down
    load_timeout_s: float = 300.0
    run_timeout_s: float = 300.0  # per block

    def block(self) -> int:
        return max(1, math.ceil(self.runs / max(self.rounds, 1)))


def measure(configs: list[Config], protocol: Protocol = Protocol(),
            progress: Callable[[str], None] | None = None,
            spawn: Callable[[str], WorkerProcess] = WorkerProcess) -> list[Measurement]:
    """Measure ``configs`` interleaved (see the module docstring); one Measurement per config, in order.
    ``spawn(label)`` starts a worker (default: a local process; a remote device passes its own)."""
    note = progress or (lambda _msg: None)
    results = [Measurement(c.label, dict(c.meta)) for c in configs]
    workers: dict[int, WorkerProcess] = {}
    try:
        for i, config in enumerate(configs):
            note(f"loading {config.label}")
            workers[i] = spawn(config.label)
            _step(results[i], workers, i, lambda w: _load(w, config, results[i], protocol))
        for i in list(workers):
            _step(results[i], workers, i, lambda w: w.request(
                {"cmd": "run", "runs": protocol.warmup}, protocol.run_timeout_s))
        block_budget = None if protocol.budget_s is None else protocol.budget_s / protocol.rounds
        for r in range(protocol.rounds):
            order = list(workers) if r % 2 == 0 else list(reversed(workers))
            for i in order:
                if i not in workers:
                    continue
                note(f"round {r + 1}/{protocol.rounds}: {configs[i].label}")
                results[i].rounds.append([])
                time.sleep(protocol.gap_s)
                _step(results[i], workers, i, lambda w: results[i].rounds[-1].extend(w.request(
                    {"cmd": "run", "runs": protocol.block(), "warmup": protocol.block_warmup,
                     "warmup_s": protocol.block_warmup_s, "budget_s": block_budget},
                    protocol.run_timeout_s)["times_ms"]))
        for i in list(workers):
            _step(results[i], workers, i, lambda w: _finish(w, results[i], protocol))
            if i in workers:
                results[i].status = "ok"
    finally:
        for w in workers.values():
            w.kill()
            w.close()
    return results


def _load(worker: WorkerProcess, config: Config, result: Measurement, protocol: Protocol) -> None:
    reply = worker.request({"cmd": "load", "config": config.worker}, protocol.load_timeout_s)
    result.load_ms, result.first_ms = reply["load_ms"], reply["first_ms"]
    result.info, result.platform = reply["info"], reply["platform"]


def _finish(worker: WorkerProcess, result: Measurement, protocol: Protocol) -> None:
    reply = worker.request({"cmd": "finish"}, protocol.run_timeout_s)
    result.peak_rss_mb, result.profile = reply["peak_rss_mb"], reply["profile"]


def _step(result: Measurement, workers: dict[int, WorkerProcess], i: int, action: Callable[[WorkerProcess], Any]) -> None:
    """Run one request; on failure record it, stop that worker and drop it from the rotation."""
    if i not in workers:
        return
    try:
        action(workers[i])
    except WorkerFailure as exc:
        result.status, result.detail = exc.kind, exc.detail
        result.rounds = [r for r in result.rounds if r]
        worker = workers.pop(i)
        worker.kill()
        worker.close()

