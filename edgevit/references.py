"""Model references: what ``edgevit export MODEL`` accepts besides zoo names.

A *reference* is either

* a saved Hugging Face transformers folder (``config.json`` + weights, as ``model.save_pretrained(dir)``
  writes it), built offline with transformers (the ``hf`` extra), or
* ``package.module:factory``: any importable callable (function or class) that returns an
  ``nn.Module`` when called with no arguments; the module is imported with the current directory on
  ``sys.path``, as ``python -m`` would.

:func:`resolve_model` turns a zoo name or a reference into a :class:`ResolvedModel` (module in eval
mode, seeded example inputs, normalisation). Resolution is deterministic -- construction runs under a
fixed torch seed, example inputs come from a seeded generator -- because the export child process, the
bench's eager baseline and the parent that checks the arguments each resolve the same string again
and must build the same model. Every failure is one-line :class:`~edgevit.errors.EdgevitError`.

Zoo names always win: a folder called ``deit_tiny`` in the current directory is not a reference.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from edgevit.errors import EdgevitError
from edgevit.registry import IMAGENET_MEAN, IMAGENET_STD

Kind = Literal["zoo", "hf", "factory"]

#: ``package.module:attribute`` (the attribute may be dotted, e.g. ``module:Class.build``).
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: Files of a Hugging Face folder that decide the model: hashed for caches and the manifest.
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HF_EXTRA = "pip install 'edgevit[hf]'"


@dataclass
class ResolvedModel:
    """A model ready to export: built, weights loaded, eval mode, with seeded example inputs.

    ``mean``/``std`` are the per-channel normalisation of image inputs (``None`` for a factory: its
    inputs are not known to be images, so parity uses seeded normal noise, as for any user module).
    ``reference`` is the string to hand to another process to rebuild the same model (an absolute
    folder path for ``hf``); ``source`` describes it for people (the manifest's ``model.reference``).
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    name: str
    kind: Kind
    reference: str
    source: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    weights: Path | None = None  # a --weights file that replaced the reference's own weights
    init: str = "keep"  # "exercise" once export_model(init="exercise") has re-initialised the module
    info: Any = field(default=None, repr=False)  # the zoo's ModelInfo, for kind "zoo"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example_inputs[0].shape)

    def weights_record(self, seed: int) -> dict[str, Any] | str:
        """What the manifest says about the weights that were exported."""
        from edgevit.export.manifest import sha256_of

        if self.init == "exercise":
            return f"re-initialised (init='exercise', seed {seed}); the reference's own weights are not exported"
        if self.weights is not None:
            return {"path": str(self.weights), "sha256": sha256_of(self.weights)}
        if self.kind == "hf":
            return {"path": self.reference, "sha256": fingerprint(self.reference)["sha256"]}
        return f"the factory's own initialisation, torch seed {seed}"


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` is a zoo model or alias (checked first: zoo names win over references)."""
    from edgevit.registry import resolve_name

    try:
        resolve_name(name)
    except EdgevitError:
        return False
    return True


def reference_kind(ref: str) -> Kind | None:
    """``"factory"`` for ``module:attr``, ``"hf"`` for something path-like or on disk, else ``None``.

    Purely syntactic (plus one ``exists`` check): nothing is imported or read.
    """
    if _FACTORY.match(ref):
        return "factory"
    if ref.startswith((".", "~")) or "/" in ref or os.sep in ref or Path(ref).exists():
        return "hf"
    return None


def is_reference(ref: str) -> bool:
    """Whether ``ref`` is meant as a Hugging Face folder or a ``module:factory`` (not a zoo name)."""
    return not is_zoo_name(ref) and reference_kind(ref) is not None


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; anything but positive integers is a one-line error."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise EdgevitError(f"malformed --input-shape '{text}': expected positive integers, e.g. 1,3,224,224")
    return tuple(int(p) for p in parts)


def split_model_list(text: str) -> list[str]:
    """``--models a,b,c`` -> names. ``module:factory`` has no comma; a folder path may: pieces are
    joined back while their join is an existing path and the piece alone is not."""
    pieces = [p.strip() for p in text.split(",")]
    models: list[str] = []
    for piece in pieces:
        joined = f"{models[-1]},{piece}" if models else ""
        if models and Path(joined).exists() and not Path(piece).exists():
            models[-1] = joined
        elif piece:
            models.append(piece)
    return models


def resolve_model(
    ref: str,
    input_shape: Sequence[int] | None = None,
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    seed: int = 0,
) -> ResolvedModel:
    """Build the model ``ref`` names (zoo name, Hugging Face folder or ``module:factory``).

    ``input_shape`` is required for a factory and overrides a folder's config; ``input_size`` replaces
    the last two dimensions (square). ``weights`` is a checkpoint loaded strictly in place of the
    reference's own weights. Construction runs under torch seed ``seed``, so it is repeatable.
    """
    if is_zoo_name(ref):
        return _resolve_zoo(ref, input_shape, weights, input_size, seed)
    kind = reference_kind(ref)
    if kind is None:
        from edgevit.registry import resolve_name

        resolve_name(ref)  # raises "unknown model 'x'; did you mean ..."
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "factory":
            return _resolve_factory(ref, input_shape, weights, input_size, seed)
        return _resolve_hf(ref, input_shape, weights, input_size, seed)


def input_shape_for(ref: str, input_shape: Sequence[int] | None, input_size: int | None = None) -> tuple[int, ...]:
    """The input shape of reference ``ref`` without building it (a folder's config is read, not run)."""
    if input_shape is None:
        if reference_kind(ref) == "factory":
            raise EdgevitError(f"'{ref}' is a module:factory reference: give its input shape, "
                               "e.g. --input-shape 1,3,224,224")
        input_shape = _hf_config_shape(_hf_folder(ref), None)
    return _with_size(tuple(input_shape), input_size)


def normalisation(ref: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-channel (mean, std) of a folder's image inputs; ``None`` for a factory. Reads no weights."""
    if reference_kind(ref) != "hf":
        return None
    folder = _hf_folder(ref)
    return _hf_normalisation(folder, _hf_config_shape(folder, None)[1])


def example_inputs(ref: str, input_shape: Sequence[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The seeded example batch :func:`resolve_model` gives ``ref`` at ``input_shape`` (without building it)."""
    norm = normalisation(ref)
    return (image_batch(tuple(input_shape), *norm, seed) if norm else _noise(tuple(input_shape), seed),)


def image_batch(shape: Sequence[int], mean: Sequence[float], std: Sequence[float], seed: int) -> torch.Tensor:
    """Seeded uniform [0, 1] pixels of ``shape`` (B, C, H, W), normalised per channel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=gen)
    view = (1, len(mean), 1, 1)
    return (x - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)


def check_forward(resolved: ResolvedModel) -> None:
    """Run the model once on its example inputs: a wrong input shape fails here, in one line."""
    try:
        with torch.no_grad():
            resolved.module(*resolved.example_inputs)
    except Exception as exc:
        shape = ",".join(map(str, resolved.input_shape))
        raise EdgevitError(f"'{resolved.name}' does not run on an input of shape {shape}: {_first_line(exc)}") from None


def fingerprint(ref: str) -> dict[str, Any]:
    """What identifies a reference's content, for caches: the reference plus a sha256 of the folder's
    config and weight files (``hf``) or of the factory module's source file (``factory``)."""
    if reference_kind(ref) == "hf":
        folder = _hf_folder(ref)
        files = [folder / "config.json", *_hf_weight_files(folder)]
        return {"reference": str(folder), "sha256": _sha256_files(files)}
    source = _module_file(ref.split(":", 1)[0])
    return {"reference": ref, "sha256": _sha256_files([source]) if source else None}


# --- zoo -----------------------------------------------------------------------------------------

def _resolve_zoo(name: str, input_shape: Sequence[int] | None, weights: str | os.PathLike | None,
                 input_size: int | None, seed: int) -> ResolvedModel:
    from edgevit.export.subject import prepare_subject  # the zoo path stays exactly export_model's

    if input_shape is not None:
        raise EdgevitError(f"--input-shape applies to a Hugging Face folder or a module:factory; "
                           f"zoo model '{name}' takes --input-size")
    subject = prepare_subject(name, None, input_size, None, seed, weights)
    info = subject.info
    return ResolvedModel(subject.model, subject.example_inputs, subject.name, "zoo", info.name, f"zoo:{info.name}",
                         info.mean, info.std, Path(weights) if weights else None, info)


# --- module:factory -----------------------------------------------------------------------------

def _resolve_factory(ref: str, input_shape: Sequence[int] | None, weights: str | os.PathLike | None,
                     input_size: int | None, seed: int) -> ResolvedModel:
    shape = input_shape_for(ref, input_shape, input_size)  # before importing: cheap errors first
    factory = _import_factory(ref)
    try:
        module = factory()
    except Exception as exc:  # the user's code raises anything
        raise EdgevitError(f"factory '{ref}' raised {_first_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise EdgevitError(f"factory '{ref}' returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_strict(module, weights)
    name = _safe_name(ref.split(":", 1)[1].split(".")[-1])
    return ResolvedModel(module.eval(), (_noise(shape, seed),), name, "factory", ref, ref,
                         weights=Path(weights) if weights else None)


def _import_factory(ref: str) -> Any:
    module_name, attr_path = ref.split(":", 1)
    # `python -m` puts the current directory first on sys.path; the `edgevit` script does not.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise EdgevitError(f"cannot import module '{module_name}' of '{ref}': no module named '{exc.name}' "
                               f"(run from the directory that holds it)") from None
        raise EdgevitError(f"importing module '{module_name}' failed: {_first_line(exc)}") from None
    except Exception as exc:
        raise EdgevitError(f"importing module '{module_name}' failed: {_first_line(exc)}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise EdgevitError(f"module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EdgevitError(f"'{ref}' is not callable (type {type(obj).__name__}): expected a function or class "
                           "returning a torch.nn.Module")
    return obj


def _module_file(module_name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module_name)
    except Exception:  # a parent package that does not import: no fingerprint, the reference still counts
        return None
    return Path(spec.origin) if spec and spec.origin and Path(spec.origin).is_file() else None


# --- Hugging Face folders -----------------------------------------------------------------------

def _resolve_hf(ref: str, input_shape: Sequence[int] | None, weights: str | os.PathLike | None,
                input_size: int | None, seed: int) -> ResolvedModel:
    folder = _hf_folder(ref)
    config = _hf_config(folder)
    shape = _with_size(tuple(input_shape) if input_shape else _hf_config_shape(folder, config), input_size)
    module = _hf_build(folder, config, weights)
    mean, std = _hf_normalisation(folder, shape[1])
    return ResolvedModel(module.eval(), (image_batch(shape, mean, std, seed),), _safe_name(folder.name), "hf",
                         str(folder), str(folder), mean, std, Path(weights) if weights else None)


def _hf_folder(ref: str) -> Path:
    folder = Path(ref).expanduser().resolve()
    if not folder.exists():
        raise EdgevitError(f"'{ref}' is neither a zoo model nor an existing folder (Hugging Face hub ids are "
                           "not downloaded: save the model with save_pretrained and pass the folder)")
    if not folder.is_dir():
        raise EdgevitError(f"'{ref}' is a file; a Hugging Face model is a folder with config.json "
                           "(model.save_pretrained(dir))")
    if not (folder / "config.json").is_file():
        raise EdgevitError(f"folder '{ref}' has no config.json: not a saved Hugging Face model "
                           "(model.save_pretrained(dir) writes one)")
    return folder


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise EdgevitError(f"a Hugging Face folder needs the Python package 'transformers': {_HF_EXTRA}") from None
    return transformers


def _hf_config(folder: Path) -> Any:
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # unknown model_type, remote code, malformed JSON, ...
        raise EdgevitError(f"transformers cannot read '{folder / 'config.json'}' offline: {_first_line(exc)}") from None


def _hf_build(folder: Path, config: Any, weights: str | os.PathLike | None) -> nn.Module:
    """The architecture named by ``config.architectures[0]``, else the image-classification or base
    Auto class; the folder's weights (or ``weights``, strictly) loaded offline."""
    transformers = _transformers()
    arch = (getattr(config, "architectures", None) or [None])[0]
    named = getattr(transformers, arch, None) if arch else None
    classes = [named] if named is not None else [transformers.AutoModelForImageClassification, transformers.AutoModel]
    problem = f"transformers has no class '{arch}'" if arch else "config.json names no architecture"
    for cls in classes:
        try:
            if weights is not None:  # the folder's own weights are replaced anyway: build, then load
                module = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
                return _load_strict(module, weights)
            return cls.from_pretrained(str(folder), local_files_only=True)
        except EdgevitError:
            raise
        except Exception as exc:
            problem = _first_line(exc)
    raise EdgevitError(f"transformers cannot build '{folder}' offline ({getattr(config, 'model_type', '?')}): "
                       f"{problem}")


def _hf_config_shape(folder: Path, config: Any) -> tuple[int, ...]:
    """(1, num_channels, H, W) from the config's ``image_size`` (or its ``vision_config``'s)."""
    raw = config.to_dict() if config is not None else json.loads((folder / "config.json").read_text())
    sources = [raw, raw.get("vision_config") or {}]
    size = next((s["image_size"] for s in sources if s.get("image_size")), None)
    channels = next((s["num_channels"] for s in sources if s.get("num_channels")), 3)
    if size is None:
        raise EdgevitError(f"'{folder / 'config.json'}' has no image_size: give --input-shape, e.g. 1,3,224,224")
    h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
    return 1, int(channels), int(h), int(w)


def _hf_normalisation(folder: Path, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``preprocessor_config.json``'s image_mean/image_std; identity if it says do_normalize: false;
    otherwise the ImageNet statistics (what most image processors use; ViT's own is 0.5/0.5, which
    its preprocessor_config.json states when present)."""
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    if pre.get("do_normalize") is False:
        return (0.0,) * channels, (1.0,) * channels
    mean, std = pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD)
    mean, std = ([mean] if isinstance(mean, (int, float)) else mean), ([std] if isinstance(std, (int, float)) else std)
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:  # e.g. ImageNet's 3 values for a 1-channel model
        return (0.5,) * channels, (0.5,) * channels
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _hf_weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in _HF_WEIGHT_SUFFIXES or p.name.endswith(".index.json")))


# --- shared -------------------------------------------------------------------------------------

def _load_strict(module: nn.Module, weights: str | os.PathLike) -> nn.Module:
    from edgevit.weights import check_state_dict, read_checkpoint

    state = read_checkpoint(weights)
    check_state_dict(module, state, str(weights))
    module.load_state_dict(state, strict=True)
    return module


def _with_size(shape: tuple[int, ...], input_size: int | None) -> tuple[int, ...]:
    if input_size is None:
        return shape
    if input_size <= 0 or len(shape) < 3:
        raise EdgevitError(f"--input-size {input_size} needs a positive size and an input shape (B, C, H, W)")
    return (*shape[:-2], input_size, input_size)


def _noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _safe_name(text: str) -> str:
    """A file-name-safe model name (it names the artifact and the default output directory)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "model"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__
