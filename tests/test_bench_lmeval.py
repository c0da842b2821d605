"""The answer benchmark's lm-eval tasks (bench/lmeval/armor_answers_*.yaml) ask what bench/answers.py asks: the
same docs in the same order, the same multiple-choice context and continuations (tokenized alike), the same chat
message and token limit for the greedy part, and the same scoring (`is_right`). No model is run; the task checks
need lm-eval (the `bench` extra; skipped without it) and, for the tokenizer checks, the bundled model's folder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench import lm_eval_local
from bench.answers import MAX_NEW_TOKENS, choice_texts, is_right, user_message
from bench.answers_set import questions
from bench.common import REPO

HANDFUL = [0, 1, 90, 150, 200, 250, 302]  # addition, opposite, capital, ..., simple_mc


@pytest.fixture(scope="module")
def tasks() -> dict:
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(REPO / lm_eval_local.TASKS_DIR))
    return manager.load(["armor_answers_mc", "armor_answers_gen"])["tasks"]


def test_the_docs_are_the_303_questions_in_order(tasks):
    items = questions()
    for name in ("armor_answers_mc", "armor_answers_gen"):
        docs = list(tasks[name].test_docs())
        assert [d["question"] for d in docs] == [it.question for it in items], name
        for i in HANDFUL:
            assert (docs[i]["family"], tuple(docs[i]["answers"]), tuple(docs[i]["choices"]), docs[i]["correct"]) == (
                items[i].family, items[i].answers, items[i].choices, items[i].correct)


def test_multiple_choice_requests_are_the_offline_context_and_continuations(tasks):
    task, items = tasks["armor_answers_mc"], questions()
    task.build_all_requests(limit=len(items))
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    for i in HANDFUL:
        assert by_doc[i] == [choice_texts(items[i].question, c) for c in items[i].choices]
        assert task.doc_to_target(task.test_docs()[i]) == items[i].correct


def test_greedy_requests_are_the_offline_message_and_token_limit(tasks):
    task, items = tasks["armor_answers_gen"], questions()
    task.build_all_requests(limit=len(items))
    for inst in task.instances:
        if inst.doc_id in HANDFUL:
            text, kwargs = inst.arguments
            assert text == user_message(items[inst.doc_id].question)
            assert kwargs["max_gen_toks"] == MAX_NEW_TOKENS and not kwargs["do_sample"] and kwargs["until"] == []


def test_a_greedy_reply_scores_as_is_right_says(tasks):
    task = tasks["armor_answers_gen"]
    docs = task.test_docs()
    replies = ["Two.", "2 + 1 = 3", "The answer is 12", "It is Cold", "cold-ish", "", "seven"]
    for i in HANDFUL:
        for reply in replies + [questions()[i].answers[-1].upper() + "!"]:
            assert task.process_results(docs[i], [reply]) == {"acc": float(is_right(reply, questions()[i].answers))}


def test_chat_and_tokens_match_the_offline_path(tasks, smollm2_dir):
    """With the model's tokenizer: the chat prompt lm-eval builds (`--apply_chat_template`) tokenizes to what
    bench/answers.py feeds `generate`, and lm-eval's context/continuation split equals answers.py's tokens."""
    from lm_eval.api.model import TemplateLM
    from transformers import AutoTokenizer

    tok, items = AutoTokenizer.from_pretrained(smollm2_dir), questions()
    gen = tasks["armor_answers_gen"]
    gen.build_all_requests(limit=max(HANDFUL) + 1, apply_chat_template=True, tokenizer_name="smollm2",
                           chat_template=lambda chat, add_generation_prompt=True: tok.apply_chat_template(
                               chat, tokenize=False, add_generation_prompt=add_generation_prompt))
    lm = SimpleNamespace(backend="causal", tok_encode=lambda s: tok(s)["input_ids"])  # lm-eval vllm: no BOS flag
    for inst in gen.instances:
        if inst.doc_id in HANDFUL:
            offline = tok.apply_chat_template([{"role": "user", "content": user_message(items[inst.doc_id].question)}],
                                              tokenize=True, add_generation_prompt=True, return_dict=False)
            assert tok(inst.arguments[0], add_special_tokens=False)["input_ids"] == offline
    for i in HANDFUL:
        for choice in items[i].choices:
            context, cont = choice_texts(items[i].question, choice)
            assert TemplateLM._encode_pair(lm, context, cont) == (
                tok(context, add_special_tokens=False)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"])


def test_only_the_greedy_task_runs_through_the_chat_template_and_limit_is_passed_on():
    mc = lm_eval_local.lm_eval_command("vllm", "pretrained=M", lm_eval_local.MC, REPO / "o", None)
    gen = lm_eval_local.lm_eval_command("local-completions", "model=M", lm_eval_local.GEN, REPO / "o", 20)
    assert "--apply_chat_template" not in mc and "--limit" not in mc and "--include_path" in mc
    assert gen[-3:] == ["--apply_chat_template", "--limit", "20"]
    assert gen[:3] == ["lm_eval", "--model", "local-completions"]
