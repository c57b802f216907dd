"""The models of the test project of ``edgevit check`` (tests/test_check.py), built by ``models:<factory>``.

Seeded and tiny (16 features), so a cell exports in seconds."""

from __future__ import annotations

import torch
from torch import nn


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return module.eval()


class TinyMLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear: whole on NNAPI once the onnx:nnapi passes decompose LayerNorm
    (NNAPI has no LayerNormalization) and write GELU in tanh primitives (it has no Erf)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


class ErfSplit(nn.Module):
    """Linear -> erf -> Linear: NNAPI has no Erf and no pass rewrites a bare erf, so onnxruntime's NNAPI
    provider runs the two Linears in two partitions with the Erf on the CPU between them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.erf(self.fc1(x)))


class Fp16Overflow(nn.Module):
    """exp of activations up to ~27: PyTorch computes it in float32 (outputs up to ~4e11), a Core ML fp16
    program computes and stores each op's output in float16, whose largest finite value is 65504: inf."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(12.0 * self.fc(x))


def tiny_mlp() -> nn.Module:
    return _seeded(TinyMLP())


def erf_split() -> nn.Module:
    return _seeded(ErfSplit())


def fp16_overflow() -> nn.Module:
    return _seeded(Fp16Overflow())


def hang() -> nn.Module:
    """A factory that never returns in an export child (``edgevit export ... --in-process``), to interrupt a
    check while its cells run; in the parent (which builds it once to learn its input) it is TinyMLP."""
    import sys
    import time

    if "--in-process" in sys.argv:
        time.sleep(3600)
    return tiny_mlp()


def _target() -> str | None:
    """The target of the export child this runs in (``edgevit export MODEL --target T --in-process``), else None."""
    import sys

    argv = sys.argv
    return argv[argv.index("--target") + 1] if "--in-process" in argv and "--target" in argv else None


def flaky() -> nn.Module:
    """In an export child for onnx the process dies at once (as a segfaulting converter does); for openvino it
    never returns (a hung one); anywhere else it is TinyMLP."""
    import os
    import time

    if _target() == "onnx":
        os._exit(3)
    if _target() == "openvino":
        time.sleep(3600)
    return tiny_mlp()


def slow() -> nn.Module:
    """TinyMLP, built 8 s late in an export child: a cell that is still running when a sweep is interrupted."""
    import time

    if _target() is not None:
        time.sleep(8)
    return tiny_mlp()
