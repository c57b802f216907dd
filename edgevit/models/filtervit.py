"""FilterViT (a.k.a. FilterMobileViT) and DropoutViT (Bohang Sun, Bo Chen; arXiv 2410.22709).

Spec section 5. A MobileNet-style CNN whose attention stages see only K pixels of a high-resolution
map: FilterViT scores every pixel with a small CNN (the "Filter Block"), gates the map by the score and
runs a transformer on the top-K pixels; DropoutViT picks the K pixels at random instead. The transformer
output is written back into the map at the same positions.

Faithful to the author's code (``BobSun98/FilterVIT`` ``v4.5/models``, spec 5.1/5.2) with these
export-oriented reformulations, each tested for equivalence in ``tests/test_zoo_filtervit.py``:

* Selection is static-K ``topk`` -> ``gather`` -> transformer -> ``scatter`` on the flattened H*W axis.
  The author builds a boolean top-K mask, gathers with ``nonzero`` (raster order) and writes back with
  ``index_put``; both give the same map because the transformer is permutation-equivariant and the
  positional code is gathered with the same indices (spec 5.1, 13).
* Attention is a rank-4 re-implementation of ``nn.MultiheadAttention`` (the author's
  ``nn.TransformerEncoderLayer`` decomposes its packed in-projection into rank-5 tensors on export).
  It keeps the PyTorch parameter names (``self_attn.in_proj_weight``, ``self_attn.out_proj``, ``linear1``,
  ``norm1``...), so the whole state dict uses the author's keys and a checkpoint trained with the
  author's code loads without mapping (none is published, spec 11.1).
* DropoutViT's ``randperm`` runs only in training mode; in eval mode the K positions of each block are a
  fixed buffer drawn once from ``seed`` at construction (the author re-draws on every call, also in eval,
  spec 5.1 -- non-deterministic inference that no export can represent).
* Integer-ratio "up-sampling" by ``AdaptiveAvgPool2d`` (11->110, 11->55, 7->28 in the xs models) is done
  by nearest interpolation, bit-exact for integer ratios (spec 0.1, 5.4). Non-integer ratios (xxs:
  110->20->110) keep the faithful adaptive pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import PackedMultiheadAttention, make_divisible
from edgevit.registry import ModelInfo, register_model

_PAPER = "FilterViT and DropoutViT (v3: FilterMobileViT and DropoutVIT) (arXiv 2410.22709)"
_MEAN_STD = (0.5, 0.5, 0.5)  # the author's training transforms: Normalize([0.5] * 3, [0.5] * 3)
_STEM_OUT = 110  # 224 -> 110 by the unpadded 5x5 stride-2 stem; the xs models resample to it at other sizes
# K, the number of selected pixels, is a lookup on the map side (the author's ``self.dict``, spec 5.1).
TOKENS_FOR_SIDE = {110: 768, 55: 256, 28: 128}


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """1-D sinusoidal code (length, dim): sin on even, cos on odd channels, base 10000 (spec 5.1)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


def resize_like_adaptive_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``, as nearest interpolation when it up-samples by an integer ratio.

    For an integer ratio r every adaptive-pool bin holds exactly one input pixel (bin i spans
    [floor(i/r), ceil((i+1)/r)) = {floor(i/r)}), which is nearest interpolation -- bit-exact (spec 0.1, 5.4).
    """
    side = x.shape[-1]
    if size > side and size % side == 0:
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.adaptive_avg_pool2d(x, size)


# --- convolutions (author's conv_layer.py; module names kept for its key layout) -----------------------


class ConvLayer(nn.Module):
    """Conv (no bias, 'same' padding) + BN + optional SiLU; keys ``block.conv``, ``block.norm``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2,
                                                groups=groups, bias=False))
        self.block.add_module("norm", nn.BatchNorm2d(out_chs))
        if act:
            self.block.add_module("act", nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped if e=1) -> DW 3x3 stride s -> 1x1 project (spec 5.1 "IR")."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = make_divisible(int(round(in_chs * expand_ratio)), 8)
        self.block = nn.Sequential()
        if expand_ratio != 1:
            self.block.add_module("exp_1x1", ConvLayer(in_chs, hidden, 1))
        self.block.add_module("conv_3x3", ConvLayer(hidden, hidden, 3, stride, groups=hidden))
        self.block.add_module("red_1x1", ConvLayer(hidden, out_chs, 1, act=False))
        self.use_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class StemConv(nn.Module):
    """Conv k5 stride 2 *without padding* (with bias) + BN + LeakyReLU(0.1): 224 -> 110 (author ConvBlock)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_chs, out_chs, 5, 2), nn.BatchNorm2d(out_chs), nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x)


class FilterConv(nn.Module):
    """The Filter Block's score CNN: Conv C->1, k7 dilation 5 padding 15 (31x31 field) + BN + GELU."""

    def __init__(self, in_chs: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_chs, 1, 7, padding=15, dilation=5), nn.BatchNorm2d(1), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x)


