"""NaViT -- Patch n' Pack (Dehghani et al., arXiv 2307.06304).

A ViT whose images keep their resolution and aspect ratio (spec section 8.1):

* factorised learned position embeddings: ``pos = pos_embed_h[row] + pos_embed_w[col]`` (8.1 item 4),
  indexed by absolute patch coordinates, tables of ``max_grid`` rows/columns;
* Patch n' Pack: the patches of several images are concatenated into fixed-length sequences, each token
  carrying an image id (slot within its sequence, -1 = padding) and its (row, col) (8.1 item 1);
* masked self-attention -- a token attends only to tokens of its own image -- as an additive bias with a
  large *finite* negative value (spec 0.1: no ``-inf``) (8.1 item 2);
* masked per-image mean pooling (timm ``naflexvit`` style) before the head (8.1 item 3).

Everything else is the ViT of ``vit.py`` (pre-norm blocks, timm key names ``blocks.i.attn.qkv`` ...),
without a class token (pooling replaces it). The patch embedding is stored as the ViT ``Conv2d`` and used
as a Linear on flattened ``(c, p1, p2)`` patches in the packed path -- the same weights, reshaped.
Training-only parts (continuous token dropping, resolution sampling; 8.1 item 5) are not implemented.

Two forwards:
* ``model(images)``: one image size per call (the export path, spec 8.3): a plain ViT with the position
  tables sliced to the grid -- no mask, no gather.
* ``model.forward_packed(images)``: variable-size images packed into sequences; :class:`NaViTPacked`
  wraps the tensor-only core so it can be exported with the packing done on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import Mlp, MultiHeadSelfAttention, init_transformer_weights
from edgevit.registry import ModelInfo, register_model

_PAPER = "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution (arXiv 2307.06304)"
# Additive mask value: exp(-1e4 + s) underflows to exactly 0 in fp32 and fp16, and -1e4 is finite in fp16.
MASK_VALUE = -1e4
MAX_GRID = 64  # factorised tables cover images up to 64 patches a side (1024 px at p=16)


class MaskedSelfAttention(MultiHeadSelfAttention):
    """:class:`MultiHeadSelfAttention` (rank <= 4, same keys) with an optional additive attention bias."""

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            attn = attn + attn_bias  # (B, 1, N, N): 0 within an image, MASK_VALUE across images
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm ViT block (keys as ``vit.Block``) taking the packing mask as an attention bias."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskedSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_bias)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Stride-p convolution (ViT keys ``patch_embed.proj``); ``linear`` applies it to flattened patches."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def linear(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, C*p*p) patches flattened in (c, p1, p2) order -> (B, L, D); equals the convolution."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


@dataclass
class PackedSequences:
    """Images packed into fixed-length token sequences (spec 8.1 item 1).

    ``patches`` (B, L, 3*p*p) float; ``rows``/``cols``/``image_ids`` (B, L) int32 (what TFLite and Core ML
    take; int64 inputs become int32 on conversion), ``image_ids`` being the
    image's slot in its sequence (0 .. max_images-1) or -1 on padding; ``index[i] = (sequence, slot)`` of
    the i-th input image.
    """

    patches: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    image_ids: torch.Tensor
    index: list[tuple[int, int]]
    max_images: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs of :class:`NaViTPacked`, in order."""
        return self.patches, self.rows, self.cols, self.image_ids


