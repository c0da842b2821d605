"""Where ARMOR's fast mode stops paying: proxy loss and WikiText-2 perplexity against iterations, at the default
block-size policy (``--block-size auto --max-overhead 0.125``).

    .venv/bin/python -m bench.convergence_curve --layers 0 15 --curve-iters 120 --ppl-iters 0 5 15 30

Part 1 (proxy loss): every pruned matrix of the chosen decoder layers of the bundled SmolLM2-135M, h from C4
windows through the dense model, one fast-mode run per matrix with no plateau stop (``plateau=None``) up to
``--curve-iters``; the relative loss at 5, 15, 30, 60, 120, 240 iterations as a fraction of the last one, the
seconds per iteration, and the iteration where the default plateau rule (DEFAULT_PLATEAU) would have stopped
with its loss against the last one.
Part 2 (perplexity): the whole model pruned with ``armor-prune --iters N --plateau-tol 0`` for every N of
``--ppl-iters`` (N = 0 is the NoWag-P start) and with the defaults (cap + plateau), each evaluated with
``armor-eval ppl`` on WikiText-2 (``--max-windows`` windows of 2048 tokens, all by default), with wall times.

With ``--one-run MAX`` part 2 costs one optimisation instead of one per point: the whole model is pruned once with
``--iters MAX --plateau-tol 0`` (jobs in ``--workers`` processes), and every matrix's state where each shorter
rule would have stopped (the caps of ``--ppl-iters``, ``--rule ITERS:WINDOW:TOL`` and, with ``--ppl-default``, the
defaults) is saved as the finished work of that rule's own ``armor-prune`` command (its OUT/.progress/), which
then only writes the checkpoint. Fast mode is deterministic, so each is the checkpoint that command would have
produced (test_armor.py::test_snapshots_are_the_shorter_runs); its time is the summed job seconds up to its stop.

    .venv/bin/python -m bench.convergence_curve --layers --one-run 240 --ppl-iters 30 60 120 240 --ppl-default \
        --rule 120:10:0.002 --workers 2 --max-windows 40

Writes bench/results/convergence_curve.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shlex
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bench.common import (
    BIN,
    C4,
    MATRICES,
    WIKITEXT,
    armor_eval_ppl,
    command_line,
    layer_statistics,
    prune_argv,
    record,
    run,
)
from offline_prune import jobs
from offline_prune.methods.armor import (
    DEFAULT_ITERS,
    DEFAULT_PLATEAU,
    Plateau,
    Snapshot,
    armor_prune,
    auto_block_sizes,
    block_sizes,
    chosen_optimizer,
    plateau_of,
    prune_output,
)
from offline_prune.progress import Progress

log = logging.getLogger("bench.convergence_curve")
MARKS = (5, 15, 30, 60, 120, 240)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="*", default=[0, 15])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-overhead", type=float, default=0.125)
    ap.add_argument("--curve-iters", type=int, default=120)
    ap.add_argument("--ppl-iters", type=int, nargs="*", default=[0, 5, 15])
    ap.add_argument("--ppl-default", action="store_true", help="also prune with the default stop and cap")
    ap.add_argument("--max-windows", type=int, default=None, help="WikiText-2 windows (default: the whole split)")
    ap.add_argument("--work", type=Path, default=Path("out/convergence_curve"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads here and in the subprocesses (0: default)")
    ap.add_argument("--one-run", type=int, default=None, metavar="MAX",
                    help="one pruning run of MAX iterations gives every perplexity point (see the docstring)")
    ap.add_argument("--rule", action="append", default=[], metavar="ITERS:WINDOW:TOL",
                    help="also a stopping rule: cap ITERS, plateau TOL over WINDOW iterations (with --one-run)")
    ap.add_argument("--workers", type=int, default=1, help="job processes of the --one-run prune (1 thread each)")
    ap.add_argument("--eval-only", nargs="*", default=None, metavar="FOLDER",
                    help="only evaluate these finished folders of WORK into the cache (to run several at once)")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate a finished prune already in WORK instead of pruning again (e.g. one resumed "
                         "across sessions); its time is then the summed job seconds of its report, not a wall time")
    return ap.parse_args()


def plateau_stop(history: list[float]) -> int:
    for it in range(1, len(history)):
        if DEFAULT_PLATEAU.reached(history[: it + 1]):
            return it
    return len(history) - 1


def curve(args: argparse.Namespace) -> list[dict]:
    rows = []
    stats = layer_statistics(args.model, C4, args.layers, MATRICES, args.samples, args.seqlen)
    for name, (w, h) in stats.items():
        bo, bi = auto_block_sizes(*w.shape, args.max_overhead)
        res = armor_prune(w, h, bo, bi, iters=args.curve_iters, plateau=None)
        last = res.history[-1]
        stop = plateau_stop(res.history)
        row = {"matrix": name, "shape": list(w.shape), "blocks": [bo, bi], "init": res.history[0], "last": last,
               "iters": res.iterations, "s_per_iter": (res.elapsed[-1] - res.elapsed[0]) / max(res.iterations, 1),
               "at": {m: res.history[m] / last for m in MARKS if m <= res.iterations},
               "plateau_stop": stop, "plateau_loss_vs_last": res.history[stop] / last}
        log.info("%s %s: %s", name, row["blocks"], {k: round(v, 4) for k, v in row["at"].items()})
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Point:
    """One perplexity point: a stopping rule, its armor-prune flags and its folder under --work."""

    name: str  # "default", "30" (cap, no plateau) or "120:10:0.002"
    folder: str
    flags: tuple[str, ...]
    rule: Snapshot

    @classmethod
    def cap(cls, iters: int) -> Point:
        return cls(str(iters), f"iters{iters}", ("--iters", str(iters), "--plateau-tol", "0"), Snapshot(iters))

    @classmethod
    def default(cls) -> Point:
        return cls("default", "default", (), Snapshot(DEFAULT_ITERS["fast"], DEFAULT_PLATEAU))

    @classmethod
    def parse(cls, text: str) -> Point:
        iters, window, tol = text.split(":")
        flags = ("--iters", iters, "--plateau-window", window, "--plateau-tol", tol)
        return cls(text, f"rule{iters}-{window}-{tol}", flags, Snapshot(int(iters), Plateau(int(window), float(tol))))


def point_argv(args: argparse.Namespace, point: Point) -> list[str]:
    """`armor-prune`'s arguments for one point."""
    return prune_argv(args.model, args.work / point.folder, C4, args.samples, args.seqlen,
                      "--max-overhead", str(args.max_overhead), "--device", "cpu", *point.flags)


