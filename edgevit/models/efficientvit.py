"""EfficientViT (Microsoft/CUHK; Liu et al., CVPR 2023, arXiv 2305.07027): M0 ... M5.

Memory-efficient "sandwich" blocks (DW conv, FFN, one cascaded-group attention, DW conv, FFN), all
norms BatchNorm and all activations ReLU, so every Conv+BN folds at inference (reference section 4).
Not the MIT Han-lab EfficientViT (section 4.5).

Key layout is timm's ``efficientvit_m*`` (section 4.4): ``patch_embed.conv{1-4}``,
``stages.i.downsample.{res1,patchmerge,res2}``, ``stages.i.blocks.j.{dw0,ffn0,mixer,dw1,ffn1}.m``,
``head.{bn,linear}``; the attention-bias index is a non-persistent buffer. :func:`checkpoint_filter`
maps the official ``microsoft/Cream`` layout onto it.

Export notes: window partition uses successive rank-4 reshapes instead of the reference's rank-6 view
(section 4.3); the bias-table gather is an ``index_select`` on a constant index buffer; softmax is on
the last axis of rank-3 maps.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.registry import ModelInfo, register_model

_PAPER = "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention (arXiv 2305.07027)"
KEY_DIM = 16
WINDOW = 7
PATCH = 16

# Section 4.2 variant table (Cream ``build.py``, same in timm).
VARIANTS: dict[str, dict] = {
    "m0": {"dims": (64, 128, 192), "depths": (1, 2, 3), "heads": (4, 4, 4), "kernels": (5, 5, 5, 5)},
    "m1": {"dims": (128, 144, 192), "depths": (1, 2, 3), "heads": (2, 3, 3), "kernels": (7, 5, 3, 3)},
    "m2": {"dims": (128, 192, 224), "depths": (1, 2, 3), "heads": (4, 3, 2), "kernels": (7, 5, 3, 3)},
    "m3": {"dims": (128, 240, 320), "depths": (1, 2, 3), "heads": (4, 3, 4), "kernels": (5, 5, 5, 5)},
    "m4": {"dims": (128, 256, 384), "depths": (1, 2, 3), "heads": (4, 4, 4), "kernels": (7, 5, 3, 3)},
    "m5": {"dims": (192, 288, 384), "depths": (1, 3, 4), "heads": (3, 3, 4), "kernels": (7, 5, 3, 3)},
}


class ConvNorm(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d (official ``Conv2d_BN``); ``bn_weight_init=0`` zeroes a branch."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        if not self.bn.weight.is_meta:
            nn.init.constant_(self.bn.weight, bn_weight_init)
            nn.init.zeros_(self.bn.bias)


class NormLinear(nn.Module):
    """BatchNorm1d + Linear classifier (official ``BN_Linear``); keys ``bn.*``, ``linear.*``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)
        if not self.linear.weight.is_meta:
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


