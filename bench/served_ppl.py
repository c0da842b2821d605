"""The served model is the evaluated model: WikiText-2 perplexity through a running `vllm serve` against
`armor-eval ppl`, same windows, same protocol.

    .venv/bin/python -m bench.served_ppl CHECKPOINT [--ctx-len 2048] [--max-windows 40]

Starts `vllm serve CHECKPOINT --quantization armor`, sends every evaluation window as a token-id prompt with
`prompt_logprobs=0` and sums the next-token NLL; runs `armor-eval ppl` (offline fp32 `ArmorLinear`) on the
same windows; writes bench/results/served_ppl.json and a line in docs/BENCHMARKS.md with both and their ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import platform
import sys
from pathlib import Path

from transformers import AutoTokenizer

from bench.common import WIKITEXT, armor_eval_ppl, command_line, record
from offline_prune.evaluate import test_windows
from tools.vllm_server import VllmServer


def served_ppl(checkpoint: Path, windows, ctx_len: int) -> float:
    args = ["--quantization", "armor", "--max-model-len", str(ctx_len + 1), "--max-num-seqs", "1"]
    with VllmServer(checkpoint, args, timeout_s=900) as srv:
        nll = sum(srv.prompt_nll(w.tolist()) for w in windows)
    return math.exp(nll / (windows.numel() - windows.shape[0]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, default=WIKITEXT)
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=40)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    windows = test_windows(a.data, AutoTokenizer.from_pretrained(a.checkpoint), a.ctx_len, a.max_windows)[0]
    served = served_ppl(a.checkpoint, windows, a.ctx_len)
    offline = armor_eval_ppl(a.checkpoint, a.data, a.ctx_len, a.max_windows)
    ratio = served / offline["ppl"]
    command = command_line("served_ppl")
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores"
    payload = {"command": command, "machine": machine, "windows": int(windows.shape[0]), "ctx_len": a.ctx_len,
               "served_ppl": served, "offline": offline, "ratio": ratio}
    line = (f"\n## Served vs offline perplexity ({dt.date.today().isoformat()})\n\n- {machine}, `{command}`: "
            f"{windows.shape[0]} windows x {a.ctx_len} tokens of WikiText-2 test; vLLM server (bf16, prompt "
            f"logprobs) ppl {served:.4f}, `armor-eval ppl` (fp32 ArmorLinear) {offline['ppl']:.4f}, "
            f"ratio {ratio:.4f} ({abs(ratio - 1):.2%} apart).\n")
    record("served_ppl", payload, line)
    return 0 if abs(ratio - 1) < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
