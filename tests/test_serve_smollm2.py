"""End to end on the bundled SmolLM2-135M pruned with a short ARMOR schedule (conftest's `armor_smollm2`):
a real `vllm serve` (CPU, eager), chat + streaming through the openai client, greedy parity with the
dense-folded twin, agreement with the offline fp32 `ArmorLinear` model (with a negative control), TP=3 checked
against the dense twin at TP=3 and the same offline model.
Servers run one after another inside one module fixture."""

from __future__ import annotations

from dataclasses import dataclass, field

import armor_fixtures as af
import pytest
import torch
from parity import MARGIN_TOL, Greedy, divergence_margins, greedy_all, offline_report

from tools.vllm_server import VllmServer

pytestmark = pytest.mark.e2e
EAGER = ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8"]
TP3_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


@dataclass
class SmolRuns:
    chat: str = ""
    stream: list[str] = field(default_factory=list)
    greedy: dict[str, list[Greedy]] = field(default_factory=dict)
    served_nll: float = 0.0  # summed over PPL_WINDOWS


PPL_CTX, PPL_N = 512, 2


@pytest.fixture(scope="module")
def ppl_windows(armor_smollm2, wikitext_path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from offline_prune.evaluate import test_windows

    return test_windows(wikitext_path, AutoTokenizer.from_pretrained(armor_smollm2), PPL_CTX, PPL_N)[0]


@pytest.fixture(scope="module")
def smol(armor_smollm2, tmp_path_factory, ppl_windows) -> SmolRuns:
    dense_dir = af.fold_checkpoint(armor_smollm2, tmp_path_factory.mktemp("smollm2-folded") / "model")
    out = SmolRuns()
    with VllmServer(armor_smollm2, ["--quantization", "armor", *EAGER]) as srv:
        client = srv.client()
        r = client.chat.completions.create(
            model=str(armor_smollm2), messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0.0,
        )
        out.chat = r.choices[0].message.content or ""
        stream = client.chat.completions.create(
            model=str(armor_smollm2), messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
            temperature=0.0, stream=True,
        )
        out.stream = [c.choices[0].delta.content or "" for c in stream if c.choices]
        out.greedy["armor"] = greedy_all(srv)
        out.served_nll = sum(srv.prompt_nll(w.tolist()) for w in ppl_windows)
    with VllmServer(dense_dir, EAGER) as srv:
        out.greedy["dense"] = greedy_all(srv)
    with VllmServer(armor_smollm2, [*EAGER, "--tensor-parallel-size", "3"], TP3_ENV) as srv:
        out.greedy["tp3"] = greedy_all(srv)
    with VllmServer(dense_dir, [*EAGER, "--tensor-parallel-size", "3"], TP3_ENV) as srv:
        out.greedy["dense_tp3"] = greedy_all(srv)
    return out


def test_chat_and_streaming(smol):
    assert smol.chat.strip()
    assert len([c for c in smol.stream if c]) >= 2, smol.stream


@pytest.fixture(scope="module")
def offline_smol(armor_smollm2):
    from offline_prune.checkpoint import load_model

    return load_model(armor_smollm2)


def test_greedy_parity_with_dense_folded_twin(smol, offline_smol):
    """Served with `auto` (the CPU 2:4 kernel where it builds) the tokens are the dense twin's, up to near ties
    of the offline fp32 model (parity.divergence_margins: the kernel rounds B x and the core's output to bf16
    where the fold rounds A·core·B once)."""
    gaps = divergence_margins(offline_smol, smol.greedy["armor"], smol.greedy["dense"])
    assert all(g < MARGIN_TOL for g in gaps), gaps


def test_tp3_greedy_parity_with_dense_folded_twin_at_tp3(smol, offline_smol):
    """Under TP=3 the ARMOR model gives the tokens vLLM gives for its dense twin under TP=3, up to near ties."""
    gaps = divergence_margins(offline_smol, smol.greedy["tp3"], smol.greedy["dense_tp3"])
    assert all(g < MARGIN_TOL for g in gaps), gaps


def test_tp3_tokens_are_offline_armorlinear_top_choice(smol, armor_smollm2):
    """TP=3 sums partial products in another order than TP=1, so near ties may break the other way (measured
    on CI: the TP=3 and TP=1 greedy runs of one prompt parted at its second token). Each TP=3 token must
    still be the offline fp32 top choice, or within MARGIN_TOL of it."""
    from offline_prune.checkpoint import load_model

    report = offline_report(load_model(armor_smollm2), smol.greedy["tp3"])
    assert report.ok, report


def test_served_tokens_are_offline_armorlinear_top_choice(smol, armor_smollm2, tmp_path):
    from offline_prune.checkpoint import load_model

    report = offline_report(load_model(armor_smollm2), smol.greedy["armor"])
    assert report.ok, report
    wrong = load_model(af.write_swapped_kv_b(armor_smollm2, tmp_path / "swapped"))
    report = offline_report(wrong, smol.greedy["armor"])
    assert not report.ok, f"the offline check did not notice swapped k/v B blocks: {report}"


def test_served_perplexity_equals_offline(smol, armor_smollm2, ppl_windows):
    """The served model is the evaluated model: WikiText-2 perplexity from the server's prompt logprobs (bf16)
    agrees with `armor-eval ppl`'s computation (offline fp32 ArmorLinear) on the same windows within 1%."""
    import math

    from offline_prune.checkpoint import load_model
    from offline_prune.evaluate import perplexity

    offline = perplexity(load_model(armor_smollm2), ppl_windows)["ppl"]
    served = math.exp(smol.served_nll / (ppl_windows.numel() - ppl_windows.shape[0]))
    assert abs(served / offline - 1) < 0.01, (served, offline)
