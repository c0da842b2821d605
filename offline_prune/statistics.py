"""Input statistics of the linears of one decoder layer, gathered with forward hooks.

For every target linear: h = diag(X^T X) = sum over calibration tokens of x_j^2 (float32), and X^T X itself
when a method needs it (SparseGPT). Linears fed by the same tensor (q/k/v; gate/up: the architecture's
``shared_inputs``, offline_prune.architectures) share one statistic.

Paired statistics (``collect_paired_stats``) add the cross term X^T X_dense, token by token: X are the inputs
in the model whose earlier layers are already pruned, X_dense the same tokens' inputs in the dense model (ARMOR
fast-gram fits the dense layer's outputs W X_dense^T from the pruned inputs, offline_prune.methods._armor_full).
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
    want_cross: bool = False
    h: torch.Tensor = field(init=False)
    gram: torch.Tensor | None = field(init=False)
    cross: torch.Tensor | None = field(init=False)  # X^T X_dense (paired statistics only)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.h = torch.zeros(self.d_in, dtype=torch.float32)
        square = (self.d_in, self.d_in)
        self.gram = torch.zeros(square, dtype=torch.float32) if self.want_gram or self.want_cross else None
        self.cross = torch.zeros(square, dtype=torch.float32) if self.want_cross else None

    def add(self, x: torch.Tensor, x_dense: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, self.d_in).float()
        if self.h.device != x.device:
            self.h = self.h.to(x.device)
            self.gram = self.gram.to(x.device) if self.gram is not None else None
            self.cross = self.cross.to(x.device) if self.cross is not None else None
        self.h += x.square().sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
        if self.cross is not None:
            if x_dense is None:
                raise ValueError("paired statistics: the dense model's inputs of these tokens are missing")
            self.cross += x.T @ x_dense.detach().reshape(-1, self.d_in).float()
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


class Pairing:
    """Which stream a paired forward runs: the dense model's (its inputs are kept) or the pruned model's (its
    inputs are added with the kept dense ones, token by token)."""

    def __init__(self) -> None:
        self.dense = False
        self.kept: dict[str, torch.Tensor] = {}

    def hook(self, name: str, stats: InputStats):
        def add(_module, args) -> None:
            if self.dense:
                self.kept[name] = args[0].detach()
            else:
                stats.add(args[0], self.kept.pop(name, None))

        return add


@contextmanager
def collect_paired_stats(linears: dict[str, nn.Linear], shared_inputs: Sequence[Sequence[str]]):
    """Like collect_stats with X^T X, plus X^T X_dense. Yields ({local name: InputStats}, Pairing): the caller
    runs every window through the dense layer with ``pairing.dense = True``, then through the pruned-model stream
    with ``pairing.dense = False`` (same tokens, same order)."""
    owner = owners(linears, shared_inputs)
    stats = {name: InputStats(linears[name].in_features, True, want_cross=True) for name in set(owner.values())}
    pairing = Pairing()
    handles = [linears[name].register_forward_pre_hook(pairing.hook(name, stats[name])) for name in stats]
    try:
        yield {name: stats[owner[name]] for name in linears}, pairing
    finally:
        for handle in handles:
            handle.remove()
