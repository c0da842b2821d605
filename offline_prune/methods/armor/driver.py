"""``armor_prune``: one weight matrix fitted by the optimiser its config names (fast, paper or fast-gram), each
supplying its start and step to the shared loop (loop.iterate)."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from offline_prune.methods.armor.fast import FastOptimizer
from offline_prune.methods.armor.fast_gram import GramOptimizer
from offline_prune.methods.armor.loop import ArmorConfig, ArmorResult, Stopper, Trace, iterate
from offline_prune.methods.armor.paper import PaperOptimizer
from vllm_armor.checkpoint_format import GROUP

log = logging.getLogger(__name__)

_OPTIMIZERS = {cls.name: cls for cls in (FastOptimizer, PaperOptimizer, GramOptimizer)}
OPTIMIZERS = tuple(_OPTIMIZERS)  # ("fast", "paper", "fast-gram")
GRAM_OPTIMIZERS = ("fast-gram",)  # on the full X^T X (fast_gram.py)
# Iteration caps when --iters is not given. Fast mode: cap 120 with the plateau rule was the cheapest rule measured
# within 1% of the 240-iteration perplexity (docs/BENCHMARKS.md, "ARMOR convergence"); fast-gram keeps 60.
DEFAULT_ITERS = {name: cls.default_iters for name, cls in _OPTIMIZERS.items()}


def check_inputs(weight: torch.Tensor, h: torch.Tensor, block_out: int, block_in: int, optimizer: str) -> None:
    """A ValueError naming what is wrong with armor_prune's arguments."""
    if weight.dim() != 2:
        raise ValueError(f"armor_prune: weight must be 2-D, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if d_in % GROUP:
        raise ValueError(f"armor_prune: d_in = {d_in} is not a multiple of 4 (2:4 groups)")
    if h.shape != (d_in,):
        raise ValueError(f"armor_prune: h must have shape ({d_in},), got {tuple(h.shape)}")
    if block_out < 1 or block_in < 1 or d_out % block_out or d_in % block_in:
        raise ValueError(
            f"armor_prune: block sizes ({block_out}, {block_in}) must divide the shape ({d_out}, {d_in})"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"armor_prune: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def armor_prune(weight: torch.Tensor, h: torch.Tensor, block_out: int, block_in: int,
                config: ArmorConfig | None = None, *, gram: torch.Tensor | None = None,
                **changes: object) -> ArmorResult:
    """Fit A' core B' ~ weight with a 2:4 core (the package docstring); h = diag(X^T X), ``gram`` = X^T X (needed
    by fast-gram). ``config`` (default ArmorConfig()) with ``changes`` to its fields (armor_prune(w, h, 16, 16,
    optimizer="paper", iters=10)) says which optimiser runs and when it stops."""
    cfg = dataclasses.replace(config or ArmorConfig(), **changes)
    check_inputs(weight, h, block_out, block_in, cfg.optimizer)
    if cfg.snapshots and cfg.optimizer in GRAM_OPTIMIZERS:
        raise ValueError(f"snapshots are not supported with optimizer {cfg.optimizer!r}")
    dev = torch.device(cfg.device) if cfg.device is not None else weight.device
    trace = Trace(time.perf_counter())
    kind = _OPTIMIZERS[cfg.optimizer]
    opt = kind.create(weight.detach().to(dev), h.detach().to(dev), None if gram is None else gram.detach().to(dev),
                      block_out, block_in, cfg)
    iters = kind.default_iters if cfg.iters is None else cfg.iters
    patience = cfg.patience if kind.patience_rule else None
    plateau = None if kind.patience_rule else cfg.plateau
    stopper = Stopper(iters, plateau, patience, cfg.time_limit)
    watched = [Stopper(rule.iters, None if kind.patience_rule else rule.plateau, None, None) for rule in cfg.snapshots]
    final = iterate(opt, trace, stopper, watched)
    log.debug("armor %s %dx%d: relative loss %.5f -> %.5f in %d iterations, %.2fs", cfg.optimizer,
              *weight.shape, final.init_relative, final.final_relative, final.iterations, final.seconds)
    return final
