"""Block tuning's driver (the method: offline_prune.reconstruct): after the jobs, walk the layers again with two
streams, the dense model's and the pruned model's, and tune each layer's pruned linears (A, B, kept values; the mask
fixed) so that the layer fed the pruned stream reproduces the dense layer's outputs. Each tuned layer is saved to
OUT/.progress/tuned/ (resume); a layer tuned before a kill only recomputes the stream."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from offline_prune.architectures import DecoderLayer
from offline_prune.budget import TUNE_SHARE
from offline_prune.capture import layer0_inputs
from offline_prune.progress import pause_point
from offline_prune.reconstruct import FactoredLinear, TuneOptions, forward_all, placed, tune_layer
from offline_prune.run import Run
from vllm_armor import checkpoint_format as fmt

log = logging.getLogger(__name__)
Tuned = dict[str, dict[str, torch.Tensor]]  # module -> suffix -> format tensor in its checkpoint dtype


def block_tuning(run: Run) -> tuple[Tuned, dict | None]:
    """Block tuning as the run's arguments and time budget allow; returns the tuned format tensors and the report's
    tuning record ({"summary", "layers"}; None when the run does not tune)."""
    args = run.args
    if args.tune_epochs <= 0 or run.windows is None:
        return {}, None
    if run.budget is not None and not run.budget.tune_reserve():
        log.warning("block tuning skipped: --time-budget %.0f s cannot hold it (it would take more than %.0f%% of it)",
                    args.time_budget, 100 * TUNE_SHARE)
        return {}, {"summary": {"epochs": args.tune_epochs, "lr": args.tune_lr, "layers": 0,
                                "skipped": "the time budget cannot hold it"}, "layers": []}
    if run.method.is_sequential(args.options):  # the walk replaced the dense weights: load them again
        run.reload_dense()
    return tune(run)


def tune(run: Run) -> tuple[Tuned, dict]:
    """Block tuning of every layer in order, from the jobs' results in OUT/.progress."""
    tuner = _LayerTuner(run)
    tuned: Tuned = {}
    reports = []
    with run.clock.phase("tuning"):
        hidden, tuner.kwargs = layer0_inputs(run.model, run.layers[0].module, run.windows, run.args.device)
        dense = torch.cat(hidden)
        pruned = dense.clone()
        bar = tqdm(run.layers, desc="block tuning", unit="layer")
        for i, layer in enumerate(bar):
            begun = time.perf_counter()
            targets = forward_all(layer.module, dense, tuner.kwargs)
            layer_tuned, pruned, report = tuner.tune(i, layer, pruned, targets, time.perf_counter() - begun)
            pause_point("tuning")
            tuned.update(layer_tuned)
            dense = targets
            reports.append({"layer": i, **report})
            if report["loss_before"] is not None:
                bar.set_postfix(error=f"{report['loss_before']:.3g}->{report['loss_after']:.3g}", refresh=False)
        bar.close()
    return tuned, {"summary": tuning_summary(run, reports), "layers": reports}


@dataclass
class _LayerTuner:
    run: Run
    kwargs: dict | None = None  # the decoder layers' keyword arguments (from the capture of layer 0)

    def __post_init__(self) -> None:
        args = self.run.args
        self.options = TuneOptions(args.tune_epochs, args.tune_lr, args.seed)
        self.dtypes = {fmt.CORE_VALUES: self.run.out_dtype, fmt.ARMOR_A: self.run.ab_dtype,
                       fmt.ARMOR_B: self.run.ab_dtype}

    def tune(self, i: int, layer: DecoderLayer, inputs: torch.Tensor, targets: torch.Tensor,
             forward_s: float) -> tuple[Tuned, torch.Tensor, dict]:
        """(tuned tensors, the layer's outputs from ``inputs`` with them, report) of decoder layer ``i``; saved."""
        run = self.run
        factored = {}
        for name, lin in layer.linears.items():
            tensors = {s: t.to(self.dtypes.get(s, t.dtype)) for s, t in run.progress.load(name)[0].items()}
            factored[name] = FactoredLinear(tensors, lin.bias, run.args.device)
        local = {layer.local_names[name]: f for name, f in factored.items()}
        with placed(layer.module, local):
            saved = run.progress.load_tuned(i)
            if saved is not None:  # tuned before a kill: only the stream is recomputed
                layer_tuned, report = saved
                for name, f in factored.items():
                    f.load(layer_tuned[name])
                return layer_tuned, forward_all(layer.module, inputs, self.kwargs), report
            seconds = run.budget.tune_limit(len(run.layers) - i) if run.budget is not None else None
            layer_tuned, outputs, report = tune_layer(layer.module, factored, inputs, targets, self.kwargs,
                                                      self.options, self.dtypes, seconds, forward_s)
            run.progress.save_tuned(i, layer_tuned, report)
        return layer_tuned, outputs, report


def tuning_summary(run: Run, reports: list[dict]) -> dict:
    """The report's ``summary.tuning`` from the layers' reports."""
    measured = [r for r in reports if r["loss_before"] is not None]  # not: skipped for want of time
    ratios = [r["loss_after"] / r["loss_before"] for r in measured if r["loss_before"] > 0]
    return {"epochs": run.args.tune_epochs, "lr": run.args.tune_lr, "layers": len(reports),
            "layers_kept": sum(r["kept"] for r in reports),
            "layers_time_limited": sum(r["stopped"] == "time_limit" for r in reports),
            "mean_error_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None,
            "last_layer_error": [reports[-1]["loss_before"], reports[-1]["loss_after"]] if reports else None,
            "layers_skipped": len(reports) - len(measured)}
