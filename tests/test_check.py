"""`armor-check DIR` (vllm_armor/check.py): one summary line on a good folder, one line naming the problem otherwise."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import armor_fixtures as af
import pytest
import torch

from vllm_armor import check
from vllm_armor import checkpoint_format as cf


def _run_check(folder: Path) -> subprocess.CompletedProcess:
    """`armor-check` as a user runs it: its own process."""
    return subprocess.run([sys.executable, "-m", "vllm_armor.check", str(folder)], capture_output=True, text=True,
                          timeout=120)


def _check(folder: Path) -> subprocess.CompletedProcess:
    """The same `main` in this process (about 1 s faster per call than a new Python with torch): exit code, stdout
    and stderr as the command's. An unexpected exception propagates and fails the test, as a traceback would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = check.main([str(folder)])
    return subprocess.CompletedProcess(["armor-check", str(folder)], code, out.getvalue(), err.getvalue())


def _assert_fails(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL ") and needle in lines[0], proc.stderr


def test_good_folder_prints_one_summary_line(armor_tiny_llama):
    proc = _run_check(armor_tiny_llama[0])
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith(f"OK {armor_tiny_llama[0]}: "), line
    assert "14 ARMOR linears" in line and "blocks 64" in line and "format v1" in line, line


@pytest.mark.parametrize("kind", sorted(af.MALFORMED))
def test_malformed_folder_fails_with_one_line(armor_tiny_llama, tmp_path, kind):
    _assert_fails(_check(af.make_malformed(armor_tiny_llama[0], tmp_path / kind, kind)), af.MALFORMED[kind])


@pytest.mark.parametrize("kind", sorted({**af.MALFORMED_MODEL, **af.MALFORMED_VLLM}))
def test_folder_valid_without_a_model_passes(armor_tiny_llama, tmp_path, kind):
    """Refused by the readers against the model (a listed module the model lacks) or by vLLM's fused layers only:
    the folder itself follows the format."""
    proc = _check(af.make_malformed(armor_tiny_llama[0], tmp_path / kind, kind))
    assert proc.returncode == 0 and proc.stdout.startswith("OK "), proc.stderr


def _copy(armor_dir: Path, out: Path) -> Path:
    shutil.copytree(armor_dir, out)
    return out


@pytest.mark.parametrize("size", [0, 4, 1000, -100])
def test_empty_or_truncated_safetensors(armor_tiny_llama, tmp_path, size):
    folder = _copy(armor_tiny_llama[0], tmp_path / "bad")
    weights = folder / cf.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:size] if size >= 0 else data[:size])
    _assert_fails(_check(folder), "model.safetensors")


def test_unlisted_armor_tensor(armor_tiny_llama, tmp_path):
    folder = _copy(armor_tiny_llama[0], tmp_path / "extra")
    config, tensors = cf.read_folder(folder)
    tensors["model.layers.0.mlp.extra_proj.core_meta"] = torch.zeros(4, 2, dtype=torch.uint8)
    cf.write_folder(folder, tensors, config)
    _assert_fails(_check(folder), "'model.layers.0.mlp.extra_proj.core_meta' (model.safetensors) belongs to no module")


def test_not_an_armor_folder(armor_tiny_llama, tmp_path):
    _assert_fails(_run_check(armor_tiny_llama[1]), "no ARMOR quantization_config")
    _assert_fails(_check(tmp_path), "no config.json")
