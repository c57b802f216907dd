"""Calibration and evaluation data: a user's images (or tensors), preprocessed the way the model expects.

``--calibration DIR`` is a folder of images, flat or in class sub-folders, or a ``.npz`` file of inputs
already preprocessed (array ``arr_j`` stacks input ``j`` of every sample on a leading axis: shape
``(samples, *input_shape)``; :func:`write_seeded_calibration` writes one of seeded images, which is what
``edgevit bench`` and ``edgevit inspect`` calibrate with when they are given no data: the values decide
the scales, never the kernels, so speed and placement do not depend on them). ``--eval DIR`` is a labelled
folder in the ImageFolder layout (one sub-folder per class, classes in sorted order = label indices).
Images become float32 NCHW batches shaped like the model's example input:

1. decoded with Pillow; an image the model cannot take is an error, never silently fixed: grey-scale
   images for a 3-channel model (converting them would invent colour), unreadable files;
2. resized so the shorter side is ``size / crop_pct`` (bilinear), then centre-cropped to ``size``
   (``crop_pct`` 0.875 is the usual ImageNet evaluation transform; 1.0 resizes the whole image to size);
3. scaled to [0, 1] and normalised per channel: ``(x - mean) / std``.

The mean/std come from the model's metadata (zoo entry, a Hugging Face folder's preprocessor), or
from the caller (``--mean``/``--std``, API arguments); a model without any is fed [0, 1] pixels and the
manifest says "no normalisation known". The Python API also takes tensors directly: an iterable of input
tensors (or tuples of them) for calibration, of ``(inputs, label)`` pairs for evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgevit.errors import EdgevitError

_log = logging.getLogger("edgevit.quantization")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_CROP_PCT = 0.875
MIN_CALIBRATION = 32  # fewer images calibrate activation ranges poorly: warn with the count
HOLDOUT_EVERY = 8  # every 8th calibration sample is held out to judge the artifact (when >= 16 samples)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")

Sample = list[np.ndarray]  # one model call's inputs, in order


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes one model input (C, H, W), float32."""

    size: tuple[int, int]  # H, W
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = DEFAULT_CROP_PCT
    source: str = ""  # where mean/std came from, for the manifest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"resize": f"shorter side to size/{self.crop_pct:g}, bilinear; centre crop"}

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image

        h, w = self.size
        scale = max(h / image.height, w / image.width) / self.crop_pct
        resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                               Image.BILINEAR)
        left, top = (resized.width - w) // 2, (resized.height - h) // 2
        pixels = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return ((chw - mean) / std).astype(np.float32)


def preprocessing_for(example_inputs: Sequence[Any], mean: Sequence[float] | None, std: Sequence[float] | None,
                      crop_pct: float | None, source: str, flag: str) -> Preprocessing:
    """The preprocessing of a model whose single input is an image batch like ``example_inputs[0]``."""
    if len(example_inputs) != 1 or len(example_inputs[0].shape) != 4 or example_inputs[0].shape[1] not in (1, 3):
        shapes = [list(t.shape) for t in example_inputs]
        raise EdgevitError(f"{flag} DIR feeds images to a model with one (N, 1|3, H, W) input; this one takes "
                           f"{shapes}: pass calibration tensors through the Python API instead")
    _, channels, h, w = example_inputs[0].shape
    if mean is None or std is None:
        mean, std, source = (0.0,) * channels, (1.0,) * channels, "no normalisation known: [0, 1] pixels"
    mean, std = _per_channel(mean, channels, "--mean"), _per_channel(std, channels, "--std")
    if any(s <= 0 for s in std):
        raise EdgevitError(f"--std must be positive, got {','.join(f'{s:g}' for s in std)}")
    crop = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
    if not 0.05 <= crop <= 1.0:
        raise EdgevitError(f"--crop-pct must be in (0.05, 1], got {crop:g}")
    return Preprocessing((int(h), int(w)), int(channels), mean, std, crop, source)


