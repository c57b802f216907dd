"""A user's own model from the CLI: a saved Hugging Face folder or ``package.module:factory``.

Resolution is unit-tested in process; every bad reference must be one line on stderr, exit 2, no
traceback (typer's CliRunner, in process, for speed); one real export of each kind goes through the
CLI in a subprocess, child process included, on models small enough to convert in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgevit import cli
from edgevit.errors import EdgevitError
from edgevit.references import (
    example_inputs,
    fingerprint,
    is_reference,
    parse_input_shape,
    reference_kind,
    resolve_model,
    split_model_list,
)

transformers = pytest.importorskip("transformers")

EDGEVIT = [sys.executable, "-m", "edgevit.cli"]

FACTORY_MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make():
    return TinyNet()


def broken():
    raise RuntimeError("the factory is broken")


def not_a_module():
    return [1, 2]


NOT_CALLABLE = 42
'''


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A tiny ViT saved with save_pretrained: config.json + model.safetensors."""
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    folder = tmp_path / "tiny_vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture
def factory_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory holds ``tinyfactory.py`` (imported as ``python -m`` would, from the cwd)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "tinyfactory.py").write_text(FACTORY_MODULE)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.delitem(sys.modules, "tinyfactory", raising=False)
    return work


# --- resolution ----------------------------------------------------------------------------------

def test_kinds_and_zoo_names_win(hf_dir: Path, factory_cwd: Path) -> None:
    assert reference_kind("pkg.mod:make") == "factory" and reference_kind("mod:Class.build") == "factory"
    assert reference_kind(str(hf_dir)) == "hf" and reference_kind("./missing") == "hf"
    assert reference_kind("deit_tny") is None and not is_reference("deit_tny")
    (factory_cwd / "deit_tiny").mkdir()  # a folder named like a zoo model: the zoo wins
    assert not is_reference("deit_tiny") and is_reference("tinyfactory:make")


def test_parse_input_shape_and_split_models(tmp_path: Path) -> None:
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    for bad in ("1,3,a,224", "", "1,,3", "1,3,-2,2", "1,3,0,4"):
        with pytest.raises(EdgevitError, match="malformed --input-shape"):
            parse_input_shape(bad)
    odd = tmp_path / "a,b"
    odd.mkdir()
    assert split_model_list(f"deit_tiny, pkg.mod:make,{odd},x") == ["deit_tiny", "pkg.mod:make", str(odd), "x"]


def test_resolve_hf_folder(hf_dir: Path) -> None:
    r = resolve_model(str(hf_dir))
    assert (r.kind, r.name, r.reference, r.input_shape) == ("hf", "tiny_vit", str(hf_dir), (1, 3, 32, 32))
    assert not r.module.training and r.mean == pytest.approx((0.485, 0.456, 0.406))
    loaded = transformers.ViTForImageClassification.from_pretrained(hf_dir)
    assert torch.equal(r.module.classifier.weight, loaded.classifier.weight)  # the folder's weights
    assert resolve_model(str(hf_dir), input_size=64).input_shape == (1, 3, 64, 64)
    assert resolve_model(str(hf_dir), input_shape=(2, 3, 16, 16)).input_shape == (2, 3, 16, 16)
    # deterministic: another process resolving the same string gets the same inputs
    assert torch.equal(r.example_inputs[0], resolve_model(str(hf_dir)).example_inputs[0])
    assert torch.equal(r.example_inputs[0], example_inputs(str(hf_dir), (1, 3, 32, 32))[0])


def test_hf_normalisation_from_the_preprocessor(hf_dir: Path) -> None:
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    r = resolve_model(str(hf_dir))
    assert r.mean == (0.5, 0.5, 0.5) and r.std == (0.5, 0.5, 0.5)
    assert float(r.example_inputs[0].min()) >= -1 and float(r.example_inputs[0].max()) <= 1


def test_hf_weights_replace_the_folders(hf_dir: Path, tmp_path: Path) -> None:
    state = {k: torch.full_like(v, 0.25) for k, v in resolve_model(str(hf_dir)).module.state_dict().items()}
    torch.save(state, tmp_path / "ckpt.pt")
    r = resolve_model(str(hf_dir), weights=tmp_path / "ckpt.pt")
    assert torch.all(r.module.classifier.weight == 0.25) and r.weights == tmp_path / "ckpt.pt"
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(EdgevitError, match="does not fit ViTForImageClassification"):
        resolve_model(str(hf_dir), weights=tmp_path / "bad.pt")


