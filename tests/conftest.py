"""Shared test plumbing: fast tests first, and a probe of the largest tensor rank a forward produces."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
