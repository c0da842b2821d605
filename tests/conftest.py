"""Shared fixtures: the bundled SmolLM2 folder, tiny random Llama / Qwen2 / Qwen3 / Mistral models, the shared data
paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.jsonl"
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"
if str(REPO) not in sys.path:  # the repository's tools/ package (test helpers, not installed)
    sys.path.insert(0, str(REPO))


def _import_triton_for_its_interpreter() -> None:
    """Import triton with TRITON_INTERPRET=1 (then unset it): its standard library (tl.sum, tl.max, ...) is jitted at
    import, and only functions jitted in interpreter mode run in Triton's interpreter, which tests/test_triton24.py
    uses to run the GPU kernels on CPU. No test process launches a compiled Triton kernel (there is no GPU), and the
    variable is not left set, so the servers and prunes that tests start do not inherit it."""
    if "triton" in sys.modules or os.environ.get("ARMOR_TRITON_TESTS") == "cuda":
        return  # compiled for a GPU (bench/gpu_check.py), or imported already (test_triton24 then says so)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_for_its_interpreter()


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
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

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
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))  # q/k norm
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
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


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", smollm2_dir)


E2E_PRUNE = dict(calib_samples=8, calib_seqlen=256, seed=0, options=dict(block_size=32, iters=8))


@pytest.fixture(scope="session")
def armor_smollm2(tmp_path_factory, smollm2_dir, c4_path) -> Path:
    """The bundled SmolLM2 pruned with a short ARMOR schedule (block 32: divides head_dim 64, so TP=3 works).

    Shared by the end-to-end tests (vLLM serving, deploy entrypoint); built once per test session.
    """
    from offline_prune.pipeline import PruneArgs, prune

    out = tmp_path_factory.mktemp("smollm2-armor") / "model"
    prune(PruneArgs(model=str(smollm2_dir), out=str(out), method="armor", calib=f"c4:{c4_path}", **E2E_PRUNE))
    return out


# --- vllm_armor plugin tests: tiny ARMOR checkpoints written without the pruner (tests/armor_fixtures.py) ---
sys.path.insert(0, str(Path(__file__).parent))
import armor_fixtures as af  # noqa: E402


@pytest.fixture(scope="session")
def armor_fixture_cache(tmp_path_factory) -> Path:
    """Where the tiny ARMOR checkpoints are built (ARMOR_TEST_CACHE to reuse them between runs)."""
    env = os.environ.get("ARMOR_TEST_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return tmp_path_factory.mktemp("armor-fixtures")


@pytest.fixture(scope="session")
def armor_tiny_llama(armor_fixture_cache) -> tuple[Path, Path]:
    """(ARMOR dir, dense-folded twin dir): tiny random Llama, 6 heads / 3 kv heads, blocks of 64."""
    return af.build_tiny(af.TINY_LLAMA, armor_fixture_cache)


@pytest.fixture(scope="session")
def armor_tiny_llama_24(armor_fixture_cache) -> tuple[Path, Path]:
    """Plain 2:4 (no A/B) tiny Llama and its dense twin."""
    return af.build_tiny(af.TINY_LLAMA_24, armor_fixture_cache)


@pytest.fixture(scope="session")
def armor_tiny_qwen2(armor_fixture_cache) -> tuple[Path, Path]:
    """Tiny random Qwen2 (qkv bias) in the ARMOR format and its dense twin."""
    return af.build_tiny(af.TINY_QWEN2, armor_fixture_cache)


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices run much faster on one thread, above all on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """An end-to-end test is a slow one too: `-m "not slow"` (make test-fast) leaves both out."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)
