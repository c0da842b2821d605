"""Calibration token windows: `c4:PATH.jsonl`, `chat:PATH.jsonl`, `text:PATH` or `self` (sampled from the dense model).

All four give a LongTensor (n_samples, seqlen), the same for the same seed.
- c4: documents (JSON lines with `text`) in a seeded random order, joined with the EOS token, cut into
  consecutive windows of `seqlen` tokens; only as many documents are tokenized as needed.
- chat: conversations (JSON lines with `messages`, a list of {"role", "content"} as in the OpenAI and Hugging Face
  chat formats) rendered with the model's own chat template, in a seeded random order, joined and cut as c4 (the
  template ends every turn, so no EOS is added). For instruct models: the pruner then sees the template, the turn
  markers and answers, as the served model will.
- text: one plain-text file tokenized whole; `n_samples` windows at seeded random offsets.
- self: sequences sampled from the model itself (temperature 1), for users without data.
- self-chat: conversations the dense model writes itself, for instruct models without chat data: a user turn
  sampled after the chat template's user prefix (temperature 1), the model's answer to it (temperature 0.7), the
  pair rendered with the template and packed as chat. Needs a chat template.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offline_prune.errors import UserError

log = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, _, path = spec.partition(":")
    if kind in ("self", "self-chat") and not path:
        return kind, None
    if kind not in ("c4", "chat", "text") or not path:
        raise UserError(f"--calib {spec!r}: expected c4:PATH.jsonl, chat:PATH.jsonl, text:PATH, self or self-chat")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--calib: calibration file {file} does not exist or is not a file")
    return kind, file


def load_calibration(spec: str, tokenizer, model, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    kind, file = parse_spec(spec)
    if n_samples < 1 or seqlen < 2:
        raise UserError(f"--calib-samples ({n_samples}) must be >= 1 and --calib-seqlen ({seqlen}) >= 2")
    if kind == "c4":
        return c4_windows(file, tokenizer, n_samples, seqlen, seed)
    if kind == "chat":
        return chat_windows(file, tokenizer, n_samples, seqlen, seed)
    if kind == "text":
        return text_windows(file, tokenizer, n_samples, seqlen, seed)
    if kind == "self-chat":
        return self_chat_windows(tokenizer, model, n_samples, seqlen, seed)
    return self_samples(tokenizer, model, n_samples, seqlen, seed)


# What each JSON-lines field must hold (for the error line).
CHECKED = {"text": "a string", "messages": 'a non-empty list of {"role": str, "content": str}'}


def _read_jsonl(file: Path, field: str, check: Callable[[Any], bool]) -> list[Any]:
    """Every line's ``field`` (blank lines skipped); a line without it, or failing ``check``, is one error naming
    the file and line."""
    found = []
    try:
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise UserError(f"{file}:{lineno}: not a JSON object with a '{field}' field ({err})") from err
                if not check(value):
                    raise UserError(f"{file}:{lineno}: '{field}' is not {CHECKED[field]}")
                found.append(value)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read calibration file {file}: {err}") from err
    if not found:
        raise UserError(f"calibration file {file} has no documents")
    return found


def _is_conversation(messages: Any) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def _packed_windows(file: Path, texts: list[str], tokenizer, n_samples: int, seqlen: int, seed: int,
                    separator: int | None) -> torch.Tensor:
    """``texts`` in a seeded random order, tokenized one by one until enough, joined (``separator`` after each, if
    any) and cut into consecutive windows."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    needed = n_samples * seqlen
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if separator is not None:
            ids.append(separator)
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise UserError(
            f"{file} has {len(ids)} tokens, fewer than --calib-samples x --calib-seqlen = {needed}"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).reshape(n_samples, seqlen)


def c4_windows(file: Path, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    texts = _read_jsonl(file, "text", lambda t: isinstance(t, str))
    return _packed_windows(file, texts, tokenizer, n_samples, seqlen, seed, tokenizer.eos_token_id)


def _require_template(tokenizer, spec: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--calib {spec}: the model's tokenizer has no chat template (a base model?); use "
                        "c4:PATH.jsonl, text:PATH or self")


def chat_windows(file: Path, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    _require_template(tokenizer, f"chat:{file}")
    conversations = _read_jsonl(file, "messages", _is_conversation)
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations]
    return _packed_windows(file, texts, tokenizer, n_samples, seqlen, seed, None)


def text_windows(file: Path, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read calibration file {file}: {err}") from err
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen:
        raise UserError(f"{file} has {ids.numel()} tokens, fewer than --calib-seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def self_samples(tokenizer, model, n_samples: int, seqlen: int, seed: int, batch: int = 8) -> torch.Tensor:
    log.warning(
        "no calibration data given (--calib self): sampling %d sequences of %d tokens from the model itself; "
        "pass --calib c4:PATH.jsonl or text:PATH for the papers' setting",
        n_samples,
        seqlen,
    )
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, n_samples, batch):
        b = min(batch, n_samples - i)
        prompt = torch.full((b, 1), start, dtype=torch.long, device=model.device)
        seq = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=seqlen - 1,
            min_new_tokens=seqlen - 1,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(seq[:, :seqlen].cpu())
    return torch.cat(out)


def _user_prefix(tokenizer) -> tuple[list[int], int]:
    """The template's tokens before a user turn's text (the default system prompt included), and the token that
    ends the turn."""
    mark = "\x00ARMOR\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    before, _, after = rendered.partition(mark)
    end = tokenizer(after, add_special_tokens=False)["input_ids"][:1] or [tokenizer.eos_token_id]
    return tokenizer(before, add_special_tokens=False)["input_ids"], end[0]


def _generate(model, tokenizer, prompts: list[list[int]], max_new: int, temperature: float,
              stop: list[int]) -> list[str]:
    """One sampled continuation per prompt (left-padded batch), decoded without special tokens."""
    width = max(map(len, prompts))
    pad = tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=max_new, eos_token_id=stop, pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


@torch.no_grad()
def self_chat_windows(tokenizer, model, n_samples: int, seqlen: int, seed: int, batch: int = 8) -> torch.Tensor:
    _require_template(tokenizer, "self-chat")
    log.warning("no calibration data given (--calib self-chat): the model writes %d x %d tokens of conversations "
                "itself (user turns and its answers, through its chat template)", n_samples, seqlen)
    torch.manual_seed(seed)
    prefix, end = _user_prefix(tokenizer)
    stop = sorted({end, tokenizer.eos_token_id} - {None})
    needed, ids = n_samples * seqlen, []
    while len(ids) < needed:
        questions = _generate(model, tokenizer, [prefix] * batch, max(8, seqlen // 8), 1.0, stop)
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in questions]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        answers = _generate(model, tokenizer, prompt_ids, max(8, seqlen // 2), 0.7, stop)
        for q, a in zip(questions, answers, strict=True):
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            ids += tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
                "input_ids"]
    return torch.tensor(ids[:needed], dtype=torch.long).reshape(n_samples, seqlen)
