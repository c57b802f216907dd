"""Shared test plumbing: fast tests first, and a probe of the largest tensor rank a forward produces."""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# edgevit's own tests hold the passes to strict: a pass that would be rolled back for a user fails the test
# that exports the model (the export children of CLI tests inherit it). Tests of the rollback itself pass
# strict_passes=False.
os.environ.setdefault("EDGEVIT_STRICT_PASSES", "1")


class _MaxRank(TorchDispatchMode):
    """Records the largest rank of any tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_rank = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ranks = [t.ndim for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.max_rank = max([self.max_rank, *ranks])
        return out


@pytest.fixture
def max_rank() -> Callable[..., int]:
    """``max_rank(model, *inputs)``: the largest tensor rank any op of ``model(*inputs)`` produces."""

    def probe(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
        with torch.no_grad(), _MaxRank() as mode:
            model(*inputs)
        return mode.max_rank

    return probe


@pytest.fixture
def executor_vs_onnxruntime() -> Callable[..., object]:
    """``check(coreml_artifact, onnx_artifact, precision, seed=0)``: the MIL reference executor's fp32 run
    of a Core ML package vs onnxruntime on an ONNX artifact of the same model, on one seeded input,
    compared at ``precision``'s bound; returns the parity report. Two converters' outputs executed by two
    independent engines: a shared mistake with PyTorch would have to be made twice."""

    def check(coreml_artifact, onnx_artifact, precision: str, seed: int = 0):
        import numpy as np

        from edgevit.devices.mil import MILExecutor, load_program
        from edgevit.devices.runtimes import load_runner
        from edgevit.export.parity import compare

        program = load_program(coreml_artifact)
        runner = load_runner("onnx", onnx_artifact)
        shape = runner.session.get_inputs()[0].shape
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        return compare([runner.run([x])], [MILExecutor(program, "fp32").run([x])], program.outputs, precision)

    return check


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full-zoo", action="store_true",
                     help="also run the tests marked full_zoo (every zoo model, not one per family; ~1 h)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # full_zoo tests repeat the per-family checks on every variant: too long for the 30-minute CI, so they
    # run only when asked for (the nightly workflow, and before a release).
    if not config.getoption("--full-zoo"):
        deselected = [item for item in items if item.get_closest_marker("full_zoo")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("full_zoo")]
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
