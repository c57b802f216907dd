"""Checkpoint loading on files the tests write: safetensors, torch (weights-only), wrappers, mismatches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import edgevit
from edgevit.errors import EdgevitError
from edgevit.weights import read_checkpoint


def _trained_state(name: str = "mobilevit_v2_050") -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return {k: v.clone() for k, v in edgevit.create_model(name).state_dict().items()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_safetensors_round_trip(tmp_path) -> None:
    state = _trained_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    assert _same(edgevit.create_model("mobilevit_v2_050", weights=tmp_path / "w.safetensors"), state)


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3},
                                  lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}])
def test_torch_checkpoints_and_wrappers(tmp_path, wrap) -> None:
    state = _trained_state()
    torch.save(wrap(state), tmp_path / "w.pth")
    assert _same(edgevit.create_model("mobilevit_v2_050", weights=tmp_path / "w.pth"), state)


def test_pickled_code_is_refused(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(EdgevitError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "evil.pth")


def test_mismatch_lists_the_first_keys(tmp_path) -> None:
    state = _trained_state()
    state.pop("head.fc.weight")
    state["head.extra"] = torch.zeros(1)
    state["stem.conv.weight"] = torch.zeros(1, 1, 1, 1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EdgevitError) as info:
        edgevit.create_model("mobilevit_v2_050", weights=tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "1 missing: head.fc.weight" in message and "1 unexpected: head.extra" in message
    assert "1 wrong shape: stem.conv.weight [1, 1, 1, 1] vs [16, 3, 3, 3]" in message
    assert "\n" not in message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(EdgevitError, match="does not exist"):
        edgevit.create_model("deit_tiny", weights=tmp_path / "nope.safetensors")


def test_cli_weights_bad_file_is_one_line(tmp_path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "edgevit.cli", "export", "deit_tiny", "--target", "onnx",
                           "--weights", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_export_records_the_checkpoint(tmp_path) -> None:
    state = _trained_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    result = edgevit.export_model("mobilevit_v2_050", target="onnx", out=tmp_path / "o",
                                  weights=tmp_path / "w.safetensors")
    assert result.ok
    recorded = json.loads(result.manifest_path.read_text())["model"]["weights"]
    assert recorded["path"].endswith("w.safetensors") and len(recorded["sha256"]) == 64


def test_exercise_all_parameters_removes_dead_branches() -> None:
    from edgevit.weights import exercise_all_parameters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    torch.nn.init.zeros_(model[1].weight)  # a zero-gamma residual branch, as EfficientViT initialises
    x = torch.randn(1, 3, 4, 4)
    assert not model(x).any()
    exercise_all_parameters(model, seed=0)
    assert model(x).abs().min() > 0 and model[1].bias.any()
    again = exercise_all_parameters(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)), 0)
    assert torch.equal(again[1].running_var, model[1].running_var)  # seeded
