"""ARMOR's shared core, part 2: the result, the stopping rule, the run's settings and the one iteration loop that
every optimiser (fast, paper, fast-gram) runs with its own start and step (core.py: what the steps are built of).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from offline_prune.methods.armor.core import Fit, State

RTOL, ATOL = 1e-6, 1e-8  # early-stop rule of the official code


@dataclass
class ArmorResult:
    a_blocks: torch.Tensor  # (d_out//block_out, block_out, block_out) float32, normaliser folded in
    b_blocks: torch.Tensor  # (d_in//block_in, block_in, block_in) float32, normaliser folded in
    core: torch.Tensor  # (d_out, d_in) float32, zero outside mask (A' core B' ~ W)
    mask: torch.Tensor  # (d_out, d_in) bool, 2:4
    history: list[float]  # relative loss per iteration, history[0] = the start (NoWag-P or SparseGPT)
    init_loss: float  # absolute loss at the start
    final_loss: float
    init_relative: float
    final_relative: float
    iterations: int
    seconds: float
    elapsed: list[float] = field(default_factory=list)  # seconds since start at each history entry
    stopped: str = "cap"  # why the iterations ended: cap, plateau (fast), patience (paper), time_limit
    snapshots: list[ArmorResult] = field(default_factory=list)  # one per ``snapshots`` rule of armor_prune


@dataclass
class Trace:
    """The relative loss and the seconds since ``start`` at every iteration (entry 0: the start)."""

    start: float
    history: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)

    def record(self, relative: float) -> None:
        self.history.append(relative)
        self.elapsed.append(time.perf_counter() - self.start)

    def result(self, a: torch.Tensor, b: torch.Tensor, s: State, losses: tuple[float, float],
               reason: str) -> ArmorResult:
        """A result of factors ``a``, ``b`` (the optimiser's normaliser folded in), a copy of the core and mask of
        ``s`` and this trace so far; ``losses``: (initial, final) absolute loss."""
        return ArmorResult(
            a_blocks=a.contiguous(), b_blocks=b.contiguous(), core=s.c.clone(), mask=s.mask.clone(),
            history=list(self.history), init_loss=losses[0], final_loss=losses[1], init_relative=self.history[0],
            final_relative=self.history[-1], iterations=len(self.history) - 1, seconds=self.elapsed[-1],
            elapsed=list(self.elapsed), stopped=reason,
        )


# ---------------------------------------------------------------- stopping rule


def improved(new: float, old: float) -> bool:
    return new <= (1 - RTOL) * old and new <= old - ATOL


@dataclass(frozen=True)
class Plateau:
    """Fast mode's stopping rule: stop when the relative loss fell by less than ``tol`` (relatively) over the
    last ``window`` iterations. Chosen from the measured curve (docs/BENCHMARKS.md, "ARMOR convergence")."""

    window: int = 10
    tol: float = 0.002

    def reached(self, history: list[float]) -> bool:
        if len(history) <= self.window:
            return False
        before, now = history[-1 - self.window], history[-1]
        return before - now < self.tol * before


@dataclass(frozen=True)
class Snapshot:
    """A stopping rule watched during a longer run: an iteration cap and, optionally, a plateau."""

    iters: int
    plateau: Plateau | None = None


DEFAULT_PLATEAU = Plateau()


@dataclass(frozen=True)
class ArmorConfig:
    """How armor_prune fits one matrix. It stops at ``iters`` iterations (None: the optimiser's default); fast and
    fast-gram also on ``plateau`` (None: never), paper mode after ``patience`` iterations without improvement (the
    official code's rule); all before an iteration that would end past ``time_limit`` seconds since the start.
    ``snapshots`` (fast and paper): other stopping rules watched along the way; ``result.snapshots[k]`` is the
    result where rule k would have stopped (the final result if it never fired), so that one long run gives the
    results of every shorter rule (bench/convergence_curve.py). ``lr`` and ``seed``: paper mode's Adam and group
    sampling; ``gram_start``: fast-gram's start, ``sparsegpt`` or ``nowag-p``."""

    optimizer: str = "fast"
    iters: int | None = None
    seed: int = 0
    lr: float = 1e-4
    device: str | torch.device | None = None
    patience: int = 100
    plateau: Plateau | None = DEFAULT_PLATEAU
    time_limit: float | None = None
    gram_start: str = "sparsegpt"
    snapshots: Sequence[Snapshot] = ()


class Stopper:
    """Decides after every iteration whether to go on: cap, plateau (fast modes), patience (paper mode) or time."""

    def __init__(self, iters: int, plateau: Plateau | None, patience: int | None, time_limit: float | None) -> None:
        self.iters, self.plateau, self.patience, self.time_limit = iters, plateau, patience, time_limit
        self.left = patience
        self.reason = "cap"

    def stop(self, it: int, history: list[float], elapsed: list[float]) -> bool:
        if self.patience is not None:
            self.left = self.patience if improved(history[-1], history[-2]) else self.left - 1
        if it >= self.iters:
            self.reason = "cap"
        elif self.plateau is not None and self.plateau.reached(history):
            self.reason = "plateau"
        elif self.patience is not None and self.left <= 0:
            self.reason = "patience"
        elif self.time_limit is not None and elapsed[-1] + (elapsed[-1] - elapsed[-2]) > self.time_limit:
            self.reason = "time_limit"  # the next iteration would end past the limit
        else:
            return False
        return True


# ---------------------------------------------------------------- the iteration loop


class Optimizer(Protocol):
    """One optimiser as the loop sees it: its loss (``scale`` makes it relative), its start, its iteration and
    its result (normaliser folded in) at any point of the trace. ``create`` sets up its problem and start state
    from the weight (float, on the device), h, X^T X (fast-gram) and the block sizes."""

    name: str
    default_iters: int  # iteration cap when ArmorConfig.iters is None
    patience_rule: bool  # stops on ArmorConfig.patience (paper) instead of the plateau rule
    scale: float

    @classmethod
    def create(cls, weight: torch.Tensor, h: torch.Tensor, gram: torch.Tensor | None, block_out: int,
               block_in: int, config: ArmorConfig) -> Optimizer: ...

    def start(self) -> Fit: ...

    def step(self, fit: Fit) -> Fit: ...

    def result(self, trace: Trace, losses: tuple[float, float], reason: str) -> ArmorResult: ...


def iterate(opt: Optimizer, trace: Trace, stopper: Stopper, watched: Sequence[Stopper] = ()) -> ArmorResult:
    """Run ``opt`` from its start until ``stopper`` says stop; ``watched`` rules give ``result.snapshots``."""
    fit = opt.start()
    init = fit.loss
    trace.record(fit.loss / opt.scale)
    taken: dict[int, ArmorResult] = {}
    time_limit = stopper.time_limit
    with torch.no_grad():
        it = 0
        while it < stopper.iters and not (time_limit is not None and trace.elapsed[-1] > time_limit):
            it += 1
            fit = opt.step(fit)
            trace.record(fit.loss / opt.scale)
            for k, rule in enumerate(watched):
                if k not in taken and rule.stop(it, trace.history, trace.elapsed):
                    taken[k] = opt.result(trace, (init, fit.loss), rule.reason)
            if stopper.stop(it, trace.history, trace.elapsed):
                break
        if stopper.iters == 0 or it == 0:
            stopper.reason = "cap" if stopper.iters == 0 else "time_limit"
    if fit.r.device.type == "cuda":
        torch.cuda.synchronize(fit.r.device)
    final = opt.result(trace, (init, fit.loss), stopper.reason)
    final.snapshots = [taken.get(k, final) for k in range(len(watched))]
    return final
