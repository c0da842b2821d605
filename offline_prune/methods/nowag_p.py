"""NoWag-P 2:4: keep the 2 largest Wn_ij^2 h_j per group of 4, Wn the NoWag-normalised W (offline_prune.proxy);
values unchanged. It is ARMOR's starting point, so its proxy loss equals the reports' ``loss_init``.

Statistics of the dense model. Conventions of the baselines: offline_prune.methods._inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from offline_prune.methods import PruneOutput, PruningMethod
from offline_prune.methods._inputs import Result, check_h, check_weight
from offline_prune.proxy import clean_h, normalize, nowag_p_mask
from offline_prune.statistics import InputStats


def nowag_p_2of4(weight: torch.Tensor, h: torch.Tensor) -> Result:
    w = check_weight(weight)
    h = check_h(h, w.shape[1])
    mask = nowag_p_mask(normalize(w).weight, clean_h(h))
    return w * mask, mask


def _prune(weight: torch.Tensor, stats: InputStats | None, h: torch.Tensor, options: Mapping[str, Any], seed: int,
           device: str) -> PruneOutput:
    return PruneOutput(*nowag_p_2of4(weight, h))


METHOD = PruningMethod(name="nowag-p", prune=_prune, order=10)
