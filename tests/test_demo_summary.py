"""`make demo`'s closing summary (tools/demo_summary.py, tools/demo_report.py): the text it prints, the full-default
line read from the newest recorded answer-benchmark run (or one line saying there is none), and the dense side's
cache key. No model runs here."""

from __future__ import annotations

import json
from pathlib import Path

from bench.results_page import newest_run
from tools.demo_report import full_default_lines, one_line, render
from tools.demo_summary import cache_path, dense_key, windows_spec

REPORT = {"bytes_ratio": 0.7, "ab_overhead": 0.1137, "time_budget_s": 150.0, "stopped": {"time_limit": 210},
          "phase_seconds": {"load": 4.0, "calibration": 26.0, "optimisation": 114.0}}


def side(answers: list[tuple[str, str, bool]], ppl: float, tps: float) -> dict:
    return {"answers": [{"q": q, "answer": a, "right": r} for q, a, r in answers], "ppl": {"ppl": ppl},
            "decode": {"tokens": 64, "tokens_per_s": tps}}


DENSE = side([("What is 1 plus 1?", "1 + 1 = 2", True), ("What is the opposite of hot?", "Cold.", True)], 15.5, 40.0)
ARMOR = side([("What is 1 plus 1?", "The the the\nthe " + "x" * 200, False),
              ("What is the opposite of hot?", "It is cold", True)], 87.2, 25.0)


def write_run(folder: Path, stamp: str, results: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}.json"
    path.write_text(json.dumps({"benchmark": "answers", "date": "2026-12-07", "machine": "x86_64, 2 cores",
                                "load": "2.00 2.00 2.00", "command": "python -m bench.answers ...",
                                "payload": {"questions": 303, "results": results}}))
    return path


def test_the_summary_puts_both_sides_and_every_answer_on_one_line_each(tmp_path):
    text = render(DENSE, ARMOR, REPORT, ["Dense side: cached."], 4, 2048, tmp_path)
    assert "15.50" in text and "87.20" in text and "0.700 (A+B / core 0.114)" in text
    assert "40.0" in text and "25.0" in text and "2/2" in text and "1/2" in text
    assert "    dense [right]: 1 + 1 = 2" in text and "    ARMOR [wrong]: The the the the xxx" in text
    assert all(len(line) < 100 for line in text.splitlines() if line.startswith("    ")), text
    assert text.rstrip().endswith("Dense side: cached.") and "no full-default run recorded yet" in text
    assert one_line("a\n b") == "a b" and one_line("") == "(empty)" and one_line("y" * 100, 10) == "yyyyyyy..."


def test_without_a_recorded_run_the_full_default_line_says_so(tmp_path):
    lines = full_default_lines(REPORT, 4, tmp_path / "absent")
    assert len(lines) == 1 and "no full-default run recorded yet" in lines[0] and "150 s budget" in lines[0]


def test_the_full_default_line_comes_from_the_newest_run(tmp_path):
    row = {"greedy": {"acc": 0.03, "stderr": 0.01, "n": 303}, "mc": {"acc": 0.5, "stderr": 0.03, "n": 303},
           "wikitext_ppl": 45.48, "wikitext_windows": 10, "heldout_ppl": None, "bytes_ratio": 0.7,
           "ab_overhead": 0.114, "prune_s": 2400.0}
    dense = {**row, "greedy": {"acc": 0.482, "stderr": 0.029, "n": 303}, "wikitext_ppl": 20.1, "bytes_ratio": 1.0}
    write_run(tmp_path, "20261201T000000Z", {"armor": {**row, "wikitext_ppl": 99.0}})
    newest = write_run(tmp_path, "20261207T120000Z", {"armor": row, "dense": dense})
    assert newest_run(tmp_path) == newest
    line, demo = full_default_lines(REPORT, 4, tmp_path)
    assert "20261207T120000Z.json" in line and "45.48 on 10 windows (dense 20.10)" in line and "99.0" not in line
    assert "0.030 ± 0.010 of 303 greedy (dense 0.482)" in line and "prune 2400 s" in line
    assert "150 s budget, 144 s spent, iterations ended by time_limit (210 matrices)" in demo
    assert "on 4 windows, the run's on 10" in demo


def test_the_dense_cache_key_changes_with_the_windows_and_moves_with_the_cache_env(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"0" * 10)
    data = tmp_path / "wiki.test.raw"
    data.write_text("text")
    monkeypatch.setenv("VLLM_ARMOR_CACHE", str(tmp_path / "cache"))
    four, eight = (dense_key("m", model, windows_spec(data, 2048, n)) for n in (4, 8))
    assert cache_path(four) != cache_path(eight) and cache_path(four) == cache_path(dict(four))
    assert cache_path(four).parent == tmp_path / "cache" / "demo" and four["vllm"]
