"""The answer benchmark (bench/answers.py) as two lm-eval tasks, `armor_answers_mc` and `armor_answers_gen`
(bench/lmeval/*.yaml): the functions their `!function` entries name. Everything comes from bench/answers.py and
bench/answers_set.py, so both paths ask the same 303 questions, the same way, and score replies alike:

- docs: `questions()` as rows {family, question, answers, choices, correct}, built in memory (no download);
- multiple choice: the context and each choice's continuation of `choice_texts` (lm-eval `acc`: the choice of the
  highest summed log-likelihood);
- greedy: the user message of `user_message` (run with `--apply_chat_template`), at most `MAX_NEW_TOKENS` tokens,
  right exactly when `is_right` says so.

lm-eval loads this file by path (not as a package module): from the `lm_eval` console script the repository root
is not on sys.path, so it is added when `bench` cannot be imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from bench.answers import choice_texts, is_right, user_message
    from bench.answers_set import questions
except ModuleNotFoundError:  # `lm_eval --include_path bench/lmeval` without PYTHONPATH=.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.answers import choice_texts, is_right, user_message
    from bench.answers_set import questions


def docs() -> list[dict]:
    """The 303 questions as lm-eval docs, in the order of `questions()` (so `--limit N` takes the same N)."""
    return [{"family": it.family, "question": it.question, "answers": list(it.answers), "choices": list(it.choices),
             "correct": it.correct} for it in questions()]


def dataset(**_metadata):
    """The tasks' `custom_dataset`: a DatasetDict with one split, `test` (lm-eval passes the task's metadata)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs())})


def mc_text(doc: dict) -> str:
    """The multiple-choice context (lm-eval appends `target_delimiter` " " and the choice)."""
    return choice_texts(doc["question"], doc["choices"][0])[0]


def gen_text(doc: dict) -> str:
    """The greedy part's user message."""
    return user_message(doc["question"])


def gen_score(doc: dict, results: list[str]) -> dict:
    """`acc` of one greedy reply: 1.0 when `is_right` finds an accepted answer in it."""
    return {"acc": float(is_right(results[0], tuple(doc["answers"])))}
