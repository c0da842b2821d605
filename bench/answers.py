"""The answer benchmark: do pruned instruct models still answer? `python -m bench.answers NAME=FOLDER ...`

Every model answers the 303 questions of `bench/answers_set.py` two ways, offline in transformers (fp32, CPU):
- greedy: the question plus "Answer in a few words." through the model's chat template, greedy, at most
  `MAX_NEW_TOKENS` tokens; right when an accepted answer form stands in the reply as a whole word;
- multiple choice: "Question: Q\\nAnswer:" followed by each of four choices, the choice of the highest
  log-likelihood (summed over its tokens, as lm-eval's `acc`).
Each row carries the accuracy of both with its standard error, per family, and for ARMOR folders the weight bytes
against dense, A+B / core values, the method and the prune's wall time from `armor_report.json`.
`--ppl-windows N` adds WikiText-2 perplexity on the first N windows of 2048 tokens (`all`: the whole test split)
and `--heldout-windows N` the held-out text's (bench/heldout.py), both through armor-eval. Writes the run through
bench.common.record (JSON under bench/results/, the table appended to docs/BENCHMARKS.md).

    python -m bench.answers dense=smollm2-135m armor=out/smollm2-armor [--ppl-windows 40] [--limit 30]
    python -m bench.answers dense=smollm2-135m armor=DIR sparsegpt=DIR --ppl-windows all --heldout-windows 20
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
from bench.heldout import shakespeare_text

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


def user_message(question: str) -> str:
    """The greedy part's one user message, sent through the model's chat template."""
    return question + SUFFIX


def choice_texts(question: str, choice: str) -> tuple[str, str]:
    """The multiple-choice part's context and continuation of one choice (scored: the continuation's tokens)."""
    return f"Question: {question}\nAnswer:", " " + choice


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
        rows = [tokenizer.apply_chat_template([{"role": "user", "content": user_message(it.question)}], tokenize=True,
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
        scores = []
        for choice in it.choices:
            context, cont = (tokenizer(text, add_special_tokens=False)["input_ids"]
                             for text in choice_texts(it.question, choice))
            logits = model(torch.tensor([context + cont])).logits[0, len(context) - 1:-1].float()
            scores.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item())
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def accuracy(right: list[bool]) -> dict:
    p = sum(right) / len(right)
    return {"acc": round(p, 4), "stderr": round(math.sqrt(p * (1 - p) / len(right)), 4), "n": len(right)}


def report_cells(path: Path) -> dict:
    """Cost and provenance of one model from its armor_report.json (a dense folder: 1.0x bytes, no A+B)."""
    report = path / "armor_report.json"
    if not report.is_file():
        return {"bytes_ratio": 1.0, "ab_overhead": 0.0, "calibration": None, "method": "dense", "prune_s": None}
    data = json.loads(report.read_text())
    summary, args = data["summary"], data.get("args") or {}
    return {"bytes_ratio": summary["bytes_ratio"], "ab_overhead": summary["ab_overhead"],
            "calibration": data.get("calibration"), "method": args.get("method"),
            "tune_epochs": args.get("tune_epochs"), "prune_s": summary.get("wall_seconds")}


def perplexities(path: Path, ppl_windows: int | None, heldout_windows: int | None) -> dict:
    """WikiText-2 and held-out perplexity (armor-eval, ctx 2048); 0 windows = the whole text."""
    cells: dict = {}
    if ppl_windows is not None:
        got = armor_eval_ppl(path, WIKITEXT, 2048, ppl_windows or None)
        cells.update(wikitext_ppl=got["ppl"], wikitext_windows=got.get("windows"))
    if heldout_windows is not None:
        got = armor_eval_ppl(path, shakespeare_text(), 2048, heldout_windows or None)
        cells.update(heldout_ppl=got["ppl"], heldout_windows=got.get("windows"))
    return cells


def evaluate(name: str, folder: str, items: list[Item], ppl_windows: int | None,
             heldout_windows: int | None = None) -> dict:
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
    row.update(report_cells(Path(path)))
    row.update(perplexities(Path(path), ppl_windows, heldout_windows))
    log.info("%s: greedy %.3f, choice %.3f (%.0f s)", name, row["greedy"]["acc"], row["mc"]["acc"], row["seconds"])
    return row


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _calibration(calib: dict) -> str:
    return f"{calib['data']} {calib.get('samples')}x{calib.get('seqlen')}" if calib.get("data") else "-"


def _ppl(row: dict, text: str) -> str:
    if row.get(f"{text}_ppl") is None:
        return "-"
    return f"{row[f'{text}_ppl']:.2f} ({row.get(f'{text}_windows')})"


def markdown(results: dict, args: argparse.Namespace, command: str) -> str:
    lines = [f"\n## Answer benchmark ({time.strftime('%Y-%m-%d')}, {len(questions())} questions"
             f"{f', first {args.limit}' if args.limit else ''}; load {args.load_start} at start)\n",
             f"`{command}`\n", "| model | greedy right | choice right | WikiText-2 ppl (windows) | held-out ppl "
             "(windows) | weight bytes / dense | A+B / core | prune s | calibration |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        calib = r.get("calibration") or {}
        lines.append(f"| {name} | {r['greedy']['acc']:.3f} ± {r['greedy']['stderr']:.3f} | {r['mc']['acc']:.3f} ± "
                     f"{r['mc']['stderr']:.3f} | {_ppl(r, 'wikitext')} | {_ppl(r, 'heldout')} | "
                     f"{r['bytes_ratio']:.3f} | {r['ab_overhead']:.3f} | {_num(r.get('prune_s'), 0)} | "
                     f"{_calibration(calib)} |")
    return "\n".join(lines) + "\n"


def windows_arg(text: str) -> int:
    """A window count for --ppl-windows / --heldout-windows: a positive int, or 'all' (0 = no limit)."""
    if text == "all":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of windows or 'all', got {text!r}")
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=FOLDER (an HF folder, an ARMOR checkpoint or a bundled name)")
    p.add_argument("--ppl-windows", type=windows_arg, default=None,
                   help="also WikiText-2 perplexity on this many windows of 2048 tokens ('all': the whole split)")
    p.add_argument("--heldout-windows", type=windows_arg, default=None,
                   help="also the held-out text's perplexity (bench/heldout.py) on this many windows ('all')")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (a quick look)")
    p.add_argument("--note", default="", help="a sentence on how the run was made, kept with it and shown on the page")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.load_start = loadavg()
    items = questions()[: args.limit] if args.limit else questions()
    results = {}
    for spec in args.models:
        name, _, folder = spec.partition("=")
        results[name] = evaluate(name, folder or name, items, args.ppl_windows, args.heldout_windows)
    command = command_line("answers")
    payload = {"results": results, "questions": len(items), "note": args.note}
    record("answers", payload, markdown(results, args, command) + (f"\n{args.note}\n" if args.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
