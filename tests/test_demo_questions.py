"""The demo's chat questions (tools/demo_questions.py) are answer-benchmark items that the dense bundled model
answers right, greedy through its chat template, as the answer benchmark asks them (bench.answers)."""

from __future__ import annotations

import pytest
import torch

from bench.answers import greedy_replies, is_right
from tools.demo_questions import DEMO_QUESTIONS, demo_items


def test_the_demo_questions_are_distinct_benchmark_items():
    items = demo_items()
    assert [it.question for it in items] == list(DEMO_QUESTIONS) and len(set(DEMO_QUESTIONS)) == len(items)
    assert len({it.family for it in items}) == len(items)  # one per family


@pytest.mark.slow  # the bundled model in transformers: 15 to 99 s on 2 busy cores (2026-12-06)
def test_the_dense_model_answers_every_demo_question_right(smollm2_dir):
    from transformers import AutoTokenizer

    from offline_prune.checkpoint import load_model

    items = demo_items()
    model = load_model(smollm2_dir, dtype=torch.float32)
    replies = greedy_replies(model, AutoTokenizer.from_pretrained(smollm2_dir), items)
    wrong = [(it.question, r) for it, r in zip(items, replies, strict=True) if not is_right(r, it.answers)]
    assert not wrong, wrong