class Residual(nn.Module):
    """x + m(x) (stochastic depth is a training-only detail and is omitted)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class ConvMlp(nn.Module):
    """FFN as 1x1 Conv+BN -> ReLU -> 1x1 Conv+BN (last BN gamma initialised to 0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """SE gate: mean pool -> 1x1 (bias) -> ReLU -> 1x1 (bias) -> sigmoid, multiplied onto x."""

    def __init__(self, chs: int, rd_chs: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(chs, rd_chs, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_chs, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class PatchMerging(nn.Module):
    """1x1 expand x4 + ReLU, 3x3 DW stride 2 + ReLU, SE (rd = 0.25 * 4C), 1x1 project (section 4.1)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = dim * 4
        self.conv1 = ConvNorm(dim, hidden)
        self.act1 = nn.ReLU()
        self.conv2 = ConvNorm(hidden, hidden, 3, stride=2, groups=hidden)
        self.act2 = nn.ReLU()
        self.se = SqueezeExcite(hidden, hidden // 4)
        self.conv3 = ConvNorm(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))


def attention_bias_index(resolution: int) -> torch.Tensor:
    """(N, N) index into a LeViT bias table: offset (|dr|, |dc|) -> |dr| * resolution + |dc|.

    This is the numbering the official dict-of-offsets produces (offsets are first met in row-major
    order along the first query row), written in closed form so it also runs on the meta device.
    """
    pos = torch.arange(resolution * resolution)
    row, col = pos // resolution, pos % resolution
    return (row[:, None] - row[None, :]).abs() * resolution + (col[:, None] - col[None, :]).abs()


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on one (B, C, r, r) window (section 4.1).

    Head i sees the channel split x_i plus the previous head's output (the cascade), projects it with a
    1x1 Conv+BN to q, k (key_dim) and v (C/h), refines q with a per-head depth-wise Conv+BN, and
    attends with a learned relative-position bias. The per-head loop is inherent to the cascade.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = dim // num_heads  # int(attn_ratio * key_dim) with attn_ratio = dim / (key_dim * heads)
        self.scale = key_dim**-0.5
        split = dim // num_heads
        self.qkvs = nn.ModuleList(ConvNorm(split, 2 * key_dim + self.val_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvNorm(key_dim, key_dim, kernels[i], groups=key_dim) for i in range(num_heads))
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.0))
        n = resolution * resolution
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n))
        # Constant table index; timm keeps it out of the state dict (section 4.4).
        self.register_buffer("attention_bias_idxs", attention_bias_index(resolution), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """(heads, N, N) bias: a gather on a constant index (the official code caches it in eval)."""
        n = self.attention_bias_idxs.shape[0]
        flat = self.attention_biases.index_select(1, self.attention_bias_idxs.reshape(-1))
        return flat.reshape(self.num_heads, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        bias = self.attention_bias()
        splits = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = splits[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + splits[i]  # cascade: previous head's output refines the next head's input
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, kd, N), (B, kd, N), (B, dv, N)
            attn = (q.transpose(-2, -1) @ k) * self.scale + bias[i]
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).reshape(b, self.val_dim, h, w)
            outs.append(feat)
        return self.proj(torch.cat(outs, dim=1))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*nH*nW, C, w, w), windows in row-major order, with rank-4 reshapes only.

    Equals the official BHWC ``view(B, nH, w, nW, w, C).transpose(2, 3)`` (rank 6) -- tests assert it;
    Apple's ANE repo uses the same idea (section 0.1).
    """
    b, c, h, w = x.shape
    nh, nw = h // window, w // window
    x = x.reshape(b * c * nh, window, nw, window).transpose(1, 2)  # (B*C*nH, nW, w, w)
    x = x.reshape(b, c, nh * nw, window * window).transpose(1, 2)  # (B, nH*nW, C, w*w)
    return x.reshape(b * nh * nw, c, window, window)


def window_reverse(x: torch.Tensor, window: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nH*nW, C, w, w) -> (B, C, H, W)."""
    h, w = size
    nh, nw = h // window, w // window
    c = x.shape[1]
    b = x.shape[0] // (nh * nw)
    x = x.reshape(b, nh * nw, c, window * window).transpose(1, 2)  # (B, C, nH*nW, w*w)
    x = x.reshape(b * c * nh, nw, window, window).transpose(1, 2)  # (B*C*nH, w, nW, w)
    return x.reshape(b, c, h, w)


class LocalWindowAttention(nn.Module):
    """CGA over the whole map when it fits one window, else over zero-padded 7x7 windows."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...],
                 window: int = WINDOW) -> None:
        super().__init__()
        self.window = window
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, min(window, resolution), kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        win = self.window
        if h <= win and w <= win:
            return self.attn(x)
        pad_b, pad_r = (win - h % win) % win, (win - w % win) % win
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))  # zero padding bottom/right, as the reference does in BHWC
        size = (h + pad_b, w + pad_r)
        x = window_reverse(self.attn(window_partition(x, win)), win, size)
        if pad_b or pad_r:
            x = x[:, :, :h, :w]
        return x


