"""ARMOR on the full layer objective (fast-gram) against NoWag-P, SparseGPT and fast mode, on real SmolLM2 matrices.

    .venv/bin/python -m bench.armor_full_h --layers 1 10 20 --iters 15

For every linear of the chosen decoder layers (inputs from the dense model, C4 windows): the TRUE layer
objective, relative:  ||(W_hat - W) X^T||_F^2 / ||W X^T||_F^2  (full X^T X), of NoWag-P, SparseGPT, ARMOR fast
(diagonal h proxy) and ARMOR fast-gram (from SparseGPT's start, and from NoWag-P's as an ablation), all at
``--block-size auto --max-overhead`` and a fixed iteration count (no plateau stop), with wall times. Writes
bench/results/armor_full_h.json and appends a table to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import time
from pathlib import Path

import torch

from bench.common import C4, MATRICES, REPO, command_line, layer_statistics
from offline_prune.methods.armor import ab_overhead, armor_prune, auto_block_sizes
from offline_prune.methods.nowag_p import nowag_p_2of4
from offline_prune.methods.sparsegpt import sparsegpt_2of4
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right

log = logging.getLogger("bench.armor_full_h")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", type=Path, default=C4)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-overhead", type=float, default=0.125)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--variants", nargs="+", default=["nowag-p", "sparsegpt", "fast", "fast-gram",
                                                          "fast-gram@nowag-p"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="cache of the statistics (torch.save file)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "armor_full_h.json")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    ap.add_argument("--no-docs", action="store_true")
    return ap.parse_args()


def layer_stats(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"L.matrix": (W float32, X^T X)} from C4 windows through the dense model (kept in --cache when given)."""
    if args.cache is not None and args.cache.is_file():
        return torch.load(args.cache)
    stats = layer_statistics(args.model, args.calib, args.layers, MATRICES, args.samples, args.seqlen, gram=True)
    out = {name.removeprefix("layers."): value for name, value in stats.items()}
    if args.cache is not None:
        torch.save(out, args.cache)
    return out


def true_relative(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    e = w_hat - w
    return float(((e @ gram) * e).sum() / ((w @ gram) * w).sum())


def run_variant(name: str, w: torch.Tensor, gram: torch.Tensor, bo: int, bi: int, iters: int) -> tuple:
    start = time.perf_counter()
    if name == "nowag-p":
        w_hat, _ = nowag_p_2of4(w, gram.diagonal().clone())
    elif name == "sparsegpt":
        w_hat, _ = sparsegpt_2of4(w, gram)
    else:
        optimizer, _, init = name.partition("@")
        res = armor_prune(w, gram.diagonal().clone(), bo, bi, optimizer=optimizer, iters=iters, plateau=None,
                          gram=gram, gram_start=init or "sparsegpt")
        w_hat = blockdiag_right(blockdiag_left(res.a_blocks, res.core), res.b_blocks)
    return w_hat, time.perf_counter() - start


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    stats = layer_stats(args)
    rows = {}
    for key, (w, gram) in stats.items():
        bo, bi = auto_block_sizes(*w.shape, args.max_overhead)
        row = {"shape": list(w.shape), "block": [bo, bi], "ab_overhead": round(ab_overhead(*w.shape, bo, bi), 4)}
        for variant in args.variants:
            w_hat, secs = run_variant(variant, w, gram, bo, bi, args.iters)
            row[variant] = {"relative": true_relative(w, w_hat, gram), "seconds": round(secs, 3)}
        log.info("%s %s", key, {k: (round(v["relative"], 4), v["seconds"]) for k, v in row.items()
                                if isinstance(v, dict)})
        rows[key] = row
    results = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} torch {torch.__version__}, {args.threads} threads, CPU",
        "loadavg": Path("/proc/loadavg").read_text().strip(),
        "command": command_line("armor_full_h"),
        "samples": args.samples, "seqlen": args.seqlen, "iters": args.iters, "max_overhead": args.max_overhead,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    table = docs_table(results, args.variants)
    print(table)
    if not args.no_docs:
        with args.docs.open("a") as f:
            f.write(table)


def docs_table(results: dict, variants: list[str]) -> str:
    lines = [
        f"\n## ARMOR on the full layer objective, fast-gram ({results['date']})\n",
        f"Machine: {results['machine']}, load average {results['loadavg']}. Command: `{results['command']}`.",
        f"SmolLM2-135M, X^T X from {results['samples']} C4 windows of {results['seqlen']} tokens through the dense "
        f"model. True relative layer error ||(W_hat - W) X^T||^2 / ||W X^T||^2 (seconds); ARMOR at --block-size "
        f"auto --max-overhead {results['max_overhead']}, {results['iters']} iterations, no plateau stop.\n",
        "| matrix | block | A+B / core | " + " | ".join(variants) + " |",
        "|---" * (len(variants) + 3) + "|",
    ]
    means = {v: [] for v in variants}
    for key, row in results["rows"].items():
        cells = []
        for v in variants:
            cells.append(f"{row[v]['relative']:.4f} ({row[v]['seconds']:.1f}s)")
            means[v].append(row[v]["relative"])
        lines.append(f"| {key} {row['shape'][0]}x{row['shape'][1]} | {row['block'][0]}/{row['block'][1]} | "
                     f"{row['ab_overhead']:.3f} | " + " | ".join(cells) + " |")
    lines.append("| mean | | | " + " | ".join(f"{sum(m) / len(m):.4f}" for m in means.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
