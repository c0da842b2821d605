"""Table of whole-model runs already made: perplexity, cost and the gap closed, from their own files.

    python -m bench.gap_table --dense DENSE_EVAL.json --run sparsegpt=OUT_DIR:EVAL.json \
        --run armor-fast=OUT_DIR:EVAL.json --run armor-fast-gram=OUT_DIR:EVAL.json

EVAL.json: the output of `armor-eval ppl` (its last line is the JSON result); OUT_DIR: the pruned folder (its
armor_report.json gives the arguments, weight bytes vs dense, A+B per kept value and the pruning times).
Gap closed = (ppl_ref - ppl) / (ppl_ref - ppl_dense), one column per reference: the best non-ARMOR run, and each
run named by --versus. Writes bench/results/gap_table.json and appends the table to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def last_json(path: Path) -> dict:
    """The last JSON line of a log (armor-eval writes its result last on stdout; progress bars go to stderr)."""
    return json.loads([line for line in path.read_text().splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path, help="armor-eval ppl output of the dense model")
    ap.add_argument("--dense-ppl", type=float, help="or: the dense perplexity already measured elsewhere ...")
    ap.add_argument("--dense-source", default="", help="... and where it was measured (printed in the table)")
    ap.add_argument("--run", action="append", default=[], help="NAME=OUT_DIR:EVAL.json")
    ap.add_argument("--versus", action="append", default=[], help="NAME of a run: one more gap column against it")
    ap.add_argument("--note", default="", help="how the runs were made (machine, lock, threads, ...)")
    ap.add_argument("--title", default="WikiText-2 gap closed at the default overhead")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gap_table.json")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    if (args.dense is None) == (args.dense_ppl is None):
        ap.error("give exactly one of --dense and --dense-ppl")
    dense = last_json(args.dense) if args.dense else {"ppl": args.dense_ppl, "source": args.dense_source}
    rows = {}
    for item in args.run:
        name, _, paths = item.partition("=")
        out_dir, _, eval_path = paths.partition(":")
        report = json.loads((Path(out_dir) / "armor_report.json").read_text())
        rows[name] = {"ppl": last_json(Path(eval_path)), "summary": report["summary"], "args": report["args"],
                      "command": report.get("command")}
    others = {k: v["ppl"]["ppl"] for k, v in rows.items() if not k.startswith("armor")}
    best = min(others, key=others.get) if others else None  # no baseline run: no gap column
    refs = list(dict.fromkeys([*([best] if best else []), *args.versus]))
    for ref in refs:
        if ref not in rows:
            ap.error(f"--versus {ref}: no run of that name")
    for row in rows.values():
        row["gap_closed"] = (others[best] - row["ppl"]["ppl"]) / (others[best] - dense["ppl"]) if best else None
        row["gap_closed_vs"] = {ref: (rows[ref]["ppl"]["ppl"] - row["ppl"]["ppl"])
                                / (rows[ref]["ppl"]["ppl"] - dense["ppl"]) for ref in refs}
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "loadavg": Path("/proc/loadavg").read_text().strip(),
              "command": shlex.join(["python", *sys.argv]), "dense": dense, "best_other": best, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    first = next(iter(rows.values()))["args"]
    first_eval = next(iter(rows.values()))["ppl"]
    lines = [
        f"\n## {args.title} ({result['date']})\n",
        f"Load average at collection {result['loadavg']}; `{result['command']}`. Calibration C4 "
        f"{first['calib_samples']} x {first['calib_seqlen']} (seed {first['seed']}); WikiText-2 test, eval ctx "
        f"{first_eval.get('ctx_len')}, {first_eval.get('windows')} windows. {args.note}\n",
        "| model | ppl | weight bytes / dense | A+B params / core values | prune wall s | "
        + "".join(f"gap closed vs {ref} | " for ref in refs) + "command |",
        "| --- | --- | --- | --- | --- | " + "--- | " * len(refs) + "--- |",
        f"| dense | {dense['ppl']:.2f} | 1.000 | 0 | - | " + "- | " * len(refs) + f"{dense.get('source', '')} |",
    ]
    for name, row in rows.items():
        s = row["summary"]
        lines.append(f"| {name} | {row['ppl']['ppl']:.2f} | {s['bytes_ratio']:.3f} | {s['ab_overhead']:.4f} | "
                     f"{s['wall_seconds']:.0f} | "
                     + "".join(f"{100 * row['gap_closed_vs'][ref]:.1f}% | " for ref in refs)
                     + f"`{row['command']}` |")
    table = "\n".join(lines) + "\n"
    print(table)
    with args.docs.open("a") as f:
        f.write(table)


if __name__ == "__main__":
    main()