# --- transformer (PyTorch nn.TransformerEncoderLayer semantics, rank <= 4) -----------------------------


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(d_model, nhead, ff, batch_first=True)`` defaults: post-norm, ReLU,
    dropout 0.1, LayerNorm eps 1e-5 (spec 5.1); the same submodule names, so its state dict loads."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = PackedMultiheadAttention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def _encoder(dim: int, num_heads: int, ff_dim: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[EncoderLayer(dim, num_heads, ff_dim) for _ in range(depth)])


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _to_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, side, side)


# --- pixel-selection attention ----------------------------------------------------------------------


def attend_selected(x: torch.Tensor, index: torch.Tensor, position: torch.Tensor, trans: nn.Module) -> torch.Tensor:
    """Run ``trans`` on the pixels ``index`` (B, K) of ``x`` (B, C, H, W) and write them back.

    Static-K form of the author's nonzero/index_put selection (spec 5.1): gather the K pixels plus
    their positional code, transform, scatter into the flattened map (overwrite; the encoder layer's own
    residual carries the input). Non-selected pixels pass unchanged.
    """
    b, c, h, w = x.shape
    flat = x.flatten(2)  # (B, C, HW)
    index_c = index.unsqueeze(1).expand(-1, c, -1)  # (B, C, K)
    tokens = flat.gather(2, index_c).transpose(1, 2)  # (B, K, C)
    tokens = tokens + position.index_select(0, index.reshape(-1)).reshape(b, -1, c)
    tokens = trans(tokens)
    return flat.scatter(2, index_c, tokens.transpose(1, 2)).reshape(b, c, h, w)


class _SelectionAttention(nn.Module):
    """Shared state of the two selection attentions: K, the encoder and the positional-code buffer."""

    def __init__(self, dim: int, num_heads: int, side: int, depth: int, expand_ratio: float) -> None:
        super().__init__()
        if side not in TOKENS_FOR_SIDE:
            raise ValueError(f"FilterViT selects pixels only on {sorted(TOKENS_FOR_SIDE)}-sided maps, got {side}")
        self.side = side
        self.num_tokens = TOKENS_FOR_SIDE[side]
        self.trans = _encoder(dim, num_heads, int(expand_ratio * dim), depth)
        # Fixed code over the raster index of the current map; not in the author's state dict.
        self.register_buffer("position", sinusoid_table(side * side, dim), persistent=False)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-2:] != (self.side, self.side):
            raise ValueError(f"expected a {self.side}x{self.side} map, got {tuple(x.shape[-2:])}")


