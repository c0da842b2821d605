"""Calibration windows in the model's own chat format (`--calib chat:PATH.jsonl`): rendered with the tokenizer's chat
template, packed like c4, the same for the same seed; bad lines and a tokenizer without a template are one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from offline_prune.calibration import chat_windows, load_calibration, parse_spec
from offline_prune.errors import UserError
from offline_prune.pipeline import prune
from offline_prune.run_args import PruneArgs

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is the opposite of hot?",
             "How many legs does a spider have?", "What do bees make?", "Which planet is called the red planet?"]
ANSWERS = ["Paris.", "Red.", "Cold.", "Eight.", "Honey.", "Mars."]


def _conversations(path: Path) -> Path:
    with path.open("w") as f:
        for q, a in zip(QUESTIONS, ANSWERS, strict=True):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
            f.write("\n\n")  # blank lines are skipped
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_chat_windows_are_the_rendered_conversations_packed_in_seeded_order(tokenizer, tmp_path):
    file = _conversations(tmp_path / "chat.jsonl")
    windows = chat_windows(file, tokenizer, 2, 40, seed=3)
    order = list(range(len(QUESTIONS)))
    random.Random(3).shuffle(order)
    ids: list[int] = []
    for i in order:
        messages = [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": ANSWERS[i]}]
        ids += tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert windows.shape == (2, 40) and windows.dtype == torch.long
    assert windows.flatten().tolist() == ids[:80]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start != tokenizer.unk_token_id and (windows == im_start).sum() >= 3  # the template's turn markers
    assert torch.equal(windows, load_calibration(f"chat:{file}", tokenizer, None, 2, 40, seed=3))
    assert not torch.equal(windows, chat_windows(file, tokenizer, 2, 40, seed=4))


@pytest.mark.parametrize(("line", "needle"), [
    ('{"text": "not a conversation"}', "chat.jsonl:2: not a JSON object with a 'messages' field"),
    ('{"messages": []}', "chat.jsonl:2: 'messages' is not a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "chat.jsonl:2: 'messages' is not a non-empty list"),
    ("not json", "chat.jsonl:2: not a JSON object"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tokenizer, tmp_path, line, needle):
    file = tmp_path / "chat.jsonl"
    file.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        chat_windows(file, tokenizer, 1, 8, seed=0)


def test_too_few_tokens_and_no_template_are_refused(tokenizer, tmp_path):
    file = _conversations(tmp_path / "chat.jsonl")
    with pytest.raises(UserError, match="fewer than --calib-samples x --calib-seqlen = 100000"):
        chat_windows(file, tokenizer, 100, 1000, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        chat_windows(file, tokenizer, 1, 8, seed=0)
    assert parse_spec(f"chat:{file}") == ("chat", file)
    with pytest.raises(UserError, match="expected c4:PATH.jsonl, chat:PATH.jsonl"):
        parse_spec("chats:x")


def test_prune_with_chat_calibration_records_it(tiny_llama, tmp_path):
    file = _conversations(tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    prune(PruneArgs(model=str(tiny_llama), out=str(out), method="wanda", calib=f"chat:{file}", calib_samples=2,
                    calib_seqlen=32))
    report = json.loads((out / "armor_report.json").read_text())
    assert report["calibration"] == {"data": f"chat:{file}", "samples": 2, "seqlen": 32}


def test_self_chat_is_the_models_own_conversations_through_its_template(tiny_llama):
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = load_calibration("self-chat", tokenizer, model, 2, 48, seed=0)
    assert windows.shape == (2, 48) and windows.dtype == torch.long
    assert torch.equal(windows, load_calibration("self-chat", tokenizer, model, 2, 48, seed=0))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "\0"}], tokenize=False)
    prefix = tokenizer(rendered.split("\0")[0], add_special_tokens=False)["input_ids"]
    assert windows[0, :len(prefix)].tolist() == prefix  # a conversation starts every packed stream
    turn = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (windows == turn).sum() >= 4  # system, user, assistant turn markers at least
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="--calib self-chat: the model's tokenizer has no chat template"):
        load_calibration("self-chat", tokenizer, model, 1, 8, seed=0)
