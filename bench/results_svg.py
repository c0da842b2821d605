"""Hand-written SVG plots for the results page (bench/results_page.py): a scatter plot with labelled points and a
grouped bar chart. No plotting library; the output depends only on the numbers given (same numbers, same file).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 48, 70  # margins around the plot area
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
FONT = 'font-family="sans-serif" font-size="12"'


@dataclass(frozen=True)
class Point:
    label: str  # written beside the point ("" for none)
    x: float
    y: float
    series: str  # points of one series share a colour and a legend entry


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((hi - first) / step)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks 1, 2, 5 times powers of ten within [lo, hi] (1, 1.5, 2, 3, 5, 7 where that gives fewer than 3)."""
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas]
        inside = [round(t, 10) for t in ticks if lo <= t <= hi]
        if len(inside) >= 3:
            return inside
    return inside


def tick_text(value: float) -> str:
    return f"{value:g}"


class Axis:
    """Maps data values to pixels along one axis (linear, or logarithmic)."""

    def __init__(self, lo: float, hi: float, start: float, end: float, log: bool = False) -> None:
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.lo) / (self.hi - self.lo) * (self.end - self.start)


def _frame(title: str, x_label: str, y_label: str) -> list[str]:
    mid_y = (TOP + HEIGHT - BOTTOM) / 2
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">',
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
            f'<text x="{WIDTH / 2:.1f}" y="20" text-anchor="middle" font-family="sans-serif" font-size="15">'
            f'{escape(title)}</text>',
            f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.1f}" y="{HEIGHT - 20}" text-anchor="middle" {FONT}>'
            f'{escape(x_label)}</text>',
            f'<text x="18" y="{mid_y:.1f}" text-anchor="middle" transform="rotate(-90 18 {mid_y:.1f})" {FONT}>'
            f'{escape(y_label)}</text>',
            f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
            'fill="none" stroke="#333"/>']


def _y_grid(ticks: list[float], y: Axis) -> list[str]:
    out = []
    for t in ticks:
        py = y(t)
        out.append(f'<line x1="{LEFT}" y1="{py:.1f}" x2="{WIDTH - RIGHT}" y2="{py:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end" {FONT}>{tick_text(t)}</text>')
    return out


def _legend(series: list[str]) -> list[str]:
    """The series' colours in one row between the title and the plot area."""
    out, x = [], LEFT
    for i, name in enumerate(series):
        out.append(f'<rect x="{x}" y="{TOP - 17}" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>')
        out.append(f'<text x="{x + 14}" y="{TOP - 8}" {FONT}>{escape(name)}</text>')
        x += 30 + 7 * len(name)
    return out


def _wrapped(text: str, x: float, y: float, width: int) -> str:
    """TEXT centred at (x, y), wrapped to lines of at most WIDTH characters."""
    lines = textwrap.wrap(text, width) or [""]
    spans = "".join(f'<tspan x="{x:.1f}" dy="{0 if i == 0 else 14}">{escape(line)}</tspan>'
                    for i, line in enumerate(lines))
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" {FONT}>{spans}</text>'


def _padded(values: list[float], log: bool) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if log:
        return lo / 1.25, hi * 1.25
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def scatter(points: list[Point], title: str, x_label: str, y_label: str) -> str:
    """A scatter plot of the points, one colour per series, each point's label beside it. The y axis is
    logarithmic when the values span more than a factor of 5 (perplexities of pruned models do)."""
    ys = [p.y for p in points]
    log_y = min(ys) > 0 and max(ys) / min(ys) > 5
    x_lo, x_hi = _padded([p.x for p in points], False)
    y_lo, y_hi = _padded(ys, log_y)
    x_ticks = [t for t in nice_ticks(x_lo, x_hi) if x_lo <= t <= x_hi]
    y_ticks = log_ticks(y_lo, y_hi) if log_y else [t for t in nice_ticks(y_lo, y_hi) if y_lo <= t <= y_hi]
    x = Axis(x_lo, x_hi, LEFT, WIDTH - RIGHT)
    y = Axis(y_lo, y_hi, HEIGHT - BOTTOM, TOP, log_y)
    out = _frame(title, x_label, y_label + (" (log scale)" if log_y else "")) + _y_grid(y_ticks, y)
    for t in x_ticks:
        out.append(f'<text x="{x(t):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" {FONT}>'
                   f'{tick_text(t)}</text>')
    series = list(dict.fromkeys(p.series for p in points))
    for p in points:
        colour = COLOURS[series.index(p.series) % len(COLOURS)]
        out.append(f'<circle cx="{x(p.x):.1f}" cy="{y(p.y):.1f}" r="4" fill="{colour}"/>')
        if p.label:
            out.append(f'<text x="{x(p.x) + 6:.1f}" y="{y(p.y) - 6:.1f}" {FONT}>{escape(p.label)}</text>')
    return "\n".join(out + _legend(series) + ["</svg>"]) + "\n"


def bars(groups: list[str], series: list[str], values: list[list[float]], title: str, y_label: str) -> str:
    """A grouped bar chart: one group per entry of ``groups``, one bar per series in each (values[group][series]),
    each bar with its value above it."""
    top = max((v for row in values for v in row), default=1.0) or 1.0
    ticks = [t for t in nice_ticks(0.0, top * 1.15) if t <= top * 1.15]
    y = Axis(0.0, top * 1.15, HEIGHT - BOTTOM, TOP)
    out = _frame(title, "", y_label) + _y_grid(ticks, y)
    slot = (WIDTH - LEFT - RIGHT) / max(1, len(groups))
    bar = slot * 0.7 / max(1, len(series))
    for g, (group, row) in enumerate(zip(groups, values, strict=True)):
        left = LEFT + g * slot + slot * 0.15
        for s, value in enumerate(row):
            bx, by = left + s * bar, y(value)
            out.append(f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bar * 0.9:.1f}" height="{HEIGHT - BOTTOM - by:.1f}" '
                       f'fill="{COLOURS[s % len(COLOURS)]}"/>')
            out.append(f'<text x="{bx + bar * 0.45:.1f}" y="{by - 4:.1f}" text-anchor="middle" {FONT}>'
                       f'{value:.1f}</text>')
        out.append(_wrapped(group, LEFT + g * slot + slot / 2, HEIGHT - BOTTOM + 16, max(8, int(slot / 7))))
    return "\n".join(out + _legend(series) + ["</svg>"]) + "\n"
