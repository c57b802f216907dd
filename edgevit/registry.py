"""Model registry: families register constructors with ``@register_model`` (the timm habit).

Each entry carries metadata (family, paper, native input size, normalisation, the stride the input size
must divide). Parameter and MAC counts are *computed* from the model on the ``meta`` device, so they can
never drift from the code, and cost no memory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from edgevit.errors import EdgevitError

DEFAULT_MODEL = "deit_tiny"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a registered model; counts are filled in by :func:`model_info`."""

    name: str
    family: str
    paper: str
    input_size: int
    input_multiple: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    aliases: tuple[str, ...] = ()
    notes: str = ""
    # Input size for the zoo-wide export matrix in CI, when the native size is too slow there.
    test_input_size: int | None = None
    params: int | None = None
    macs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Maps a published checkpoint layout (official repo / timm) onto this model's keys.
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("checkpoint_filter")
        return d


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    build: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}


def register_model(info: ModelInfo) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn(**kwargs) -> nn.Module`` under ``info.name`` (and its aliases)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if info.name in _REGISTRY or info.name in _ALIASES:
            raise ValueError(f"model {info.name!r} registered twice")
        _REGISTRY[info.name] = _Entry(info, fn)
        for alias in info.aliases:
            _ALIASES[alias] = info.name
        return fn

    return wrap


def _ensure_zoo_loaded() -> None:
    # Importing the zoo package runs every family's @register_model decorators.
    import edgevit.models  # noqa: F401


def resolve_name(name: str) -> str:
    """Canonical model name for ``name`` or an alias; unknown names get the closest suggestions."""
    _ensure_zoo_loaded()
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = sorted([*_REGISTRY, *_ALIASES])
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run 'edgevit models' to list them"
    raise EdgevitError(f"unknown model '{name}'{hint}")


def list_models(family: str | None = None) -> list[str]:
    """Canonical names of every registered model, optionally of one family."""
    _ensure_zoo_loaded()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.info.family == family)


def create_model(name: str, weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``kwargs`` go to its constructor.

    Without ``weights`` the parameters are randomly initialised (seed with ``torch.manual_seed``). With
    ``weights`` (a .safetensors file or a torch checkpoint, read with ``weights_only=True``) they are
    loaded strictly, through the family's key mapping when the file uses a published layout.
    """
    entry = _REGISTRY[resolve_name(name)]
    model = entry.build(**kwargs)
    if weights is not None:
        from edgevit.weights import load_weights

        load_weights(model, weights, entry.info.checkpoint_filter)
    model.edgevit_info = entry.info  # type: ignore[attr-defined]
    return model


@lru_cache(maxsize=None)
def _counts(name: str, input_size: int) -> tuple[int, int]:
    entry = _REGISTRY[name]
    with torch.device("meta"):
        model = entry.build(img_size=input_size).eval()
    params = sum(p.numel() for p in model.parameters())
    return params, count_macs(model, torch.empty(1, 3, input_size, input_size, device="meta"))


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (FLOPs/2 from PyTorch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def model_info(name: str, input_size: int | None = None) -> ModelInfo:
    """Metadata of a model with its parameter count and MACs at ``input_size`` (native by default)."""
    info = _REGISTRY[resolve_name(name)].info
    params, macs = _counts(info.name, input_size or info.input_size)
    return dataclasses.replace(info, params=params, macs=macs)


def check_input_size(info: ModelInfo, size: int) -> int:
    """``size`` if the model can take a square input of that size, else a one-line error."""
    if size <= 0 or size % info.input_multiple:
        raise EdgevitError(
            f"input size {size} is not a positive multiple of {info.input_multiple}, "
            f"which {info.name} needs; try {info.input_size}"
        )
    return size


INPUT_MEMORY_FACTOR = 8  # an input image plus the first activations: a floor, not an estimate of the peak


def check_requested_size(size: int | None, flag: str = "--input-size") -> int | None:
    """A user's square input size: ``None`` (the model's own) or a positive size that fits in memory."""
    if size is None:
        return None
    if size <= 0:
        raise EdgevitError(f"{flag} {size} is not a positive size; leave it out for the model's own size")
    check_input_memory((1, 3, size, size), f"{flag} {size}")
    return size


def check_input_memory(shape: tuple[int, ...], what: str) -> None:
    """Refuse an input whose float32 image (times a small activation factor) exceeds this machine's memory."""
    elements = 1
    for dim in shape:
        elements *= max(int(dim), 1)
    need = elements * 4 * INPUT_MEMORY_FACTOR
    have = physical_memory()
    if have and need > have:
        raise EdgevitError(f"{what} needs about {need / 2**30:.0f} GB for one input image; "
                           f"this machine has {have / 2**30:.0f} GB")


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
