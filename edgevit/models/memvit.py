"""Learnable-memory ViT (Sandler, Zhmoginov, Vladymyrov, Jackson; CVPR 2022, arXiv 2203.15243).

A frozen pre-trained ViT is fine-tuned for new tasks by adding, per task, a class token, a head and a
handful of learnable *memory tokens per layer* (reference section 10.1):

* Memory tokens act as keys/values only: in layer l, task t's memory ``E_t^l`` (m_t x D) is appended to
  the keys/values; memory never queries and produces no outputs, so the layer output is the paper's
  "concatenate, then truncate back to the input tokens" without computing the truncated rows. Memory
  passes through the block's LN1 like any layer input -- the paper's equation; the lucidrains and
  necrashter reproductions append it after LN1 instead (ambiguity noted in section 10.1).
* Each task has its own class token (initialised from the backbone's, plus the class-token position
  embedding) and head. Tasks are *concatenated*: one backbone pass serves every task.
* Attention masking keeps the original model intact: original tokens (class token + patches) attend only
  to original tokens; task t's class token attends to the original tokens, itself and its own memory
  (with ``extend=True`` also to earlier tasks' class tokens and memory -- the paper's "extension").
  The original rows are computed on the original tokens alone (exactly the masked rows: masked entries
  contribute exact zeros) with the same ops as ``vit.VisionTransformer``, so adding a task leaves the
  original logits bit-identical by construction. The task rows use a static additive mask buffer with a
  finite large negative (-1e4: exp underflows to exactly 0 in fp32 and fp16, no -inf NaN hazard).

Outputs: ``forward`` returns a tuple of logits, one per task: index 0 is the original head
(B, num_classes), index i the i-th added task. Tensors stay rank <= 4 (q, k, v sliced from the fused
``qkv``), softmax on the last axis, no einsum.

Key layout = timm ``VisionTransformer`` (``deit_tiny``/``vit_tiny`` checkpoints load into the backbone)
plus ``tasks.{i}.{cls_token, memory, head.*}`` (names are ours; no reference checkpoint exists), with
``memory`` of shape (depth, m, D). The checkpoint filter fills task keys a backbone checkpoint lacks:
class tokens from its ``cls_token``, memory and heads from the model's current initialisation.

Default configuration of ``memvit_tiny``: ViT-Ti / DeiT-Tiny backbone (D=192, depth 12, 3 heads) with
its 1000-class head, plus one added task of 100 classes (CIFAR-100, the paper's first benchmark) with
5 memory tokens per layer, so the exported graph has two outputs: (B, 1000) and (B, 100).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgevit.models.vit import Block, VisionTransformer
from edgevit.registry import ModelInfo, register_model

_PAPER = "Fine-tuning Image Transformers using Learnable Memory (arXiv 2203.15243)"
MASK_VALUE = -1e4  # finite "minus infinity" (reference section 0.1: -inf gives NaN in fp16)
DEFAULT_TASKS: tuple[tuple[int, int], ...] = ((100, 5),)  # (num_classes, memory tokens per layer)


class TaskAdapter(nn.Module):
    """One added task: its class token, memory tokens for every layer (depth, m, D) and its head."""

    def __init__(self, dim: int, depth: int, num_classes: int, num_memory_tokens: int, extend: bool = False) -> None:
        super().__init__()
        self.extend = extend
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.memory = nn.Parameter(torch.zeros(depth, num_memory_tokens, dim))
        self.head = nn.Linear(dim, num_classes)

    @property
    def num_memory_tokens(self) -> int:
        return self.memory.shape[1]


class MemoryViT(VisionTransformer):
    """ViT with learnable memory and per-task class tokens/heads; returns one logits tensor per task."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes)
        self.tasks = nn.ModuleList()
        # (tasks, keys) additive mask of the task rows; rebuilt by add_task; not part of the state dict.
        self.register_buffer("task_mask", self._build_mask(), persistent=False)

    def add_task(self, num_classes: int, num_memory_tokens: int, extend: bool = False) -> int:
        """Add a task (class token, per-layer memory, head); returns its output index in ``forward``.

        The original head's logits are unchanged bit for bit. With ``extend`` the new class token may also
        attend to earlier tasks' class tokens and memory (never the other way round).
        """
        ref = self.cls_token
        dim, depth = ref.shape[-1], len(self.blocks)
        task = TaskAdapter(dim, depth, num_classes, num_memory_tokens, extend).to(device=ref.device, dtype=ref.dtype)
        if not ref.is_meta:
            with torch.no_grad():
                task.cls_token.copy_(ref)
                nn.init.trunc_normal_(task.memory, std=0.02)  # N(0, 0.02) as in section 10.1
                nn.init.trunc_normal_(task.head.weight, std=0.02)
                nn.init.zeros_(task.head.bias)
        self.tasks.append(task)
        self.task_mask = self._build_mask()
        return len(self.tasks)

    def _build_mask(self) -> torch.Tensor:
        """Additive mask of the task queries over keys [original | task cls tokens | memory]."""
        n_orig, n_tasks = self.pos_embed.shape[1], len(self.tasks)
        sizes = [task.num_memory_tokens for task in self.tasks]
        starts = [n_orig + n_tasks + sum(sizes[:i]) for i in range(n_tasks)]
        ref = self.pos_embed
        mask = torch.full((n_tasks, n_orig + n_tasks + sum(sizes)), MASK_VALUE, device=ref.device, dtype=ref.dtype)
        mask[:, :n_orig] = 0.0
        for t, task in enumerate(self.tasks):
            for s in range(t + 1) if task.extend else (t,):
                mask[t, n_orig + s] = 0.0
                mask[t, starts[s] : starts[s] + sizes[s]] = 0.0
        return mask

    def _heads(self, t: torch.Tensor, num_heads: int) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    def _original_attention(self, block: Block, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Plain MHSA of the original tokens (same ops as layers.MultiHeadSelfAttention), plus their k, v."""
        attn = block.attn
        b, n, c = h.shape
        q, k, v = attn.qkv(h).split(c, dim=-1)
        q, k, v = (self._heads(t, attn.num_heads) for t in (q, k, v))
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c)), k, v

    def _task_attention(
        self, block: Block, layer: int, t: torch.Tensor, k_orig: torch.Tensor, v_orig: torch.Tensor
    ) -> torch.Tensor:
        """Masked attention of the task class tokens over [original; task cls; memory] keys/values."""
        attn = block.attn
        b, n, c = t.shape
        q, k, v = attn.qkv(block.norm1(t)).split(c, dim=-1)
        memory = torch.cat([task.memory[layer] for task in self.tasks]).unsqueeze(0)  # (1, M, D)
        _, k_mem, v_mem = attn.qkv(block.norm1(memory)).split(c, dim=-1)  # memory never queries
        heads = attn.num_heads
        k_mem = self._heads(k_mem, heads).expand(b, -1, -1, -1)
        v_mem = self._heads(v_mem, heads).expand(b, -1, -1, -1)
        k = torch.cat((k_orig, self._heads(k, heads), k_mem), dim=2)
        v = torch.cat((v_orig, self._heads(v, heads), v_mem), dim=2)
        scores = (self._heads(q, heads) * attn.scale) @ k.transpose(-2, -1) + self.task_mask
        return attn.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        """Normalised original tokens (B, N+1, D) and task class tokens (B, T, D) (None without tasks)."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed  # exactly VisionTransformer's embedding
        t = None
        if len(self.tasks):
            t = torch.cat([task.cls_token for task in self.tasks], dim=1) + self.pos_embed[:, :1]
            t = t.expand(x.shape[0], -1, -1)
        for layer, block in enumerate(self.blocks):
            out, k, v = self._original_attention(block, block.norm1(x))
            x = x + out
            x = x + block.mlp(block.norm2(x))
            if t is not None:
                t = t + self._task_attention(block, layer, t, k, v)
                t = t + block.mlp(block.norm2(t))
        return self.norm(x), (self.norm(t) if t is not None else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        x, t = self.forward_features(x)
        logits = [self.head(x[:, 0])]
        logits += [task.head(t[:, i]) for i, task in enumerate(self.tasks)]  # type: ignore[index]
        return tuple(logits)


def checkpoint_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Load a plain ViT (timm/edgevit ``deit_tiny``) state into a MemoryViT: fill in the task keys.

    Task class tokens start from the checkpoint's ``cls_token``; memory and heads keep the model's
    current initialisation. Keys the checkpoint already has (a MemoryViT checkpoint) are kept.
    """
    state = dict(state)
    for key, value in model.state_dict().items():
        if key.startswith("tasks.") and key not in state:
            from_cls = key.endswith(".cls_token") and "cls_token" in state
            state[key] = state["cls_token"].clone() if from_cls else value.clone()
    return state


@register_model(
    ModelInfo(
        name="memvit_tiny",
        family="memvit",
        paper=_PAPER,
        input_size=224,
        input_multiple=16,
        aliases=("learnable_memory_vit_tiny",),
        notes="outputs: (original 1000-class logits, added-task logits); DeiT-Tiny backbone keys",
        extra={"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16,
               "tasks": [{"num_classes": c, "num_memory_tokens": m} for c, m in DEFAULT_TASKS]},
        checkpoint_filter=checkpoint_filter,
    )
)
def memvit_tiny(
    img_size: int = 224, num_classes: int = 1000, tasks: Sequence[tuple[int, int]] = DEFAULT_TASKS
) -> MemoryViT:
    """ViT-Ti backbone with ``num_classes`` original classes and the added ``tasks`` (classes, memory)."""
    model = MemoryViT(img_size, 16, 192, 12, 3, num_classes=num_classes)
    for task_classes, memory_tokens in tasks:
        model.add_task(task_classes, memory_tokens)
    return model
