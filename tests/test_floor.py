"""The floors (benchmarks/floor.py): the model's Linear calls (and, for the matmul floor, its matmuls of two
activations), recorded and replayed as one chain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sys
from pathlib import Path

from edgevit.export.subject import prepare_subject

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmark code, not the package
from floor import (  # noqa: E402
    LinearCall,
    LinearChain,
    MatmulCall,
    _fit,
    _fit_flat,
    adapters,
    call_from_list,
    exported_linear_calls,
    builder_options,
    linear_floor,
    record_linear_calls,
)
from edgevit.devices.worker import Worker  # noqa: E402


def test_deit_tiny_linear_calls_are_its_blocks_and_head() -> None:
    subject = prepare_subject("deit_tiny", None, None, None, 0)
    calls = record_linear_calls(subject.model.eval(), subject.example_inputs)
    # 12 blocks of qkv, proj, fc1, fc2 on 197 tokens (196 patches + cls), then the head on the cls token.
    block = [LinearCall(197, 192, 576, True), LinearCall(197, 192, 192, True),
             LinearCall(197, 192, 768, True), LinearCall(197, 768, 192, True)]
    assert calls == block * 12 + [LinearCall(1, 192, 1000, True)]
    assert sum(c.macs for c in calls) == 12 * 197 * 192 * (576 + 192 + 768 + 768) + 192 * 1000
    # slicing qkv's 576 outputs to proj's 192 inputs (12x), and the 197 tokens to the head's one row
    assert adapters(calls) == 13


def test_the_floor_is_what_the_exported_graph_runs() -> None:
    """sink_slices runs DeiT-Tiny's last proj, fc1 and fc2 on the class token alone; qkv keeps every row
    (keys and values need them). The floor follows: 196 x 331,776 MACs fewer."""
    subject = prepare_subject("deit_tiny", None, None, None, 0)
    calls = exported_linear_calls(subject.model, subject.example_inputs)
    block = [LinearCall(197, 192, 576, True), LinearCall(197, 192, 192, True),
             LinearCall(197, 192, 768, True), LinearCall(197, 768, 192, True)]
    last = [LinearCall(197, 192, 576, True), LinearCall(1, 192, 192, True),
            LinearCall(1, 192, 768, True), LinearCall(1, 768, 192, True)]
    assert calls == block * 11 + last + [LinearCall(1, 192, 1000, True)]
    assert sum(c.macs for c in calls) == 1_045_949_952 - 196 * 331_776
    assert exported_linear_calls(subject.model, subject.example_inputs, []) == record_linear_calls(
        subject.model, subject.example_inputs)


def test_the_matmul_floor_adds_the_attention_matmuls() -> None:
    """Each block's q k^T (3 heads x 197 x 64 @ 64 x 197) and softmax(.) v (197 x 197 @ 197 x 64) between
    qkv and proj; in the last block the class token's query alone (sink_slices)."""
    subject = prepare_subject("deit_tiny", None, None, None, 0)
    calls = exported_linear_calls(subject.model, subject.example_inputs, matmuls=True)
    qkv, proj, fc1, fc2 = (LinearCall(197, 192, 576, True), LinearCall(197, 192, 192, True),
                           LinearCall(197, 192, 768, True), LinearCall(197, 768, 192, True))
    scores, mix = MatmulCall(3, 197, 64, 197), MatmulCall(3, 197, 197, 64)
    last = [qkv, MatmulCall(3, 1, 64, 197), MatmulCall(3, 1, 197, 64), LinearCall(1, 192, 192, True),
            LinearCall(1, 192, 768, True), LinearCall(1, 768, 192, True), LinearCall(1, 192, 1000, True)]
    assert calls == [qkv, scores, mix, proj, fc1, fc2] * 11 + last
    linear_macs = 1_045_949_952 - 196 * 331_776
    assert sum(c.macs for c in calls) == linear_macs + 11 * 2 * 3 * 197 * 197 * 64 + 2 * 3 * 197 * 64
    # only qkv's 576 outputs sliced to the scores' 3 x 197 x 64 inputs; every other step is a reshape
    assert adapters(calls) == 12
    chain = LinearChain(calls).eval()
    with torch.no_grad():
        out = chain(chain.example_input())
    assert out.shape == (1, 1, 1000) and torch.isfinite(out).all()


