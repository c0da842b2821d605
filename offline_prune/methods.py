"""One pruning job: a method applied to one weight matrix, returned as ARMOR format tensors plus a report.

Every method is scored with the same NoWag proxy loss (offline_prune.proxy) so their reports compare:
`loss_init` is NoWag-P's (ARMOR's starting point), `loss_final` the method's own result.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch

from offline_prune import baselines
from offline_prune.proxy import clean_h, normalize, nowag_p_mask, proxy_loss, proxy_scale
from offline_prune.statistics import InputStats
from vllm_armor import checkpoint_format as fmt

METHODS = ("armor", "nowag-p", "wanda", "sparsegpt", "magnitude")
# Methods whose statistics come from the already-pruned model (as in their papers); the others use the
# dense model's statistics.
SEQUENTIAL_METHODS = ("sparsegpt", "wanda")
NEEDS_CALIBRATION = ("armor", "nowag-p", "wanda", "sparsegpt")


@dataclass(frozen=True)
class JobOptions:
    method: str
    block_size: int
    optimizer: str
    iters: int
    seed: int
    device: str


@dataclass
class JobResult:
    tensors: dict[str, torch.Tensor]  # suffix -> tensor (core_values, core_meta[, armor_a, armor_b])
    report: dict
    dense: torch.Tensor  # float32 reconstruction A @ core @ B, for sequential methods and checks


def job_seed(seed: int, module: str) -> int:
    """Per-matrix seed: stable across runs and resumes, different for every matrix."""
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**31)


def _proxy(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> tuple[float, float, float]:
    """(loss, relative loss, NoWag-P loss) of ``approx`` of ``weight`` in the normalised space."""
    norm = normalize(weight)
    wn = norm.weight
    approx_n = approx.float() / norm.row_scale[:, None] / norm.col_scale[None, :]
    scale = proxy_scale(wn, h)
    loss = proxy_loss(approx_n, wn, h)
    init = proxy_loss(wn * nowag_p_mask(wn, h), wn, h)
    return float(loss), float(loss / scale), float(init)


def run_job(module: str, weight: torch.Tensor, stats: InputStats | None, options: JobOptions) -> JobResult:
    start = time.perf_counter()
    w = weight.detach().float()
    d_out, d_in = w.shape
    h = clean_h(stats.h) if stats is not None else torch.ones(d_in)
    w, h = w.to(options.device), h.to(options.device)
    report: dict = {"name": module, "shape": [d_out, d_in], "method": options.method}
    a_blocks = b_blocks = None
    iterations = 0
    if options.method == "armor":
        bs_out = fmt.largest_block_size(d_out, options.block_size)
        bs_in = fmt.largest_block_size(d_in, options.block_size)
        from offline_prune.armor import armor_prune

        res = armor_prune(
            w, h, bs_out, bs_in, optimizer=options.optimizer, iters=options.iters,
            seed=job_seed(options.seed, module), device=options.device,
        )
        core, mask, a_blocks, b_blocks = res.core, res.mask, res.a_blocks, res.b_blocks
        iterations = res.iterations
        report.update(block_out=bs_out, block_in=bs_in, optimizer=options.optimizer)
    elif options.method == "magnitude":
        core, mask = baselines.magnitude_2of4(w)
    elif options.method == "wanda":
        core, mask = baselines.wanda_2of4(w, h)
    elif options.method == "nowag-p":
        core, mask = baselines.nowag_p_2of4(w, h)
    elif options.method == "sparsegpt":
        core, mask = baselines.sparsegpt_2of4(w, stats.gram.to(options.device))
    else:
        raise ValueError(f"unknown method {options.method!r}")

    tensors = {}
    values, meta = fmt.pack_2to4(core.cpu(), mask.cpu())
    tensors[fmt.CORE_VALUES], tensors[fmt.CORE_META] = values, meta
    if a_blocks is not None:
        tensors[fmt.ARMOR_A] = a_blocks.float().cpu().contiguous()
        tensors[fmt.ARMOR_B] = b_blocks.float().cpu().contiguous()
    dense = fmt.reconstruct_weight(tensors)
    loss, rel, init = _proxy(w.cpu(), dense, h.cpu())
    init_rel = init / float(proxy_scale(normalize(w.cpu()).weight, h.cpu()))
    report.update(
        loss_init=init, loss_init_relative=init_rel, loss_final=loss, loss_final_relative=rel,
        iterations=iterations, seconds=round(time.perf_counter() - start, 3),
    )
    return JobResult(tensors, report, dense)