class FilterAttention(_SelectionAttention):
    """Filter attention (author ``LeakyAttention``): score CNN, soft gate, top-K pixels through a transformer.

    s = sigmoid(FilterConv(x)); x <- x * s (the gate gives the filter its gradient); the K highest-scoring
    pixels of each image get the transformer (spec 5.1 steps 1-6).
    """

    def __init__(self, dim: int, num_heads: int, side: int, depth: int = 1, expand_ratio: float = 2) -> None:
        super().__init__(dim, num_heads, side, depth, expand_ratio)
        self.conv = FilterConv(dim)
        self.sigmoid = nn.Sigmoid()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The salient mask s (B, 1, H, W) in (0, 1)."""
        return self.sigmoid(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        score = self.scores(x)
        index = score.flatten(1).topk(self.num_tokens, dim=1).indices  # (B, K), static K
        return attend_selected(x * score, index, self.position, self.trans)


class RandomAttention(_SelectionAttention):
    """DropoutViT attention (author ``DropAttention``): K random pixels, the same for the whole batch.

    Training: a fresh uniform draw per call from this block's own generator (seeded, so runs repeat).
    Eval: the fixed ``eval_index`` buffer drawn once from ``generator`` at construction -- deterministic
    and export-stable (no randperm in the graph). Indices are kept sorted (raster order), the order the
    author's ``nonzero`` gather produces. No filter CNN and no gating (spec 5.1).
    """

    def __init__(self, dim: int, num_heads: int, side: int, generator: torch.Generator, depth: int = 1,
                 expand_ratio: float = 2) -> None:
        super().__init__(dim, num_heads, side, depth, expand_ratio)
        self.sigmoid = nn.Sigmoid()  # unused, as in the author's code; no parameters
        # Drawn on the CPU with an explicit generator (works inside a meta-device build), then moved to the
        # device factories default to here, so meta builds get meta buffers.
        index = self._draw(generator)
        self.register_buffer("eval_index", index.to(torch.empty(()).device))
        seed = int(torch.randint(2**62, (1,), generator=generator, device="cpu"))
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        perm = torch.randperm(self.side * self.side, generator=generator, device="cpu")
        return perm[: self.num_tokens].sort().values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        index = self._draw(self.generator).to(x.device) if self.training else self.eval_index
        return attend_selected(x, index.unsqueeze(0).expand(x.shape[0], -1), self.position, self.trans)


class SelectionBlock(nn.Module):
    """Selection attention -> IR(C -> C', stride s, e) (author ``LeakyConvFormerBlock`` / ``DropOutBlock``)."""

    def __init__(self, attention: _SelectionAttention, in_chs: int, out_chs: int, stride: int,
                 expand_ratio: float) -> None:
        super().__init__()
        self.leaky_attention = attention
        self.conv_block = InvertedResidual(in_chs, out_chs, stride, expand_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(self.leaky_attention(x))


# --- the two global attention blocks -----------------------------------------------------------------


class PooledAttentionBlock(nn.Module):
    """Pooled global attention (author ``FirstConvFormerBlock``, spec 5.1).

    Y = pool(X) to grid x grid, + 1-D positional code, transformer, resize back to X's side (adaptive
    pool in the author's code), X + Y, then IR(C -> C', stride 2, e).
    """

    def __init__(self, in_chs: int, out_chs: int, num_heads: int, grid: int, depth: int = 1,
                 expand_ratio: float = 2) -> None:
        super().__init__()
        self.trans = _encoder(in_chs, num_heads, int(expand_ratio * in_chs), depth)
        self.conv = InvertedResidual(in_chs, out_chs, 2, expand_ratio)
        self.avg = nn.AdaptiveAvgPool2d(grid)
        self.grid = grid
        self.register_buffer("position", sinusoid_table(grid * grid, in_chs), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trans(_to_tokens(self.avg(x)) + self.position)
        x = x + resize_like_adaptive_pool(_to_map(y, self.grid), x.shape[-1])
        return self.conv(x)


class FullAttentionBlock(nn.Module):
    """X + Attention over all H*W tokens (no positional code), then IR(C -> C', stride 2, e=2)
    (author ``ConvFormerBlock`` with reduce=1, spec 5.1).

    The outer residual X + T(X) is not in the spec's description but is what the author's code computes:
    its ``if self.reduce != 1`` test compares the module that replaced the integer ``reduce``
    (``nn.Identity``) with 1, which is always true, so the block input is always added back.
    """

    def __init__(self, in_chs: int, out_chs: int, num_heads: int, depth: int = 1, expand_ratio: float = 2) -> None:
        super().__init__()
        self.trans = _encoder(in_chs, num_heads, int(expand_ratio * in_chs), depth)
        self.conv = InvertedResidual(in_chs, out_chs, 2, expand_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + _to_map(self.trans(_to_tokens(x)), x.shape[-1]))


# --- the network ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One block: kind 'pool' (PooledAttentionBlock), 'select' (Filter/Random attention + IR) or 'full'."""

    kind: str
    in_chs: int
    out_chs: int
    num_heads: int
    stride: int = 1  # 'select' only; 'pool' and 'full' always halve the map
    expand_ratio: float = 2
    grid: int = 0  # 'pool' only


@dataclass(frozen=True)
class Config:
    """A ``ConvFormer_*`` variant (spec 5.2)."""

    stem_chs: int
    stem_expand: float
    resample_stem: bool  # xs: AdaptiveAvgPool2d(110) after the stem (identity at 224)
    first: Stage | None  # xxs: a separate ``first_ConvFormer`` block before the selection stages
    stages: tuple[Stage, ...]
    tail: tuple[Stage, ...]
    head_in: int
    head_hidden: int


def _out_side(side: int, stride: int) -> int:
    return (side - 1) // stride + 1  # 3x3 convolution, padding 1


class FilterViT(nn.Module):
    """``ConvFormer_*`` classifier with filter (``selection='filter'``) or random (``'random'``) selection.

    Module names mirror the author's (``first_conv``, ``first_ConvFormer``, ``leaky_att_network``,
    ``network``, ``mlp_head``), so its state-dict layout is the author's.
    """

    def __init__(self, cfg: Config, img_size: int = 224, num_classes: int = 1000, selection: str = "filter",
                 seed: int = 0) -> None:
        super().__init__()
        if selection not in ("filter", "random"):
            raise ValueError(f"selection must be 'filter' or 'random', got {selection!r}")
        side = (img_size - 5) // 2 + 1
        if side != _STEM_OUT and not cfg.resample_stem:
            raise ValueError(f"this FilterViT variant takes 223-224 px inputs only (stem map {side}, needs 110)")
        # The author's AdaptiveAvgPool2d((110, 110)) is the identity at 224; elsewhere it resamples (a
        # non-integer ratio: export hazard, spec 0.1) -- kept faithful.
        resample: nn.Module = nn.AdaptiveAvgPool2d(_STEM_OUT) if side != _STEM_OUT else nn.Identity()
        layers = [StemConv(3, cfg.stem_chs), InvertedResidual(cfg.stem_chs, cfg.stem_chs, 1, cfg.stem_expand)]
        self.first_conv = nn.Sequential(*layers, resample) if cfg.resample_stem else nn.Sequential(*layers)
        side = _STEM_OUT
        self._generator = torch.Generator().manual_seed(seed)
        if cfg.first is not None:
            self.first_ConvFormer, side = self._block(cfg.first, side, selection)
        self.leaky_att_network, side = self._sequence(cfg.stages, side, selection)
        self.network, side = self._sequence(cfg.tail, side, selection)
        del self._generator
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.mlp_head = nn.Sequential(
            nn.Linear(cfg.head_in, cfg.head_hidden), nn.GELU(), nn.Dropout(0.5), nn.Linear(cfg.head_hidden, num_classes)
        )

    def _sequence(self, stages: tuple[Stage, ...], side: int, selection: str) -> tuple[nn.Sequential, int]:
        blocks = []
        for stage in stages:
            block, side = self._block(stage, side, selection)
            blocks.append(block)
        return nn.Sequential(*blocks), side

    def _block(self, s: Stage, side: int, selection: str) -> tuple[nn.Module, int]:
        if s.kind == "pool":
            pooled = PooledAttentionBlock(s.in_chs, s.out_chs, s.num_heads, s.grid, expand_ratio=s.expand_ratio)
            return pooled, _out_side(side, 2)
        if s.kind == "full":
            return FullAttentionBlock(s.in_chs, s.out_chs, s.num_heads, expand_ratio=s.expand_ratio), _out_side(side, 2)
        if selection == "filter":
            attn: _SelectionAttention = FilterAttention(s.in_chs, s.num_heads, side, expand_ratio=s.expand_ratio)
        else:
            attn = RandomAttention(s.in_chs, s.num_heads, side, self._generator, expand_ratio=s.expand_ratio)
        return SelectionBlock(attn, s.in_chs, s.out_chs, s.stride, s.expand_ratio), _out_side(side, s.stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        if hasattr(self, "first_ConvFormer"):
            x = self.first_ConvFormer(x)
        return self.network(self.leaky_att_network(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.avg(self.forward_features(x)).flatten(1))


# --- variants (author ``v4.5/models/convformer.py``, spec 5.2) -------------------------------------------

_XS = Config(
    stem_chs=64, stem_expand=3, resample_stem=True, first=None,
    stages=(
        Stage("pool", 64, 128, 2, grid=11),  # 110 -> 55
        Stage("select", 128, 128, 4, expand_ratio=3),  # 55, K=256
        Stage("pool", 128, 128, 2, grid=11),  # 55 -> 28
        Stage("select", 128, 128, 4, expand_ratio=3),  # 28, K=128
        Stage("select", 128, 128, 4, expand_ratio=3),
        Stage("pool", 128, 128, 2, grid=7),  # 28 -> 14
    ),
    tail=(Stage("full", 128, 128, 8), Stage("full", 128, 256, 8)),  # 14 -> 7 -> 4
    head_in=256, head_hidden=384,
)

_XXS = Config(
    stem_chs=64, stem_expand=2, resample_stem=False,
    first=Stage("pool", 64, 64, 2, grid=20),  # 110 -> 20 -> 110 (non-integer adaptive pools), then -> 55
    stages=(
        Stage("select", 64, 64, 2),  # 55, K=256
        Stage("select", 64, 64, 4, stride=2),  # 55 -> 28
        Stage("select", 64, 128, 4),  # 28, K=128
        Stage("select", 128, 128, 4),
    ),
    tail=(Stage("full", 128, 128, 8), Stage("full", 128, 128, 8)),  # 28 -> 14 -> 7
    head_in=128, head_hidden=384,
)


def _extra(cfg: Config) -> dict:
    return {"tokens_per_side": dict(TOKENS_FOR_SIDE), "stem_chs": cfg.stem_chs, "head_hidden": cfg.head_hidden}


@register_model(ModelInfo(
    name="filtervit_xs", family="filtervit", paper=_PAPER, input_size=224, input_multiple=1,
    mean=_MEAN_STD, std=_MEAN_STD, aliases=("convformer_xs", "filtermobilevit_xs"),
    notes="author's ConvFormer_xs; other input sizes are resampled to 110x110 after the stem",
    extra=_extra(_XS),
))
def filtervit_xs(img_size: int = 224, num_classes: int = 1000) -> FilterViT:
    """FilterViT-xs (``ConvFormer_xs``): 2.24 M params, 1.38 GMACs at 224 (spec 5.2)."""
    return FilterViT(_XS, img_size, num_classes, selection="filter")


@register_model(ModelInfo(
    name="filtervit_xxs", family="filtervit", paper=_PAPER, input_size=224, input_multiple=224,
    mean=_MEAN_STD, std=_MEAN_STD, aliases=("convformer_xxs",),
    notes="author's ConvFormer_xxs; 224 px only (no stem resampling); 110->20->110 adaptive pools",
    extra=_extra(_XXS),
))
def filtervit_xxs(img_size: int = 224, num_classes: int = 1000) -> FilterViT:
    """FilterViT-xxs (``ConvFormer_xxs``): 1.29 M params, 1.01 GMACs at 224 (spec 5.2)."""
    return FilterViT(_XXS, img_size, num_classes, selection="filter")


def dropoutvit_checkpoint_filter(state: dict, model: nn.Module) -> dict:
    """Author-layout state dicts lack the eval index buffers: take them from ``model`` (its seed)."""
    state = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith("eval_index") and key not in state:
            state[key] = value
    return state


@register_model(ModelInfo(
    name="dropoutvit_xs", family="dropoutvit", paper=_PAPER, input_size=224, input_multiple=1,
    mean=_MEAN_STD, std=_MEAN_STD, aliases=("dropoutvit", "dropout_vit_xs"),
    notes="author's DropOutVIT_xs; eval uses fixed seeded pixel sets (author re-draws every call)",
    extra={**_extra(_XS), "seed": 0}, checkpoint_filter=dropoutvit_checkpoint_filter,
))
def dropoutvit_xs(img_size: int = 224, num_classes: int = 1000, seed: int = 0) -> FilterViT:
    """DropoutViT-xs (``DropOutVIT_xs``): FilterViT-xs with random pixel selection; 2.22 M params."""
    return FilterViT(_XS, img_size, num_classes, selection="random", seed=seed)
