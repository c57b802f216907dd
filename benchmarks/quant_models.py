"""Small zoo-family models trained on real labelled images, to measure what quantization costs.

The images are scikit-learn's handwritten digits (1797 8x8 grey images of 10 classes, shipped inside
the scikit-learn wheel: nothing is downloaded), upscaled and written as RGB PNG files in the ImageFolder
layout, so that edgevit reads them exactly as it reads a user's folders (``--calibration``, ``--eval``).
Split (seeded): ``train`` (1000 images), ``calibration`` (300 other images of the same distribution, flat),
``eval`` (the remaining 497, one sub-folder per class).

Two configurations of zoo families, trained deterministically on 1 thread in well under a minute each:

- ``deit``: a DeiT/ViT (edgevit.models.vit.VisionTransformer) at 32x32, patch 8, DeiT-Tiny's width (192) and heads (3), depth 2
  (wide enough that weights, not graph structure, dominate the artifact: the size goals are about weights);
- ``mobilevit_v2``: edgevit.models.mobilevit_v2.MobileViTv2 at width 0.5 (mobilevit_v2_050), 64x64 input
  (at width 0.25 the graph's fixed cost, not the weights, dominated the artifacts: 0.36-0.46x at int8/w8).

:func:`trained` returns the model with its fp32 accuracy on ``eval``; a model below its stated level
(:data:`MIN_TOP1`) raises, so a broken training run is an error, never a pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgevit.export.quantization.data import Preprocessing, load_image, scan_folder

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SPLIT = {"train": 1000, "calibration": 300}  # the rest is eval
SEED = 0
MIN_TOP1 = {"deit": 90.0, "mobilevit_v2": 90.0}  # fp32 top-1 on eval the training must reach


@dataclass(frozen=True)
class Config:
    name: str
    size: int
    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    batch: int


def _deit() -> nn.Module:
    from edgevit.models.vit import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=10)


def _mobilevit_v2() -> nn.Module:
    from edgevit.models.mobilevit_v2 import MobileViTv2

    return MobileViTv2(width=0.5, num_classes=10)  # the zoo's mobilevit_v2_050, 10 classes


CONFIGS = {
    "deit": Config("deit", 32, _deit, epochs=20, lr=2e-3, batch=64),
    "mobilevit_v2": Config("mobilevit_v2", 64, _mobilevit_v2, epochs=4, lr=5e-3, batch=64),
}


def write_digits(root: Path, size: int) -> dict[str, Path]:
    """The digits as RGB PNGs of ``size`` pixels: ``train/`` and ``eval/`` (class sub-folders) and a flat
    ``calibration/``; written once per root and size."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folders = {split: root / f"digits{size}" / split for split in ("train", "calibration", "eval")}
    if all(f.is_dir() for f in folders.values()):
        return folders
    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    cut = np.cumsum([SPLIT["train"], SPLIT["calibration"]])
    parts = dict(zip(("train", "calibration", "eval"), np.split(order, cut)))
    for split, indices in parts.items():
        for i in indices:
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).convert("RGB")
            label = int(digits.target[i])
            folder = folders[split] if split == "calibration" else folders[split] / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
    return folders


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "stereo_motorcycle")  # scikit-image's RGB sample photos shipped in its wheel


def write_photos(folder: Path, count: int = 64, size: int = 256) -> Path:
    """A flat folder of ``count`` seeded random crops (1/4 to all of the shorter side) of scikit-image's
    sample photos, resized to ``size``: natural images to calibrate a zoo model with (``--calibration``)."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in PHOTOS:
        photo = getattr(data, name)()
        photos.append((name, photo[0] if isinstance(photo, tuple) else photo))
    for i in range(count):
        name, photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side, :3]).resize((size, size), Image.BILINEAR)
        crop.save(folder / f"{name}-{i:03d}.png")
    return folder


def preprocessing(size: int) -> Preprocessing:
    """How the folders are read for training, calibration and evaluation alike (whole image, no crop)."""
    return Preprocessing((size, size), 3, MEAN, STD, crop_pct=1.0, source="benchmarks/quant_models.py")


def load_labelled(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    found = scan_folder(folder, "--eval", labelled=True)
    prep = preprocessing(size)
    images = np.stack([load_image(f, prep, "--eval") for f in found.files])
    return torch.from_numpy(images), torch.tensor(found.labels)


def train(config: Config, folders: dict[str, Path]) -> nn.Module:
    """Seeded AdamW with a one-cycle schedule; deterministic on a fixed thread count."""
    torch.manual_seed(SEED)
    model = config.build()
    x, y = load_labelled(folders["train"], config.size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    steps = config.epochs * ((len(x) + config.batch - 1) // config.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(config.batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def top1(model: nn.Module, folder: Path, size: int) -> float:
    x, y = load_labelled(folder, size)
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def trained(name: str, root: Path) -> tuple[nn.Module, dict[str, Path], float]:
    """The trained model, its folders and its fp32 top-1 on eval; raises if training fell short."""
    config = CONFIGS[name]
    folders = write_digits(root, config.size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order (hence the exact weights) depends on it; 1 thread never oversubscribes a busy machine
    try:
        model = train(config, folders)
    finally:
        torch.set_num_threads(threads)
    accuracy = top1(model, folders["eval"], config.size)
    if accuracy < MIN_TOP1[name]:
        raise RuntimeError(f"{name}: fp32 top-1 {accuracy:.1f}% < {MIN_TOP1[name]}%: training is broken")
    return model, folders, accuracy


if __name__ == "__main__":
    import sys
    import tempfile

    if sys.argv[1:2] == ["photos"]:  # python benchmarks/quant_models.py photos DIR: a calibration folder
        print(write_photos(Path(sys.argv[2])))
        raise SystemExit

    with tempfile.TemporaryDirectory() as tmp:
        for key in CONFIGS:
            start = time.perf_counter()
            _, _, acc = trained(key, Path(tmp))
            params = sum(p.numel() for p in CONFIGS[key].build().parameters())
            print(f"{key}: top-1 {acc:.2f}% params {params} in {time.perf_counter() - start:.1f} s")
