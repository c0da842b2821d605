"""bench/demo_options.py: the demo takes the lowest perplexity among the prunes that fit its time, and every row of
the table carries its cost."""

from __future__ import annotations

import json
import re

from bench.common import REPO
from bench.demo_options import CANDIDATES, FITS_S, choose, markdown


def _row(wall: float, ppl: float) -> dict:
    acc = {"acc": 0.5, "stderr": 0.1, "n": 4}
    return {"prune_wall_s": wall, "wikitext_ppl": ppl, "greedy": acc, "mc": acc, "bytes_ratio": 0.7,
            "ab_overhead": 0.114, "phases": {"load": 4.0, "calibration": 20.0}}


def test_the_lowest_perplexity_that_fits_is_chosen_and_a_slow_prune_never():
    rows = {"fast": _row(150, 90.0), "better": _row(190, 70.0), "best-but-slow": _row(FITS_S + 1, 50.0)}
    assert choose(rows) == "better"
    assert choose({"slow": _row(FITS_S + 60, 40.0)}) is None
    table = markdown(rows, "python -m bench.demo_options", "1.0 1.0 1.0", 44)
    assert "| better | 190 | 70.00 | 0.500 | 0.500 | 0.700 | 0.114 | load 4, calibration 20 |" in table
    assert "**better**" in table



def test_the_makefile_demo_prunes_the_way_the_newest_committed_run_chose():
    runs = sorted((REPO / "bench" / "results" / "runs" / "demo_options").glob("*.json"))
    assert runs, "no committed bench/demo_options run"
    chosen = json.loads(runs[-1].read_text())["payload"]["chosen"]
    samples, extra = CANDIDATES[chosen]
    make = (REPO / "Makefile").read_text()
    assert re.search(rf"^DEMO_CALIB_SAMPLES \?= {samples}$", make, re.M), chosen
    assert re.search(rf"^DEMO_BUDGET \?= {extra[extra.index('--time-budget') + 1]}$", make, re.M), chosen