def patchify(image: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, H, W) -> patches (N, C*p*p) in (c, p1, p2) order, row and col indices (N,) in raster order."""
    c, h, w = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image side {h}x{w} is not a multiple of the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    patches = F.unfold(image.unsqueeze(0), patch_size, stride=patch_size)[0].transpose(0, 1)
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    return patches, rows, cols


def pack_images(
    images: list[torch.Tensor], patch_size: int, seq_len: int | None = None, max_images: int | None = None
) -> PackedSequences:
    """Greedy in-order packing of ``images`` into sequences of ``seq_len`` tokens (default: one sequence).

    Host-side preprocessing (spec 8.3): data-dependent, so it stays outside any exported graph.
    """
    pieces = [patchify(img, patch_size) for img in images]
    lengths = [p[0].shape[0] for p in pieces]
    seq_len = seq_len or sum(lengths)
    groups: list[list[int]] = []
    used = seq_len
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"image {i} has {n} patches, more than the sequence length {seq_len}")
        if used + n > seq_len or (max_images is not None and len(groups[-1]) == max_images):
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    slots = max_images or max(len(g) for g in groups)
    dim = pieces[0][0].shape[1]
    patches = torch.zeros(len(groups), seq_len, dim, dtype=images[0].dtype)
    rows = torch.zeros(len(groups), seq_len, dtype=torch.int32)
    cols = torch.zeros(len(groups), seq_len, dtype=torch.int32)
    ids = torch.full((len(groups), seq_len), -1, dtype=torch.int32)
    index: list[tuple[int, int]] = [(0, 0)] * len(images)
    for s, group in enumerate(groups):
        start = 0
        for slot, i in enumerate(group):
            p, r, c = pieces[i]
            end = start + p.shape[0]
            patches[s, start:end], rows[s, start:end], cols[s, start:end] = p, r, c
            ids[s, start:end] = slot
            index[i] = (s, slot)
            start = end
    return PackedSequences(patches, rows, cols, ids, index, slots)


class NaViT(nn.Module):
    """NaViT classifier: factorised position embeddings, packed masked attention, masked mean pooling."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        max_grid: int = MAX_GRID,
    ) -> None:
        super().__init__()
        if img_size % patch_size or img_size // patch_size > max_grid:
            raise ValueError(
                f"img_size {img_size} must be a multiple of {patch_size} and at most {max_grid * patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.max_grid = max_grid
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pos_embed_h = nn.Parameter(torch.zeros(max_grid, embed_dim))  # phi_y (spec 8.1 item 4)
        self.pos_embed_w = nn.Parameter(torch.zeros(max_grid, embed_dim))  # phi_x
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        init_transformer_weights(self, self.pos_embed_h, self.pos_embed_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of the patch size -> logits (B, num_classes)."""
        gh, gw = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        if gh > self.max_grid or gw > self.max_grid:
            raise ValueError(f"{x.shape[2]}x{x.shape[3]} exceeds the {self.max_grid}-patch position tables")
        # phi_y[row] + phi_x[col] on the raster grid, by static slices (spec 8.3: no gather needed).
        pos = (self.pos_embed_h[:gh].unsqueeze(1) + self.pos_embed_w[:gw].unsqueeze(0)).reshape(gh * gw, -1)
        x = self.patch_embed(x) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))

    def forward_packed_tensors(
        self, patches: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, image_ids: torch.Tensor, max_images: int
    ) -> torch.Tensor:
        """Packed sequences (see :class:`PackedSequences`) -> logits per image slot (B, max_images, classes).

        Empty slots give the head's bias (their pooled feature is 0). Static shapes, no data-dependent ops.
        """
        x = self.patch_embed.linear(patches)
        x = x + F.embedding(rows, self.pos_embed_h) + F.embedding(cols, self.pos_embed_w)
        same = (image_ids.unsqueeze(2) == image_ids.unsqueeze(1)).to(x.dtype)  # (B, L, L) block-diagonal
        attn_bias = ((1.0 - same) * MASK_VALUE).unsqueeze(1)  # padding (-1) forms its own block: no empty rows
        for blk in self.blocks:
            x = blk(x, attn_bias)
        x = self.norm(x)
        slots = torch.arange(max_images, dtype=image_ids.dtype, device=image_ids.device).view(1, -1, 1)
        member = (image_ids.unsqueeze(1) == slots).to(x.dtype)  # (B, M, L); padding belongs to no slot
        pooled = (member @ x) / member.sum(dim=-1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)

    def forward_packed(
        self, images: list[torch.Tensor] | PackedSequences, seq_len: int | None = None
    ) -> torch.Tensor:
        """Logits (N, num_classes) for N images of any sizes (multiples of p), run packed in sequences."""
        packed = images if isinstance(images, PackedSequences) else pack_images(images, self.patch_size, seq_len)
        logits = self.forward_packed_tensors(*packed.tensors(), packed.max_images)
        return torch.stack([logits[s, slot] for s, slot in packed.index])


class NaViTPacked(nn.Module):
    """Tensor-only wrapper of :meth:`NaViT.forward_packed_tensors` for export.

    ``forward(patches, rows, cols, image_ids)`` -> (B, max_images, num_classes); pack on the host with
    :func:`pack_images` (``max_images`` must equal the wrapper's).
    """

    def __init__(self, model: NaViT, max_images: int) -> None:
        super().__init__()
        self.model = model
        self.max_images = max_images

    def forward(
        self, patches: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, image_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model.forward_packed_tensors(patches, rows, cols, image_ids, self.max_images)


def _navit_variant(name: str, dim: int, depth: int, heads: int) -> None:
    info = ModelInfo(
        name=name,
        family="navit",
        paper=_PAPER,
        input_size=224,
        input_multiple=16,
        notes="no public NaViT weights (spec 8.2); ImageNet normalisation assumed",
        extra={"embed_dim": dim, "depth": depth, "num_heads": heads, "patch_size": 16, "max_grid": MAX_GRID},
    )

    @register_model(info)
    def build(img_size: int = 224, num_classes: int = 1000) -> NaViT:
        return NaViT(img_size, 16, dim, depth, heads, num_classes=num_classes)


# ViT-Ti / ViT-S widths (spec 8.1b: NaViT reuses the ViT sizes).
_navit_variant("navit_tiny", 192, 12, 3)
_navit_variant("navit_small", 384, 12, 6)