def test_resolve_factory(factory_cwd: Path, tmp_path: Path) -> None:
    r = resolve_model("tinyfactory:make", (1, 3, 16, 16))
    assert (r.kind, r.name, r.mean, r.input_shape) == ("factory", "make", None, (1, 3, 16, 16))
    again = resolve_model("tinyfactory:make", (1, 3, 16, 16))  # seeded construction: the same weights
    assert torch.equal(r.module.conv.weight, again.module.conv.weight)
    assert resolve_model("tinyfactory:TinyNet", (1, 3, 8, 8)).name == "TinyNet"  # a class is a factory
    torch.save({k: torch.ones_like(v) for k, v in r.module.state_dict().items()}, tmp_path / "w.pt")
    assert torch.all(resolve_model("tinyfactory:make", (1, 3, 8, 8), tmp_path / "w.pt").module.head.bias == 1)
    with pytest.raises(EdgevitError, match="give its input shape"):
        resolve_model("tinyfactory:make")


def test_fingerprint_follows_the_folders_files(hf_dir: Path) -> None:
    before = fingerprint(str(hf_dir))
    assert before["reference"] == str(hf_dir) and before == fingerprint(str(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"layer_norm_eps": 1e-6}))
    assert fingerprint(str(hf_dir))["sha256"] != before["sha256"]


def test_export_model_takes_a_reference_string(factory_cwd: Path, tmp_path: Path) -> None:
    """The Python API: the same strings as the CLI, example inputs fixing the shape."""
    from edgevit.export.subject import prepare_subject

    subject = prepare_subject("tinyfactory:make", torch.zeros(1, 3, 8, 8), None, None, 0, init="exercise")
    assert subject.reference.kind == "factory" and subject.reference.init == "exercise"
    with pytest.raises(EdgevitError, match="give its input shape"):
        prepare_subject("tinyfactory:make", None, None, None, 0)


# --- bad references: one line, exit 2 ------------------------------------------------------------

def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


