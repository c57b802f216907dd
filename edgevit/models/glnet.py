"""GLNet / GLMix (Zhu, Wang, Zhang, Lau; "Revisiting the Integration of Convolution and Attention for
Vision Backbone", arXiv 2411.14429, NeurIPS 2024) -- reference section 6.

A GLMix block mixes a *global* branch (soft clustering of the feature map into 64 semantic slots,
multi-head self-attention among the slots, dispatch back to the pixels) with a *local* branch
(1x1 -> depth-wise 5x5 -> 1x1 convolutions). Key names follow the official repository
(``rayleizhu/GLMix: models/glnet.py``; reference section 6.5): ``downsample_layers.i.*``,
``stages.i.blocks.j.{slot_scale, pos_conv, norm1, relation_mha.*, feature_conv.*, norm2, mlp.*, ls1, ls2}``,
``mha_op.*`` for attention blocks, ``norm``, ``head`` -- so its checkpoints load without a mapping.

Export-oriented choices (reference section 0.1, 6.4), each exactly equivalent to the reference:
* ``nn.MultiheadAttention`` (rank-5 on export) is recomputed from its packed ``in_proj_weight`` [q; k; v],
  sliced, with rank-4 heads; same parameters and keys.
* Slot initialisation ``adaptive_avg_pool2d(x, 8)`` (non-integer ratios 28->8, 14->8) is computed as two
  constant averaging matrices, ``P_h @ x @ P_w^T``: each output bin of an adaptive average pool is the
  mean over a rectangle [h0, h1) x [w0, w1), which factorises into a row mean and a column mean.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import PackedMultiheadAttention
from edgevit.registry import ModelInfo, register_model

_PAPER = "Revisiting the Integration of Convolution and Attention for Vision Backbone (arXiv 2411.14429)"


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map (timm ``LayerNorm2d``, eps 1e-6): per-pixel normalisation."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma * x``; ``gamma`` is (C,) for tokens or (1, C, 1, 1) for NCHW maps."""

    def __init__(self, dim: int, init_value: float, nchw: bool) -> None:
        super().__init__()
        shape = (1, dim, 1, 1) if nchw else (dim,)
        self.gamma = nn.Parameter(torch.full(shape, init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class ResDWConv(nn.Conv2d):
    """``x + DWConv3x3(x)`` (with bias) inside the conv MLP when ``mlp_dw`` (4G/9G/16G)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def conv_mlp(dim: int, mlp_ratio: float, mlp_dw: bool) -> nn.Sequential:
    """Conv1x1 (C->rC) -> [x + DWConv3x3] -> GELU (erf) -> Conv1x1 (rC->C); keys ``mlp.{0,1,3}``."""
    hidden = int(mlp_ratio * dim)
    return nn.Sequential(
        nn.Conv2d(dim, hidden, 1),
        ResDWConv(hidden) if mlp_dw else nn.Identity(),
        nn.GELU(),
        nn.Conv2d(hidden, dim, 1),
    )


@lru_cache(maxsize=None)
def _pool_weights(size_in: int, size_out: int) -> tuple[tuple[float, ...], ...]:
    """Rows of the (size_out, size_in) 1-D adaptive-average matrix.

    Bin i averages [floor(i * n / o), ceil((i + 1) * n / o)) -- PyTorch's adaptive-pool bins, which
    overlap when the ratio n / o is not an integer (and also cover o > n).
    """
    rows = []
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        rows.append(tuple(1.0 / (end - start) if start <= j < end else 0.0 for j in range(size_in)))
    return tuple(rows)


def adaptive_pool_matrix(size_in: int, size_out: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The (size_out, size_in) matrix ``P`` with ``adaptive_avg_pool1d(x, o) == x @ P.T``."""
    return torch.tensor(_pool_weights(size_in, size_out), dtype=dtype, device=device)


def adaptive_avg_pool2d_matmul(x: torch.Tensor, pool_h: torch.Tensor, pool_w: torch.Tensor) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as ``P_h @ x @ P_w^T`` (exact: bins are rectangles, so means factorise)."""
    return pool_h @ (x @ pool_w.transpose(0, 1))


class SlotPool(nn.Module):
    """Slot initialisation: adaptive average pool of the block input to ``grid x grid`` (reference 6.1 step 1).

    The averaging matrices for the native feature size are non-persistent buffers (export constants, not
    checkpoint keys); another input size builds its own constants on the fly. Output (B, grid^2, C) with
    slot index ``row * grid + col``, as the reference's ``permute(0, 2, 3, 1).flatten(1, 2)``.
    """

    def __init__(self, grid: int, feat_size: int) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("pool_h", adaptive_pool_matrix(feat_size, grid), persistent=False)
        self.register_buffer("pool_w", adaptive_pool_matrix(feat_size, grid), persistent=False)

    def _matrix(self, buf: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
        if buf.shape[1] == size:
            return buf.to(like.dtype)
        return adaptive_pool_matrix(size, self.grid, like.dtype, like.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = adaptive_avg_pool2d_matmul(x, self._matrix(self.pool_h, h, x), self._matrix(self.pool_w, w, x))
        return pooled.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Blocks (reference sections 6.1, 6.2)
# --------------------------------------------------------------------------------------------------


class GLMixBlock(nn.Module):
    """Global (slot clustering + slot MHSA + dispatch) and local (conv) mixing, then a conv MLP.

    Steps of reference section 6.1: slots from the block input (before CPE and norm); optional CPE;
    ``Xn = LN2d(X)``; logits = (l2n(slots) tau) l2n(Xn)^T; cluster (softmax over pixels); MHSA among
    slots; dispatch (softmax over slots of the same logits); add the local branch on Xn; residual; MLP.
    """

    def __init__(self, dim: int, num_heads: int, feat_size: int, num_slots: int = 64, mlp_ratio: float = 4.0,
                 local_dw_ks: int = 5, cpe_ks: int = 0, mlp_dw: bool = False, layerscale: float = -1.0,
                 slot_init: str = "ada_avgpool") -> None:
        super().__init__()
        grid = math.isqrt(num_slots)
        if grid * grid != num_slots:
            raise ValueError(f"num_slots {num_slots} is not a square")
        # tau, learnable, initialised to C^-0.5 (scale_mode='learnable').
        self.slot_scale = nn.Parameter(torch.tensor(dim**-0.5))
        self.slot_init = slot_init
        if slot_init == "param":
            self.init_slots = nn.Parameter(torch.zeros(1, num_slots, dim))
            if not self.init_slots.is_meta:
                nn.init.normal_(self.init_slots, std=0.02)
        else:
            self.slot_pool = SlotPool(grid, feat_size)
        self.pos_conv = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim) if cpe_ks > 0 else None
        self.norm1 = LayerNorm2d(dim)
        self.relation_mha = PackedMultiheadAttention(dim, num_heads)
        self.feature_conv = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.Conv2d(dim, dim, local_dw_ks, padding=local_dw_ks // 2, groups=dim),
            nn.Conv2d(dim, dim, 1),
        )
        self.norm2 = LayerNorm2d(dim)
        self.mlp = conv_mlp(dim, mlp_ratio, mlp_dw)
        self.ls1 = LayerScale(dim, layerscale, nchw=True) if layerscale > 0 else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale, nchw=True) if layerscale > 0 else nn.Identity()

    def _slots(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot_init == "param":
            return self.init_slots.expand(x.shape[0], -1, -1)
        return self.slot_pool(x)

    def _global_local(self, xn: torch.Tensor, init_slots: torch.Tensor) -> torch.Tensor:
        tokens = xn.flatten(2).transpose(1, 2)  # (B, HW, C)
        keys = self.slot_scale * F.normalize(tokens, p=2.0, dim=-1).transpose(1, 2)  # (B, C, HW)
        logits = F.normalize(init_slots, p=2.0, dim=-1) @ keys  # (B, S, HW)
        slots = logits.softmax(dim=-1) @ tokens  # soft clustering, (B, S, C)
        slots = self.relation_mha(slots)  # global mixing among slots
        out = logits.transpose(1, 2).softmax(dim=-1) @ slots  # dispatch, softmax over slots, (B, HW, C)
        out = out.transpose(1, 2).reshape(xn.shape)
        return out + self.feature_conv(xn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        init_slots = self._slots(x)  # from the block input, before CPE and norm
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        x = x + self.ls1(self._global_local(self.norm1(x), init_slots))
        return x + self.ls2(self.mlp(self.norm2(x)))


class MHSABlockNCHW(nn.Module):
    """``MHSA_NCHW_Block``: optional CPE, ``x + MHA(LN(x))`` on tokens, then ``x + ConvMLP(LN2d(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cpe_ks: int = 0, mlp_dw: bool = False,
                 layerscale: float = -1.0) -> None:
        super().__init__()
        self.pos_conv = nn.Conv2d(dim, dim, cpe_ks, padding=cpe_ks // 2, groups=dim) if cpe_ks > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mha_op = PackedMultiheadAttention(dim, num_heads)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = conv_mlp(dim, mlp_ratio, mlp_dw)
        self.ls1 = LayerScale(dim, layerscale, nchw=False) if layerscale > 0 else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale, nchw=True) if layerscale > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        shape = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.ls1(self.mha_op(self.norm1(tokens)))
        x = tokens.transpose(1, 2).reshape(shape)
        return x + self.ls2(self.mlp(self.norm2(x)))


class MHSABlock(nn.Module):
    """``MHSA_Block`` (STL stage 4): pre-norm ViT block on (B, N, C) with a Linear-GELU-Linear MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layerscale: float = -1.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mha_op = PackedMultiheadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls1 = LayerScale(dim, layerscale, nchw=False) if layerscale > 0 else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale, nchw=False) if layerscale > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.mha_op(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """One resolution stage (official ``BasicLayer``): ``blocks`` of one mixing mode.

    Modes: ``glmix``; ``glmix.mha_nchw`` (GLMix at even indices, MHSA at odd); ``mha_nchw``; ``mha``
    (token blocks -- the stage flattens to (B, HW, C) and back).
    """

    def __init__(self, mode: str, dim: int, depth: int, num_heads: int, feat_size: int, mlp_ratio: float,
                 cpe_ks: int, mlp_dw: bool, layerscale: float, num_slots: int, slot_init: str) -> None:
        super().__init__()
        self.mode = mode

        def glmix() -> GLMixBlock:
            return GLMixBlock(dim, num_heads, feat_size, num_slots, mlp_ratio, cpe_ks=cpe_ks, mlp_dw=mlp_dw,
                              layerscale=layerscale, slot_init=slot_init)

        def mha_nchw() -> MHSABlockNCHW:
            return MHSABlockNCHW(dim, num_heads, mlp_ratio, cpe_ks, mlp_dw, layerscale)

        if mode == "glmix":
            blocks = [glmix() for _ in range(depth)]
        elif mode == "glmix.mha_nchw":
            blocks = [glmix() if i % 2 == 0 else mha_nchw() for i in range(depth)]
        elif mode == "mha_nchw":
            blocks = [mha_nchw() for _ in range(depth)]
        elif mode == "mha":
            blocks = [MHSABlock(dim, num_heads, mlp_ratio, layerscale) for _ in range(depth)]
        else:
            raise ValueError(f"unknown mixing mode {mode!r}")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mha":
            shape = x.shape
            x = x.flatten(2).transpose(1, 2)
            for blk in self.blocks:
                x = blk(x)
            return x.transpose(1, 2).reshape(shape)
        for blk in self.blocks:
            x = blk(x)
        return x


# --------------------------------------------------------------------------------------------------
# Stems and transitions (reference section 6.2)
# --------------------------------------------------------------------------------------------------


def non_overlapping_downsamples(dims: tuple[int, ...], in_chans: int = 3) -> nn.ModuleList:
    """STL: stem Conv4x4 s4 + BN; transitions BN -> Conv2x2 s2 (Swin-style patch merging order)."""
    layers = [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 4), nn.BatchNorm2d(dims[0]))]
    for i in range(3):
        layers.append(nn.Sequential(nn.BatchNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
    return nn.ModuleList(layers)


def overlapping_downsamples(dims: tuple[int, ...], in_chans: int = 3) -> nn.ModuleList:
    """4G/9G/16G: deep stem (Conv3x3 s2 + BN + GELU + Conv3x3 s2 + BN); transitions Conv3x3 s2 + BN.

    Index 0 of the stem is an Identity (the official optional input LayerNorm), kept so keys match
    (``downsample_layers.0.{1,2,4,5}``).
    """
    half = dims[0] // 2
    stem = nn.Sequential(
        nn.Identity(),
        nn.Conv2d(in_chans, half, 3, 2, 1),
        nn.BatchNorm2d(half),
        nn.GELU(),
        nn.Conv2d(half, dims[0], 3, 2, 1),
        nn.BatchNorm2d(dims[0]),
    )
    layers = [stem]
    for i in range(3):
        layers.append(nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1), nn.BatchNorm2d(dims[i + 1])))
    return nn.ModuleList(layers)


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class GLNet(nn.Module):
    """Four-stage GLNet classifier: downsample + stage x4, BatchNorm2d, global mean, Linear."""

    def __init__(
        self,
        img_size: int = 224,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        mlp_ratio: float = 4.0,
        modes: tuple[str, ...] = ("glmix", "glmix", "glmix", "mha"),
        overlapping: bool = False,
        cpe_ks: int = 0,
        mlp_dw: bool = False,
        layerscale: float = -1.0,
        head_dim: int = 32,
        num_slots: int = 64,
        slot_init: str = "ada_avgpool",
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if img_size % 32:
            raise ValueError(f"img_size {img_size} is not a multiple of 32")
        make = overlapping_downsamples if overlapping else non_overlapping_downsamples
        self.downsample_layers = make(dims)
        self.stages = nn.ModuleList(
            Stage(modes[i], dims[i], depths[i], dims[i] // head_dim, img_size // (4 * 2**i), mlp_ratio, cpe_ks,
                  mlp_dw, layerscale, num_slots, slot_init)
            for i in range(4)
        )
        self.norm = nn.BatchNorm2d(dims[-1])  # pre-head norm is BatchNorm2d in every variant
        self.head = nn.Linear(dims[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Official init: trunc-normal(0.02) Linear weights (incl. attention out_proj), zero biases.
        if self.head.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((2, 3)))


# --------------------------------------------------------------------------------------------------
# Variants (reference section 6.3)
# --------------------------------------------------------------------------------------------------

_STL = dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), mlp_ratio=4.0, modes=("glmix", "glmix", "glmix", "mha"))
_G_MODES = ("glmix", "glmix", "glmix.mha_nchw", "mha_nchw")
_G = dict(depths=(4, 4, 18, 4), mlp_ratio=3.0, modes=_G_MODES, overlapping=True, cpe_ks=3, mlp_dw=True)
VARIANTS: dict[str, dict] = {
    "glnet_stl": _STL,
    "glnet_stl_paramslot": {**_STL, "slot_init": "param"},
    "glnet_4g": {**_G, "dims": (64, 128, 256, 512)},
    "glnet_9g": {**_G, "dims": (96, 192, 384, 768)},
    "glnet_16g": {**_G, "dims": (128, 256, 512, 1024), "layerscale": 1e-4},
}


def _register(name: str, cfg: dict) -> None:
    info = ModelInfo(
        name=name,
        family="glnet",
        paper=_PAPER,
        input_size=224,
        input_multiple=32,
        test_input_size=128,  # CI zoo matrix: 1.5 GMACs (4.5 at 224); uniform slot pooling here, the
        # non-uniform adaptive-pool path is covered by tests/test_pass_pooling.py
        extra={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()} | {"num_slots": 64, "head_dim": 32},
    )

    @register_model(info)
    def build(img_size: int = 224, num_classes: int = 1000) -> GLNet:
        return GLNet(img_size=img_size, num_classes=num_classes, **cfg)


for _name, _cfg in VARIANTS.items():
    _register(_name, _cfg)
