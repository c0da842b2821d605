"""Block tuning settings side by side: one set of ARMOR jobs, tuned with each (epochs, lr), then perplexity.

    .venv/bin/python -m bench.tune_sweep --settings 0:1e-4,1:1e-4,1:3e-4,1:1e-3,2:3e-4 --jobs 2 \
        --reference sparsegpt=out/quality128_15/sparsegpt --ppl-work out/quality128_15

1. The jobs: `armor-prune` with the defaults into WORK/jobs, stopped once block tuning has begun (the prune's own
   pause hook, ARMOR_PRUNE_PAUSE_AT=tuning:1), so WORK/jobs/.progress holds every finished matrix.
2. Each setting E:LR: WORK/jobs copied to WORK/tune-eE-lrLR and the same command rerun with --tune-epochs E
   --tune-lr LR. A rerun that changes only the tuning settings keeps the finished jobs and tunes again, so every
   setting starts from the very same A, B, masks and kept values (E = 0: the jobs alone).
3. `armor-eval ppl` of each on WikiText-2 (--max-windows) and on the held-out text (bench/heldout.py), cached
   under PPL_WORK/ppl/ by the weights' sha256 (bench/quality.py), with the dense model and --reference runs
   evaluated the same way; gap closed = (ppl_ref - ppl) / (ppl_ref - ppl_dense) against the first reference.

Every row states weight bytes / dense and A+B params / core values (from its report). `--jobs N` runs N prunes or
evaluations at a time with threads / N torch threads each, so the tuning seconds come from a loaded machine.
Writes bench/results/tune_sweep.json and appends the table to docs/BENCHMARKS.md.
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
import time
from pathlib import Path

from bench import common, quality
from bench.heldout import shakespeare_text

log = logging.getLogger("bench.tune_sweep")
PAUSE_AT = "tuning:1"
PAUSE_MARK = "ARMOR_PRUNE_PAUSED"  # offline_prune.progress.PAUSE_MARK (the bench does not import the package)


def prune_cmd(args, out: Path, extra: list[str]) -> list[str]:
    return common.prune_command(args.model, out, args.calib, args.calib_samples, args.calib_seqlen,
                                "--device", "cpu", *extra)


def jobs_until_tuning(args) -> Path:
    """WORK/jobs/.progress with every job finished: run (or resume) the prune until block tuning has begun."""
    out = args.work / "jobs"
    if (out / "armor_report.json").exists():
        raise SystemExit(f"{out} is a finished run (its jobs' progress is gone): remove it and rerun")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ARMOR_PRUNE_PAUSE_AT": PAUSE_AT}
    cmd = prune_cmd(args, out, [])
    log.info("$ %s  (until block tuning begins)", " ".join(cmd))
    begun = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    tail = []
    for line in proc.stderr:  # progress bars end with \r, so a line may hold many of them
        tail = (tail + [line])[-20:]
        if PAUSE_MARK in line:
            proc.kill()
            proc.wait()
            log.info("jobs finished in %.0f s (this call)", time.perf_counter() - begun)
            return out
    proc.wait()
    raise SystemExit(f"the jobs' prune ended ({proc.returncode}) before block tuning began:\n{''.join(tail)[-3000:]}")


def tuned(args, jobs: Path, epochs: str, lr: str) -> dict:
    """The jobs tuned with (epochs, lr) in their own folder (reused when already finished)."""
    name = f"tune-e{epochs}-lr{lr}"
    out = args.work / name
    if not (out / "armor_report.json").exists():
        if not out.exists():
            shutil.copytree(jobs, out)
        cmd = prune_cmd(args, out, ["--tune-epochs", epochs, "--tune-lr", lr])
        common.run(cmd, common.lane_env(args.threads, args.jobs))
    report = json.loads((out / "armor_report.json").read_text())
    return {"name": name, "epochs": float(epochs), "lr": float(lr), "dir": str(out), "report": report}


def evaluated(args, heldout: Path, name: str, model_dir: str) -> dict:
    ppl_args = argparse.Namespace(**{**vars(args), "work": args.ppl_work})
    return {"wikitext": quality.ppl(ppl_args, name, model_dir),
            "heldout": quality.ppl(ppl_args, name, model_dir, heldout, args.heldout_windows)}


def gap(ppl: float, dense: float, ref: float) -> float:
    return (ref - ppl) / (ref - dense)


def markdown(args, rows: list[dict], refs: dict[str, dict], load_start: str, command: str) -> str:
    ref_name = [n for n in refs if n != "dense"][0]
    dense, ref = refs["dense"]["ppl"], refs[ref_name]["ppl"]
    w = refs["dense"]["ppl"]["wikitext"]["windows"]
    lines = [
        f"\n## Block tuning settings, one set of ARMOR jobs ({dt.date.today().isoformat()})\n",
        f"Machine: {platform.machine()}, {args.threads} threads, {args.jobs} prune(s) or evaluation(s) at a time; "
        f"load average at the start {load_start}, at the end {common.loadavg()}. Command: `{command}`. "
        f"Calibration C4 {args.calib_samples} x {args.calib_seqlen}, seed 0; ARMOR at the CLI defaults; "
        f"WikiText-2 {w} windows of {args.ctx_len}, held-out {args.heldout_name} {args.heldout_windows} windows. "
        f"Gap closed against {ref_name}. Tuning seconds: wall time of the tuning phase on the loaded machine.\n",
        "| model | tune epochs | lr | WikiText-2 ppl | held-out ppl | gap closed (wiki / held-out) "
        "| weight bytes / dense | A+B params / core values | tuning s | mean layer error after / before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in refs.items():
        wiki, held = r["ppl"]["wikitext"]["ppl"], r["ppl"]["heldout"]["ppl"]
        cost = common.cost_cells(name, r.get("summary", {}))
        lines.append(f"| {name} | - | - | {wiki:.2f} | {held:.2f} | - | {cost} | - | - |")
    for r in rows:
        s = r["report"]["summary"]
        wiki, held = r["ppl"]["wikitext"]["ppl"], r["ppl"]["heldout"]["ppl"]
        g = (f"{gap(wiki, dense['wikitext']['ppl'], ref['wikitext']['ppl']):.1%} / "
             f"{gap(held, dense['heldout']['ppl'], ref['heldout']['ppl']):.1%}")
        t = s.get("tuning") or {}
        seconds = s["phase_seconds"].get("tuning")
        lines.append(f"| ARMOR | {r['epochs']:g} | {r['lr']:g} | {wiki:.2f} | {held:.2f} | {g} "
                     f"| {common.cost_cells('armor', s)} | {f'{seconds:.0f}' if seconds else '-'} "
                     f"| {t.get('mean_error_ratio') or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", type=Path, default=Path("out/sweep"))
    p.add_argument("--ppl-work", type=Path, default=None, help="where the ppl cache lives (default: --work)")
    p.add_argument("--calib", type=Path, default=common.C4)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--settings", default="0:1e-4,1:1e-4,1:3e-4,1:1e-3", help="EPOCHS:LR,... block tuning settings")
    p.add_argument("--reference", action="append", default=[], help="NAME=DIR of a pruned model (first: gap ref)")
    p.add_argument("--data", type=Path, default=common.WIKITEXT)
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--heldout-windows", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.ppl_work = args.ppl_work or args.work
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = common.loadavg()
    heldout = shakespeare_text()
    args.heldout_name = heldout.stem
    settings = [s.split(":") for s in args.settings.split(",")]
    jobs = jobs_until_tuning(args)
    rows = list(common.in_lanes(args.jobs, {f"{e}:{lr}": (lambda e=e, lr=lr: tuned(args, jobs, e, lr))
                                        for e, lr in settings}).values())
    refs = {"dense": {"dir": args.model}} | {n: {"dir": d} for n, d in (r.split("=", 1) for r in args.reference)}
    for ref in refs.values():
        report = Path(ref["dir"]) / "armor_report.json"
        ref["summary"] = json.loads(report.read_text())["summary"] if report.exists() else {}
    tasks = {r["name"]: (lambda r=r: evaluated(args, heldout, r["name"], r["dir"])) for r in rows}
    tasks |= {n: (lambda n=n, d=ref["dir"]: evaluated(args, heldout, n, d)) for n, ref in refs.items()}
    ppls = common.in_lanes(args.jobs, tasks)
    for r in rows:
        r["ppl"] = ppls[r["name"]]
    for name, ref in refs.items():
        ref["ppl"] = ppls[name]
    if len(refs) < 2:
        raise SystemExit("--reference NAME=DIR is needed for the gap closed")
    payload = {"rows": [{k: v for k, v in r.items() if k != "report"} | {"summary": r["report"]["summary"]}
                        for r in rows], "references": refs, "load_start": load_start}
    common.record("tune_sweep", payload, markdown(args, rows, refs, load_start, common.command_line("tune_sweep")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
