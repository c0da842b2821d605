"""The sections of the results page (bench/results_page.py): one renderer per known benchmark (`answers`,
`serve_speed`, `demo_time`, `demo_options`) and a generic one for the rest, each from a run's payload only. Every
figure is formatted here (fixed decimals), so the page and the README block built from the same run agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench import results_svg

PPL_FIGURE = "results_ppl_vs_bytes.svg"
SPEED_FIGURE = "results_serve_speed.svg"
FIGURES = (PPL_FIGURE, SPEED_FIGURE)  # every figure a renderer may write, beside docs/RESULTS.md
GENERIC_ROWS = 30  # at most this many scalar fields in a generic section


@dataclass
class Section:
    """A benchmark's part of the page: markdown lines and the figures they link (file name -> SVG text)."""
    title: str
    lines: list[str]
    figures: dict[str, str] = field(default_factory=dict)


def num(value: float | None, digits: int) -> str:
    """VALUE with DIGITS decimals, "-" where there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def acc(cell: dict | None) -> str:
    """An accuracy with its standard error: "0.482 ± 0.029"."""
    return "-" if not cell else f"{cell['acc']:.3f} ± {cell['stderr']:.3f}"


def with_windows(value: float | None, windows: int | None) -> str:
    """A perplexity with the number of windows it was measured on: "20.10 (10)"."""
    return num(value, 2) + (f" ({windows})" if value is not None and windows else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows]


# answers ---------------------------------------------------------------------------------------------------------

def pruning(row: dict) -> str:
    """How a row's model was pruned: method, calibration (kind and SAMPLES x SEQLEN), tuning epochs."""
    parts = [str(row["method"])] if row.get("method") else []
    calib = row.get("calibration")
    if calib:
        parts.append(f"{str(calib.get('data', '?')).split(':')[0]} {calib.get('samples')}x{calib.get('seqlen')}")
    if row.get("tune_epochs") is not None:
        parts.append(f"tune {row['tune_epochs']}")
    return ", ".join(parts) or "-"


def answers_cells(row: dict) -> dict[str, str]:
    """The formatted cells of one model of an `answers` run (shared by the page and the README block)."""
    greedy, mc = row.get("greedy") or {}, row.get("mc") or {}
    return {"greedy": acc(greedy), "mc": acc(mc), "greedy_acc": num(greedy.get("acc"), 3),
            "mc_acc": num(mc.get("acc"), 3),
            "wikitext": num(row.get("wikitext_ppl"), 2), "heldout": num(row.get("heldout_ppl"), 2),
            "wikitext_w": with_windows(row.get("wikitext_ppl"), row.get("wikitext_windows")),
            "heldout_w": with_windows(row.get("heldout_ppl"), row.get("heldout_windows")),
            "bytes": num(row.get("bytes_ratio"), 3), "ab": num(row.get("ab_overhead"), 3),
            "prune_s": num(row.get("prune_s"), 0), "pruning": pruning(row)}


def family_table(results: dict) -> list[str]:
    """Greedy / choice accuracy per question family, one column per model."""
    names = [n for n, r in results.items() if r.get("families")]
    if not names:
        return []
    families = sorted({f for n in names for f in results[n]["families"]})
    rows = []
    for fam in families:
        cells = [results[n]["families"].get(fam) for n in names]
        n_items = next((c["greedy"]["n"] for c in cells if c), 0)
        rows.append([fam, str(n_items)] + [f"{c['greedy']['acc']:.3f} / {c['mc']['acc']:.3f}" if c else "-"
                                           for c in cells])
    return ["", "Per family, greedy / choice accuracy:", ""] + table(["family", "questions", *names], rows)


