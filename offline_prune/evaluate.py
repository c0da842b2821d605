"""Perplexity on a plain-text test set, with the protocol of ../shared/data/README.md.

The file is read whole (CRLF -> LF), tokenized once, cut into consecutive non-overlapping windows of
`ctx_len` tokens (the ragged tail dropped); perplexity = exp(mean next-token NLL over all windows).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from offline_prune.errors import UserError

log = logging.getLogger(__name__)


def test_windows(path: Path, tokenizer, ctx_len: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    """(windows (n, ctx_len), tokens in the whole split)."""
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read evaluation data {path}: {err}") from err
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = ids.numel() // ctx_len
    if n == 0:
        raise UserError(f"{path} has {ids.numel()} tokens, fewer than --ctx-len {ctx_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * ctx_len].reshape(n, ctx_len), ids.numel()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str = "cpu") -> dict:
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc="ppl windows", unit="window"):
        inp = window[None].to(device)
        logits = model(inp, use_cache=False).logits[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, inp[0, 1:], reduction="sum"))
        total_tokens += inp.shape[1] - 1
    return {"ppl": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens, "tokens": total_tokens}
