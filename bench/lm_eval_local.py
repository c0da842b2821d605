"""lm-evaluation-harness on a small local task, dense vs ARMOR: `bench/lmeval/armor_local_mc.yaml` (40
multiple-choice questions written for this repository, read from JSON lines; nothing is downloaded).

    .venv/bin/python -m bench.lm_eval_local CHECKPOINT [--dense smollm2-135m] [--tasks armor_local_mc]

Runs, from the repository root, `lm_eval --model vllm --model_args pretrained=DIR[,quantization=armor],...` for the
dense model and the ARMOR checkpoint (vLLM loads the `armor` plugin through its entry point in every process it
starts), then `lm_eval --model local-completions` against a running `vllm serve CHECKPOINT --quantization armor`;
writes bench/results/lm_eval_local.json and a line in docs/BENCHMARKS.md. Needs the `bench` extra (lm-eval).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from bench.common import BIN, REPO, RESULTS, command_line, record, run
from bench.lmeval.questions import QUESTIONS
from offline_prune.models import resolve_model
from tools.vllm_server import VllmServer
from vllm_armor import checkpoint_format as fmt

TASKS_DIR = "bench/lmeval"
VLLM_ARGS = "enforce_eager=True,max_model_len=2048"  # short CPU start-up
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}


def lm_eval(name: str, model: str, model_args: str, tasks: str) -> dict:
    """Run the lm_eval CLI; return {command, seconds, results of every task} from its results JSON."""
    out = (RESULTS / "lm_eval" / name).relative_to(REPO)
    cmd = [str(BIN / "lm_eval"), "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", TASKS_DIR, "--output_path", str(out)]
    t0 = time.monotonic()
    run(cmd, env={**os.environ, **ENV})
    seconds = time.monotonic() - t0
    newest = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    shown = " ".join(c if "," not in c and " " not in c else f"'{c}'" for c in cmd)
    return {"command": shown.replace(str(BIN / "lm_eval"), "lm_eval"), "seconds": round(seconds, 1),
            "results": json.loads(newest.read_text())["results"]}


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
    return f"{args['model']} pruned with " + ", ".join(f"{k} {args[k]}" for k in keys if k in args) + f" ({cost})"


def figures(result: dict) -> str:
    parts = []
    for task, r in result["results"].items():
        parts.append(f"{task} acc {r['acc,none']:.4f} ± {r['acc_stderr,none']:.4f}, acc_norm {r['acc_norm,none']:.4f}")
    return "; ".join(parts)


def write_task_data() -> Path:
    """The local task's JSON lines (from bench/lmeval/questions.py) where armor_local_mc.yaml reads them."""
    path = RESULTS / "lmeval" / "armor_local_mc.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="ARMOR checkpoint folder")
    p.add_argument("--dense", default="smollm2-135m", help="dense model (name or folder)")
    p.add_argument("--tasks", default="armor_local_mc")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(REPO)  # the task's data_files are relative to the repository root
    write_task_data()
    dense, armor = resolve_model(a.dense), a.checkpoint.resolve()
    runs = {
        "dense": lm_eval("dense", "vllm", f"pretrained={dense},{VLLM_ARGS}", a.tasks),
        "armor": lm_eval("armor", "vllm", f"pretrained={armor},quantization=armor,{VLLM_ARGS}", a.tasks),
    }
    with VllmServer(armor, ["--quantization", "armor", "--max-model-len", "2048", "--enforce-eager"],
                    env=ENV, timeout_s=900) as srv:
        served = f"model={armor},base_url={srv.base_url}/v1/completions,tokenizer_backend=huggingface,num_concurrent=1"
        runs["armor_served"] = lm_eval("armor_served", "local-completions", served, a.tasks)
    command = command_line("lm_eval_local")
    machine = (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
               f"load average {os.getloadavg()[0]:.1f}")
    payload = {"command": command, "machine": machine, "lm_eval": version("lm_eval"), "runs": runs}
    rows = "\n".join(f"  - {name}: {figures(r)} ({r['seconds']:.0f} s): `{r['command']}`" for name, r in runs.items())
    line = (f"\n## lm-eval on the local task, dense vs ARMOR ({dt.date.today().isoformat()})\n\n- {machine}, "
            f"`{command}`, lm-eval {payload['lm_eval']}, vLLM CPU (bf16, eager), `{a.tasks}` "
            f"(bench/lmeval, 40 questions); ARMOR: {pruned_with(armor)}; `armor_served` is `local-completions` "
            f"against `vllm serve --quantization armor`:\n{rows}\n")
    record("lm_eval_local", payload, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
