"""DETR (Carion et al., arXiv 2005.12872): ResNet + transformer encoder-decoder set predictor.

Follows the official ``facebookresearch/detr`` defaults as spec section 9.1 describes them:

* backbone: ResNet (torchvision layout, v1.5 stride on the 3x3 conv) with frozen BatchNorm, C5 output
  at stride 32; ``input_proj`` 1x1 conv to d=256;
* fixed sine position encoding (128 + 128 features, normalised to (0, 2pi]), **precomputed** as a
  non-persistent buffer for the native input size (spec 9.3: an unpadded image has an all-False mask);
* post-norm transformer, d=256, 8 heads, FFN 2048, ReLU; 6 encoder layers (q = k = src + pos, no final
  norm) and 6 decoder layers (tgt starts at zeros, learned object queries added to q/k of self-attention
  and to the query of cross-attention, keys ``memory + pos``), final decoder LayerNorm;
* heads: class Linear(256, num_classes + 1) and 3-layer box MLP with sigmoid (cx, cy, w, h).

Export-oriented forms (spec 0.1, 9.3), each exactly equivalent to the reference:

* attention keeps ``nn.MultiheadAttention``'s parameters (``in_proj_weight``/``in_proj_bias``/``out_proj``)
  but slices the fused in-projection and works on rank-4 (B, heads, N, hd) tensors (``nn.MultiheadAttention``
  decomposes to rank 5 on export);
* batch-first (B, HW, C) token layout instead of the official sequence-first (HW, B, C);
* the sine encoding's ``stack(sin, cos, dim=4).flatten(3)`` interleave (rank 5) is a ``where`` on even
  channels: the two frequencies of each pair are equal, so both forms give the same values;
* padding masks (optional ``mask`` argument, True = padding) are additive finite large negatives, not -inf.

Key layout equals the official checkpoint's (spec 9.4), so ``detr-r50-*.pth`` loads as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.registry import ModelInfo, register_model

_PAPER = "End-to-End Object Detection with Transformers (arXiv 2005.12872)"
MASK_VALUE = -1e4  # finite in fp16; exp(MASK_VALUE + s) is exactly 0 in fp32 and fp16 (spec 0.1)


# ----------------------------------------------------------------------------------------------- backbone
class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine as *buffers* (official ``backbone.py``): y = x*scale + shift.

    Not parameters, so they are excluded from parameter counts (the spec's 41.52 M) and never trained.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def _conv(in_chs: int, out_chs: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, k, stride, k // 2, bias=False)


def _downsample(in_chs: int, out_chs: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(_conv(in_chs, out_chs, 1, stride), FrozenBatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs (torchvision keys conv1/bn1/conv2/bn2/downsample)."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(in_chs, planes, 3, stride)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.downsample = _downsample(in_chs, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet-50+ block: 1x1, 3x3 (carries the stride, v1.5), 1x1 x4 (torchvision keys)."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(in_chs, planes, 1)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.downsample = _downsample(in_chs, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """ResNet trunk up to C5 (no pool/fc, as the official ``IntermediateLayerGetter`` keeps)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chs = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(chs, planes, 2 if j == 0 and i > 0 else 1))
                chs = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_channels = chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Backbone(nn.Module):
    """Holds ``body`` so keys read ``backbone.0.body.*`` inside ``nn.Sequential`` (official ``Joiner``)."""

    def __init__(self, body: ResNetBody) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ------------------------------------------------------------------------------------ position encoding
def sine_position_encoding(
    mask: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """Normalised sine encoding of a padding mask (B, h, w), True = padding -> (B, 2*num_pos_feats, h, w).

    Official ``PositionEmbeddingSine(normalize=True)`` (spec 9.1): cumulative row/col counts of valid
    pixels scaled to (0, 2pi], divided by ``temperature^(2*floor(i/2)/F)``; sin on even and cos on odd
    channels; [pos_y, pos_x]. The even/odd interleave is a ``where`` (rank 4) instead of stack + flatten.
    """
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    idx = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_pos_feats)
    even = torch.remainder(idx, 2) == 0
    pos_y = y.unsqueeze(-1) / dim_t
    pos_x = x.unsqueeze(-1) / dim_t
    pos_y = torch.where(even, pos_y.sin(), pos_y.cos())
    pos_x = torch.where(even, pos_x.sin(), pos_x.cos())
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------- transformer
class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names, computed at rank <= 4.

    The fused ``in_proj_weight`` (3d x d) is sliced into the q, k, v projections (they take different
    inputs here: q/k carry position embeddings, v does not). Batch-first (B, N, d) tensors.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor, part: int) -> torch.Tensor:
        d = self.dim
        t = F.linear(t, self.in_proj_weight[part * d:(part + 1) * d], self.in_proj_bias[part * d:(part + 1) * d])
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attn_bias`` (B, 1, 1, Nk): 0 on valid keys, MASK_VALUE on padding (key_padding_mask)."""
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            attn = attn + attn_bias
        out = attn.softmax(dim=-1) @ v
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.dim))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer (official ``forward_post``); dropout is inference identity."""

    def __init__(self, dim: int, num_heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        qk = src + pos
        src = self.norm1(src + self.self_attn(qk, qk, src, attn_bias))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, cross-attention to the memory, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.multihead_attn = MultiheadAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        attn_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt))
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_bias))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Encoder(nn.Module):
    """Stack of post-norm encoder layers over the (B, HW, d) image tokens."""

    def __init__(self, dim: int, num_heads: int, ffn: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(dim, num_heads, ffn) for _ in range(depth)])

    def forward(self, src: torch.Tensor, pos: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, attn_bias)
        return src  # post-norm: no final encoder norm (official encoder_norm is None)


