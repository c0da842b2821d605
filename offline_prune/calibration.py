"""Calibration token windows: `c4:PATH.jsonl`, `text:PATH` or `self` (sampled from the dense model).

All three give a LongTensor (n_samples, seqlen), the same for the same seed.
- c4: documents (JSON lines with `text`) in a seeded random order, joined with the EOS token, cut into
  consecutive windows of `seqlen` tokens; only as many documents are tokenized as needed.
- text: one plain-text file tokenized whole; `n_samples` windows at seeded random offsets.
- self: sequences sampled from the model itself (temperature 1), for users without data.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from offline_prune.errors import UserError

log = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, _, path = spec.partition(":")
    if kind == "self" and not path:
        return "self", None
    if kind not in ("c4", "text") or not path:
        raise UserError(f"--calib {spec!r}: expected c4:PATH.jsonl, text:PATH or self")
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
    if kind == "text":
        return text_windows(file, tokenizer, n_samples, seqlen, seed)
    return self_samples(tokenizer, model, n_samples, seqlen, seed)


def _read_jsonl_texts(file: Path) -> list[str]:
    texts = []
    try:
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise UserError(f"{file}:{lineno}: not a JSON object with a 'text' field ({err})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read calibration file {file}: {err}") from err
    if not texts:
        raise UserError(f"calibration file {file} has no documents")
    return texts


def c4_windows(file: Path, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    texts = _read_jsonl_texts(file)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    needed = n_samples * seqlen
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise UserError(
            f"{file} has {len(ids)} tokens, fewer than --calib-samples x --calib-seqlen = {needed}"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).reshape(n_samples, seqlen)


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
