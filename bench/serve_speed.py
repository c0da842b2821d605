"""Start-up time, output tokens/s, time to first token and weight bytes of a served ARMOR checkpoint next to
a dense model, same run.

    .venv/bin/python -m bench.serve_speed ARMOR_DIR [--dense-dir DIR] [--eager] [--tokens 128] [--factored]

For each variant (ARMOR with `--quantization armor` and the default kernel, `auto`: the CPU 2:4 kernel
`sparse24_cpu` where it builds; ARMOR with `VLLM_ARMOR_KERNEL=dense`, the fold; the dense model: `--dense-dir`,
e.g. the original, or by default the dense twin folded by `tools.fold`): start `vllm serve` (time until /health
answers), one warm-up request, then greedy decoding of `--tokens` tokens (ignore_eos) for 1 request and for 8
concurrent requests (output tokens / wall seconds), and the time to first token of a 1024-token prompt
(streamed, median of 3 different prompts, so no prefix-cache hit). Weight bytes: what the server holds for the
model's weights, from the safetensors headers (sparse24_cpu: the checkpoint with A and B in bf16, packed with their
zero padding; the fold and the dense model: every pruned linear as a dense weight). With `--factored` also
`VLLM_ARMOR_KERNEL=factored`. Writes bench/results/serve_speed.json and appends the table (date, machine, command,
ratios to the dense model) to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import WIKITEXT, command_line, record
from tools.fold import fold_checkpoint
from tools.vllm_server import VllmServer
from vllm_armor import checkpoint_format as cf
from vllm_armor.kernels.sparse24_cpu import packed_numel, padded_rows

log = logging.getLogger("bench.serve_speed")
PROMPT = "Write a short story about a lighthouse keeper."
TTFT_PROMPT_TOKENS = 1024


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


def ttft_s(srv: VllmServer, prompts: list[list[int]]) -> float:
    """Median seconds to the first streamed token of each prompt (token ids)."""
    times = []
    for ids in prompts:
        t0 = time.perf_counter()
        stream = srv.client().completions.create(model=str(srv.model), prompt=ids, max_tokens=1, temperature=0.0,
                                                 stream=True)
        next(iter(stream))
        times.append(time.perf_counter() - t0)
        for _ in stream:
            pass
    return statistics.median(times)


def long_prompts(model: Path, n: int = 3, length: int = TTFT_PROMPT_TOKENS) -> list[list[int]]:
    """``n`` different prompts of ``length`` tokens each (WikiText-2 test text)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(WIKITEXT.read_text()[: 40 * length * n]).input_ids
    return [ids[i * length: (i + 1) * length] for i in range(n)]


def measure(model: Path, args: list[str], tokens: int, prompts: list[list[int]],
            env: dict[str, str] | None = None) -> dict[str, float]:
    with VllmServer(model, args, env or {}, timeout_s=900) as srv:
        _one(srv, 8)  # warm-up
        return {
            "startup_s": srv.startup_s,
            "tok_s_1": throughput(srv, tokens, 1),
            "tok_s_8": throughput(srv, tokens, 8),
            "ttft_s": ttft_s(srv, prompts),
        }