def snapshot_job(module: str, weight: torch.Tensor, stats, options, rules: list[Snapshot],
                 folders: list[Path]) -> jobs.JobResult:
    """One ARMOR job of the --one-run prune; where each rule stops, the state is saved to that rule's progress."""
    w, h = jobs.job_inputs(weight, stats, options.device)
    params = options.params
    bo, bi = block_sizes(*w.shape, params)
    optimizer = chosen_optimizer(params)
    res = armor_prune(w, h, bo, bi, optimizer=optimizer, iters=params["iters"], plateau=plateau_of(params),
                      seed=jobs.job_seed(options.seed, module), device=options.device, snapshots=rules)
    for folder, snap in zip(folders, res.snapshots, strict=True):
        done = jobs.job_result(module, w, h, options.method, prune_output(snap, optimizer), snap.seconds)
        done.report["snapshot_of_iters"] = params["iters"]  # the table then says "one run", not "reused"
        Progress.existing(folder).save(module, done.tensors, done.report)
    return jobs.job_result(module, w, h, options.method, prune_output(res, optimizer), res.seconds)


def one_run(args: argparse.Namespace, points: list[Point]) -> None:
    """Prune once at --one-run iterations; leave every shorter point's folder with its finished progress."""
    from offline_prune.cli import prune_args, prune_parser
    from offline_prune.executor import PoolExecutor
    from offline_prune.pipeline import prune
    from offline_prune.run_args import run_key

    main = Point.cap(args.one_run)
    todo = [p for p in points if p != main and not (args.work / p.folder / "armor_report.json").exists()]
    if (args.work / main.folder / "armor_report.json").exists():  # finished: its snapshots were taken then
        if todo:
            log.warning("%s is finished: %s will be pruned by their own commands", main.folder,
                        ", ".join(p.folder for p in todo))
        return
    executor = PoolExecutor(args.workers, partial(snapshot_job, rules=[p.rule for p in todo],
                                                  folders=[args.work / p.folder for p in todo]))
    for p in todo:  # each folder is an unfinished run of its own command, so that command resumes it
        Progress(args.work / p.folder, run_key(prune_args(prune_parser().parse_args(point_argv(args, p))), executor),
                 False)
    argv = point_argv(args, main)
    prune(prune_args(prune_parser().parse_args(argv)), executor=executor, command=shlex.join(["armor-prune", *argv]))


