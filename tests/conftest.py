"""Shared fixtures: the bundled SmolLM2 folder, tiny random Llama / Qwen2 models, the shared data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.jsonl"
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"shared data file {path} is missing (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def c4_path() -> Path:
    return require(C4)


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    return require(WIKITEXT)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a cached HF folder (dequantized once from its GGUF)."""
    from offline_prune.models import resolve_model

    return Path(resolve_model("smollm2-135m"))


def save_tiny_model(folder: Path, arch: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random decoder model (real transformers classes, real tokenizer) saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))  # q/k/v carry a bias
    else:
        raise ValueError(arch)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", smollm2_dir)


E2E_PRUNE = dict(calib_samples=8, calib_seqlen=256, block_size=32, iters=30, seed=0)


@pytest.fixture(scope="session")
def armor_smollm2(tmp_path_factory, smollm2_dir, c4_path) -> Path:
    """The bundled SmolLM2 pruned with a short ARMOR schedule (block 32: divides head_dim 64, so TP=3 works).

    Shared by the end-to-end tests (vLLM serving, deploy entrypoint); built once per test session.
    """
    from offline_prune.pipeline import PruneArgs, prune

    out = tmp_path_factory.mktemp("smollm2-armor") / "model"
    prune(PruneArgs(model=str(smollm2_dir), out=str(out), method="armor", calib=f"c4:{c4_path}", **E2E_PRUNE))
    return out
