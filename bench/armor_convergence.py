"""Convergence of the ARMOR optimiser, paper mode against fast mode, on real SmolLM2-135M matrices.

    .venv/bin/python -m bench.armor_convergence            # layer 10, 64 C4 windows of 512 tokens, block 32

For q_proj, k_proj, up_proj and down_proj of one decoder layer: the relative NoWag proxy loss (normalised
space, same h for all) of magnitude, Wanda and NoWag-P 2:4, of ARMOR paper mode (one 3000-iteration run,
read at 100/500/1000/3000 iterations) and of ARMOR fast mode, with wall times, all in one run. Writes
bench/results/armor_convergence.json and .png (relative loss against seconds, log x) and appends a table to
docs/BENCHMARKS.md with fast/paper ratios: the speed-up to reach paper mode's final loss and the losses at
equal time.
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

from bench.common import C4, REPO, command_line, layer_statistics
from offline_prune.methods.armor import ArmorResult, armor_prune
from offline_prune.methods.magnitude import magnitude_2of4
from offline_prune.methods.nowag_p import nowag_p_2of4
from offline_prune.methods.wanda import wanda_2of4
from offline_prune.proxy import normalize, proxy_loss, proxy_scale

log = logging.getLogger("bench.armor_convergence")
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")  # a subset of common.MATRICES
PAPER_MARKS = (100, 500, 1000, 3000)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", type=Path, default=C4)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--paper-iters", type=int, default=max(PAPER_MARKS))
    ap.add_argument("--fast-iters", type=int, default=600)
    ap.add_argument("--matrices", nargs="+", default=list(MATRICES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "armor_convergence")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    ap.add_argument("--no-docs", action="store_true", help="do not append to docs/BENCHMARKS.md")
    return ap.parse_args()


# ---------------------------------------------------------------- data


def layer_inputs(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{matrix: (W float32, h = diag(X^T X))} for the chosen layer, from C4 windows through the dense model."""
    stats = layer_statistics(args.model, args.calib, [args.layer], args.matrices, args.samples, args.seqlen)
    return {name.removeprefix(f"layers.{args.layer}."): value for name, value in stats.items()}


# ---------------------------------------------------------------- measurements