class Decoder(nn.Module):
    """Stack of decoder layers over the object queries, then the shared final LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(dim, num_heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
        attn_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, attn_bias)
        # Only the last layer's output is needed at inference (aux losses use all six, training only).
        return self.norm(tgt)


class Transformer(nn.Module):
    """Encoder-decoder (keys ``transformer.encoder.layers.i``, ``transformer.decoder.{layers.i,norm}``)."""

    def __init__(self, dim: int = 256, num_heads: int = 8, ffn: int = 2048, enc: int = 6, dec: int = 6) -> None:
        super().__init__()
        self.encoder = Encoder(dim, num_heads, ffn, enc)
        self.decoder = Decoder(dim, num_heads, ffn, dec)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, query_embed: torch.Tensor, attn_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """src (B, d, h, w), pos (B or 1, d, h, w), query_embed (Q, d) -> decoder output (B, Q, d)."""
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        memory = self.encoder(src, pos, attn_bias)
        tgt = torch.zeros(src.shape[0], query_embed.shape[0], src.shape[2], dtype=src.dtype, device=src.device)
        # (Q, d) queries broadcast against (B, Q, d); passing the parameter itself (not a view of it) keeps
        # FlopCounterMode's module hooks happy.
        return self.decoder(tgt, memory, pos, query_embed, attn_bias)


class MLP(nn.Module):
    """Box head: Linear layers with ReLU between (keys ``layers.{0,1,2}``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# ---------------------------------------------------------------------------------------------- DETR
class DETR(nn.Module):
    """DETR detector: images (B, 3, H, W) -> {"pred_logits": (B, Q, classes+1), "pred_boxes": (B, Q, 4)}."""

    def __init__(
        self,
        body: ResNetBody,
        img_size: int = 800,
        num_classes: int = 91,
        num_queries: int = 100,
        dim: int = 256,
        num_heads: int = 8,
        ffn: int = 2048,
        enc_layers: int = 6,
        dec_layers: int = 6,
    ) -> None:
        super().__init__()
        self.backbone = nn.Sequential(Backbone(body))  # official Joiner(backbone, position_embedding)
        self.input_proj = nn.Conv2d(body.num_channels, dim, 1)
        self.transformer = Transformer(dim, num_heads, ffn, enc_layers, dec_layers)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.num_pos_feats = dim // 2
        # Spec 9.3: the unpadded image's encoding is a constant (1, d, H/32, W/32) -- not in the state dict.
        side = _feature_side(img_size)
        pos = sine_position_encoding(torch.zeros(1, side, side, dtype=torch.bool), self.num_pos_feats)
        self.register_buffer("pos_cache", pos, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # Official Transformer._reset_parameters: Xavier-uniform on every transformer matrix. The backbone
        # keeps PyTorch's conv defaults with identity frozen BN, so random-weight activations stay finite.
        if self.query_embed.weight.is_meta:
            return
        for p in self.transformer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def position_encoding(self, h: int, w: int, mask: torch.Tensor | None) -> torch.Tensor:
        """(1 or B, d, h, w): the precomputed buffer when it fits, else the on-the-fly formula."""
        if mask is None and tuple(self.pos_cache.shape[2:]) == (h, w):
            return self.pos_cache
        if mask is None:
            mask = torch.zeros(1, h, w, dtype=torch.bool, device=self.pos_cache.device)
        return sine_position_encoding(mask, self.num_pos_feats)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``mask`` (B, H, W), True on padding (official NestedTensor); None for unpadded images."""
        feat = self.backbone(x)
        h, w = feat.shape[2:]
        attn_bias = None
        if mask is not None:
            # Official: nearest interpolation of the pixel mask to the feature size.
            mask = F.interpolate(mask.unsqueeze(1).float(), size=(h, w)).to(torch.bool)[:, 0]
            attn_bias = mask.flatten(1).to(feat.dtype)[:, None, None, :] * MASK_VALUE
        pos = self.position_encoding(h, w, mask).to(feat.dtype)
        hs = self.transformer(self.input_proj(feat), pos, self.query_embed.weight, attn_bias)
        return {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()}


def _feature_side(size: int) -> int:
    """C5 side of a ResNet for an input side: five stride-2 stages (conv1, maxpool, layer2..4)."""
    for _ in range(5):
        size = (size - 1) // 2 + 1
    return size


def checkpoint_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official DETR checkpoints already use these keys; drop BN counters a torchvision backbone adds."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _detr_variant(name: str, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], aliases=()) -> None:
    info = ModelInfo(
        name=name,
        family="detr",
        paper=_PAPER,
        input_size=800,
        input_multiple=32,
        num_classes=91,
        aliases=aliases,
        test_input_size=320,
        notes="outputs pred_logits (91 classes + no-object) and pred_boxes (cx, cy, w, h) in [0, 1]",
        extra={"backbone": name.split("_")[1], "d_model": 256, "heads": 8, "ffn": 2048, "enc_layers": 6,
               "dec_layers": 6, "num_queries": 100},
        checkpoint_filter=checkpoint_filter,
    )

    @register_model(info)
    def build(img_size: int = 800, num_classes: int = 91) -> DETR:
        return DETR(ResNetBody(block, layers), img_size=img_size, num_classes=num_classes)


_detr_variant("detr_r50", Bottleneck, (3, 4, 6, 3), aliases=("detr_resnet50",))
_detr_variant("detr_r18", BasicBlock, (2, 2, 2, 2))
