"""Bad checkpoints in the offline reader (`armor-eval` / `offline_prune.checkpoint.load_model`, through the
transformers quantizer): every malformed folder of tests/armor_fixtures.py is refused with exit code 2 and one line,
the same text as at vLLM start-up (tests/test_malformed.py) and in armor-check (tests/test_check.py). Also the format
module's header, dtype, shape and numerics checks on their own."""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
from pathlib import Path

import armor_fixtures as af
import pytest
import torch
from safetensors.torch import save_file

from vllm_armor import checkpoint_format as fmt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("Some words to evaluate the model on. " * 40)
    return path


def _eval_in_process(folder: Path, text: Path, caplog) -> tuple[int, list[str]]:
    from offline_prune.cli import eval_main

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = eval_main(["ppl", str(folder), "--data", str(text), "--ctx-len", "16", "--max-windows", "1"])
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", sorted({**af.MALFORMED, **af.MALFORMED_MODEL}))
def test_armor_eval_refuses_with_the_readers_message(armor_tiny_llama, tmp_path, text_file, caplog, kind):
    folder = af.make_malformed(armor_tiny_llama[0], tmp_path / kind, kind)
    code, errors = _eval_in_process(folder, text_file, caplog)
    assert code == 2, errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert {**af.MALFORMED, **af.MALFORMED_MODEL}[kind] in errors[0], errors


@pytest.mark.parametrize("kind", sorted(af.MALFORMED_VLLM))
def test_offline_reader_serves_what_only_vllm_cannot_fuse(armor_tiny_llama, tmp_path, kind):
    from offline_prune.checkpoint import load_model

    model = load_model(af.make_malformed(armor_tiny_llama[0], tmp_path / kind, kind))
    assert model(torch.tensor([[1, 2, 3]]), use_cache=False).logits.isfinite().all()


@pytest.mark.parametrize("kind", af.FILE_DAMAGE)
def test_armor_eval_damaged_file_is_one_line_exit_2(armor_tiny_llama, tmp_path, text_file, kind):
    folder = af.make_malformed(armor_tiny_llama[0], tmp_path / kind, kind)
    main = "import sys; from offline_prune.cli import eval_main; sys.exit(eval_main())"  # = armor-eval
    proc = subprocess.run([sys.executable, "-c", main, "ppl", str(folder), "--data", str(text_file), "--ctx-len", "16"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and af.MALFORMED[kind] in errors[0] and str(folder) in errors[0], proc.stderr[-3000:]


# --- the format module on its own ---------------------------------------------------------------------------------


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3, dtype=torch.uint8)}, path)
    return path


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_header_checked_against_the_file(tmp_path):
    path = _file(tmp_path)
    assert fmt.read_header(path)["a"] == fmt.TensorInfo((4, 4), torch.float32)
    good = path.read_bytes()
    cases = {
        b"": "is empty",
        good[:5]: "is 5 bytes, too short for a header",
        good[:8] + good[8:40]: "header length",
        good[:-1]: "truncated: tensor",
        good + b"\0" * 4: "holds 71 bytes of tensor data, its header describes 67",
    }
    for data, needle in cases.items():
        path.write_bytes(data)
        with pytest.raises(fmt.ArmorFormatError, match=f"safetensors file {path}: .*{needle}"):
            fmt.read_header(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["a"].update(shape=[4, 5]))
    with pytest.raises(fmt.ArmorFormatError, match=r"tensor 'a' \(F32 \[4, 5\]\) has 64 bytes of data"):
        fmt.read_header(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["b"].pop("data_offsets"))
    with pytest.raises(fmt.ArmorFormatError, match="unreadable header entry for tensor 'b'"):
        fmt.read_header(path)