def cached_ppl(args: argparse.Namespace, out: Path) -> dict:
    """`armor-eval ppl` of ``out``, kept in WORK/ppl/ with the hash of the checkpoint's report: a rerun (or an
    evaluation run by hand with the same command, e.g. several at once) is not measured twice."""
    cache = args.work / "ppl" / f"{out.name}-w{args.max_windows or 'all'}.json"
    digest = hashlib.sha256((out / "armor_report.json").read_bytes()).hexdigest()
    if cache.exists() and json.loads(cache.read_text()).get("report_sha256") == digest:
        log.info("%s: perplexity from %s", out, cache)
        return json.loads(cache.read_text())
    ppl = armor_eval_ppl(out, WIKITEXT, 2048, args.max_windows) | {"report_sha256": digest}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(ppl))
    return ppl


def prune_and_eval(args: argparse.Namespace, point: Point) -> dict:
    out = args.work / point.folder
    cmd = [str(BIN / "armor-prune"), *point_argv(args, point)]
    resumed = args.one_run is not None and (out / ".progress").exists()
    reused = (args.reuse or args.one_run is not None) and (out / "armor_report.json").exists()
    start = time.perf_counter()
    if resumed or not reused:
        run(cmd if resumed else [*cmd, "--overwrite"])
    wall = time.perf_counter() - start
    report = json.loads((out / "armor_report.json").read_text())
    snapshot = any("snapshot_of_iters" in r for r in report["linears"])
    source = "one run" if snapshot or (args.one_run is not None and point == Point.cap(args.one_run)) else (
        "reused" if reused else "ran")
    if source != "ran":
        wall = report["summary"]["job_seconds"]
    ppl = cached_ppl(args, out)
    s = report["summary"]
    return {"iters": point.name, "is_default": point.rule == Point.default().rule, "ppl": ppl["ppl"],
            "windows": ppl["windows"], "prune_wall_s": round(wall, 1),
            "source": source,
            "mean_loss": s["mean_loss_final_relative"], "mean_iterations": sum(
                r["iterations"] for r in report["linears"]) / len(report["linears"]),
            "bytes_ratio": s["bytes_ratio"], "ab_overhead": s["ab_overhead"], "stopped": s["stopped"]}


