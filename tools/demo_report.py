"""The text of `make demo`'s closing summary (dense vs the demo's ARMOR checkpoint), and how far the demo prune is
from the full defaults, read from the newest recorded answer-benchmark run
(`bench/results/runs/answers/<UTC stamp>.json`) where there is one. Pure formatting: no model is run here."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import RESULTS
from bench.results_page import newest_run

RUNS = RESULTS / "runs" / "answers"
ANSWER_WIDTH = 72


def one_line(text: str, width: int = ANSWER_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters (an ellipsis says where)."""
    flat = " ".join(text.split()) or "(empty)"
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def _right(side: dict) -> str:
    answers = side["answers"]
    return f"{sum(a['right'] for a in answers)}/{len(answers)}"


def summary_rows(dense: dict, armor: dict, report: dict, windows: str) -> list[tuple[str, str, str]]:
    """The table: perplexity, weight bytes, decode speed, answers right; ``report`` is the ARMOR summary."""
    return [
        ("", "dense", "ARMOR (demo)"),
        (f"WikiText-2 perplexity ({windows})", f"{dense['ppl']['ppl']:.2f}", f"{armor['ppl']['ppl']:.2f}"),
        ("weight bytes vs dense", "1.000", f"{report['bytes_ratio']:.3f} (A+B / core {report['ab_overhead']:.3f})"),
        (f"served decode tokens/s (1 request, {armor['decode']['tokens']} tokens)",
         f"{dense['decode']['tokens_per_s']:.1f}", f"{armor['decode']['tokens_per_s']:.1f}"),
        ("greedy chat answers right", _right(dense), _right(armor)),
    ]


def answer_lines(dense: dict, armor: dict) -> list[str]:
    lines = []
    for i, (d, a) in enumerate(zip(dense["answers"], armor["answers"], strict=True), 1):
        lines += [f"Q{i}. {d['q']}",
                  f"    dense [{'right' if d['right'] else 'wrong'}]: {one_line(d['answer'])}",
                  f"    ARMOR [{'right' if a['right'] else 'wrong'}]: {one_line(a['answer'])}"]
    return lines


def full_default_lines(report: dict, windows: int, folder: Path = RUNS) -> list[str]:
    """How far the demo prune is from the full defaults: the `armor` (and `dense`) rows of the newest run
    (``windows``: the demo's perplexity windows)."""
    stopped = ", ".join(f"{why} ({n} matrices)" for why, n in (report.get("stopped") or {}).items()) or "-"
    demo = (f"The demo prune: {report.get('time_budget_s') or 0:.0f} s budget, "
            f"{sum(report.get('phase_seconds', {}).values()):.0f} s spent, iterations ended by {stopped}.")
    path = newest_run(folder)
    if path is None:
        return [f"Full defaults: no full-default run recorded yet ({folder}). {demo}"]
    run = json.loads(path.read_text())
    results = run["payload"]["results"]
    armor, dense = results.get("armor"), results.get("dense")
    head = f"Full defaults ({path.name}: {run.get('date')}, {run.get('machine')}, load {run.get('load')}):"
    if armor is None:
        return [f"{head} the run has no `armor` row. {demo}"]
    greedy = armor["greedy"]
    dense_greedy = f" (dense {dense['greedy']['acc']:.3f})" if dense else ""
    dense_ppl = f" (dense {dense['wikitext_ppl']:.2f})" if dense else ""
    line = (f"{head} ARMOR answers {greedy['acc']:.3f} ± {greedy['stderr']:.3f} of {greedy['n']} greedy{dense_greedy}; "
            f"WikiText-2 ppl {armor['wikitext_ppl']:.2f} on {armor['wikitext_windows']} windows{dense_ppl}; "
            f"weights {armor['bytes_ratio']:.3f}x dense, A+B / core {armor['ab_overhead']:.3f}; "
            f"prune {armor['prune_s']:.0f} s.")
    if armor["wikitext_windows"] != windows:
        demo += f" (Its perplexity is on {windows} windows, the run's on {armor['wikitext_windows']}: compare each "
        demo += "with its own dense figure.)"
    return [line, demo]


def render(dense: dict, armor: dict, report: dict, notes: list[str], windows: int, ctx_len: int,
           runs: Path = RUNS) -> str:
    """The whole summary: the table, each question with both answers, the full-default line, the notes."""
    rows = summary_rows(dense, armor, report, f"{windows} windows x {ctx_len} tokens")
    parts = ["", "=== make demo: dense vs ARMOR (2:4 + A/B) ===", *_table(rows), "", *answer_lines(dense, armor), "",
             *full_default_lines(report, windows, runs), *notes]
    return "\n".join(parts) + "\n"
