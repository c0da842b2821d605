"""Input statistics of the linears of one decoder layer, gathered with forward hooks.

For every target linear: h = diag(X^T X) = sum over calibration tokens of x_j^2 (float32), and X^T X itself
when a method needs it (SparseGPT). Linears fed by the same tensor (q/k/v; gate/up) share one statistic.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# Linears of a decoder layer that receive the same input tensor: the first one present owns the statistic.
SHARED_INPUTS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


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


def owners(local_names: Iterable[str]) -> dict[str, str]:
    """Map each linear (local name in the layer) to the linear whose statistic it uses."""
    present = list(local_names)
    owner = {name: name for name in present}
    for group in SHARED_INPUTS:
        members = [n for n in group if n in owner]
        for n in members:
            owner[n] = members[0]
    return owner


@contextmanager
def collect_stats(linears: dict[str, nn.Linear], want_gram: bool):
    """Hook the linears (keyed by local name); yield {local name: InputStats} filled by forwards."""
    owner = owners(linears)
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
