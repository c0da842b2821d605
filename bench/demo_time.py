"""How long `make demo` takes here, step by step (issue: a demo that ends in under 5 minutes).

    .venv/bin/python -m bench.demo_time [--fresh-dense]

Runs `make demo-prune` and `make demo-summary` (the steps of `make demo`, setup already done) one after another,
timing each, and reads the prune's report (phases, budget, cost) and the summary's JSON (perplexities, answers right,
decode speeds, and whether the dense side was computed or found cached; ``--fresh-dense`` first removes the cached
dense side, as on a fresh machine). Writes bench/results/demo_time.json and a line in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, command_line, record
from tools.demo_summary import dense_cache_folder

log = logging.getLogger("bench.demo_time")
STEPS = ("demo-prune", "demo-summary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh-dense", action="store_true", help="remove the cached dense side of the summary first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.fresh_dense:
        log.info("removing the cached dense side %s", dense_cache_folder())
        shutil.rmtree(dense_cache_folder(), ignore_errors=True)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    times, outputs = {}, {}
    for step in STEPS:
        start = time.perf_counter()
        proc = subprocess.run(["make", "--no-print-directory", step], cwd=REPO, capture_output=True, text=True)
        times[step] = round(time.perf_counter() - start, 1)
        outputs[step] = proc.stdout
        if proc.returncode:
            sys.stderr.write(proc.stderr[-5000:])
            raise SystemExit(f"make {step} failed ({proc.returncode})")
        log.info("%s: %.1f s", step, times[step])
    out = REPO / "out" / "smollm2-armor"
    summary = json.loads((out / "armor_report.json").read_text())["summary"]
    sides = json.loads((out / "demo_summary.json").read_text())
    dense, armor = sides["dense"], sides["armor"]
    total = sum(times.values())
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_before": load_before, "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "command": command_line("demo_time")}
    md = (f"\n## `make demo` step by step ({meta['date']})\n\nMachine: {meta['machine']}, load average "
          f"{meta['load_before']} before, {meta['load_after']} after. Command: `{meta['command']}` (setup done).\n\n"
          f"| step | seconds |\n| --- | --- |\n"
          + "".join(f"| `make {k}` | {v:.0f} |\n" for k, v in times.items())
          + f"| total | {total:.0f} |\n\nPrune phases (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in summary["phase_seconds"].items())
          + f"; budget {summary['time_budget_s']:.0f} s, stopped by: {summary['stopped']}; "
          f"weights {summary['bytes_ratio']:.3f}x dense, A+B / core values {summary['ab_overhead']:.4f}; "
          f"mean relative proxy loss {summary['mean_loss_final_relative']:.4f}.\n\n"
          f"Summary ({armor['ppl']['windows']} WikiText-2 windows): perplexity dense {dense['ppl']['ppl']:.2f}, "
          f"ARMOR {armor['ppl']['ppl']:.2f}; answers right dense {right(dense)}, ARMOR {right(armor)}; decode "
          f"tokens/s of one served request dense {dense['decode']['tokens_per_s']:.1f}, ARMOR "
          f"{armor['decode']['tokens_per_s']:.1f}. {sides['notes'][0]}\n")
    record("demo_time", {"meta": meta, "seconds": times, "total": total, "summary": summary, "sides": sides,
                         "summary_text": outputs["demo-summary"][-6000:]}, md)


def right(side: dict) -> str:
    return f"{sum(a['right'] for a in side['answers'])}/{len(side['answers'])}"


if __name__ == "__main__":
    main()
