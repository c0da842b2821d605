"""The answer benchmark through lm-evaluation-harness, dense vs ARMOR: the tasks `armor_answers_mc` and
`armor_answers_gen` of bench/lmeval/ (the 303 questions of bench/answers_set.py, built in memory; no download).

    .venv/bin/python -m bench.lm_eval_local CHECKPOINT [--dense smollm2-135m] [--limit N] [--no-serve]

Runs, from the repository root, `lm_eval --model vllm --model_args pretrained=DIR[,quantization=armor],...` on both
tasks for the dense model and the ARMOR checkpoint (vLLM loads the `armor` plugin through its entry point in every
process it starts), then `lm_eval --model local-completions` against a running `vllm serve CHECKPOINT
--quantization armor`. The greedy task runs with `--apply_chat_template`; `local-completions` with the Hugging
Face tokenizer applies the chat template itself and sends tokens to /v1/completions, so no chat endpoint is
needed. Each row carries the weight bytes against dense and A+B / core values (armor_report.json); the greedy
replies are kept, to compare with `python -m bench.answers` (fp32 transformers; vLLM runs bf16). Writes the run
through bench.common.record. Needs the `bench` extra (lm-eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

from bench.answers import report_cells
from bench.answers_set import questions
from bench.common import BIN, REPO, RESULTS, command_line, loadavg, record, run
from offline_prune.models import resolve_model
from tools.vllm_server import VllmServer
from vllm_armor import checkpoint_format as fmt

TASKS_DIR = "bench/lmeval"
MC, GEN = "armor_answers_mc", "armor_answers_gen"
VLLM_ARGS = "enforce_eager=True,max_model_len=2048"  # short CPU start-up
# PYTHONPATH: the tasks' functions (bench/lmeval/answers_task.py) import bench.answers of this checkout
log = logging.getLogger("bench.lm_eval_local")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": str(REPO)}


def lm_eval_command(model: str, model_args: str, task: str, out: Path, limit: int | None) -> list[str]:
    """The lm_eval CLI on one task (the greedy one through the chat template), samples logged under OUT."""
    cmd = ["lm_eval", "--model", model, "--model_args", model_args, "--tasks", task, "--include_path", TASKS_DIR,
           "--output_path", str(out), "--log_samples"]
    return cmd + (["--apply_chat_template"] if task == GEN else []) + (["--limit", str(limit)] if limit else [])


def newest(folder: Path, pattern: str) -> Path:
    return max(folder.rglob(pattern), key=lambda p: p.stat().st_mtime)


def lm_eval(name: str, model: str, model_args: str, task: str, limit: int | None) -> dict:
    """Run lm_eval on one task; {command, seconds, acc, stderr, n} and, for the greedy task, every reply."""
    out = (RESULTS / "lm_eval" / name).relative_to(REPO)
    cmd = lm_eval_command(model, model_args, task, out, limit)
    t0 = time.monotonic()
    run([str(BIN / "lm_eval"), *cmd[1:]], env={**os.environ, **ENV})
    seconds = round(time.monotonic() - t0, 1)
    results = json.loads(newest(out, "results_*.json").read_text())
    got = {"command": " ".join(c if "," not in c and " " not in c else f"'{c}'" for c in cmd), "seconds": seconds,
           "acc": results["results"][task]["acc,none"], "stderr": results["results"][task]["acc_stderr,none"],
           "n": results["n-samples"][task]["effective"]}
    if task == GEN:
        samples = [json.loads(line) for line in newest(out, f"samples_{task}_*.jsonl").read_text().splitlines()]
        got["replies"] = [{"q": s["doc"]["question"], "reply": s["resps"][0][0].strip(), "right": bool(s["acc"])}
                          for s in sorted(samples, key=lambda s: s["doc_id"])]
    return got


def evaluate(name: str, folder: Path, model: str, model_args: str, limit: int | None) -> dict:
    """One row: both tasks of one model through one lm-eval model type, with its cost from armor_report.json."""
    mc, gen = (lm_eval(f"{name}-{task}", model, model_args, task, limit) for task in (MC, GEN))
    cost = report_cells(folder)
    row = {"lm_eval_model": model, "greedy": {"acc": gen["acc"], "stderr": gen["stderr"]},
           "mc": {"acc": mc["acc"], "stderr": mc["stderr"]}, "bytes_ratio": cost["bytes_ratio"],
           "ab_overhead": cost["ab_overhead"], "method": cost["method"], "seconds": mc["seconds"] + gen["seconds"],
           "folder": str(folder), "n": gen["n"], "commands": [mc["command"], gen["command"]],
           "replies": gen["replies"]}
    log.info("%s (%s): greedy %.3f, choice %.3f", name, model, row["greedy"]["acc"], row["mc"]["acc"])
    return row


def pruned_with(checkpoint: Path) -> str:
    """How the checkpoint was pruned (its armor_report.json) and what it costs (its safetensors headers)."""
    pruned = fmt.read_config(checkpoint)["quantization_config"]["pruned_modules"]
    size = fmt.footprint(fmt.read_headers(checkpoint), pruned)
    cost = (f"weight bytes {size.checkpoint_bytes / 1e9:.3f} GB = {size.bytes_ratio:.3f}x dense, "
            f"A+B params / core values {size.overhead:.3f}")
    report = checkpoint / "armor_report.json"
    if not report.is_file():
        return f"an ARMOR checkpoint ({cost})"
    args = json.loads(report.read_text())["args"]
    keys = ("method", "block_size", "iters", "optimizer", "calib_samples", "calib_seqlen")
    given = ", ".join(f"{k} {args[k]}" for k in keys if args.get(k) is not None)
    return f"{args['model']} pruned with {given} ({cost})"


def markdown(rows: dict, armor: Path, limit: int | None, load: str, command: str) -> str:
    n = next(iter(rows.values()))["n"]
    lines = [f"\n## Answer benchmark through lm-eval, dense vs ARMOR ({time.strftime('%Y-%m-%d')}, {n} questions"
             f"{f' (--limit {limit})' if limit else ''}; load {load} at start)\n",
             f"`{command}`, lm-eval {version('lm_eval')}, vLLM CPU (bf16, eager); greedy: `{GEN}` with "
             f"`--apply_chat_template`, choice: `{MC}` (bench/lmeval); ARMOR: {pruned_with(armor)}\n",
             "| model | lm-eval model | greedy right | choice right | weight bytes / dense | A+B / core | s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['lm_eval_model']} | {r['greedy']['acc']:.3f} ± {r['greedy']['stderr']:.3f} | "
                     f"{r['mc']['acc']:.3f} ± {r['mc']['stderr']:.3f} | {r['bytes_ratio']:.3f} | "
                     f"{r['ab_overhead']:.3f} | {r['seconds']:.0f} |")
    lines.append("")
    lines += [f"- {name}: `{c}`" for name, r in rows.items() for c in r["commands"]]
    return "\n".join(lines) + "\n"


def served_row(armor: Path, limit: int | None) -> dict:
    """Both tasks with `local-completions` against `vllm serve CHECKPOINT --quantization armor`."""
    with VllmServer(armor, ["--quantization", "armor", "--max-model-len", "2048", "--enforce-eager"],
                    env=ENV, timeout_s=900) as srv:
        served = (f"model={armor},base_url={srv.base_url}/v1/completions,tokenizer_backend=huggingface,"
                  "num_concurrent=1")
        return evaluate("armor_served", armor, "local-completions", served, limit)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="ARMOR checkpoint folder")
    p.add_argument("--dense", default="smollm2-135m", help="dense model (name or folder)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (a quick look)")
    p.add_argument("--no-serve", action="store_true", help="leave out the served ARMOR row (local-completions)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(REPO)  # --include_path and the output paths are relative to the repository root
    load = loadavg()
    dense, armor = Path(resolve_model(a.dense)), a.checkpoint.resolve()
    rows = {"dense": evaluate("dense", dense, "vllm", f"pretrained={dense},{VLLM_ARGS}", a.limit),
            "armor": evaluate("armor", armor, "vllm", f"pretrained={armor},quantization=armor,{VLLM_ARGS}", a.limit)}
    if not a.no_serve:
        rows["armor_served"] = served_row(armor, a.limit)
    command = command_line("lm_eval_local")
    payload = {"rows": rows, "questions": rows["dense"]["n"], "of": len(questions()), "lm_eval": version("lm_eval")}
    record("lm_eval_local", payload, markdown(rows, armor, a.limit, load, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
