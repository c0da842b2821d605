"""Block-wise reconstruction ("block tuning"): after the per-matrix jobs, tune each decoder layer's pruned linears
so that the layer, fed the outputs of the already-tuned earlier layers, reproduces the dense model's layer output.

For decoder layer l with dense inputs X_l, dense outputs Y_l = f_l(X_l) and inputs from the pruned model
X~_l = f~_{l-1}(...f~_0(X_0)), minimise over theta = the continuous parameters of the layer's pruned linears

    L_l(theta) = mean over tokens and features of (f_l(X~_l; theta) - Y_l)^2

with Adam, ``epochs`` passes over the calibration windows in steps of about ``TOKENS_PER_STEP`` tokens (at least
one window). For ARMOR theta = (A, kept core values, B) of every linear: W_hat = A (W' * M) B with the 2:4 mask M
fixed; for a baseline (A = B = I) the kept values only. Everything else in the layer (norms, unpruned linears)
stays as it was.

Why: every job minimises its own matrix's proxy loss on dense inputs (NoWag: diag(X^T X) only), blind to the
errors of the other matrices and of the earlier layers. Fitting the layer output from the pruned inputs corrects
both (SparseGPT's sequential setting, at the level of a whole layer; EBFT-style block-wise fine-tuning, with the
ARMOR factors as the trainable parameters). The tuned tensors are cast to the checkpoint dtypes before the layer
produces the next layer's inputs, so the next layer tunes against what will be served.

Never worse on its own objective: the loss is measured on all windows before and after; a layer whose loss rose
keeps its untuned tensors (the report says so). The per-matrix proxy losses in the report are those of the jobs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from offline_prune.budget import TUNE_FORWARDS
from vllm_armor import checkpoint_format as fmt
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right

TOKENS_PER_STEP = 2048  # tokens per Adam step (4 windows of 512, 1 of 2048)
TUNE_LR = 3e-4  # Adam's default lr: of 1e-4, 3e-4, 1e-3 at 1 epoch, the best on SmolLM2 (bench/tune_sweep.py)
FORWARD_TOKENS = 8192  # tokens per forward chunk when only evaluating


@dataclass(frozen=True)
class TuneOptions:
    epochs: float  # passes over the calibration windows (a fraction runs part of one pass)
    lr: float
    seed: int = 0


class FactoredLinear(nn.Module):
    """y = A ((W' * M) B) x + bias with trainable A, W', B (A, B optional) and a fixed 2:4 mask M."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None, device: str) -> None:
        super().__init__()
        dec = fmt.decode_linear(tensors, torch.float32)
        self.register_buffer("mask", fmt.unpack_mask(tensors[fmt.CORE_META]).to(device))
        self.core = nn.Parameter(dec.core.to(device))
        self.a = nn.Parameter(dec.a_blocks.to(device)) if dec.a_blocks is not None else None
        self.b = nn.Parameter(dec.b_blocks.to(device)) if dec.b_blocks is not None else None
        self.bias = bias

    def weight(self) -> torch.Tensor:
        core = self.core * self.mask
        if self.a is None:
            return core
        return blockdiag_left(self.a, blockdiag_right(core, self.b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)

    def tensors(self, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """Format tensors (suffix -> CPU tensor), each in its checkpoint dtype."""
        with torch.no_grad():
            a = self.a.detach() if self.a is not None else None
            b = self.b.detach() if self.b is not None else None
            enc = fmt.encode_linear(self.core.detach() * self.mask, self.mask, a, b)
        return {s: v.to(dtypes.get(s, v.dtype)) for s, v in enc.items()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        dec = fmt.decode_linear(tensors, torch.float32)
        with torch.no_grad():
            self.core.copy_(dec.core)
            if self.a is not None:
                self.a.copy_(dec.a_blocks)
                self.b.copy_(dec.b_blocks)


@contextmanager
def placed(layer: nn.Module, linears: Mapping[str, nn.Module]) -> Iterator[None]:
    """``layer`` with its submodules named in ``linears`` (local names) replaced, restored on exit."""
    originals = {name: layer.get_submodule(name) for name in linears}
    try:
        for name, module in linears.items():
            _set(layer, name, module)
        yield
    finally:
        for name, module in originals.items():
            _set(layer, name, module)


def _set(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, module)


def forward_all(layer: nn.Module, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer applied to every window of ``inputs`` (windows, seq, hidden), in chunks, without gradients."""
    step = max(1, FORWARD_TOKENS // inputs.shape[1])
    with torch.no_grad():
        return torch.cat([_first(layer(inputs[i:i + step], **kwargs)) for i in range(0, inputs.shape[0], step)])


def output_error(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 kwargs: dict) -> tuple[float, torch.Tensor]:
    """(mean squared error of the layer's outputs against ``targets``, the outputs)."""
    outputs = forward_all(layer, inputs, kwargs)
    return float(((outputs - targets) ** 2).mean()), outputs


def tune_layer(layer: nn.Module, factored: Mapping[str, FactoredLinear], inputs: torch.Tensor, targets: torch.Tensor,
               kwargs: dict, options: TuneOptions, dtypes: Mapping[str, torch.dtype],
               seconds: float | None = None,
               forward_s: float = 0.0) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, dict]:
    """Tune the ``factored`` linears (already placed in ``layer``) so that layer(inputs) fits ``targets``.

    Returns (format tensors per linear in their checkpoint dtypes, the layer's outputs with those tensors, report).
    ``seconds``: the time this call may take (the run's --time-budget), ``forward_s``: what one pass of the layer
    over all windows takes; steps are taken only while the pass that follows them still fits, and a share too small
    for the passes around any step leaves the layer as it is (one pass, for the next layer's inputs)."""
    start = time.perf_counter()
    before = {name: lin.tensors(dtypes) for name, lin in factored.items()}
    if seconds is not None and seconds < TUNE_FORWARDS * forward_s:
        outputs = forward_all(layer, inputs, kwargs)
        return before, outputs, {"loss_before": None, "loss_after": None, "steps": 0, "stopped": "time_limit",
                                 "kept": True, "seconds": round(time.perf_counter() - start, 3)}
    loss_before, out_before = output_error(layer, inputs, targets, kwargs)
    if not factored:  # every linear of the layer left dense (--skip): nothing to tune, the stream passes through
        return {}, out_before, {"loss_before": loss_before, "loss_after": loss_before, "steps": 0, "stopped": "steps",
                                "kept": True, "seconds": round(time.perf_counter() - start, 3)}
    params = [p for lin in factored.values() for p in (lin.core, lin.a, lin.b) if p is not None]
    trained = {id(p) for p in params}
    for p in layer.parameters():  # norms and unpruned linears stay as they are
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.Adam(params, lr=options.lr)
    n = inputs.shape[0]
    per_step = min(n, max(1, TOKENS_PER_STEP // inputs.shape[1]))  # windows per step
    total_steps = max(1, round(options.epochs * math.ceil(n / per_step))) if options.epochs > 0 else 0
    gen = torch.Generator().manual_seed(options.seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(total_steps * per_step / n))])
    steps, stopped = 0, "steps"
    with torch.enable_grad():
        while steps < total_steps:
            if seconds is not None and time.perf_counter() - start + forward_s > seconds:
                stopped = "time_limit"
                break
            idx = order[steps * per_step:(steps + 1) * per_step].to(inputs.device)
            loss = ((_first(layer(inputs[idx], **kwargs)) - targets[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    after = {}
    for name, lin in factored.items():
        after[name] = lin.tensors(dtypes)
        lin.load(after[name])  # what will be served: the next layer tunes against it
    loss_after, out_after = output_error(layer, inputs, targets, kwargs)
    kept = loss_after <= loss_before
    if not kept:
        after, out_after = before, out_before
    report = {"loss_before": loss_before, "loss_after": loss_after if kept else loss_before, "steps": steps,
              "stopped": stopped, "kept": kept, "seconds": round(time.perf_counter() - start, 3)}
    return after, out_after, report


def _first(out):
    return out[0] if isinstance(out, tuple) else out