def ppl_figure(results: dict) -> str | None:
    """Perplexity against weight bytes / dense for every model that has both (WikiText-2 and held-out)."""
    points = []
    for name, r in results.items():
        if r.get("bytes_ratio") is None:
            continue
        for key, series in (("wikitext_ppl", "WikiText-2"), ("heldout_ppl", "held-out")):
            if r.get(key) is not None:
                points.append(results_svg.Point(name if key == "wikitext_ppl" else "", r["bytes_ratio"], r[key],
                                                series))
    if not points:
        return None
    return results_svg.scatter(points, "Perplexity against weight bytes", "weight bytes / dense", "perplexity")


def render_answers(payload: dict) -> Section:
    results = payload.get("results", {})
    header = ["model", "greedy right ± se", "choice right ± se", "WikiText-2 ppl (windows)",
              "held-out ppl (windows)", "weight bytes / dense", "A+B / core", "prune s", "pruning"]
    rows = []
    for name, row in results.items():
        c = answers_cells(row)
        rows.append([name, c["greedy"], c["mc"], c["wikitext_w"], c["heldout_w"], c["bytes"], c["ab"], c["prune_s"],
                     c["pruning"]])
    lines = [f"{payload.get('questions', '?')} questions; greedy: the chat-template reply holds an accepted answer; "
             "choice: the most likely of four choices. Weight bytes / dense and A+B / core: the checkpoint's "
             "`armor_report.json` (dense: 1 and 0).", "", *table(header, rows), *family_table(results)]
    if payload.get("note"):
        lines += ["", f"Note on this run: {payload['note']}"]
    figure = ppl_figure(results)
    figures = {PPL_FIGURE: figure} if figure else {}
    if figure:
        lines += ["", f"![Perplexity against weight bytes]({PPL_FIGURE})"]
    return Section("Answer benchmark (`answers`)", lines, figures)


# serve_speed -----------------------------------------------------------------------------------------------------

def dense_row(rows: dict) -> dict | None:
    return next((r for name, r in rows.items() if name.startswith("dense")), None)


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def speed_cells(row: dict, dense: dict | None) -> dict[str, str]:
    """The formatted cells of one served variant of a `serve_speed` run."""
    d = dense or {}
    return {"tok_s_1": num(row.get("tok_s_1"), 1), "tok_s_8": num(row.get("tok_s_8"), 1),
            "x_1": ratio(row.get("tok_s_1"), d.get("tok_s_1")), "x_8": ratio(row.get("tok_s_8"), d.get("tok_s_8")),
            "startup": num(row.get("startup_s"), 1), "ttft": num(row.get("ttft_s"), 3),
            "x_ttft": ratio(row.get("ttft_s"), d.get("ttft_s")),
            "mb": num(row["weight_bytes"] / 1e6 if row.get("weight_bytes") else None, 1),
            "x_mb": ratio(row.get("weight_bytes"), d.get("weight_bytes"))}


def render_serve_speed(payload: dict) -> Section:
    rows = payload.get("rows", {})
    dense = dense_row(rows)
    header = ["model", "start-up s", "tok/s, 1 request", "x dense", "tok/s, 8 concurrent", "x dense", "TTFT s",
              "x dense TTFT", "weights MB", "x dense weights", "rounds"]
    body = []
    for name, row in rows.items():
        c = speed_cells(row, dense)
        body.append([name, c["startup"], c["tok_s_1"], c["x_1"], c["tok_s_8"], c["x_8"], c["ttft"], c["x_ttft"],
                     c["mb"], c["x_mb"], str(len(row.get("rounds", [])) or "-")])
    lines = [f"vLLM CPU backend, {payload.get('mode', '?')}, {payload.get('tokens', '?')} output tokens per request "
             "(greedy, ignore_eos), medians over the rounds; x dense: the ratio to the dense row.", "",
             *table(header, body)]
    figures = {}
    if rows:
        values = [[row.get("tok_s_1") or 0.0, row.get("tok_s_8") or 0.0] for row in rows.values()]
        figures[SPEED_FIGURE] = results_svg.bars(list(rows), ["1 request", "8 concurrent"], values,
                                                 "Served decode speed", "output tokens/s")
        lines += ["", f"![Served decode speed]({SPEED_FIGURE})"]
    return Section("Serving speed, ARMOR vs dense (`serve_speed`)", lines, figures)


