"""Per-iteration time of one ARMOR matrix job, for the time model of docs/SCALING.md.

For each shape, one job is timed at two iteration counts and the difference is divided by the extra iterations
(this cancels the set-up: NoWag-P init, packing). With `offline_prune.methods.armor` present it times
`armor_prune(..., optimizer=OPT)`; without it, a stand-in of one ARMOR iteration (the block-diagonal products
A (W' * M) B, the proxy loss, its backward and an Adam step on A, B, W'), and says so in every line.

    .venv/bin/python -m bench.scaling --device cpu --threads 1 --shapes 576x576 1536x576 2048x2048 4096x4096

Prints one JSON line per shape with seconds per iteration and c = seconds / (d_out * d_in * (b_out + b_in)),
the constant of the scaling rule t_iter ~ c * d_out * d_in * (b_out + b_in); writes them all to
bench/results/scaling.json and appends a table (date, machine, command, median c) to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import statistics
import time

import torch

from bench.common import command_line, record
from offline_prune.methods.armor import largest_block_size

log = logging.getLogger("bench.scaling")


def _standin(w: torch.Tensor, h: torch.Tensor, b_out: int, b_in: int, iters: int) -> int:
    """`iters` stand-in ARMOR iterations (continuous step only; the discrete mask step is cheaper)."""
    d_out, d_in = w.shape
    n_out, n_in = d_out // b_out, d_in // b_in
    eye = torch.eye(b_out, device=w.device)
    a = eye.repeat(n_out, 1, 1).requires_grad_()
    b = torch.eye(b_in, device=w.device).repeat(n_in, 1, 1).requires_grad_()
    core = w.clone().requires_grad_()
    mask = torch.ones_like(w).view(d_out, d_in // 4, 4)
    mask[..., :2] = 0
    mask = mask.view(d_out, d_in)
    opt = torch.optim.Adam([a, b, core], lr=1e-4)
    for _ in range(iters):
        x = (core * mask).view(d_out, n_in, b_in).transpose(0, 1) @ b  # right: block-diagonal B
        x = x.transpose(0, 1).reshape(n_out, b_out, d_in)
        x = (a @ x).view(d_out, d_in)  # left: block-diagonal A
        loss = ((x - w).square() * h).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return iters


def _armor(w: torch.Tensor, h: torch.Tensor, b_out: int, b_in: int, iters: int, optimizer: str) -> int:
    from offline_prune.methods.armor import armor_prune

    res = armor_prune(w, h, b_out, b_in, optimizer=optimizer, iters=iters, seed=0, device=str(w.device),
                      patience=10**9)  # no early stop while timing
    return res.iterations


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_shape(d_out: int, d_in: int, block: int, device: str, optimizer: str, n1: int, n2: int) -> dict:
    b_out, b_in = largest_block_size(d_out, block), largest_block_size(d_in, block)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=gen).to(device) * 0.02
    h = torch.rand(d_in, generator=gen).to(device) + 0.1
    engine = "armor_prune" if importlib.util.find_spec("offline_prune.methods.armor") else "stand-in"
    seconds, done = [], []
    for n in (1, n1, n2):  # the first run only warms up (allocator, kernels)
        _sync(device)
        start = time.perf_counter()
        if engine == "armor_prune":
            done.append(_armor(w, h, b_out, b_in, n, optimizer))
        else:
            done.append(_standin(w, h, b_out, b_in, n))
        _sync(device)
        seconds.append(time.perf_counter() - start)
    seconds, done = seconds[1:], done[1:]
    per_iter = (seconds[1] - seconds[0]) / (done[1] - done[0])
    return {
        "engine": engine, "optimizer": optimizer if engine == "armor_prune" else None,
        "shape": [d_out, d_in], "block": [b_out, b_in], "device": device, "threads": torch.get_num_threads(),
        "iters": done, "seconds": [round(s, 4) for s in seconds], "seconds_per_iter": per_iter,
        "c": per_iter / (d_out * d_in * (b_out + b_in)), "machine": platform.machine(),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["576x576", "192x576", "1536x576", "576x1536", "2048x2048"])
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--optimizer", default="paper")
    p.add_argument("--iters", type=int, nargs=2, default=[5, 25], metavar=("N1", "N2"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for shape in a.shapes:
        d_out, d_in = (int(x) for x in shape.split("x"))
        rows.append(time_shape(d_out, d_in, a.block, a.device, a.optimizer, *a.iters))
        log.info("%s", json.dumps(rows[-1]))
    write_results(rows, a)


def write_results(rows: list[dict], a: argparse.Namespace) -> None:
    command = command_line("scaling")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
               f"load average {os.getloadavg()[0]:.1f}")
    if a.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    engine = rows[0]["engine"] + (f" optimizer={a.optimizer}" if rows[0]["engine"] == "armor_prune" else "")
    lines = [f"\n## Per-iteration time of one ARMOR job ({dt.date.today().isoformat()})\n",
             f"Machine: {machine}. Command: `{command}`. Engine: {engine}, early stop off.\n",
             "| shape | blocks | s / iteration | c (s) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['shape'][0]}x{r['shape'][1]} | {r['block'][0]}, {r['block'][1]} | {r['seconds_per_iter']:.4g} | "
              f"{r['c']:.2e} |" for r in rows]
    lines.append(f"\nMedian c = {statistics.median(r['c'] for r in rows):.2e} s.\n")
    record("scaling", {"command": command, "machine": machine, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
