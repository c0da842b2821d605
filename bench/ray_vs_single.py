"""Wall time of `armor-prune` with `--ray` (local instance, 2 workers) against the same command without it.

    .venv/bin/python -m bench.ray_vs_single [--method armor] [--iters 3] [--repeats 2]

Runs the same command alternately without and with `--ray` (`--repeats` times each, fresh output folders),
checks that every `--ray` checkpoint is byte-identical to the single-process one, and reports whole-command
wall seconds, the report's job seconds and the ratio ray / single. Writes bench/results/ray_vs_single.json and
appends a line to docs/BENCHMARKS.md. On 2 cores expect no speed-up: the point is the overhead and equality.
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.common import C4, RESULTS, command_line, prune_command, record, run

log = logging.getLogger("bench.ray_vs_single")


def prune_cmd(a: argparse.Namespace, out: Path) -> list[str]:
    return prune_command(a.model, out, C4, a.calib_samples, a.calib_seqlen, "--method", a.method,
                         "--iters", str(a.iters), "--block-size", str(a.block_size))


def run_once(a: argparse.Namespace, out: Path, ray: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = prune_cmd(a, out) + (["--ray"] if ray else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if ray else None  # Ray workers: 1 thread each
    start = time.perf_counter()
    run(cmd, env)
    wall = time.perf_counter() - start
    summary = json.loads((out / "armor_report.json").read_text())["summary"]
    return {"wall_s": wall, "job_seconds": summary["job_seconds"], "report_wall_s": summary["wall_seconds"]}


def listed(runs: list[dict], key: str) -> str:
    return ", ".join(f"{r[key]:.1f}" for r in runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="armor")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=RESULTS / "ray_vs_single")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs: dict[str, list[dict]] = {"single": [], "ray": []}
    identical = True
    for i in range(a.repeats):
        single_dir, ray_dir = a.work / f"single-{i}", a.work / f"ray-{i}"
        runs["single"].append(run_once(a, single_dir, ray=False))
        runs["ray"].append(run_once(a, ray_dir, ray=True))
        same = filecmp.cmp(single_dir / "model.safetensors", ray_dir / "model.safetensors", shallow=False)
        identical &= same
        log.info("repeat %d: single %.1f s, ray %.1f s, identical %s", i, runs["single"][-1]["wall_s"],
                 runs["ray"][-1]["wall_s"], same)
    median = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    command = command_line("ray_vs_single")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    payload = {"command": command, "machine": machine, "argv": prune_cmd(a, Path("OUT")), "runs": runs,
               "median_wall_s": median, "ray_over_single": median["ray"] / median["single"],
               "byte_identical": identical}
    line = (f"\n## `--ray` vs single process ({dt.date.today().isoformat()})\n\n- {machine}, `{command}` "
            f"(`armor-prune {a.model} --method {a.method} --iters {a.iters} --block-size {a.block_size}`, "
            f"C4 {a.calib_samples} x {a.calib_seqlen}; `--ray` = local instance, 2 workers x 1 thread): "
            f"whole-command wall s single {listed(runs['single'], 'wall_s')}, ray {listed(runs['ray'], 'wall_s')}; "
            f"median ratio ray / single {payload['ray_over_single']:.2f}; summed job s single "
            f"{listed(runs['single'], 'job_seconds')}, ray {listed(runs['ray'], 'job_seconds')}; checkpoints "
            f"byte-identical: {identical}.\n")
    record("ray_vs_single", payload, line)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
