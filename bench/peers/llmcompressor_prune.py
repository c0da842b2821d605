"""Prune a Hugging Face decoder with llm-compressor's SparseGPT and Wanda 2:4 modifiers (the peer baseline).

Runs inside the throwaway venv that bench/peers/llmcompressor.sh makes (llmcompressor + CPU torch), with the
repository root on PYTHONPATH so that the calibration windows come from `offline_prune.calibration.c4_windows`:
the very windows `armor-prune --calib c4:FILE --calib-samples N --calib-seqlen L --seed S` uses.

For each method: load the model in float32 (as armor-prune does), `oneshot(...)` with
`SparseGPTModifier` / `WandaPruningModifier(sparsity=0.5, mask_structure="2:4")` on the q/k/v/o/gate/up/down
projections of every decoder layer (lm_head ignored), save a plain dense HF folder in the source dtype (no
quantization/sparsity config), reload it with plain transformers and verify that every targeted weight has
exactly 2 nonzeros in every group of 4 consecutive input columns (fewer only where the dense
group already had fewer nonzeros). Writes OUT/llmcompressor.json:
{"llmcompressor-sparsegpt": {"dir", "seconds", "version", ...}, "llmcompressor-wanda": {...}}.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.peers.llmcompressor")

TARGETS = [
    r"re:.*layers\.\d+\.self_attn\.(q|k|v|o)_proj$",
    r"re:.*layers\.\d+\.mlp\.(gate|up|down)_proj$",
]
TARGET_RE = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
# Keys that llm-compressor may add to config.json and that plain transformers / armor-eval must not see.
CONFIG_KEYS_TO_STRIP = ("quantization_config", "sparsity_config", "compression_config")


def make_modifier(method: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    return cls(sparsity=0.5, mask_structure="2:4", targets=TARGETS, ignore=["lm_head"])


def calibration_dataset(windows: torch.Tensor):
    from datasets import Dataset

    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def strip_config(out: Path) -> list[str]:
    path = out / "config.json"
    config = json.loads(path.read_text())
    removed = [k for k in CONFIG_KEYS_TO_STRIP if k in config]
    for key in removed:
        config.pop(key)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return removed


@torch.no_grad()
def verify_2of4(out: Path, dense_dir: Path) -> dict:
    """Reload OUT with plain transformers; every targeted weight must be 2:4 along the input dimension.

    Every group of 4 consecutive input columns must hold exactly 2 nonzeros, or, where the dense weight's
    group already had fewer than 2 nonzeros (exact zeros of the dequantized GGUF), at least that many.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dense = dict(AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).named_modules())
    checked, short, bad = 0, 0, []
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and TARGET_RE.search(name)):
            continue
        weight = module.weight
        if weight.shape[1] % 4:
            bad.append(f"{name}: input dim {weight.shape[1]} is not a multiple of 4")
            continue
        nonzeros = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        dense_nonzeros = (dense[name].weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        wrong = int(((nonzeros > 2) | (nonzeros < dense_nonzeros.clamp(max=2))).sum())
        if wrong:
            bad.append(f"{name}: {wrong} of {nonzeros.numel()} groups of 4 do not have exactly 2 nonzeros "
                       f"(counts seen: {sorted(set(nonzeros.flatten().tolist()))})")
        short += int((nonzeros < 2).sum())
        checked += 1
    expected = 7 * model.config.num_hidden_layers
    if checked != expected:
        bad.append(f"found {checked} targeted linears, expected {expected}")
    if bad:
        raise SystemExit(f"{out} is NOT 2:4:\n  " + "\n  ".join(bad[:20]))
    log.info("%s: all %d targeted weights are 2:4 along the input dimension (%d groups with fewer than 2 "
             "nonzeros, all where the dense weight already had as few)", out.name, checked, short)
    return {"linears_checked": checked, "groups_below_2_nonzeros_from_dense_zeros": short}


def prune_one(args, method: str, tokenizer, dataset, out_dtype: torch.dtype, version: str) -> dict:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    out = args.out / f"llmcompressor-{method}"
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    modifier = make_modifier(method)
    log.info("%s: oneshot with %r on %d x %d windows", method, modifier, args.n_samples, args.seqlen)
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=args.n_samples,
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    oneshot_seconds = time.perf_counter() - t0
    model.to(out_dtype)
    model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    removed = strip_config(out)
    seconds = time.perf_counter() - started
    log.info("%s: pruned in %.0f s (oneshot %.0f s), saved to %s%s", method, seconds, oneshot_seconds, out,
             f", stripped {removed} from config.json" if removed else "")
    del model
    check = verify_2of4(out, args.model)
    return {
        "dir": str(out),
        "seconds": round(seconds, 1),
        "oneshot_seconds": round(oneshot_seconds, 1),
        "version": version,
        "modifier": f"{type(modifier).__name__}(sparsity=0.5, mask_structure='2:4', targets={TARGETS}, "
                    "ignore=['lm_head'])",
        "calib": {"file": str(args.c4), "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": args.seed},
        "torch": torch.__version__,
        "transformers": md.version("transformers"),
        "dtype": str(out_dtype).removeprefix("torch."),
        **check,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="HF folder of the dense model")
    p.add_argument("--c4", type=Path, default=REPO.parent / "shared" / "data" / "c4" / "c4_validation_2k.jsonl")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="sparsegpt,wanda")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - {"sparsegpt", "wanda"}:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from sparsegpt, wanda")

    from transformers import AutoConfig, AutoTokenizer

    from offline_prune.calibration import c4_windows

    version = md.version("llmcompressor")
    log.info("llmcompressor %s, compressed-tensors %s, torch %s, transformers %s", version,
             md.version("compressed-tensors"), torch.__version__, md.version("transformers"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out_dtype = getattr(AutoConfig.from_pretrained(args.model), "dtype", None) or torch.float32
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)
    windows = c4_windows(args.c4, tokenizer, args.n_samples, args.seqlen, args.seed)
    log.info("calibration: %d x %d tokens from %s (seed %d)", *windows.shape, args.c4, args.seed)
    dataset = calibration_dataset(windows)
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "llmcompressor.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for method in methods:
        report[f"llmcompressor-{method}"] = prune_one(args, method, tokenizer, dataset, out_dtype, version)
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s", report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