def markdown(args: argparse.Namespace, rows: list[dict], ppl_rows: list[dict], meta: dict) -> str:
    lines = [f"\n## ARMOR convergence at the default overhead ({meta['date']})\n",
             f"Machine: {meta['machine']}, load average {meta['load']}. Command: `{meta['command']}`.",
             f"Fast mode, `--block-size auto --max-overhead {args.max_overhead}`, C4 {args.samples} x {args.seqlen}.\n"]
    if rows:
        marks = [m for m in MARKS if any(str(m) in map(str, r["at"]) for r in rows)]
        lines += [f"Proxy loss at N iterations / loss at {args.curve_iters} (no plateau stop); where the default "
                  f"plateau rule (down < {DEFAULT_PLATEAU.tol:.1%} over {DEFAULT_PLATEAU.window} iterations) stops:\n",
                  "| matrix | blocks | s/iter | " + " | ".join(f"{m}" for m in marks)
                  + " | plateau stop | its loss / last |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in marks) + " | --- | --- |"]
        for r in rows:
            at = {int(k): v for k, v in r["at"].items()}
            lines.append(f"| {r['matrix']} | {r['blocks'][0]}x{r['blocks'][1]} | {r['s_per_iter']:.3f} | "
                         + " | ".join(f"{at[m]:.4f}" if m in at else "" for m in marks)
                         + f" | {r['plateau_stop']} | {r['plateau_loss_vs_last']:.4f} |")
    if ppl_rows:
        windows = ppl_rows[0]["windows"]
        ref = reference_row(ppl_rows)
        vs_head, vs_rule = (f" vs {ref['iters']} its |", " --- |") if ref else ("", "")
        lines += ["", f"Whole model, WikiText-2 perplexity ({windows} windows of 2048 tokens), per iteration cap "
                  "(`--plateau-tol 0`; 0 = the NoWag-P start; `default` = cap "
                  f"{DEFAULT_ITERS['fast']} with the plateau stop; ITERS:WINDOW:TOL = cap ITERS with a stop when "
                  "the loss fell by less than TOL over WINDOW iterations):\n",
                  f"| iterations | ppl |{vs_head} mean its | mean rel. loss | prune wall s | weight bytes / dense | "
                  "A+B / core values |", f"| --- | --- |{vs_rule} --- | --- | --- | --- | --- |"]
        for r in ppl_rows:
            name = str(r["iters"]) + (" (the default)" if r.get("is_default") else "")
            secs = f"{r['prune_wall_s']:.0f}" + ("" if r["source"] == "ran" else f" (job s, {r['source']})")
            vs = f" {r['ppl'] / ref['ppl'] - 1:+.2%} |" if ref else ""
            lines.append(f"| {name} | {r['ppl']:.3f} |{vs} {r['mean_iterations']:.1f} | {r['mean_loss']:.4f} | "
                         f"{secs} | {r['bytes_ratio']:.3f} | {r['ab_overhead']:.4f} |")
        if ref:
            within = [r for r in ppl_rows if r["ppl"] <= 1.01 * ref["ppl"] and r is not ref]
            best = min(within, key=lambda r: r["mean_iterations"]) if within else None
            lines.append(f"\nWithin 1% of the {ref['iters']}-iteration perplexity: "
                         + (", ".join(str(r["iters"]) for r in within) or "none")
                         + (f"; the cheapest (fewest mean iterations) is {best['iters']}." if best else "."))
    return "\n".join(lines) + "\n"


def reference_row(rows: list[dict]) -> dict | None:
    """The row of the largest plain cap (no plateau): what the other rows are compared with."""
    caps = [r for r in rows if str(r["iters"]).isdigit()]
    return max(caps, key=lambda r: int(r["iters"])) if caps else None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.eval_only is not None:
        for folder in args.eval_only:
            log.info("%s: %s", folder, cached_ppl(args, args.work / folder))
        return
    rows = curve(args) if args.layers and args.curve_iters else []
    points = [Point.cap(n) for n in args.ppl_iters] + [Point.parse(r) for r in args.rule]
    if args.ppl_default:
        points.append(Point.default())
    if args.one_run is not None:
        one_run(args, points)
    ppl_rows = [prune_and_eval(args, p) for p in points]
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "command": command_line("convergence_curve"), "threads": torch.get_num_threads()}
    meta["machine"] += f", {meta['threads']} torch thread(s)"
    record("convergence_curve", {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "curve": rows,
                                 "ppl": ppl_rows}, markdown(args, rows, ppl_rows, meta))


if __name__ == "__main__":
    main()