class EfficientVitBlock(nn.Module):
    """Sandwich block: Res(DW) -> Res(FFN) -> Res(window CGA) -> Res(DW) -> Res(FFN)."""

    def __init__(self, dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        self.dw0 = Residual(ConvNorm(dim, dim, 3, groups=dim, bn_weight_init=0.0))
        self.ffn0 = Residual(ConvMlp(dim, dim * 2))
        self.mixer = Residual(LocalWindowAttention(dim, KEY_DIM, num_heads, resolution, kernels))
        self.dw1 = Residual(ConvNorm(dim, dim, 3, groups=dim, bn_weight_init=0.0))
        self.ffn1 = Residual(ConvMlp(dim, dim * 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


def _dw_ffn(dim: int) -> nn.Sequential:
    """Res(DW 3x3 Conv+BN) -> Res(FFN): the token-interaction pair around patch merging."""
    return nn.Sequential(Residual(ConvNorm(dim, dim, 3, groups=dim)), Residual(ConvMlp(dim, dim * 2)))


class EfficientVitStage(nn.Module):
    """Optional downsample (res1, patchmerge, res2) followed by ``depth`` sandwich blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, resolution: int,
                 kernels: tuple[int, ...], downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential()
            self.downsample.add_module("res1", _dw_ffn(in_dim))
            self.downsample.add_module("patchmerge", PatchMerging(in_dim, dim))
            self.downsample.add_module("res2", _dw_ffn(dim))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[EfficientVitBlock(dim, num_heads, resolution, kernels) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbedding(nn.Module):
    """Four 3x3 stride-2 Conv+BN (ReLU between): 3 -> C/8 -> C/4 -> C/2 -> C, total stride 16."""

    def __init__(self, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, stride=2)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, stride=2)
        self.relu3 = nn.ReLU()
        self.conv4 = ConvNorm(dim // 2, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.conv4(self.relu3(self.conv3(x)))


class EfficientViT(nn.Module):
    """EfficientViT-M classifier; ``img_size`` fixes the attention-bias tables (stage maps r, r/2, r/4)."""

    def __init__(self, variant: str = "m0", img_size: int = 224, num_classes: int = 1000) -> None:
        super().__init__()
        if img_size % PATCH:
            raise ValueError(f"img_size {img_size} is not a multiple of {PATCH}")
        cfg = VARIANTS[variant]
        dims = cfg["dims"]
        self.patch_embed = PatchEmbedding(dims[0])
        resolution = img_size // PATCH
        stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, cfg["depths"], cfg["heads"])):
            if i > 0:
                resolution = (resolution - 1) // 2 + 1  # stride-2, pad-1 3x3 DW conv in patch merging
            stages.append(EfficientVitStage(dims[max(i - 1, 0)], dim, depth, heads, resolution, cfg["kernels"],
                                            downsample=i > 0))
        self.stages = nn.Sequential(*stages)
        self.head = NormLinear(dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((2, 3)))


# --- official microsoft/Cream layout -> timm layout (section 4.4) ---------------------------------------

_PATCH_EMBED = {"0": "conv1", "2": "conv2", "4": "conv3", "6": "conv4"}
_DOWNSAMPLE = {0: "res1", 1: "patchmerge", 2: "res2"}


def official_to_timm_key(key: str) -> str | None:
    """One official key in timm naming, or None for keys timm does not store (``attention_bias_idxs``).

    Renames: ``patch_embed.{0,2,4,6}`` -> ``patch_embed.conv{1..4}``; ``blocks1.j`` ->
    ``stages.0.blocks.j``; in ``blocks{2,3}`` items 0/1/2 are the downsample ``res1``/``patchmerge``/
    ``res2`` and item j >= 3 is ``blocks.{j-3}``; path parts ``c`` -> ``conv`` and ``l`` -> ``linear``.
    """
    if key.endswith("attention_bias_idxs"):
        return None
    parts = key.split(".")
    if parts[0] == "patch_embed" and parts[1] in _PATCH_EMBED:
        parts[1] = _PATCH_EMBED[parts[1]]
    match = re.fullmatch(r"blocks([123])", parts[0])
    if match:
        stage, j = int(match.group(1)) - 1, int(parts[1])
        if stage == 0:
            head = ["stages", "0", "blocks", str(j)]
        elif j < 3:
            head = ["stages", str(stage), "downsample", _DOWNSAMPLE[j]]
        else:
            head = ["stages", str(stage), "blocks", str(j - 3)]
        parts = head + parts[2:]
    parts = ["conv" if p == "c" else "linear" if p == "l" else p for p in parts]
    return ".".join(parts)


def checkpoint_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official ``microsoft/Cream`` EfficientViT state dict to timm keys; timm dicts pass through.

    A distillation head (``head_dist.*``) has no counterpart here and is left for the loader to report.
    """
    if any(k.startswith("stages.") for k in state):
        return {k: v for k, v in state.items() if not k.endswith("attention_bias_idxs")}
    out = {}
    for key, value in state.items():
        new = official_to_timm_key(key)
        if new is not None:
            out[new] = value
    return out


def _register(variant: str) -> None:
    cfg = VARIANTS[variant]
    info = ModelInfo(
        name=f"efficientvit_{variant}",
        family="efficientvit",
        paper=_PAPER,
        input_size=224,
        input_multiple=PATCH,  # every stride-2 conv has padding 1, so any multiple of 16 is exact
        aliases=(f"efficientvit_msra_{variant}",),
        extra={"embed_dims": cfg["dims"], "depths": cfg["depths"], "num_heads": cfg["heads"],
               "kernels": cfg["kernels"], "key_dim": KEY_DIM, "window": WINDOW},
        checkpoint_filter=checkpoint_filter,
    )

    @register_model(info)
    def build(img_size: int = 224, num_classes: int = 1000) -> EfficientViT:
        return EfficientViT(variant, img_size=img_size, num_classes=num_classes)


for _variant in VARIANTS:
    _register(_variant)