def _per_channel(values: Sequence[float], channels: int, flag: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise EdgevitError(f"{flag} needs 1 or {channels} values (the model has {channels} channels), "
                           f"got {len(values)}")
    return values


# --- folders ---------------------------------------------------------------------------------------

@dataclass
class ImageFolder:
    """The image files of a folder; ``classes`` (sorted sub-folder names) when it is labelled."""

    root: Path
    files: list[Path]
    labels: list[int] | None
    classes: list[str] | None


def scan_folder(path: str | Path, flag: str, labelled: bool) -> ImageFolder:
    """The images of ``path``: flat or one level of class sub-folders (``labelled``: sub-folders required)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise EdgevitError(f"{flag} {root}: no such folder")
    if not root.is_dir():
        raise EdgevitError(f"{flag} {root}: not a folder (give a folder of images)")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat = _images_in(root)
    if labelled:
        if not subdirs:
            raise EdgevitError(f"{flag} {root}: no class sub-folders (ImageFolder layout: one sub-folder of "
                               "images per class)")
        files, labels = [], []
        for label, d in enumerate(subdirs):
            images = _images_in(d)
            if not images:
                raise EdgevitError(f"{flag} {root}: class folder '{d.name}' has no images")
            files += images
            labels += [label] * len(images)
        return ImageFolder(root, files, labels, [d.name for d in subdirs])
    files = flat + [f for d in subdirs for f in _images_in(d)]
    if not files:
        raise EdgevitError(f"{flag} {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return ImageFolder(root, files, None, None)


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path, prep: Preprocessing, flag: str) -> np.ndarray:
    """One image as a (C, H, W) float32 input, or a one-line error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if prep.channels == 3 and mode in _GREY_MODES:
                raise EdgevitError(f"{flag}: {path} is a grey-scale image ({mode}) and the model takes 3 channels; "
                                   "convert the images to RGB")
            return prep(image.convert("RGB" if prep.channels == 3 else "L"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EdgevitError(f"{flag}: cannot read {path} as an image ({type(exc).__name__})") from None


def load_batches(files: Sequence[Path], prep: Preprocessing, batch: int, flag: str) -> list[Sample]:
    """Images stacked into batches of the model's batch size (a trailing partial batch is dropped)."""
    images = [load_image(f, prep, flag) for f in files]
    return [[np.stack(images[i:i + batch])] for i in range(0, len(images) - batch + 1, batch)]


# --- what the pipeline gets --------------------------------------------------------------------------

@dataclass
class CalibrationSet:
    """Samples to calibrate with, samples held out to judge the artifact, and where they came from."""

    samples: list[Sample]
    heldout: list[Sample]
    record: dict[str, Any]


@dataclass
class EvaluationSet:
    """Labelled samples (one label per batch element) and where they came from."""

    samples: list[Sample]
    labels: np.ndarray  # (total images,)
    record: dict[str, Any]


def calibration_set(source: Any, example_inputs: Sequence[Any], prep: Preprocessing | None) -> CalibrationSet:
    """Calibration samples from a folder (``prep`` required), a ``.npz`` of preprocessed inputs, or an
    iterable of tensors / tuples of them."""
    if is_npz(source):
        samples = [_as_sample(list(arrays), example_inputs, f"--calibration {source}")
                   for arrays in zip(*load_npz_inputs(source))]
        record = {"source": str(Path(source).resolve()), "images": len(samples), "preprocessing": None}
    elif isinstance(source, (str, Path)):
        folder = scan_folder(source, "--calibration", labelled=False)
        samples = load_batches(folder.files, prep, example_inputs[0].shape[0], "--calibration")
        record = {"source": str(folder.root), "images": len(folder.files), "preprocessing": prep.to_dict()}
    else:
        samples = [_as_sample(item, example_inputs, "calibration") for item in source]
        record = {"source": "tensors (Python API)", "images": len(samples), "preprocessing": None}
    if not samples:
        raise EdgevitError("calibration data is empty: give at least one sample")
    if record["images"] < MIN_CALIBRATION:
        _log.warning("only %d calibration images: activation ranges from fewer than %d are unreliable",
                     record["images"], MIN_CALIBRATION)
        record["warning"] = f"only {record['images']} calibration images (< {MIN_CALIBRATION})"
    heldout = samples[HOLDOUT_EVERY - 1::HOLDOUT_EVERY] if len(samples) >= 2 * HOLDOUT_EVERY else []
    used = [s for i, s in enumerate(samples) if not heldout or (i + 1) % HOLDOUT_EVERY]
    record |= {"calibrated_on": len(used), "held_out": len(heldout)}
    return CalibrationSet(used, heldout, record)


def evaluation_set(source: Any, example_inputs: Sequence[Any], prep: Preprocessing | None,
                   num_classes: int) -> EvaluationSet:
    """Labelled samples from an ImageFolder (``prep`` required) or an iterable of ``(inputs, label)``."""
    if isinstance(source, (str, Path)):
        folder = scan_folder(source, "--eval", labelled=True)
        if len(folder.classes) != num_classes:
            raise EdgevitError(f"--eval {folder.root}: {len(folder.classes)} class folders, but the model outputs "
                               f"{num_classes} scores")
        batch = example_inputs[0].shape[0]
        samples = load_batches(folder.files, prep, batch, "--eval")
        labels = np.asarray(folder.labels[:len(samples) * batch])
        record = {"source": str(folder.root), "images": len(labels), "classes": folder.classes,
                  "preprocessing": prep.to_dict()}
    else:
        samples, labels = [], []
        for item in source:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise EdgevitError("evaluation must be (inputs, label) pairs")
            samples.append(_as_sample(item[0], example_inputs, "evaluation"))
            labels += np.atleast_1d(np.asarray(item[1])).astype(np.int64).tolist()
        labels = np.asarray(labels)
        record = {"source": "tensors (Python API)", "images": len(labels), "preprocessing": None}
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise EdgevitError(f"evaluation labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    if not samples:
        raise EdgevitError("evaluation data is empty: give at least one labelled sample")
    return EvaluationSet(samples, labels, record)


def is_npz(source: Any) -> bool:
    return isinstance(source, (str, Path)) and str(source).lower().endswith(".npz")


def load_npz_inputs(path: str | Path) -> list[np.ndarray]:
    """The stacked inputs of a calibration ``.npz`` (``arr_0``, ``arr_1``... in order), checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgevitError(f"--calibration {path}: no such file")
    try:
        with np.load(path) as data:
            arrays = [data[f"arr_{j}"] for j in range(len(data.files))]
    except (OSError, ValueError, KeyError) as exc:
        raise EdgevitError(f"--calibration {path}: not a .npz of arrays arr_0, arr_1... ({type(exc).__name__})") from None
    if not arrays or len({a.shape[0] if a.ndim else -1 for a in arrays}) != 1 or arrays[0].ndim == 0:
        raise EdgevitError(f"--calibration {path}: give one array per input, samples on the leading axis")
    return arrays


def check_calibration_source(source: str | Path) -> None:
    """A ``--calibration`` path, checked before any work: a readable .npz of inputs, or a folder with images."""
    if is_npz(source):
        load_npz_inputs(source)
    else:
        scan_folder(source, "--calibration", labelled=False)


def write_seeded_calibration(example_inputs: Sequence[Any], samples: list[Sequence[Any]], path: Path) -> Path:
    """``samples`` (each one model call's tensors, shaped like ``example_inputs``) as a calibration .npz."""
    arrays = [np.stack([_as_sample(list(s), example_inputs, "seeded calibration")[j] for s in samples])
              for j in range(len(example_inputs))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.npz")
    np.savez(tmp, *arrays)
    tmp.replace(path)
    return path


def _as_sample(item: Any, example_inputs: Sequence[Any], what: str) -> Sample:
    """One model call's inputs as float32 arrays shaped like the example inputs."""
    import torch

    tensors = item if isinstance(item, (tuple, list)) else (item,)
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in tensors]
    expected = [tuple(t.shape) for t in example_inputs]
    if [a.shape for a in arrays] != expected:
        raise EdgevitError(f"{what} sample shapes {[list(a.shape) for a in arrays]} differ from the model's "
                           f"inputs {[list(s) for s in expected]}")
    return [a.astype(e.detach().cpu().numpy().dtype) for a, e in zip(arrays, example_inputs)]


SEEDED_CALIBRATION = 32  # seeded samples when the bench or inspect is given no calibration data
SEEDED_FIRST_SEED = 1000  # far from the parity inputs' seeds (1...)


def seeded_calibration(model: str, input_size: int | None, input_shape: Sequence[int] | None, path: Path,
                       count: int = SEEDED_CALIBRATION) -> Path:
    """A calibration ``.npz`` of ``count`` seeded inputs for ``model`` (a zoo name or a reference), made
    like the parity inputs: for measuring speed and placement, which the values do not decide."""
    import torch

    from edgevit.export.subject import prepare_subject, seeded_inputs

    example = torch.zeros(tuple(input_shape)) if input_shape else None
    subject = prepare_subject(model, example, input_size, None, 0)
    seeds = range(SEEDED_FIRST_SEED, SEEDED_FIRST_SEED + count)
    return write_seeded_calibration(subject.example_inputs, seeded_inputs(subject, seeds), path)
