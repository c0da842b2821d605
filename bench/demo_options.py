"""How to spend the demo's ~3 minutes of prune time (issue: a demo that shows the trade-off honestly).

    .venv/bin/python -m bench.demo_options [--only w32-b150,w16-b180] [--questions-every 7]

Prunes the bundled model with each candidate of `CANDIDATES` (ARMOR; calibration windows, time budget, iteration
cap and block tuning varied), one after another on the same machine, then evaluates each checkpoint the way the
demo does: WikiText-2 perplexity on its 4 windows (armor-eval), plus greedy and multiple-choice accuracy on every
N-th question of bench/answers_set.py (bench/answers.evaluate). Each row carries the prune's wall time, its phases,
what stopped it, weight bytes vs dense and A+B / core. The demo should take the lowest perplexity among the
candidates whose prune fits ~3 minutes. Writes the run through bench.common.record.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from bench.answers import evaluate
from bench.answers_set import questions
from bench.common import BIN, C4, RESULTS, command_line, loadavg, record, run

log = logging.getLogger("bench.demo_options")
DEMO_WINDOWS = 4  # the Makefile's demo-eval --max-windows
FITS_S = 200  # a prune that takes longer does not fit the demo's ~3 minutes
# name: (calibration windows of 512 tokens, extra armor-prune arguments)
CANDIDATES: dict[str, tuple[int, list[str]]] = {
    "w32-b150": (32, ["--time-budget", "150s"]),  # the demo until now
    "w32-b180": (32, ["--time-budget", "180s"]),
    "w16-b180": (16, ["--time-budget", "180s"]),
    "w8-b180": (8, ["--time-budget", "180s"]),
    "w16-i3-t1": (16, ["--iters", "3", "--tune-epochs", "1"]),
    "w32-i2-t1": (32, ["--iters", "2", "--tune-epochs", "1"]),
}


def prune(name: str, work: Path, calib: Path) -> dict:
    """armor-prune one candidate into WORK/NAME; its wall time and the report's summary."""
    samples, extra = CANDIDATES[name]
    out = work / name
    cmd = [str(BIN / "armor-prune"), "smollm2-135m", str(out), "--method", "armor", "--calib", f"c4:{calib}",
           "--calib-samples", str(samples), "--calib-seqlen", "512", "--seed", "0", "--overwrite", *extra]
    started = time.perf_counter()
    run(cmd)
    wall = round(time.perf_counter() - started, 1)
    summary = json.loads((out / "armor_report.json").read_text())["summary"]
    log.info("%s: pruned in %.0f s (%s)", name, wall, summary["phase_seconds"])
    return {"command": " ".join(cmd[1:]), "prune_wall_s": wall, "phases": summary["phase_seconds"],
            "stopped": summary.get("stopped"), "tuning": summary.get("tuning"), "folder": str(out)}


def markdown(rows: dict, command: str, load: str, n_questions: int) -> str:
    lines = [f"\n## How to spend the demo's prune time ({time.strftime('%Y-%m-%d')}; load {load} at start)\n",
             f"`{command}`; WikiText-2 perplexity on the demo's {DEMO_WINDOWS} windows, answers on {n_questions} "
             "questions of bench/answers_set.py.\n",
             "| candidate | prune s | WikiText-2 ppl | greedy right | choice right | weight bytes / dense | "
             "A+B / core | phases s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items())
        lines.append(f"| {name} | {r['prune_wall_s']:.0f} | {r['wikitext_ppl']:.2f} | {r['greedy']['acc']:.3f} | "
                     f"{r['mc']['acc']:.3f} | {r['bytes_ratio']:.3f} | {r['ab_overhead']:.3f} | {phases} |")
    best = choose(rows)
    lines.append(f"\nLowest perplexity among the prunes within {FITS_S} s: **{best or 'none'}**.\n")
    return "\n".join(lines) + "\n"


def choose(rows: dict) -> str | None:
    """The candidate the demo should take: lowest perplexity among those whose prune fits."""
    fitting = {n: r for n, r in rows.items() if r["prune_wall_s"] <= FITS_S}
    return min(fitting, key=lambda n: fitting[n]["wikitext_ppl"]) if fitting else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates")
    p.add_argument("--questions-every", type=int, default=7, help="every N-th question of the answer set")
    p.add_argument("--calib", type=Path, default=C4)
    p.add_argument("--work", type=Path, default=RESULTS / "demo_options")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"--only: unknown candidate(s) {', '.join(unknown)} (known: {', '.join(CANDIDATES)})")
    load = loadavg()
    items = questions()[:: args.questions_every]
    rows = {}
    for name in names:
        row = prune(name, args.work, args.calib)
        row.update({k: v for k, v in evaluate(name, row["folder"], items, DEMO_WINDOWS).items()
                    if k not in ("replies", "families", "folder")})
        rows[name] = row
    payload = {"rows": rows, "questions": len(items), "windows": DEMO_WINDOWS, "fits_s": FITS_S,
               "chosen": choose(rows)}
    record("demo_options", payload, markdown(rows, command_line("demo_options"), load, len(items)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
