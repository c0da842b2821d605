"""Start-up time and output tokens/s of a served ARMOR checkpoint next to a dense model, same run.

    .venv/bin/python bench/serve_speed.py ARMOR_DIR [--dense-dir DIR] [--eager] [--tokens 128] [--factored]

For each model (ARMOR with `--quantization armor`, then the dense model: `--dense-dir`, e.g. the original,
or by default the dense twin folded by `tools.fold`): start `vllm serve` (time until /health answers),
one warm-up request, then greedy decoding of `--tokens` tokens (ignore_eos) for 1 request and for 8
concurrent requests; output tokens / wall seconds. With `--factored` also the ARMOR checkpoint with
`VLLM_ARMOR_KERNEL=factored`. Writes bench/results/serve_speed.json and appends the table (date, machine,
command, ratios to the dense model) to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import command_line, record

from tools.fold import fold_checkpoint  # noqa: E402 - after common puts the repo on sys.path
from tools.vllm_server import VllmServer  # noqa: E402 - after common puts the repo on sys.path

log = logging.getLogger("bench.serve_speed")
PROMPT = "Write a short story about a lighthouse keeper."


def _one(srv: VllmServer, tokens: int) -> int:
    r = srv.client().completions.create(
        model=str(srv.model), prompt=PROMPT, max_tokens=tokens, temperature=0.0, extra_body={"ignore_eos": True}
    )
    return r.usage.completion_tokens


def throughput(srv: VllmServer, tokens: int, concurrency: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = sum(pool.map(lambda _: _one(srv, tokens), range(concurrency)))
    return done / (time.perf_counter() - t0)


def measure(model: Path, args: list[str], tokens: int, env: dict[str, str] | None = None) -> dict[str, float]:
    with VllmServer(model, args, env or {}, timeout_s=900) as srv:
        _one(srv, 8)  # warm-up
        return {
            "startup_s": srv.startup_s,
            "tok_s_1": throughput(srv, tokens, 1),
            "tok_s_8": throughput(srv, tokens, 8),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("armor_dir", type=Path)
    parser.add_argument("--dense-dir", type=Path, help="dense twin (default: ARMOR_DIR-folded, built if missing)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--factored", action="store_true", help="also VLLM_ARMOR_KERNEL=factored")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: vLLM's compilation)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dense_dir = args.dense_dir or fold_checkpoint(args.armor_dir, Path(f"{args.armor_dir}-folded"))
    common = ["--max-model-len", "1024", "--max-num-seqs", "8"] + (["--enforce-eager"] if args.eager else [])
    mode = "eager" if args.eager else "compiled"
    armor = ["--quantization", "armor", *common]
    rows = [
        ("ARMOR (plugin, default kernel)", measure(args.armor_dir, armor, args.tokens)),
        (f"dense ({dense_dir.name})", measure(dense_dir, common, args.tokens)),
    ]
    if args.factored:
        rows.append(("ARMOR, VLLM_ARMOR_KERNEL=factored",
                     measure(args.armor_dir, armor, args.tokens, {"VLLM_ARMOR_KERNEL": "factored"})))
    dense = rows[1][1]
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    command = command_line("serve_speed.py")
    out = [
        f"\n## Serving speed, ARMOR vs dense ({dt.date.today().isoformat()})\n",
        f"Machine: {machine}. Command: `{command}`. vLLM CPU backend, {mode}, {args.tokens} output tokens "
        "per request (greedy, ignore_eos), one run, servers one after another.\n",
        "| model | start-up s | tok/s, 1 request | tok/s, 8 concurrent | x dense (1 / 8) |",
        "| --- | --- | --- | --- | --- |",
    ]
    out += [f"| {name} | {r['startup_s']:.1f} | {r['tok_s_1']:.1f} | {r['tok_s_8']:.1f} | "
            f"{r['tok_s_1'] / dense['tok_s_1']:.2f} / {r['tok_s_8'] / dense['tok_s_8']:.2f} |" for name, r in rows]
    table = "\n".join(out) + "\n"
    payload = {"command": command, "machine": machine, "mode": mode, "tokens": args.tokens, "rows": dict(rows)}
    record("serve_speed", payload, table)


if __name__ == "__main__":
    main()
