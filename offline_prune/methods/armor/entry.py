"""ARMOR's registry entry (offline_prune.methods): its options and ``prune`` on one matrix.

Options: block_size (``auto`` or N, blocks.py), max_overhead, ab_dtype (how the checkpoint stores A and B),
optimizer, the plateau rule and iters; the per-matrix seed is offline_prune.jobs.job_seed. ``--optimizer auto``
(the default, ``chosen_optimizer``) runs fast-gram under a small A+B budget (below AUTO_GRAM_BELOW) and fast
otherwise. With fast-gram the entry asks the walk for X^T X and sequential statistics (its ``needs_gram`` and
``sequential`` are functions of the options).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from offline_prune.methods import TIME_LIMIT, MethodOption, PruneOutput, PruningMethod
from offline_prune.methods.armor.blocks import AUTO, ab_overhead, block_size_arg, block_sizes
from offline_prune.methods.armor.driver import GRAM_OPTIMIZERS, OPTIMIZERS, armor_prune
from offline_prune.methods.armor.loop import DEFAULT_PLATEAU, ArmorResult, Plateau
from offline_prune.statistics import InputStats

# --optimizer auto (the default): fast-gram when --block-size auto gives A and B less than this budget, else fast.
# Measured on SmolLM2 (docs/BENCHMARKS.md, overhead sweep): at 0.03 fast was worse than SparseGPT 2:4 (1.40x its
# WikiText-2 perplexity) and fast-gram better (0.79x); at 0.125 fast was the better of the two on the held-out text.
AUTO_GRAM_BELOW = 0.1
# Default --tune-epochs for ARMOR: passes of block-wise reconstruction of A, B and the kept values after the jobs
# (offline_prune.reconstruct). Measured on SmolLM2 in docs/BENCHMARKS.md (block tuning).
TUNE_EPOCHS = 1.0
AB_DTYPES = ("model", "float32")  # how A and B are stored: in the model dtype, or float32


def chosen_optimizer(options: Mapping[str, Any]) -> str:
    """The optimiser a run uses: ``--optimizer`` itself, or for ``auto`` fast-gram under a small A+B budget
    (``--block-size auto`` with ``--max-overhead`` < AUTO_GRAM_BELOW), where starting from SparseGPT pays, else fast."""
    optimizer = options.get("optimizer", AUTO)
    if optimizer != AUTO:
        return optimizer
    small = options.get("block_size", AUTO) == AUTO and options.get("max_overhead", 0.125) < AUTO_GRAM_BELOW
    return "fast-gram" if small else "fast"


def plateau_of(options: Mapping[str, Any]) -> Plateau | None:
    """The plateau rule of the options (plateau_tol 0: none)."""
    return Plateau(options["plateau_window"], options["plateau_tol"]) if options["plateau_tol"] > 0 else None


def prune_output(res: ArmorResult, optimizer: str, used_gram: bool = False) -> PruneOutput:
    """The registry's PruneOutput of one result, with ARMOR's report fields."""
    (n_o, bs_out, _), (n_i, bs_in, _) = res.a_blocks.shape, res.b_blocks.shape
    extra = {"block_out": bs_out, "block_in": bs_in, "optimizer": optimizer,
             "ab_overhead": round(ab_overhead(n_o * bs_out, n_i * bs_in, bs_out, bs_in), 6), "stopped": res.stopped}
    if used_gram:  # its own objective, ||(W_hat - W) X^T||^2 / ||W X^T||^2: SparseGPT's, then its result
        extra |= {"layer_loss_sparsegpt_relative": res.init_relative, "layer_loss_final_relative": res.final_relative}
    return PruneOutput(res.core, res.mask, res.a_blocks, res.b_blocks, res.iterations, extra)


def prune(weight: torch.Tensor, stats: InputStats | None, h: torch.Tensor, options: Mapping[str, Any], seed: int,
          device: str) -> PruneOutput:
    """The registry's prune: ARMOR on one matrix with the block sizes and optimiser of the options."""
    d_out, d_in = weight.shape
    bs_out, bs_in = block_sizes(d_out, d_in, options)
    optimizer = chosen_optimizer(options)
    gram = stats.gram if optimizer in GRAM_OPTIMIZERS and stats is not None else None
    res = armor_prune(
        weight, h, bs_out, bs_in, optimizer=optimizer, iters=options["iters"], seed=seed, device=device,
        time_limit=options.get(TIME_LIMIT), gram=gram, plateau=plateau_of(options),
    )
    return prune_output(res, optimizer, gram is not None)


def uses_gram(options: Mapping[str, Any]) -> bool:
    """fast-gram needs X^T X and, like SparseGPT (its start), statistics of the already-pruned earlier layers."""
    return chosen_optimizer(options) in GRAM_OPTIMIZERS


METHOD = PruningMethod(
    name="armor", prune=prune, order=0, tune_epochs=TUNE_EPOCHS,
    options=(
        MethodOption("block_size", AUTO, block_size_arg,
                     "ARMOR block size: 'auto' = per matrix the largest size whose A+B stay within --max-overhead; "
                     "N = per dimension the largest divisor that is a multiple of 4 and <= N"),
        MethodOption("max_overhead", 0.125, float,
                     "with --block-size auto: A+B parameters per kept core value, at most (paper: ~0.09-0.12)"),
        MethodOption("ab_dtype", "model", str, "dtype of A and B in the checkpoint: the model's, or float32",
                     choices=AB_DTYPES),
        MethodOption("optimizer", AUTO, str,
                     "ARMOR optimiser (fast: exact block steps on the NoWag proxy; paper: Adam + sampling; fast-gram: "
                     "exact block steps on the full X^T X layer objective from SparseGPT's start, sequential; auto: "
                     f"fast-gram when --block-size auto and --max-overhead < {AUTO_GRAM_BELOW}, else fast)",
                     choices=(AUTO, *OPTIMIZERS)),
        MethodOption("plateau_tol", DEFAULT_PLATEAU.tol, float,
                     "fast mode stops when the relative loss fell by less than this fraction over the last "
                     "--plateau-window iterations (0: only the cap stops it)"),
        MethodOption("plateau_window", DEFAULT_PLATEAU.window, int, "iterations the plateau rule looks back"),
        MethodOption("iters", None, int, "ARMOR iteration cap per matrix (default: fast 120 and fast-gram 60, with a "
                     "plateau stop; paper 20000, the paper's setting)"),
    ),
    iterative=True,
    sequential=uses_gram,
    needs_gram=uses_gram,
)
