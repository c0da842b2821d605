"""End to end on a tiny random Qwen2 (qkv bias) in the ARMOR format and on a plain 2:4 Llama checkpoint
(no A/B, as the baselines write): greedy parity with the dense-folded twin and with the offline fp32 model.
Servers run one after another inside one module fixture."""

from __future__ import annotations

import armor_fixtures as af
import pytest
from parity import MARGIN_TOL, divergence_margins, greedy_all, offline_report

from tools.vllm_server import VllmServer

pytestmark = pytest.mark.e2e
EAGER = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def variants(armor_tiny_qwen2, armor_tiny_llama_24):
    out = {}
    for name, (armor_dir, dense_dir) in {"qwen2": armor_tiny_qwen2, "plain24": armor_tiny_llama_24}.items():
        with VllmServer(armor_dir, EAGER) as srv:
            out[f"{name}_armor"] = greedy_all(srv)
        with VllmServer(dense_dir, EAGER) as srv:
            out[f"{name}_dense"] = greedy_all(srv)
    return out


@pytest.mark.parametrize(("name", "fixture"), [("qwen2", "armor_tiny_qwen2"), ("plain24", "armor_tiny_llama_24")])
def test_greedy_parity_with_dense_folded_twin(variants, name, fixture, request):
    """Served with `auto` (the CPU 2:4 kernel where it builds), the tokens are the fold's up to near ties of the
    fp32 model (parity.divergence_margins: the kernel rounds B x and the core's output to bf16)."""
    offline = af.offline_fp32_model(request.getfixturevalue(fixture)[0])
    gaps = divergence_margins(offline, variants[f"{name}_armor"], variants[f"{name}_dense"])
    assert all(g < MARGIN_TOL for g in gaps), gaps


@pytest.mark.parametrize(("name", "fixture"), [("qwen2", "armor_tiny_qwen2"), ("plain24", "armor_tiny_llama_24")])
def test_served_tokens_are_offline_top_choice(variants, name, fixture, request):
    armor_dir = request.getfixturevalue(fixture)[0]
    report = offline_report(af.offline_fp32_model(armor_dir), variants[f"{name}_armor"])
    assert report.ok, report


def test_qwen2_bias_matters(variants, armor_tiny_qwen2):
    """The qkv bias is loaded: the offline model without it disagrees with the served tokens."""
    cfg, tensors = af.load_armor_tensors(armor_tiny_qwen2[0])
    no_bias = {k: (v * 0 if k.endswith("_proj.bias") else v) for k, v in tensors.items()}
    report = offline_report(af.offline_fp32_model(armor_tiny_qwen2[0], no_bias), variants["qwen2_armor"])
    assert not report.ok, report