def relative(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """Relative proxy loss of ``approx`` of ``weight``, both mapped by the same NoWag scales of ``weight``."""
    norm = normalize(weight)
    approx_n = approx / norm.row_scale[:, None] / norm.col_scale[None, :]
    return float(proxy_loss(approx_n, norm.weight, h) / proxy_scale(norm.weight, h))


def timed(fn, *a):
    start = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - start


def baseline_rows(w: torch.Tensor, h: torch.Tensor) -> dict[str, dict]:
    rows = {}
    for name, fn, extra in (
        ("magnitude", magnitude_2of4, ()),
        ("wanda", wanda_2of4, (h,)),
        ("nowag-p", nowag_p_2of4, (h,)),
    ):
        (w_hat, _), secs = timed(fn, w, *extra)
        rows[name] = {"relative": relative(w, w_hat, h), "seconds": secs}
    return rows


def reached(res: ArmorResult, target: float) -> float | None:
    """Seconds at which the history first reaches ``target`` (None if never)."""
    for loss, t in zip(res.history, res.elapsed, strict=True):
        if loss <= target:
            return t
    return None


def at_time(res: ArmorResult, seconds: float) -> float:
    """Relative loss of a run at ``seconds`` (its last value before then; its final one if it ended earlier)."""
    best = res.history[0]
    for loss, t in zip(res.history, res.elapsed, strict=True):
        if t > seconds:
            break
        best = loss
    return best


def armor_rows(w: torch.Tensor, h: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict]:
    bs = args.block_size
    paper = armor_prune(w, h, bs, bs, optimizer="paper", iters=args.paper_iters, seed=0)
    log.info("paper: %.5f -> %.5f, %d its, %.1fs", paper.history[0], paper.final_relative,
             paper.iterations, paper.seconds)
    fast = armor_prune(w, h, bs, bs, optimizer="fast", iters=args.fast_iters, seed=0)
    log.info("fast: %.5f -> %.5f, %d its, %.1fs", fast.history[0], fast.final_relative,
             fast.iterations, fast.seconds)
    rows = {}
    for mark in PAPER_MARKS:
        k = min(mark, paper.iterations)
        rows[f"paper-{mark}"] = {"relative": paper.history[k], "seconds": paper.elapsed[k], "iterations": k}
    rows["fast"] = {"relative": fast.final_relative, "seconds": fast.seconds, "iterations": fast.iterations}
    t_reach = reached(fast, paper.final_relative)
    ratios = {
        "paper_final": paper.final_relative,
        "paper_seconds": paper.seconds,
        "fast_seconds_to_paper_final": t_reach,
        "speedup_to_paper_final": paper.seconds / t_reach if t_reach else None,
        "fast_at_paper_time": at_time(fast, paper.seconds),
        "loss_ratio_equal_time": at_time(fast, paper.seconds) / paper.final_relative,
        "fast_at_paper_100_time": at_time(fast, rows["paper-100"]["seconds"]),
        "paper_at_100": rows["paper-100"]["relative"],
    }
    curves = {"paper": [paper.elapsed, paper.history], "fast": [fast.elapsed, fast.history]}
    return rows | {"ratios": ratios}, curves


# ---------------------------------------------------------------- output


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return False
    names = list(results["matrices"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        m = results["matrices"][name]
        for mode, (t, loss) in m["curves"].items():
            ax.plot([max(x, 1e-3) for x in t], loss, label=f"ARMOR {mode}")
        for base, style in (("magnitude", ":"), ("wanda", "-."), ("nowag-p", "--")):
            ax.axhline(m["rows"][base]["relative"], ls=style, color="grey", lw=1, label=base)
        ax.set_xscale("log")
        ax.set_title(f"{name} {m['shape'][0]}x{m['shape'][1]}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("relative proxy loss")
        ax.set_ylim(0, m["rows"]["nowag-p"]["relative"] * 1.15)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fmt(x: float | None, digits: int = 4) -> str:
    return "never" if x is None else f"{x:.{digits}f}"


def docs_table(results: dict) -> str:
    cols = ["magnitude", "wanda", "nowag-p", *[f"paper-{m}" for m in PAPER_MARKS], "fast"]
    lines = [
        f"\n## ARMOR convergence, paper vs fast mode ({results['date']})\n",
        f"Machine: {results['machine']}. Command: `{results['command']}`.",
        f"SmolLM2-135M layer {results['layer']}, h from {results['samples']} C4 windows of {results['seqlen']} "
        f"tokens (seed 0), block size {results['block_size']}. Relative NoWag proxy loss (seconds); paper-N is "
        "one paper-mode run read at N iterations (fewer if it stopped early: iterations in brackets).\n",
        "| matrix | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, m in results["matrices"].items():
        cells = []
        for c in cols:
            row = m["rows"][c]
            its = f" [{row['iterations']}]" if "iterations" in row and c != "fast" and \
                row["iterations"] != int(c.split("-")[1]) else ""
            its = f" [{row['iterations']} its]" if c == "fast" else its
            cells.append(f"{row['relative']:.4f} ({row['seconds']:.2f}s){its}")
        lines.append(f"| {name} {m['shape'][0]}x{m['shape'][1]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| matrix | paper final | paper s | fast s to reach it | speed-up | fast at paper's time | "
        "fast/paper loss at equal time | paper-100 | fast at paper-100's time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["matrices"].items():
        r = m["rows"]["ratios"]
        speed = "not reached" if r["speedup_to_paper_final"] is None else f"{r['speedup_to_paper_final']:.1f}x"
        lines.append(
            f"| {name} | {r['paper_final']:.4f} | {r['paper_seconds']:.1f} | "
            f"{fmt(r['fast_seconds_to_paper_final'], 2)} | {speed} | {r['fast_at_paper_time']:.4f} | "
            f"{r['loss_ratio_equal_time']:.3f} | {r['paper_at_100']:.4f} | {r['fast_at_paper_100_time']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = layer_inputs(args)
    # warm-up: the first call pays one-off costs (lazy imports in torch.optim) that are not the algorithm's
    warm_w, warm_h = torch.randn(64, 64), torch.rand(64) + 0.5
    for mode in ("paper", "fast"):
        armor_prune(warm_w, warm_h, 32, 32, optimizer=mode, iters=3)
    results: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, CPU".replace("  ", " "),
        "command": command_line("armor_convergence"),
        "layer": args.layer, "samples": args.samples, "seqlen": args.seqlen, "block_size": args.block_size,
        "matrices": {},
    }
    for name, (w, h) in inputs.items():
        log.info("%s %s", name, tuple(w.shape))
        rows = baseline_rows(w, h)
        armor, curves = armor_rows(w, h, args)
        results["matrices"][name] = {"shape": list(w.shape), "rows": rows | armor, "curves": curves}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1))
    log.info("wrote %s", json_path)
    if plot(results, args.out.with_suffix(".png")):
        log.info("wrote %s", args.out.with_suffix(".png"))
    table = docs_table(results)
    print(table)
    if not args.no_docs:
        with args.docs.open("a") as f:
            f.write(table)
        log.info("appended the table to %s", args.docs)


if __name__ == "__main__":
    main()
