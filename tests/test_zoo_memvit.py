"""Learnable-memory ViT (architectures.md section 10): non-destructive tasks, masking, loading a DeiT."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import edgevit
from edgevit.models.memvit import MemoryViT
from edgevit.registry import model_info

SIZE = 32  # 2x2 patches: the masking logic does not depend on the token count


def _small(seed: int = 0) -> MemoryViT:
    torch.manual_seed(seed)
    return MemoryViT(img_size=SIZE, embed_dim=48, depth=3, num_heads=3, num_classes=7).eval()


def _paper_reference(model: MemoryViT, images: torch.Tensor) -> list[torch.Tensor]:
    """The paper's form: append every task's memory to each layer's input, one joint attention over all
    tokens with the full additive (0 / -inf) mask of section 10.1, then truncate the memory rows."""
    x = model.patch_embed(images)
    b, n_orig = x.shape[0], x.shape[1] + 1
    x = torch.cat((model.cls_token.expand(b, -1, -1), x), dim=1) + model.pos_embed
    cls = torch.cat([t.cls_token for t in model.tasks], dim=1) + model.pos_embed[:, :1]
    z = torch.cat((x, cls.expand(b, -1, -1)), dim=1)
    n_tasks, sizes = len(model.tasks), [t.memory.shape[1] for t in model.tasks]
    kept = n_orig + n_tasks
    owner = [None] * n_orig + list(range(n_tasks)) + [t for t, m in enumerate(sizes) for _ in range(m)]
    allowed = torch.zeros(len(owner), len(owner), dtype=torch.bool)
    for i, qi in enumerate(owner):
        for j, kj in enumerate(owner):
            if qi is None:  # original tokens see original tokens only
                allowed[i, j] = kj is None
            else:  # a task token sees originals, its own cls/memory, earlier tasks' if extending
                allowed[i, j] = kj is None or kj == qi or (model.tasks[qi].extend and kj < qi)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    for layer, block in enumerate(model.blocks):
        memory = torch.cat([t.memory[layer] for t in model.tasks]).expand(b, -1, -1)
        h = block.norm1(torch.cat((z, memory), dim=1))
        attn, c = block.attn, h.shape[-1]
        q, k, v = attn.qkv(h).reshape(b, -1, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * attn.scale + mask).softmax(dim=-1)
        z = torch.cat((z, memory), dim=1) + attn.proj((w @ v).transpose(1, 2).reshape(b, -1, c))
        z = z + block.mlp(block.norm2(z))
        z = z[:, :kept]  # truncate: memory is not propagated
    z = model.norm(z)
    return [model.head(z[:, 0])] + [t.head(z[:, n_orig + i]) for i, t in enumerate(model.tasks)]


def test_registered_defaults_and_counts() -> None:
    info, deit = model_info("memvit_tiny"), model_info("deit_tiny")
    assert info.family == "memvit" and "2203.15243" in info.paper
    extra = 192 + 12 * 5 * 192 + 192 * 100 + 100  # one task: cls token, 5 memory tokens x 12 layers, head
    assert info.params == deit.params + extra
    assert info.params / 1e6 == pytest.approx(5.717 + extra / 1e6, rel=0.01)  # deit_tiny target, sec. 13
    assert info.macs / 1e9 == pytest.approx(1.254, rel=0.02)  # memory adds ~1% to deit_tiny


def test_forward_returns_logits_of_every_task() -> None:
    model = edgevit.create_model("memvit_tiny", img_size=SIZE, num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, SIZE, SIZE))
    assert isinstance(logits, tuple) and [t.shape for t in logits] == [(2, 10), (2, 100)]


@pytest.mark.parametrize("extend", [False, True])
def test_adding_a_task_leaves_the_original_logits_bit_identical(extend: bool) -> None:
    model = _small()
    model.add_task(5, 2)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        assert model.add_task(4, 3, extend=extend) == 2
        after = model(x)
    assert len(after) == 3 and after[2].shape == (2, 4)
    assert torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-6)  # earlier tasks: masked too


def test_memory_changes_only_its_own_task() -> None:
    model = _small()
    model.add_task(5, 2)
    model.add_task(4, 3)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        model.tasks[1].memory.add_(torch.randn_like(model.tasks[1].memory))
        after = model(x)
    assert torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[2], before[2])


def test_efficient_form_equals_concatenate_mask_truncate() -> None:
    model = _small()
    model.add_task(5, 2)
    model.add_task(4, 3)
    model.add_task(3, 1, extend=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for ours, ref in zip(model(x), _paper_reference(model, x), strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_mask_is_finite_and_tensors_stay_rank_4(max_rank) -> None:
    model = _small()
    model.add_task(5, 2)
    model.add_task(4, 3, extend=True)
    assert torch.isfinite(model.task_mask).all() and model.task_mask.min() < -1e3
    assert "task_mask" not in model.state_dict()
    assert max_rank(model, torch.randn(1, 3, SIZE, SIZE)) <= 4


def test_deit_tiny_checkpoint_loads_into_the_backbone(tmp_path) -> None:
    torch.manual_seed(3)
    deit = edgevit.create_model("deit_tiny", img_size=SIZE).eval()
    state = {k: v.clone().contiguous() for k, v in deit.state_dict().items()}
    save_file(state, str(tmp_path / "deit_tiny.safetensors"))
    model = edgevit.create_model("memvit_tiny", img_size=SIZE, weights=tmp_path / "deit_tiny.safetensors").eval()
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())  # timm/edgevit ViT keys, unchanged
    assert torch.equal(own["tasks.0.cls_token"], state["cls_token"])  # task token starts from the cls
    assert own["tasks.0.memory"].shape == (12, 5, 192)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x)[0], deit(x))  # the original task is the DeiT, bit for bit


def test_memvit_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(4)
    source = edgevit.create_model("memvit_tiny", img_size=SIZE).eval()
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "memvit.safetensors"))
    torch.manual_seed(5)
    model = edgevit.create_model("memvit_tiny", img_size=SIZE, weights=tmp_path / "memvit.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