def _linear(ab: bool = True, values_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    core, mask = torch.randn(8, 16, generator=g), torch.zeros(8, 16, dtype=torch.bool)
    mask.view(8, 4, 4)[..., :2] = True
    a = torch.eye(4).expand(2, 4, 4).clone() if ab else None
    b = torch.eye(8).expand(2, 8, 8).clone() if ab else None
    t = fmt.encode_linear(core, mask, a, b)
    t[fmt.CORE_VALUES] = t[fmt.CORE_VALUES].to(values_dtype)
    return t


def test_dtypes_are_checked_not_cast():
    fmt.validate_linear("m", _linear(), model_dtype=torch.bfloat16)
    t = _linear()
    t[fmt.ARMOR_A], t[fmt.ARMOR_B] = t[fmt.ARMOR_A].bfloat16(), t[fmt.ARMOR_B].bfloat16()
    fmt.validate_linear("m", t, model_dtype=torch.bfloat16)  # A and B in the model dtype: a float dtype is enough
    with pytest.raises(fmt.ArmorFormatError, match="'m.core_values': stored as torch.bfloat16, expected the model"):
        fmt.validate_linear("m", _linear(), model_dtype=torch.float16)
    t = _linear()
    t[fmt.CORE_META] = t[fmt.CORE_META].view(torch.int8)
    with pytest.raises(fmt.ArmorFormatError, match="'m.core_meta': expected dtype uint8, got torch.int8"):
        fmt.validate_linear("m", t)
    t = _linear()
    t[fmt.ARMOR_B] = t[fmt.ARMOR_B].to(torch.int64)
    with pytest.raises(fmt.ArmorFormatError, match="'m.armor_b': expected a floating dtype, got torch.int64"):
        fmt.validate_linear("m", t)


def test_shape_errors_blame_the_wrong_tensor():
    shapes = {s: tuple(t.shape) for s, t in _linear().items()}
    # without the layer's dimensions, B arbitrates between values and metadata
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.core_meta': expected shape \(8, 2\) for a 8x16 layer"):
        fmt.check_shapes("m", {**shapes, fmt.CORE_META: (8, 3)})
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.core_values': expected shape \(8, 8\)"):
        fmt.check_shapes("m", {**shapes, fmt.CORE_VALUES: (8, 12)})
    plain = {s: shapes[s] for s in (fmt.CORE_VALUES, fmt.CORE_META)}
    with pytest.raises(fmt.ArmorFormatError, match="tensors of 'm' disagree on the layer's input dimension: "
                                                   r"'m.core_meta' \(8, 3\) -> 24, 'm.core_values' \(8, 8\) -> 16"):
        fmt.check_shapes("m", {**plain, fmt.CORE_META: (8, 3)})
    # a rank error comes before any derived check
    with pytest.raises(fmt.ArmorFormatError, match="'m.armor_b': expected a 3-D tensor"):
        fmt.check_shapes("m", {**shapes, fmt.ARMOR_B: (16, 8), fmt.CORE_META: (8, 3)})


def test_numerics_in_the_model_and_serving_dtypes(monkeypatch):
    t = _linear()
    t[fmt.ARMOR_A] = t[fmt.ARMOR_A] * 300.0
    t[fmt.ARMOR_B] = t[fmt.ARMOR_B] * 300.0
    t[fmt.CORE_VALUES] = t[fmt.CORE_VALUES].clamp(-1, 1)
    fmt.validate_linear("m", t, model_dtype=torch.bfloat16, serving_dtype=torch.float32)  # 9e4 fits both
    with pytest.raises(fmt.ArmorFormatError, match="ARMOR layer 'm': the reconstructed .* not finite in torch.float16"):
        fmt.validate_linear("m", t, model_dtype=torch.bfloat16, serving_dtype=torch.float16)
    t = _linear()
    t[fmt.ARMOR_A][0, 0, 0] = 1e5
    with pytest.raises(fmt.ArmorFormatError, match="'m.armor_a': has values that overflow torch.float16"):
        fmt.validate_linear("m", t, serving_dtype=torch.float16)
    # a small bound means no product is computed
    from vllm_armor.checkpoint_format import numerics

    calls = []
    monkeypatch.setattr(numerics, "reconstruct_weight", lambda *a: calls.append(a))
    monkeypatch.setattr(numerics, "decode_linear", lambda *a: calls.append(a))
    fmt.validate_linear("m", _linear(), model_dtype=torch.bfloat16, serving_dtype=torch.float16)
    assert calls == [] and math.isfinite(fmt.reconstruction_bound(_linear()))


def test_checkpoint_config_and_tensors_agree_both_ways():
    infos = {f"p.{s}": fmt.info_of(t) for s, t in _linear().items()}
    assert fmt.check_checkpoint(infos, ["p"], torch.bfloat16)["p"].block_in == 8
    with pytest.raises(fmt.ArmorFormatError, match="'q.core_values' is missing"):
        fmt.check_checkpoint(infos, ["p", "q"])
    with pytest.raises(fmt.ArmorFormatError, match="'p.armor_a' .* belongs to no module"):
        fmt.check_checkpoint(infos, [])
    with pytest.raises(fmt.ArmorFormatError, match="pruned module 'p' also has a dense tensor 'p.weight'"):
        fmt.check_checkpoint({**infos, "p.weight": fmt.TensorInfo((8, 16), torch.bfloat16)}, ["p"])
