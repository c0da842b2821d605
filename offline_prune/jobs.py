"""One pruning job: a registered method (offline_prune.methods) applied to one weight matrix, returned as ARMOR
format tensors plus a report. Common to all methods: h cleaning, the per-matrix seed, packing, scoring, timing.

Every method is scored with the same NoWag proxy loss (offline_prune.proxy) so their reports compare:
`loss_init` is NoWag-P's (ARMOR's starting point), `loss_final` the method's own result.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from offline_prune.methods import PruneOutput, get_method
from offline_prune.progress import pause_point
from offline_prune.proxy import clean_h, normalize, nowag_p_mask, proxy_loss, proxy_scale
from offline_prune.statistics import InputStats
from vllm_armor import checkpoint_format as fmt
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right


@dataclass(frozen=True)
class JobOptions:
    """What every job of a run shares; pickled to Ray workers (hence the options as sorted (name, value) pairs)."""

    method: str
    options: tuple[tuple[str, Any], ...]
    seed: int
    device: str

    @classmethod
    def create(cls, method: str, options: Mapping[str, Any], seed: int, device: str) -> JobOptions:
        return cls(method, tuple(sorted(options.items())), seed, device)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass
class Finished:
    """A finished job, the one record executors hand back and the walk saves to OUT/.progress."""

    name: str  # full module name
    tensors: dict[str, torch.Tensor]  # suffix -> tensor (core_values, core_meta[, armor_a, armor_b])
    report: dict


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


def run_job(module: str, weight: torch.Tensor, stats: InputStats | None, options: JobOptions) -> Finished:
    start = time.perf_counter()
    w, h = job_inputs(weight, stats, options.device)
    out = get_method(options.method).prune(w, stats, h, options.params, job_seed(options.seed, module), options.device)
    pause_point("job")
    return job_result(module, w, h, options.method, out, time.perf_counter() - start)


def job_inputs(weight: torch.Tensor, stats: InputStats | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float32, cleaned h) on ``device``; h is all ones for methods without statistics."""
    w = weight.detach().float()
    h = clean_h(stats.h) if stats is not None else torch.ones(w.shape[1])
    return w.to(device), h.to(device)


def approximation(out: PruneOutput) -> torch.Tensor:
    """W_hat = A @ core @ B of a method's output as a dense float32 CPU matrix, straight from the output (the same
    values as decoding its format tensors: the core outside the mask is zero, as the format's unpacking gives)."""
    core = torch.where(out.mask.cpu().bool(), out.core.cpu().float(), 0.0)
    if out.a_blocks is None:
        return core
    return blockdiag_left(out.a_blocks.float().cpu(), blockdiag_right(core, out.b_blocks.float().cpu()))


def job_result(module: str, w: torch.Tensor, h: torch.Tensor, method: str, out: PruneOutput,
               seconds: float) -> Finished:
    """Encode, validate and score one method output; ``seconds``: the method's time (scoring is added)."""
    start = time.perf_counter()
    d_out, d_in = w.shape
    report: dict = {"name": module, "shape": [d_out, d_in], "method": method, **out.report_extra}
    tensors = fmt.encode_linear(out.core, out.mask, out.a_blocks, out.b_blocks)
    fmt.validate_linear(module, tensors, expected_shape=(d_out, d_in))  # never save a non-finite result
    loss, rel, init = _proxy(w.cpu(), approximation(out), h.cpu())  # only for the loss report
    init_rel = init / float(proxy_scale(normalize(w.cpu()).weight, h.cpu()))
    report.update(
        loss_init=init, loss_init_relative=init_rel, loss_final=loss, loss_final_relative=rel,
        iterations=out.iterations, seconds=round(seconds + time.perf_counter() - start, 3),
    )
    return Finished(module, tensors, report)
