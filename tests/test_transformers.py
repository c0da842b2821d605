"""ARMOR checkpoints through transformers (`vllm_armor.hf_quantizer`): `from_pretrained` after `import vllm_armor`
builds ArmorLinear layers equal to the offline reference; without the registration transformers only warns and
builds plain linears, which our loaders (`load_model`, `armor-eval`) refuse."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import armor_fixtures as af
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_from_pretrained_builds_armor_layers_equal_to_offline_reference(armor_tiny_qwen2):
    from transformers import AutoModelForCausalLM

    import vllm_armor  # noqa: F401  (registers the transformers quantizer)
    from vllm_armor.torch_module import ArmorLinear

    armor_dir, _ = armor_tiny_qwen2
    pruned = json.loads((armor_dir / "config.json").read_text())["quantization_config"]["pruned_modules"]
    model = AutoModelForCausalLM.from_pretrained(armor_dir, dtype=torch.float32)
    assert all(isinstance(model.get_submodule(m), ArmorLinear) for m in pruned) and len(pruned) == 14
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        want = af.offline_fp32_model(armor_dir)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("first", ["vllm_armor", "vllm_armor.hf_quantizer", "transformers.quantizers"])
def test_import_registers_the_quantizer_in_any_order(first):
    out = _run(f"""
        import {first}
        import vllm_armor
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print(AUTO_QUANTIZER_MAPPING["armor"].__name__)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ArmorHfQuantizer"
    assert "cannot register" not in out.stderr


def test_package_import_loads_no_transformers():
    out = _run("import sys, vllm_armor; print('transformers' in sys.modules, 'vllm' in sys.modules)")
    assert out.stdout.strip() == "False False", out.stderr


def test_unregistered_quantizer_builds_plain_linears_and_loaders_refuse(armor_tiny_qwen2, tmp_path):
    armor_dir, _ = armor_tiny_qwen2
    (tmp_path / "text.txt").write_text("Some words to evaluate. " * 50)
    out = _run(f"""
        import sys
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(armor_dir)!r})  # vllm_armor never imported
        print(type(model.model.layers[0].mlp.down_proj).__name__, "vllm_armor" in sys.modules)
        import transformers.quantizers.auto as auto
        from offline_prune.cli import eval_main  # imports vllm_armor, which registers: undo it
        del auto.AUTO_QUANTIZER_MAPPING["armor"], auto.AUTO_QUANTIZATION_CONFIG_MAPPING["armor"]
        sys.exit(eval_main(["ppl", {str(armor_dir)!r}, "--data", {str(tmp_path / "text.txt")!r}, "--ctx-len", "32"]))
    """)
    assert out.stdout.splitlines()[0] == "Linear False"
    assert "Unknown quantization type, got armor" in out.stderr
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "not as an ARMOR layer" in line]
    assert len(errors) == 1 and "was not registered" in errors[0], out.stderr
