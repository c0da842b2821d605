"""One run of the pruner as one object: its arguments and everything the walk, block tuning and the writer share
(the loaded model and its decoder layers, the calibration windows, OUT/.progress, the executor, the clock, the time
budget), so that each step takes the run instead of a dozen parameters."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offline_prune.architectures import Architecture, DecoderLayer, architecture_of, decoder_layers
from offline_prune.budget import PhaseClock, TimeBudget
from offline_prune.calibration import load_calibration
from offline_prune.checkpoint import dtype_of_config
from offline_prune.errors import UserError
from offline_prune.executor import Executor
from offline_prune.methods import PruningMethod
from offline_prune.models import resolve_model
from offline_prune.progress import Progress
from offline_prune.run_args import PruneArgs, run_key

log = logging.getLogger(__name__)


@dataclass
class Run:
    args: PruneArgs
    source: str  # the model's local folder (or hub id)
    tokenizer: Any
    model: nn.Module  # float32, on args.device
    out_dtype: torch.dtype  # the model's own dtype: the checkpoint's
    arch: Architecture
    layers: list[DecoderLayer]  # with the linears to prune (packable, not skipped)
    windows: torch.Tensor | None  # calibration token ids (n, seqlen); None for methods without calibration
    progress: Progress
    executor: Executor
    clock: PhaseClock
    budget: TimeBudget | None
    command: str | None  # the command line for the model card (None: the Python API)

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def method(self) -> PruningMethod:
        return self.args.pruning_method

    @property
    def ab_dtype(self) -> torch.dtype:
        return self.args.ab_dtype(self.out_dtype)

    def reload_dense(self) -> None:
        """The dense weights again (a sequential walk replaced them with the pruned ones)."""
        with self.clock.phase("load"):
            self.model = load_model(self.args)[2]
            self.layers = target_layers(self.model, self.arch, self.args.skip)


def open_run(args: PruneArgs, overwrite: bool, executor: Executor, command: str | None) -> Run:
    """Load the model and the calibration data, then open OUT/.progress (a bad file leaves OUT untouched)."""
    clock = PhaseClock()
    with clock.phase("load"):
        source, tokenizer, model, out_dtype = load_model(args)
        arch = architecture_of(model)
        layers = target_layers(model, arch, args.skip)
        if not any(layer.linears for layer in layers):
            raise UserError(f"model {args.model!r} has no supported linear layers to prune (q/k/v/o/gate/up/down)")
        windows = None
        if args.pruning_method.needs_calibration:  # read the data before touching OUT: a bad file leaves nothing
            windows = load_calibration(args.calib or "self", tokenizer, model, args.calib_samples,
                                       args.calib_seqlen, args.seed)
    progress = Progress(Path(args.out), run_key(args, executor), overwrite, args.retune_keys())
    budget = None
    if args.time_budget is not None and (args.pruning_method.iterative or args.tune_epochs > 0):
        write_bytes = sum(p.numel() for p in model.parameters()) * out_dtype.itemsize
        budget = TimeBudget(args.time_budget, clock, write_bytes, args.tune_epochs, len(layers))
    return Run(args, source, tokenizer, model, out_dtype, arch, layers, windows, progress, executor, clock, budget,
               command)


def load_model(args: PruneArgs) -> tuple[str, Any, nn.Module, torch.dtype]:
    """(source folder, tokenizer, the model in float32 on args.device, the model's own dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        out_dtype = dtype_of_config(AutoConfig.from_pretrained(source))  # before loading in float32
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load model {args.model!r} from {source}: {err}") from err
    return source, tokenizer, model.to(args.device).eval(), out_dtype


def target_layers(model: nn.Module, arch: Architecture, skip: str | None) -> list[DecoderLayer]:
    """The decoder layers with the linears to prune: not matching ``skip`` (a regex), input dimension packable."""
    layers = decoder_layers(model, arch, re.compile(skip) if skip else None)
    for layer in layers:
        layer.linears = _packable(layer.linears)
    return layers


def _packable(found: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    kept = {}
    for name, lin in found.items():
        if lin.in_features % 8:
            log.warning("%s: input dimension %d is not a multiple of 8, left dense", name, lin.in_features)
        else:
            kept[name] = lin
    return kept