def weight_bytes(folder: Path, compressed: bool) -> int:
    """Bytes of the model's weights as a server holds them: the compressed checkpoint with A and B in bf16
    (sparse24_cpu), or every pruned linear as a dense weight (the fold, a dense model)."""
    infos = cf.read_headers(folder)
    config = cf.read_config(folder)
    if not cf.is_armor_config(config):
        return cf.footprint(infos, []).checkpoint_bytes
    pruned = config["quantization_config"]["pruned_modules"]
    if not compressed:
        return cf.footprint(infos, pruned).dense_bytes
    ab = {cf.tensor_name(m, s) for m in pruned for s in (cf.ARMOR_A, cf.ARMOR_B)}
    core = {cf.tensor_name(m, s) for m in pruned for s in (cf.CORE_VALUES, cf.CORE_META)}

    def held(name: str, info) -> int:
        if name in ab:
            return 2 * packed_numel(info.shape[0], info.shape[1])
        if name in core:  # pack_core pads the rows to a multiple of 32
            return padded_rows(info.shape[0]) * math.prod(info.shape[1:]) * info.dtype.itemsize
        return math.prod(info.shape) * info.dtype.itemsize

    return sum(held(n, i) for n, i in infos.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("armor_dir", type=Path)
    parser.add_argument("--dense-dir", type=Path, help="dense twin (default: ARMOR_DIR-folded, built if missing)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--factored", action="store_true", help="also VLLM_ARMOR_KERNEL=factored")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: vLLM's compilation)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="start every server this many times, in forward then reverse order; medians reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dense_dir = args.dense_dir or fold_checkpoint(args.armor_dir, Path(f"{args.armor_dir}-folded"))
    common = ["--max-model-len", "2048", "--max-num-seqs", "8"] + (["--enforce-eager"] if args.eager else [])
    mode = "eager" if args.eager else "compiled"
    armor = ["--quantization", "armor", *common]
    prompts = long_prompts(args.armor_dir)
    compressed, folded = weight_bytes(args.armor_dir, True), weight_bytes(args.armor_dir, False)
    variants = [
        ("ARMOR, default kernel (auto: sparse24_cpu)", args.armor_dir, armor, {}, compressed),
        ("ARMOR, VLLM_ARMOR_KERNEL=dense (fold)", args.armor_dir, armor, {"VLLM_ARMOR_KERNEL": "dense"}, folded),
        (f"dense ({dense_dir.name})", dense_dir, common, {}, weight_bytes(dense_dir, False)),
    ]
    if args.factored:
        variants.append(("ARMOR, VLLM_ARMOR_KERNEL=factored", args.armor_dir, armor,
                         {"VLLM_ARMOR_KERNEL": "factored"}, compressed))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in variants}
    for r in range(args.rounds):  # forward, then backward, ...: drift of the machine cancels out
        for name, folder, server_args, env, _ in (variants if r % 2 == 0 else variants[::-1]):
            runs[name].append(measure(folder, server_args, args.tokens, prompts, env))
    rows = [(name, dict({k: statistics.median(run[k] for run in runs[name]) for k in runs[name][0]},
                        weight_bytes=held, rounds=runs[name])) for name, _, _, _, held in variants]
    dense = rows[2][1]
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    command = command_line("serve_speed")
    out = [
        f"\n## Serving speed, ARMOR vs dense ({dt.date.today().isoformat()})\n",
        f"Machine: {machine}. Command: `{command}`. vLLM CPU backend, {mode}, {args.tokens} output tokens "
        f"per request (greedy, ignore_eos), servers one after another, {args.rounds} round(s) (forward, then reverse "
        "order), medians. TTFT: time to the first token of a "
        f"{TTFT_PROMPT_TOKENS}-token prompt (median of 3). Weights: bytes the server holds for the weights.\n",
        "| model | start-up s | tok/s, 1 request | tok/s, 8 concurrent | x dense (1 / 8) | TTFT s | x dense TTFT "
        "| weights MB | x dense weights | each round, tok/s 1 / 8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    out += [f"| {name} | {r['startup_s']:.1f} | {r['tok_s_1']:.1f} | {r['tok_s_8']:.1f} | "
            f"{r['tok_s_1'] / dense['tok_s_1']:.2f} / {r['tok_s_8'] / dense['tok_s_8']:.2f} | {r['ttft_s']:.3f} | "
            f"{r['ttft_s'] / dense['ttft_s']:.2f} | {r['weight_bytes'] / 1e6:.1f} | "
            f"{r['weight_bytes'] / dense['weight_bytes']:.2f} | "
            + ", ".join(f"{x['tok_s_1']:.1f} / {x['tok_s_8']:.1f}" for x in r["rounds"]) + " |" for name, r in rows]
    table = "\n".join(out) + "\n"
    payload = {"command": command, "machine": machine, "mode": mode, "tokens": args.tokens, "rows": dict(rows)}
    record("serve_speed", payload, table)


if __name__ == "__main__":
    main()
