"""Wanda 2:4 (Sun et al. 2023): keep the 2 largest |W_ij| * ||x_j|| per group of 4, ||x_j|| = sqrt(h_j);
values unchanged.

Sequential, as in the paper: h comes from the model whose earlier layers are already pruned. Conventions of
the baselines: offline_prune.methods._inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from offline_prune.methods import PruneOutput, PruningMethod
from offline_prune.methods._inputs import Result, check_h, check_weight
from offline_prune.proxy import top2_of_4_mask
from offline_prune.statistics import InputStats


def wanda_2of4(weight: torch.Tensor, h: torch.Tensor) -> Result:
    w = check_weight(weight)
    h = check_h(h, w.shape[1])
    norm = torch.nan_to_num(h, nan=0.0, posinf=0.0).clamp_min(0).sqrt()
    mask = top2_of_4_mask(w.abs() * norm[None, :])
    return w * mask, mask


def _prune(weight: torch.Tensor, stats: InputStats | None, h: torch.Tensor, options: Mapping[str, Any], seed: int,
           device: str) -> PruneOutput:
    return PruneOutput(*wanda_2of4(weight, h))


METHOD = PruningMethod(name="wanda", prune=_prune, order=20, sequential=True)