def test_a_matmul_call_multiplies_the_previous_output_by_a_constant() -> None:
    calls = [LinearCall(4, 8, 6, True), MatmulCall(2, 4, 3, 5), LinearCall(8, 5, 2, False)]
    assert [call_from_list(c.to_list()) for c in calls] == calls
    chain = LinearChain(calls, seed=3).eval()
    x = chain.example_input()
    with torch.no_grad():
        first = chain.layers[0](x)  # (1, 4, 6) = 24 elements = 2 x 4 x 3: a reshape
        mixed = torch.matmul(first.reshape(2, 4, 3), chain.layers[1].rhs).reshape(1, 8, 5)
        assert torch.allclose(chain(x), chain.layers[2](mixed))
    assert adapters(calls) == 0
    assert torch.equal(LinearChain(calls, seed=3).layers[1].rhs, chain.layers[1].rhs)  # seeded
    with pytest.raises(ValueError, match="starts with a Linear"):
        LinearChain(calls[1:])


def test_fit_flat_reshapes_slices_and_tiles() -> None:
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(_fit_flat(x, (3, 2)), x.reshape(3, 2))
    assert torch.equal(_fit_flat(x, (2, 2)), torch.arange(4.0).reshape(2, 2))
    assert torch.equal(_fit_flat(x, (2, 4)).reshape(-1), torch.tensor([0., 1, 2, 3, 4, 5, 0, 1]))


def test_the_chain_replays_the_same_calls() -> None:
    subject = prepare_subject("deit_tiny", None, None, None, 0)
    chain = linear_floor(subject.model, subject.example_inputs)
    x = chain.example_input()
    assert x.shape == (1, 197, 192)
    assert record_linear_calls(chain, (x,)) == chain.calls
    with torch.no_grad():
        assert chain(x).shape == (1, 1, 1000)
    again = LinearChain(chain.calls)
    assert torch.equal(again.layers[0].weight, chain.layers[0].weight)  # seeded


def test_fit_slices_and_tiles() -> None:
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(_fit(x, 1, 2), x[:, :1, :2])
    tiled = _fit(x, 3, 5)
    assert tiled.shape == (1, 3, 5)
    assert torch.equal(tiled[0, :, :3], torch.cat([x[0], x[0, :1]]))  # rows wrap around
    assert torch.equal(tiled[0, 0, 3:], x[0, 0, :2])  # features wrap around
    assert _fit(x, 2, 3) is x


def test_a_growing_chain_tiles_between_calls() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4, bias=False), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.cat([self.a(x)] * 4, dim=-1).repeat(1, 3, 1))

    calls = record_linear_calls(Toy(), (torch.randn(1, 5, 8),))
    assert calls == [LinearCall(5, 8, 4, False), LinearCall(15, 16, 2, True)]
    assert adapters(calls) == 2
    chain = LinearChain(calls)
    assert chain(chain.example_input()).shape == (1, 15, 2)


def test_a_model_without_linear_layers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        record_linear_calls(nn.Conv2d(3, 4, 1), (torch.randn(1, 3, 8, 8),))


def test_the_eager_worker_times_the_floor_on_request(tmp_path) -> None:
    import numpy as np

    subject = prepare_subject("efficientvit_m0", None, 64, None, 0)
    chain = LinearChain(record_linear_calls(subject.model.eval(), subject.example_inputs))
    inputs = tmp_path / "x.npz"
    np.savez(inputs, chain.example_input().numpy())
    worker = Worker()
    worker.load({"runtime": "torch", "inputs": str(inputs), "threads": 1,
                 "options": {"model": "efficientvit_m0", "input_size": 64, **builder_options(chain)}})
    assert isinstance(worker.session.model, LinearChain) and worker.session.model.calls == chain.calls
    assert torch.equal(worker.session.model.layers[-1].weight, chain.layers[-1].weight)  # same seed
    assert len(worker.run(2)["times_ms"]) == 2
    mixed = [LinearCall(4, 8, 6, True), MatmulCall(2, 4, 3, 5)]  # the matmul floor travels the same way
    np.savez(inputs, LinearChain(mixed).example_input().numpy())
    worker = Worker()
    worker.load({"runtime": "torch", "inputs": str(inputs), "threads": 1,
                 "options": builder_options(LinearChain(mixed))})
    assert worker.session.model.calls == mixed and len(worker.run(1)["times_ms"]) == 1
