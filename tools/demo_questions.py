"""The chat questions of `make demo`'s summary: a fixed few of the answer benchmark's (`bench/answers_set.py`),
asked the benchmark's way (the question plus `bench.answers.SUFFIX` through the chat template, greedy, at most
`bench.answers.MAX_NEW_TOKENS` tokens) and checked with `bench.answers.is_right`.

How they were picked (by measurement of the DENSE model only, never of a pruned one): from the dense row of the
first answer benchmark run (`python -m bench.answers dense=smollm2-135m ...`, transformers fp32 greedy, the run
recorded in docs/BENCHMARKS.md on 2026-12-06), the first question, in `questions()` order, of each of the nine
families that the dense model answered right; then the first demo run, where the dense model is served by vLLM (bf16),
answered "What is the plural of mouse?" wrong ("Mouse is a plural noun in the singular form."), so the plural is the
next one the dense model answered right, child. tests/test_demo_questions.py checks that the dense model still
answers every one of them right through transformers greedy; each demo summary shows whether it does through vLLM.
"""

from __future__ import annotations

from bench.answers import MAX_NEW_TOKENS, SUFFIX
from bench.answers_set import Item, questions

DEMO_QUESTIONS = (
    "What is 1 plus 1?",  # addition
    "What is the opposite of hot?",  # opposite
    "What is the capital of France?",  # capital
    "What is the plural of child?",  # plural (see below: not mouse)
    "What number comes after 1?",  # next_number
    "Which letter of the alphabet comes after D?",  # next_letter
    "What colour is grass?",  # colour
    "What sound does a wolf make?",  # animal_sound
    "What color is the sky on a clear day?",  # simple_mc
)
ANSWER_TOKENS = MAX_NEW_TOKENS


def demo_items() -> list[Item]:
    """The benchmark items of `DEMO_QUESTIONS`, in that order (KeyError where the set no longer has one)."""
    by_question = {it.question: it for it in questions()}
    return [by_question[q] for q in DEMO_QUESTIONS]


def chat_text(item: Item) -> str:
    """The user message of an item, as the answer benchmark words it."""
    return item.question + SUFFIX
