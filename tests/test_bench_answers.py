"""bench/answers_set.py and the reply check of bench/answers.py: the question set is what its docstring says and
a reply is right only when an accepted answer stands in it as a word."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from bench.answers import accuracy, is_right, report_cells, windows_arg
from bench.answers_set import questions


def test_the_set_has_303_distinct_questions_each_with_four_choices_holding_its_answer():
    items = questions()
    assert len(items) == 303 and len({it.question for it in items}) == 303
    assert Counter(it.family for it in items)["addition"] == 81
    for it in items:
        assert len(set(it.choices)) == 4 and it.choices[it.correct] == it.answers[0], it
        assert not any(a in it.answers for i, a in enumerate(it.choices) if i != it.correct), it
    assert questions() == items  # seeded


def test_a_reply_is_right_only_with_an_answer_as_a_whole_word():
    assert is_right("The opposite of hot is cold.", ("cold",))
    assert not is_right("The opposite of hot is hot.", ("cold",))
    assert is_right("3 + 4 = 7", ("7", "seven")) and is_right("Seven.", ("7", "seven"))
    assert not is_right("3 + 4 = 17", ("7", "seven"))
    assert not is_right("Paris is lovely; the capital is Lyon", ("Paris City",))
    assert is_right("It is Mexico City.", ("Mexico City",)) and is_right("A rooster says cock-a-doodle-doo!",
                                                                        ("cock-a-doodle-doo", "crow"))
    assert accuracy([True, False, True, True]) == {"acc": 0.75, "stderr": 0.2165, "n": 4}


def test_window_counts_are_positive_numbers_or_all():
    assert windows_arg("40") == 40 and windows_arg("all") == 0  # 0 = no --max-windows: the whole text
    for bad in ("0", "-3", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            windows_arg(bad)


def test_a_row_carries_bytes_overhead_method_and_prune_time_from_the_report(tmp_path):
    assert report_cells(tmp_path) == {"bytes_ratio": 1.0, "ab_overhead": 0.0, "calibration": None,
                                      "method": "dense", "prune_s": None}
    report = {"summary": {"bytes_ratio": 0.7, "ab_overhead": 0.11, "wall_seconds": 123.4},
              "args": {"method": "armor", "tune_epochs": 1}, "calibration": {"data": "c4:x", "samples": 4}}
    (tmp_path / "armor_report.json").write_text(json.dumps(report))
    assert report_cells(tmp_path) == {"bytes_ratio": 0.7, "ab_overhead": 0.11, "calibration": report["calibration"],
                                      "method": "armor", "tune_epochs": 1, "prune_s": 123.4}