# demo_time -------------------------------------------------------------------------------------------------------

def render_demo_time(payload: dict) -> Section:
    seconds = payload.get("seconds", {})
    rows = [[f"`make {step}`", num(s, 1)] for step, s in seconds.items()]
    rows.append(["total", num(payload.get("total"), 1)])
    lines = table(["step", "seconds"], rows)
    s, ppl = payload.get("summary") or {}, payload.get("ppl") or {}
    facts = []
    if s:
        facts.append(f"weights {num(s.get('bytes_ratio'), 3)}x dense, A+B / core {num(s.get('ab_overhead'), 3)}, "
                     f"prune stopped by: {s.get('stopped', '-')}")
    if ppl:
        facts.append(f"demo perplexity {num(ppl.get('ppl'), 2)} on {ppl.get('windows', '?')} WikiText-2 windows")
    if facts:
        lines += ["", "; ".join(facts) + "."]
    return Section("`make demo` step by step (`demo_time`)", lines)


# demo_options ----------------------------------------------------------------------------------------------------

def render_demo_options(payload: dict) -> Section:
    """The ways of spending the demo's prune time, side by side; the one the demo should take named."""
    rows = [[name, num(r.get("prune_wall_s"), 0), num(r.get("wikitext_ppl"), 2), acc(r.get("greedy")),
             acc(r.get("mc")), num(r.get("bytes_ratio"), 3), num(r.get("ab_overhead"), 3),
             ", ".join(f"{k} {num(v, 0)}" for k, v in (r.get("phases") or {}).items()),
             f"`{r.get('command', '-')}`"] for name, r in payload.get("rows", {}).items()]
    lines = [f"WikiText-2 perplexity on the demo's {payload.get('windows', '?')} windows; answers on "
             f"{payload.get('questions', '?')} questions of bench/answers_set.py.", ""]
    lines += table(["candidate", "prune s", "WikiText-2 ppl", "greedy right", "choice right", "weight bytes / dense",
                    "A+B / core", "phases s", "command"], rows)
    lines += ["", f"Lowest perplexity among the prunes within {num(payload.get('fits_s'), 0)} s: "
                  f"**{payload.get('chosen') or 'none'}**."]
    return Section("How to spend the demo's prune time (`demo_options`)", lines)


# any other benchmark ---------------------------------------------------------------------------------------------

def flat_scalars(value: object, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, text) of every number, string and boolean in nested dicts (lists are left out)."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in flat_scalars(v, f"{prefix}{k}.")]
    if isinstance(value, bool) or value is None:
        return [(prefix[:-1], str(value))]
    if isinstance(value, float):
        return [(prefix[:-1], f"{value:.4g}")]
    if isinstance(value, (int, str)):
        return [(prefix[:-1], str(value).replace("|", "\\|").replace("\n", " "))]
    return []


def render_generic(payload: dict) -> Section:
    pairs = flat_scalars(payload)
    lines = ["No dedicated renderer; the run's scalar fields"
             + (f" (the first {GENERIC_ROWS} of {len(pairs)})" if len(pairs) > GENERIC_ROWS else "") + ":", ""]
    if not pairs:
        return Section("", ["No dedicated renderer and no scalar field; see the run's JSON."])
    return Section("", lines + table(["field", "value"], [[f"`{k}`", v] for k, v in pairs[:GENERIC_ROWS]]))


RENDERERS: dict[str, Callable[[dict], Section]] = {
    "answers": render_answers, "serve_speed": render_serve_speed, "demo_time": render_demo_time,
    "demo_options": render_demo_options}


def render(benchmark: str, payload: dict) -> Section:
    """The section of one run of BENCHMARK (the generic one for a benchmark without a renderer)."""
    section = RENDERERS.get(benchmark, render_generic)(payload)
    section.title = section.title or f"`{benchmark}`"
    return section