@pytest.mark.parametrize(
    "args,message",
    [
        (["nosuchmodule:make", "--input-shape", "1,3,8,8"], "cannot import module 'nosuchmodule'"),
        (["tinyfactory:missing", "--input-shape", "1,3,8,8"], "module 'tinyfactory' has no attribute 'missing'"),
        (["tinyfactory:NOT_CALLABLE", "--input-shape", "1,3,8,8"], "'tinyfactory:NOT_CALLABLE' is not callable (type int)"),
        (["tinyfactory:broken", "--input-shape", "1,3,8,8"], "factory 'tinyfactory:broken' raised RuntimeError: "
                                                             "the factory is broken"),
        (["tinyfactory:not_a_module", "--input-shape", "1,3,8,8"], "returned list, not a torch.nn.Module"),
        (["tinyfactory:make"], "is a module:factory reference: give its input shape"),
        (["tinyfactory:make", "--input-shape", "1,3,x"], "malformed --input-shape '1,3,x'"),
        (["tinyfactory:make", "--input-shape", "1,5,8,8"], "'make' does not run on an input of shape 1,5,8,8"),
        (["deit_tiny", "--input-shape", "1,3,224,224"], "--input-shape applies to a Hugging Face folder"),
        (["deit_tny"], "unknown model 'deit_tny'; did you mean deit_tiny"),
        (["./no_such_folder"], "'./no_such_folder' is neither a zoo model nor an existing folder"),
        (["empty_folder"], "folder 'empty_folder' has no config.json"),
        (["unknown_arch"], "transformers cannot read"),
        (["tinyfactory:make", "--input-shape", "1,3,8,8", "--init", "zero"], "unknown --init 'zero'"),
    ],
)
def test_bad_reference_one_line_exit_2(factory_cwd: Path, args: list[str], message: str) -> None:
    (factory_cwd / "empty_folder").mkdir()
    (factory_cwd / "unknown_arch").mkdir()
    (factory_cwd / "unknown_arch" / "config.json").write_text(json.dumps({"model_type": "no-such-arch",
                                                                           "architectures": ["NoSuchModel"]}))
    result = _invoke("export", *args, "--target", "onnx", "--out", str(factory_cwd / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (factory_cwd / "out").exists()


def test_unbuildable_architecture_one_line(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchViT"]}))
    (hf_dir / "model.safetensors").unlink()  # nor can the Auto fallbacks load weights that are not there
    result = _invoke("export", str(hf_dir), "--target", "onnx")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "transformers cannot build" in result.stderr, result.stderr


def test_missing_transformers_names_the_extra(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = _invoke("export", str(hf_dir), "--target", "onnx")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: a Hugging Face folder needs the Python package 'transformers': "
                                     "pip install 'edgevit[hf]'")


def test_bench_rejects_bad_references(factory_cwd: Path) -> None:
    result = _invoke("bench", "--models", "deit_tiny,tinyfactory:broken", "--input-shape", "1,3,8,8",
                     "--out", str(factory_cwd / "bench"))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "factory 'tinyfactory:broken' raised" in result.stderr


def test_options_travel_to_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's checked options reach the export child whole, as JSON in its environment."""
    from edgevit.export import isolated
    from edgevit.export.options import ExportOptions

    opts = ExportOptions(input_shape=(1, 3, 8, 8), init="exercise", strict_passes=True, weights=Path("/w.pt"),
                         passes=("strip_aliases", "select_to_slice"))
    assert ExportOptions.from_json(opts.to_json()) == opts
    seen: dict = {}
    monkeypatch.setattr(isolated, "run_export_child",
                        lambda cmd, *args, **kwargs: seen.update(cmd=cmd, env=args[-1], kwargs=kwargs) or {})
    isolated.export_in_child("tinyfactory:make", "onnx", Path("out"), opts)
    assert seen["cmd"][-1] == "--in-process" and "--init" not in seen["cmd"]  # nothing to parse again
    assert seen["kwargs"] == {"detached": False}  # the child shares our session unless a sweep asks otherwise
    monkeypatch.setenv(isolated.OPTIONS_ENV, seen["env"][isolated.OPTIONS_ENV])
    assert isolated.take_child_options() == opts and isolated.OPTIONS_ENV not in os.environ


def test_bench_cache_key_changes_with_the_folder(hf_dir: Path) -> None:
    from edgevit.devices.bench import cache_key
    from edgevit.devices.table import DEVICES

    device = next(d for d in DEVICES.values() if d.target == "onnx")
    key = cache_key(str(hf_dir), 32, device, "fp32", "auto", (1, 3, 32, 32))
    assert key["model"] == str(hf_dir) and key["input_shape"] == [1, 3, 32, 32]
    (hf_dir / "model.safetensors").write_bytes(b"changed")
    assert cache_key(str(hf_dir), 32, device, "fp32", "auto", (1, 3, 32, 32))["content"] != key["content"]


# --- through the CLI, for real -------------------------------------------------------------------

def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEVIT, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_hf_error_after_loading_is_one_line_in_a_real_process(hf_dir: Path, tmp_path: Path) -> None:
    """Loading a transformers model imports torchao, which logs through torch's logger: kept quiet."""
    proc = _run("export", str(hf_dir), "--target", "onnx", "--input-shape", "1,3,48,32", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: 'tiny_vit' does not run on an input of shape 1,3,48,32: ValueError: Input image size (48*32) "
        "doesn't match model (32*32)."], proc.stderr


def test_export_hf_folder_end_to_end(hf_dir: Path, tmp_path: Path) -> None:
    proc = _run("export", str(hf_dir), "--target", "onnx", "--out", str(tmp_path / "out"), "--json",
                "--latency-runs", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["model"]["source"] == "hf"
    assert manifest["model"]["reference"] == str(hf_dir) and manifest["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert manifest["model"]["weights"]["sha256"] == fingerprint(str(hf_dir))["sha256"]
    assert manifest["outputs"][0]["name"] == "logits" and (tmp_path / "out" / "tiny_vit.onnx").is_file()


def test_export_factory_end_to_end(factory_cwd: Path) -> None:
    proc = _run("export", "tinyfactory:make", "--input-shape", "1,3,32,32", "--target", "onnx",
                "--init", "exercise", "--latency-runs", "0", cwd=factory_cwd)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((factory_cwd / "exports" / "make" / "onnx" / "manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["model"]["source"] == "factory"
    assert manifest["model"]["reference"] == "tinyfactory:make" and "init='exercise'" in manifest["model"]["weights"]
    assert manifest["inputs"][0]["shape"] == [1, 3, 32, 32]


def test_inspect_hf_folder_json(hf_dir: Path, tmp_path: Path) -> None:
    proc = _run("inspect", str(hf_dir), "-t", "onnx", "-a", "cpu", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "tiny_vit" and report["accelerators"]
    assert all("coverage" in row for row in report["accelerators"])
