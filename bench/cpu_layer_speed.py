"""One linear layer on CPU: dense bf16 F.linear (oneDNN; what the fold runs) against the CPU 2:4 kernel
(`vllm_armor::sparse24_cpu_linear`), all variants in one run.

    flock /work/cpu.lock .venv/bin/python bench/cpu_layer_speed.py [--quick]

Shapes (d_out x d_in): SmolLM2-135M (576x576, 192x576, 1536x576, 576x1536) and Llama-2-7B (4096x4096,
11008x4096, 4096x11008); M (tokens per call) in 1, 2, 4, 8, 16, 64, 512; 1 and 2 threads. Variants: dense;
the kernel with the core alone on each of its two paths (the streaming small-M path and the tile-decompression
+ at::mm path, forced); the kernel with A and B at block sizes 16, 32, 64, 128 (the pruner's rule: the largest
divisor of the dimension that is a multiple of 4 and at most the size) as `apply` runs it (its M threshold).
Median of a few repeats; effective GB/s = weight bytes read / time (dense: 2 bytes a weight; the kernel:
values + metadata + A and B in bf16). Writes bench/results/cpu_layer_speed.json and appends the table to
docs/BENCHMARKS.md. Timings are only meaningful under the machine's CPU lock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import command_line, record

from offline_prune.methods.armor import largest_block_size  # noqa: E402 - after common puts the repo on sys.path
from vllm_armor import checkpoint_format as cf  # noqa: E402
from vllm_armor.kernels.sparse24_cpu import DENSE_MIN_M, available, pack_blocks  # noqa: E402

log = logging.getLogger("bench.cpu_layer_speed")
SHAPES = {
    "SmolLM2 q/o 576x576": (576, 576),
    "SmolLM2 k/v 192x576": (192, 576),
    "SmolLM2 gate/up 1536x576": (1536, 576),
    "SmolLM2 down 576x1536": (576, 1536),
    "Llama-2-7B q/k/v/o 4096x4096": (4096, 4096),
    "Llama-2-7B gate/up 11008x4096": (11008, 4096),
    "Llama-2-7B down 4096x11008": (4096, 11008),
}
MS = (1, 2, 4, 8, 16, 64, 512)
THREADS = (1, 2)
BLOCKS = (16, 32, 64, 128)
NEVER, ALWAYS = 1 << 30, 1


def median_s(fn: Callable[[], torch.Tensor], budget_s: float) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    reps = max(3, min(30, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer(d_out: int, d_in: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    w = torch.randn(d_out, d_in, generator=gen)
    groups = w.abs().reshape(d_out, d_in // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    values, meta = cf.pack_2to4(w, keep.reshape(d_out, d_in))
    return {"values": values.to(torch.bfloat16).contiguous(), "meta": meta.contiguous()}


def blocks(dim: int, size: int, gen: torch.Generator) -> torch.Tensor:
    bs = largest_block_size(dim, size)
    return pack_blocks(torch.eye(bs) + 0.1 * torch.randn(dim // bs, bs, bs, generator=gen))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


Variant = tuple[Callable[[], torch.Tensor], int]


def layer_variants(x: torch.Tensor, core: dict[str, torch.Tensor], dense_w: torch.Tensor,
                   ab: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Variant]:
    """name -> (call, weight bytes it reads)."""
    op = torch.ops.vllm_armor.sparse24_cpu_linear
    vals, meta = [core["values"]], [core["meta"]]
    core_bytes = nbytes(core["values"], core["meta"])
    out: dict[str, Variant] = {
        "dense": (lambda: F.linear(x, dense_w), nbytes(dense_w)),
        "core_stream": (lambda: op(x, vals, meta, [], [], None, NEVER), core_bytes),
        "core_tiles": (lambda: op(x, vals, meta, [], [], None, ALWAYS), core_bytes),
    }
    for bs, (a, b) in ab.items():
        out[f"ab{bs}"] = ((lambda a=a, b=b: op(x, vals, meta, [a], [b], None, DENSE_MIN_M)),
                          core_bytes + nbytes(a, b))
    return out


def bench_shape(d_out: int, d_in: int, budget_s: float, ms: tuple[int, ...]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    core = layer(d_out, d_in, gen)
    dense_w = torch.randn(d_out, d_in, generator=gen).to(torch.bfloat16)
    ab = {bs: (blocks(d_out, bs, gen), blocks(d_in, bs, gen)) for bs in BLOCKS}
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for m in ms:
            x = torch.randn(m, d_in, generator=gen).to(torch.bfloat16)
            variants = layer_variants(x, core, dense_w, ab)
            row = {"shape": [d_out, d_in], "m": m, "threads": threads,
                   "blocks": {bs: [a.shape[1], b.shape[1]] for bs, (a, b) in ab.items()}}
            for name, (fn, weight_bytes) in variants.items():
                s = median_s(fn, budget_s)
                row[name] = {"us": s * 1e6, "gb_s": weight_bytes / s / 1e9, "weight_bytes": weight_bytes}
            row["speedup_ab128"] = row["dense"]["us"] / row["ab128"]["us"]
            rows.append(row)
            log.info("%dx%d M=%d t=%d dense %.0fus ab128 %.0fus (%.2fx)", d_out, d_in, m, threads,
                     row["dense"]["us"], row["ab128"]["us"], row["speedup_ab128"])
    return rows


def cell(v: dict) -> str:
    return f"{v['us']:.0f} ({v['gb_s']:.1f})"


def markdown(rows: list[dict], machine: str, command: str) -> str:
    names = ["dense", "core_stream", "core_tiles"] + [f"ab{bs}" for bs in BLOCKS]
    head = ("| shape | thr | M | dense bf16 | core, stream path | core, tile path | A,B 16 | A,B 32 | A,B 64 | A,B 128 "
            "| dense / A,B 128 |\n|" + " --- |" * 11 + "\n")
    body = "".join(
        f"| {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['m']} | "
        + " | ".join(cell(r[n]) for n in names) + f" | {r['speedup_ab128']:.2f}x |\n" for r in rows)
    seven_b = [r for r in rows if r["shape"][0] >= 4096 and r["m"] == 1]
    target = ", ".join(f"{r['shape'][0]}x{r['shape'][1]} t={r['threads']}: {r['speedup_ab128']:.2f}x" for r in seven_b)
    return (f"\n## CPU layer speed: dense bf16 vs the CPU 2:4 kernel ({dt.date.today()})\n\n"
            f"Machine: {machine}. Command: `{command}`. Each cell: median microseconds "
            f"(effective GB/s of weight bytes). A,B columns: block sizes by the pruner's rule, M >= {DENSE_MIN_M} "
            "on the tile path as `apply` routes it.\n\n"
            f"Target 7B shapes, M=1, A,B 128 >= 1.5x dense: {target}.\n\n" + head + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=0.25, help="time per measurement (median of repeats)")
    parser.add_argument("--quick", action="store_true", help="M=1 only, nothing recorded")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok, why = available()
    if not ok:
        raise SystemExit(f"the CPU 2:4 kernel is not available: {why}")
    load_before = open("/proc/loadavg").read().split()[0]
    ms = (1,) if args.quick else MS
    rows = [r for d_out, d_in in SHAPES.values() for r in bench_shape(d_out, d_in, args.budget_s, ms)]
    if args.quick:
        return
    machine = (f"{platform.node()} {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
               f"load average {load_before} before and {open('/proc/loadavg').read().split()[0]} after, "
               f"torch {torch.__version__}")
    command = command_line("cpu_layer_speed.py")
    record("cpu_layer_speed", {"date": str(dt.datetime.now(dt.timezone.utc)), "machine": machine, "command": command,
                               "dense_min_m": DENSE_MIN_M, "rows": rows}, markdown(rows, machine, command))


if __name__ == "__main__":
    main()
