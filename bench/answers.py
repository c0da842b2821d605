"""The answer benchmark: do pruned instruct models still answer? `python -m bench.answers NAME=FOLDER ...`

Every model answers the 303 questions of `bench/answers_set.py` two ways, offline in transformers (fp32, CPU):
- greedy: the question plus "Answer in a few words." through the model's chat template, greedy, at most
  `MAX_NEW_TOKENS` tokens; right when an accepted answer form stands in the reply as a whole word;
- multiple choice: "Question: Q\\nAnswer:" followed by each of four choices, the choice of the highest
  log-likelihood (summed over its tokens, as lm-eval's `acc`).
Each row carries the accuracy of both with its standard error, per family, and for ARMOR folders the weight bytes
against dense and A+B / core values from `armor_report.json`. `--ppl-windows N` adds WikiText-2 perplexity on the
first N windows (armor-eval). Writes bench/results/answers.json and appends the table to docs/BENCHMARKS.md.

    python -m bench.answers dense=smollm2-135m armor=out/smollm2-armor [--ppl-windows 40] [--limit 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import torch

from bench.answers_set import Item, questions
from bench.common import WIKITEXT, armor_eval_ppl, command_line, loadavg, record

MAX_NEW_TOKENS = 24
BATCH = 16
SUFFIX = " Answer in a few words."
log = logging.getLogger("bench.answers")


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())) + " "


def is_right(reply: str, answers: tuple[str, ...]) -> bool:
    """An accepted form stands in the reply as a whole word (or words), case and punctuation aside."""
    said = _words(reply)
    return any(_words(a) in said for a in answers)


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def greedy_replies(model, tokenizer, items: list[Item]) -> list[str]:
    replies = []
    for start in range(0, len(items), BATCH):
        chunk = items[start:start + BATCH]
        rows = [tokenizer.apply_chat_template([{"role": "user", "content": it.question + SUFFIX}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False) for it in chunk]
        ids, mask = _left_padded(rows, tokenizer.eos_token_id)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=tokenizer.eos_token_id)
        replies += [tokenizer.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in out]
    return replies


@torch.no_grad()
def choice_picks(model, tokenizer, items: list[Item]) -> list[int]:
    """The index of the most likely choice of every item (summed log-likelihood of its tokens)."""
    picks = []
    for it in items:
        context = tokenizer(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in it.choices:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([context + cont])).logits[0, len(context) - 1:-1].float()
            scores.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item())
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def accuracy(right: list[bool]) -> dict:
    p = sum(right) / len(right)
    return {"acc": round(p, 4), "stderr": round(math.sqrt(p * (1 - p) / len(right)), 4), "n": len(right)}


def evaluate(name: str, folder: str, items: list[Item], ppl_windows: int | None) -> dict:
    from transformers import AutoTokenizer

    from offline_prune.checkpoint import load_model
    from offline_prune.models import resolve_model

    path = resolve_model(folder)
    started = time.time()
    model = load_model(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    replies = greedy_replies(model, tokenizer, items)
    picks = choice_picks(model, tokenizer, items)
    greedy = [is_right(r, it.answers) for r, it in zip(replies, items, strict=True)]
    mc = [p == it.correct for p, it in zip(picks, items, strict=True)]
    families = sorted({it.family for it in items})
    row = {"folder": str(path), "greedy": accuracy(greedy), "mc": accuracy(mc),
           "families": {f: {"greedy": accuracy([g for g, it in zip(greedy, items, strict=True) if it.family == f]),
                            "mc": accuracy([m for m, it in zip(mc, items, strict=True) if it.family == f])}
                        for f in families},
           "replies": [{"q": it.question, "reply": r, "right": g} for it, r, g in zip(items, replies, greedy,
                                                                                     strict=True)],
           "seconds": round(time.time() - started, 1)}
    report = Path(path) / "armor_report.json"
    if report.is_file():
        summary = json.loads(report.read_text())["summary"]
        row["bytes_ratio"], row["ab_overhead"] = summary["bytes_ratio"], summary["ab_overhead"]
        row["calibration"] = json.loads(report.read_text()).get("calibration")
    else:
        row["bytes_ratio"], row["ab_overhead"] = 1.0, 0.0
    if ppl_windows:
        row["wikitext_ppl"] = armor_eval_ppl(path, WIKITEXT, 2048, ppl_windows)["ppl"]
    log.info("%s: greedy %.3f, choice %.3f (%.0f s)", name, row["greedy"]["acc"], row["mc"]["acc"], row["seconds"])
    return row


def markdown(results: dict, args: argparse.Namespace, command: str) -> str:
    lines = [f"\n## Answer benchmark ({time.strftime('%Y-%m-%d')}, {len(questions())} questions"
             f"{f', first {args.limit}' if args.limit else ''}; load {args.load_start} at start)\n",
             f"`{command}`\n", "| model | greedy right | choice right | WikiText-2 ppl | weight bytes / dense | "
             "A+B / core | calibration |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        calib = r.get("calibration") or {}
        ppl = f"{r['wikitext_ppl']:.2f}" if "wikitext_ppl" in r else "-"
        lines.append(f"| {name} | {r['greedy']['acc']:.3f} ± {r['greedy']['stderr']:.3f} | {r['mc']['acc']:.3f} ± "
                     f"{r['mc']['stderr']:.3f} | {ppl} | {r['bytes_ratio']:.3f} | {r['ab_overhead']:.3f} | "
                     f"{calib.get('data', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=FOLDER (an HF folder, an ARMOR checkpoint or a bundled name)")
    p.add_argument("--ppl-windows", type=int, default=None, help="also WikiText-2 perplexity on this many windows")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (a quick look)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.load_start = loadavg()
    items = questions()[: args.limit] if args.limit else questions()
    results = {}
    for spec in args.models:
        name, _, folder = spec.partition("=")
        results[name] = evaluate(name, folder or name, items, args.ppl_windows)
    command = command_line("answers")
    record("answers", {"results": results, "questions": len(items)}, markdown(results, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
