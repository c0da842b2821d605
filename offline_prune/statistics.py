"""Input statistics of the linears of one decoder layer, gathered with forward hooks.

For every target linear: h = diag(X^T X) = sum over calibration tokens of x_j^2 (float32), and X^T X itself
when a method needs it (SparseGPT). Linears fed by the same tensor (q/k/v; gate/up: the architecture's
``shared_inputs``, offline_prune.architectures) share one statistic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class InputStats:
    d_in: int
    want_gram: bool
    h: torch.Tensor = field(init=False)
    gram: torch.Tensor | None = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.h = torch.zeros(self.d_in, dtype=torch.float32)
        self.gram = torch.zeros(self.d_in, self.d_in, dtype=torch.float32) if self.want_gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.d_in).float()
        if self.h.device != x.device:
            self.h = self.h.to(x.device)
            self.gram = self.gram.to(x.device) if self.gram is not None else None
        self.h += x.square().sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
        self.tokens += x.shape[0]


def owners(local_names: Iterable[str], shared_inputs: Sequence[Sequence[str]]) -> dict[str, str]:
    """Map each linear (local name in the layer) to the linear whose statistic it uses: the first one present of
    its group in ``shared_inputs`` (groups of linears fed the same tensor)."""
    present = list(local_names)
    owner = {name: name for name in present}
    for group in shared_inputs:
        members = [n for n in group if n in owner]
        for n in members:
            owner[n] = members[0]
    return owner


@contextmanager
def collect_stats(linears: dict[str, nn.Linear], want_gram: bool, shared_inputs: Sequence[Sequence[str]]):
    """Hook the linears (keyed by local name); yield {local name: InputStats} filled by forwards."""
    owner = owners(linears, shared_inputs)
    stats = {name: InputStats(linears[name].in_features, want_gram) for name in set(owner.values())}
    handles = [
        linears[name].register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0]))
        for name in stats
    ]
    try:
        yield {name: stats[owner[name]] for name in linears}
    finally:
        for handle in handles:
            handle.remove()
