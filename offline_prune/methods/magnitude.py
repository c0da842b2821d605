"""Magnitude 2:4: keep the 2 largest |W_ij| of every group of 4 consecutive inputs; values unchanged.

No calibration data. Conventions of the baselines: offline_prune.methods._inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from offline_prune.methods import PruneOutput, PruningMethod
from offline_prune.methods._inputs import Result, check_weight
from offline_prune.proxy import top2_of_4_mask
from offline_prune.statistics import InputStats


def magnitude_2of4(weight: torch.Tensor) -> Result:
    w = check_weight(weight)
    mask = top2_of_4_mask(w.abs())
    return w * mask, mask


def _prune(weight: torch.Tensor, stats: InputStats | None, h: torch.Tensor, options: Mapping[str, Any], seed: int,
           device: str) -> PruneOutput:
    return PruneOutput(*magnitude_2of4(weight))


METHOD = PruningMethod(name="magnitude", prune=_prune, order=40, needs_calibration=False)
