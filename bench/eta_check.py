"""The progress bar's ETA against the time the rest of the run really took, read from finished prunes' reports.

    .venv/bin/python -m bench.eta_check out/defaults128/default out/defaults128/rounds

`armor-prune` keeps, in `armor_report.json` (summary.eta_check), what the bar predicted for the remaining
matrices once the first round of jobs was done (a decoder layer in layer order, one linear of each kind from
layers spread over the depth in depth rounds) and the seconds that remaining work then took, the final write
included. This script tabulates them with each run's command, wall time and phases (issue: right within 25%).
Reports written before depth rounds existed name the key `predicted_after_first_layer_s` (layer order).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from bench.common import command_line, record


def row(folder: Path) -> dict:
    report = json.loads((folder / "armor_report.json").read_text())
    s = report["summary"]
    eta = s.get("eta_check")
    if not eta:
        raise SystemExit(f"{folder}/armor_report.json: no eta_check (a run that started with its work done?)")
    predicted = eta.get("predicted_after_first_round_s", eta.get("predicted_after_first_layer_s"))
    its = [r["iterations"] for r in report["linears"]]
    return {"folder": str(folder), "order": eta.get("order", "layers"), "predicted_s": predicted,
            "actual_s": eta["actual_s"], "error": eta["error"], "wall_s": s["wall_seconds"],
            "phases": s["phase_seconds"], "mean_iters": sum(its) / len(its), "stopped": s["stopped"],
            "command": report.get("command")}


def markdown(rows: list[dict], command: str) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    today = dt.date.today().isoformat()
    lines = [f"\n## Progress bar ETA after the first round vs the real rest of the run ({today})\n",
             f"Machine: {os.uname().machine}, {os.cpu_count()} cores; load average when tabulated {load} (each run's "
             f"own load is in its notes). Command: `{command}`.\n",
             "| run | job order | ETA after first round s | rest took s | error | wall s "
             "| load / calib / optim / write s | mean its | stopped by | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["phases"]
        phases = " / ".join(f"{p.get(k, 0):.0f}" for k in ("load", "calibration", "optimisation", "write"))
        stopped = ", ".join(f"{k} {v}" for k, v in r["stopped"].items())
        lines.append(f"| {r['folder']} | {r['order']} | {r['predicted_s']:.0f} | {r['actual_s']:.0f} | "
                     f"{r['error']:+.1%} | {r['wall_s']:.0f} | {phases} | {r['mean_iters']:.1f} | {stopped} | "
                     f"`{r['command']}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="finished armor-prune output folders")
    args = p.parse_args()
    rows = [row(f) for f in args.folders]
    record("eta_check", {"rows": rows}, markdown(rows, command_line("eta_check")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
