"""ARMOR: a 2:4 sparse core between two block-diagonal matrices, fitted to one weight matrix.

W (d_out x d_in) is approximated by  W_hat = A (C) B,  with A = blockdiag(A_1..A_nO) (blocks bo x bo),
B = blockdiag(B_1..B_nI) (blocks bi x bi) and C a 2:4 sparse core (2 of every 4 consecutive inputs kept).
Each optimiser fits a loss L = <R, R H> with R = A C B - T:

  * ``fast`` (fast.py) and ``paper`` (paper.py, the paper's Adam + sampled group updates) fit the NoWag proxy
    (nowag.py: T the normalised weight, H = diag h, start NoWag-P);
  * ``fast-gram`` (fast_gram.py) fits the full layer objective ||(A C B - W) X^T||^2 (H = X^T X, start SparseGPT).

Write Q = A^T (R H) B^T (half the gradient of L w.r.t. the dense core). The exact group update re-solves the 4
values of one group for each of the 6 patterns (core.solve_groups); the fast optimisers also solve the kept values,
A and B in closed form or by a few CG steps (core.BlockSteps). Guarantee (Theorem 3.1 of the paper, enforced
here): every step that would raise L in floating point is rejected, so the history never rises and the returned
loss is at most the start's (NoWag-P's; fast-gram: SparseGPT's). Same seed, same device: same result. All math
is float32 whatever the input dtype; every block is handled by batched tensor ops.

Layout: blocks.py (block-size policy), core.py (state, group and SPD solves, checked steps), loop.py (result,
stopping rule, config, the one iteration loop), one module per optimiser, driver.py (``armor_prune``) and
entry.py (the registry entry ``METHOD`` with its options). This module re-exports the names callers use.
"""

from __future__ import annotations

from offline_prune.methods.armor.blocks import (
    AUTO,
    ab_overhead,
    auto_block_sizes,
    block_size_arg,
    block_sizes,
    largest_block_size,
)
from offline_prune.methods.armor.core import solve_groups
from offline_prune.methods.armor.driver import DEFAULT_ITERS, GRAM_OPTIMIZERS, OPTIMIZERS, armor_prune
from offline_prune.methods.armor.entry import (
    AB_DTYPES,
    AUTO_GRAM_BELOW,
    METHOD,
    TUNE_EPOCHS,
    chosen_optimizer,
    plateau_of,
    prune_output,
)
from offline_prune.methods.armor.loop import DEFAULT_PLATEAU, ArmorConfig, ArmorResult, Plateau, Snapshot

__all__ = [
    "AB_DTYPES", "AUTO", "AUTO_GRAM_BELOW", "DEFAULT_ITERS", "DEFAULT_PLATEAU", "GRAM_OPTIMIZERS", "METHOD",
    "OPTIMIZERS", "TUNE_EPOCHS", "ArmorConfig", "ArmorResult", "Plateau", "Snapshot", "ab_overhead",
    "armor_prune", "auto_block_sizes", "block_size_arg", "block_sizes", "chosen_optimizer", "largest_block_size",
    "plateau_of", "prune_output", "solve_groups",
]
