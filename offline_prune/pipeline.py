"""The model walk: calibrate one decoder layer at a time, run the per-matrix jobs, write the checkpoint.

1. Load the model (float32 for calibration) and the calibration windows.
2. Capture the inputs of decoder layer 0 for every window (a pre-hook that stops the forward there).
3. For each decoder layer: hook its target linears and run the layer over all windows, which gives the
   statistics (h, and X^T X for SparseGPT) and the layer's outputs = the next layer's inputs. ARMOR and
   NoWag-P use statistics of the dense model; SparseGPT and Wanda see the already-pruned earlier layers
   (their papers' setting), so for them the layer is pruned and run again to produce its outputs.
   What a method needs (calibration, sequential statistics, X^T X) and its options come from its registry
   entry (offline_prune.methods); the layers and linears from offline_prune.architectures.
   The per-matrix jobs go to an executor (offline_prune.executor: in this process, or Ray tasks with
   --ray, offline_prune.distributed); every finished matrix is saved to OUT/.progress/ as it arrives (resume).
   Jobs follow their layer's calibration, except for dense-statistics methods run in this process: all layers
   are calibrated first and the jobs run in rounds spread over the depth, so the bar's ETA is right early.
4. Block tuning (offline_prune.reconstruct; ARMOR's default, --tune-epochs): walk the layers again with two
   streams, the dense model's and the pruned model's, and tune each layer's pruned linears (A, B, kept values; the
   mask fixed) so that the layer fed the pruned stream reproduces the dense layer's outputs. Each tuned layer is
   saved to OUT/.progress/tuned/ (resume).
5. Assemble the checkpoint (docs/FORMAT.md) and armor_report.json.
Peak memory is the model plus one layer's activations for all windows.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from offline_prune.architectures import Architecture, DecoderLayer, architecture_of, decoder_layers
from offline_prune.budget import TUNE_SHARE, PhaseClock, TimeBudget
from offline_prune.calibration import load_calibration
from offline_prune.checkpoint import checkpoint_state, dtype_of_config, write_checkpoint
from offline_prune.executor import Executor, Finished, LayerJobs, LocalExecutor
from offline_prune.jobs import JobOptions
from offline_prune.methods import PruningMethod, get_method
from offline_prune.model_card import CARD_FILE, model_card
from offline_prune.models import UserError, resolve_model
from offline_prune.progress import PROGRESS_DIR, Progress, pause_point
from offline_prune.reconstruct import TUNE_LR, FactoredLinear, TuneOptions, forward_all, placed, tune_layer
from offline_prune.statistics import collect_stats
from vllm_armor import checkpoint_format as fmt

log = logging.getLogger(__name__)
REPORT_FILE = "armor_report.json"


@dataclass(frozen=True)
class PruneArgs:
    model: str
    out: str
    method: str = "armor"
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    skip: str | None = None
    device: str = "cpu"
    time_budget: float | None = None  # seconds for the whole run (offline_prune.budget), None: no limit
    tune_epochs: float | None = None  # block tuning passes (offline_prune.reconstruct); None: the method's default
    tune_lr: float | None = None  # block tuning's Adam lr; None: reconstruct.TUNE_LR
    # Options of the method (offline_prune.methods): missing ones get the method's defaults, unknown ones are refused.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = get_method(self.method)
        object.__setattr__(self, "options", method.resolve(self.options))
        if self.tune_epochs is None:
            object.__setattr__(self, "tune_epochs", method.tune_epochs if method.needs_calibration else 0.0)
        if self.tune_lr is None:
            object.__setattr__(self, "tune_lr", TUNE_LR)
        if self.tune_epochs < 0 or self.tune_lr <= 0:
            raise UserError(f"--tune-epochs {self.tune_epochs} / --tune-lr {self.tune_lr}: expected >= 0 and > 0")
        if self.tune_epochs > 0 and not method.needs_calibration:
            raise UserError(f"--tune-epochs needs calibration data, which method {self.method!r} does not use")

    @property
    def pruning_method(self) -> PruningMethod:
        return get_method(self.method)

    def flat(self) -> dict[str, Any]:
        """The generic fields and the method's options in one dict (the report's "args")."""
        generic = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**generic, **self.options}

    def run_key(self) -> dict:
        """What must match for a rerun to resume (everything that changes the result)."""
        key = self.flat()
        key.pop("out")
        return key

    def retune_keys(self) -> tuple[str, ...]:
        """The run_key fields that change block tuning only: a rerun that differs in these alone keeps the finished
        jobs and tunes again. With a time budget the tuning plan also sets the jobs' time limits: none then."""
        return () if self.time_budget is not None else ("tune_epochs", "tune_lr")


class _StopForward(Exception):
    pass


def _load(args: PruneArgs):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        out_dtype = dtype_of_config(AutoConfig.from_pretrained(source))  # before loading in float32
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load model {args.model!r} from {source}: {err}") from err
    return source, tokenizer, model.to(args.device).eval(), out_dtype


@torch.no_grad()
def _layer0_inputs(model: nn.Module, layer0: nn.Module, windows: torch.Tensor, device: str):
    """Hidden states entering decoder layer 0 for every window, and the layer's keyword arguments."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def stop(_module, args, kw):
        captured.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, kwargs


def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _job_options(args: PruneArgs) -> JobOptions:
    return JobOptions.create(args.method, args.options, args.seed, args.device)


@torch.no_grad()
def prune(args: PruneArgs, overwrite: bool = False, executor: Executor | None = None,
          command: str | None = None) -> dict:
    """Run the whole job; return the report (also written to OUT/armor_report.json).

    ``executor`` runs the per-matrix jobs (default: in this process; offline_prune.distributed.RayExecutor
    for a Ray cluster). It is closed when the run ends. ``command`` is the command line for the model card
    (README.md in OUT; None: the Python API).
    """
    executor = executor or LocalExecutor()
    try:
        return _prune(args, overwrite, executor, command)
    finally:
        executor.close()


def _finished_report(out: Path, args: PruneArgs) -> dict | None:
    """The report of a run of the same arguments that already finished in ``out`` (a rerun after a kill that came
    after the last write), else None."""
    report_file = out / REPORT_FILE
    if (out / PROGRESS_DIR).exists() or not report_file.is_file():
        return None
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        return None
    done = {k: v for k, v in report.get("args", {}).items() if k != "out"}
    return report if done == json.loads(json.dumps(args.run_key())) else None


def _prune(args: PruneArgs, overwrite: bool, executor: Executor, command: str | None) -> dict:
    skip = re.compile(args.skip) if args.skip else None
    out = Path(args.out)
    finished = None if overwrite else _finished_report(out, args)
    if finished is not None:
        log.info("%s already holds the finished run of these arguments: nothing to do", out)
        return finished
    clock = PhaseClock()
    with clock.phase("load"):
        source, tokenizer, model, out_dtype = _load(args)
        arch = architecture_of(model)
        layers = _target_layers(model, arch, skip)
        if not any(layer.linears for layer in layers):
            raise UserError(f"model {args.model!r} has no supported linear layers to prune (q/k/v/o/gate/up/down)")
        windows = None
        if args.pruning_method.needs_calibration:  # read the data before touching OUT: a bad file leaves nothing
            windows = load_calibration(args.calib or "self", tokenizer, model, args.calib_samples,
                                       args.calib_seqlen, args.seed)
    progress = Progress(out, _run_key(args, executor), overwrite, args.retune_keys())
    budget = None
    if args.time_budget is not None and (args.pruning_method.iterative or args.tune_epochs > 0):
        write_bytes = sum(p.numel() for p in model.parameters()) * out_dtype.itemsize
        budget = TimeBudget(args.time_budget, clock, write_bytes, args.tune_epochs, len(layers))
    eta = _walk(args, model, windows, arch, layers, progress, executor, clock, budget)
    eta_check = eta.check(clock.elapsed())  # the jobs' ETA is checked against the jobs (tuning has its own bar)
    tuned: dict[str, dict[str, torch.Tensor]] = {}
    tuning = None
    if args.tune_epochs > 0 and windows is not None and budget is not None and not budget.tune_reserve():
        tuning = {"summary": {"epochs": args.tune_epochs, "lr": args.tune_lr, "layers": 0,
                              "skipped": "the time budget cannot hold it"}, "layers": []}
        log.warning("block tuning skipped: --time-budget %.0f s cannot hold it (it would take more than %.0f%% of it)",
                    args.time_budget, 100 * TUNE_SHARE)
    elif args.tune_epochs > 0 and windows is not None:
        if args.pruning_method.is_sequential(args.options):  # the walk replaced the dense weights: load them again
            with clock.phase("load"):
                model = _load(args)[2]
                layers = _target_layers(model, arch, skip)
        tuned, tuning = _tune(args, model, windows, layers, progress, clock, budget, out_dtype)

    with clock.phase("write"):
        report = _write(args, out, source, tokenizer, model, out_dtype, layers, progress, executor, command, clock,
                        tuned, tuning)
    report["summary"].update(wall_seconds=round(clock.elapsed(), 3), phase_seconds=clock.summary(),
                             eta_check=eta_check)
    fmt.atomic_write_text(out / REPORT_FILE, _json(report))
    progress.finish()  # only now: a run killed before this point is finished by a rerun
    _log_summary(report, out)
    return report


def _target_layers(model: nn.Module, arch: Architecture, skip: re.Pattern | None) -> list[DecoderLayer]:
    layers = decoder_layers(model, arch, skip)
    for layer in layers:
        layer.linears = _packable(layer.linears)
    return layers


def _ab_dtype(args: PruneArgs, out_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if args.options.get("ab_dtype") == "float32" else out_dtype


def _tune(args: PruneArgs, model: nn.Module, windows: torch.Tensor, layers: list[DecoderLayer], progress: Progress,
          clock: PhaseClock, budget: TimeBudget | None,
          out_dtype: torch.dtype) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Block tuning (offline_prune.reconstruct) of every layer in order, from the jobs' results in OUT/.progress;
    returns the tuned format tensors (name -> suffix -> tensor, checkpoint dtypes) and the report's "tuning"."""
    options = TuneOptions(args.tune_epochs, args.tune_lr, args.seed)
    ab_dtype = _ab_dtype(args, out_dtype)
    dtypes = {fmt.CORE_VALUES: out_dtype, fmt.ARMOR_A: ab_dtype, fmt.ARMOR_B: ab_dtype}
    tuned: dict[str, dict[str, torch.Tensor]] = {}
    reports = []
    with clock.phase("tuning"):
        hidden, layer_kwargs = _layer0_inputs(model, layers[0].module, windows, args.device)
        dense = torch.cat(hidden)
        pruned = dense.clone()
        bar = tqdm(layers, desc="block tuning", unit="layer")
        for i, layer in enumerate(bar):
            begun = time.perf_counter()
            targets = forward_all(layer.module, dense, layer_kwargs)
            forward_s = time.perf_counter() - begun
            factored = {}
            for name, lin in layer.linears.items():
                tensors = {s: t.to(dtypes.get(s, t.dtype)) for s, t in progress.load(name)[0].items()}
                factored[name] = FactoredLinear(tensors, lin.bias, args.device)
            local = {layer.local_names[name]: f for name, f in factored.items()}
            with placed(layer.module, local):
                saved = progress.load_tuned(i)
                if saved is not None:  # tuned before a kill: only the stream is recomputed
                    layer_tuned, report = saved
                    for name, f in factored.items():
                        f.load(layer_tuned[name])
                    outputs = forward_all(layer.module, pruned, layer_kwargs)
                else:
                    seconds = budget.tune_limit(len(layers) - i) if budget is not None else None
                    layer_tuned, outputs, report = tune_layer(layer.module, factored, pruned, targets, layer_kwargs,
                                                              options, dtypes, seconds, forward_s)
                    progress.save_tuned(i, layer_tuned, report)
            pause_point("tuning")
            tuned.update(layer_tuned)
            dense, pruned = targets, outputs
            reports.append({"layer": i, **report})
            if report["loss_before"] is not None:
                bar.set_postfix(error=f"{report['loss_before']:.3g}->{report['loss_after']:.3g}", refresh=False)
        bar.close()
    measured = [r for r in reports if r["loss_before"] is not None]  # not: skipped for want of time
    ratios = [r["loss_after"] / r["loss_before"] for r in measured if r["loss_before"] > 0]
    summary = {"epochs": args.tune_epochs, "lr": args.tune_lr, "layers": len(reports),
               "layers_kept": sum(r["kept"] for r in reports),
               "layers_time_limited": sum(r["stopped"] == "time_limit" for r in reports),
               "mean_error_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None,
               "last_layer_error": [reports[-1]["loss_before"], reports[-1]["loss_after"]] if reports else None,
               "layers_skipped": len(reports) - len(measured)}
    return tuned, {"summary": summary, "layers": reports}


def _write(args: PruneArgs, out: Path, source: str, tokenizer, model: nn.Module, out_dtype: torch.dtype,
           layers: list[DecoderLayer], progress: Progress, executor: Executor, command: str | None,
           clock: PhaseClock, tuned: dict[str, dict[str, torch.Tensor]], tuning: dict | None) -> dict:
    names = [name for layer in layers for name in layer.linears]
    results: dict[str, dict[str, torch.Tensor]] = {}
    reports: list[dict] = []
    for name in names:  # from OUT/.progress, in model order: the same bytes however the jobs ran
        results[name], report = progress.load(name)
        results[name] = tuned.get(name, results[name])
        reports.append(report)
    # pruned weights are replaced by their cores
    state = checkpoint_state(model, results, out_dtype, _ab_dtype(args, out_dtype))
    size = fmt.footprint({k: fmt.info_of(v) for k, v in state.items()}, list(results))
    quant = fmt.make_quant_config(args.method, args.options.get("block_size"), list(results),
                                  args.options.get("max_overhead") if args.options.get("block_size") == "auto"
                                  else None, size)
    write_checkpoint(out, source, model.config, tokenizer, state, quant, out_dtype)
    pause_point("final_write")
    report = _report(args, source, reports, clock, executor.describe(), size, command, tuning)
    fmt.atomic_write_text(out / REPORT_FILE, _json(report))
    fmt.atomic_write_text(out / CARD_FILE, model_card(report))
    return report


def _run_key(args: PruneArgs, executor: Executor) -> dict:
    key = args.run_key()
    job_device = executor.job_device(args.device)
    if job_device != args.device:  # e.g. a CPU driver with GPU workers: results differ from a CPU run
        key["job_device"] = job_device
    return key


def _walk(args: PruneArgs, model: nn.Module, windows: torch.Tensor | None, arch: Architecture,
          layers: list[DecoderLayer], progress: Progress, executor: Executor, clock: PhaseClock,
          budget: TimeBudget | None) -> _Eta:
    """Calibrate, hand the jobs to the executor and save every result as it arrives; returns the ETA record.

    Two orders. Sequential methods (SparseGPT, Wanda: they see the pruned earlier layers), methods on X^T X (one
    d_in x d_in matrix per input: too big to keep for every layer) and executors that run jobs while the walk
    calibrates (Ray, worker processes) go layer by layer (``_walk_layers``). Otherwise (ARMOR fast/paper,
    NoWag-P, magnitude in this process) the walk calibrates every layer first, then runs the jobs in rounds that
    sample the depth (``depth_rounds``), so the rate measured on the first round predicts the rest: layers differ
    (on SmolLM2 layer 0 needs 1.5x a typical layer's iterations under the plateau rule).
    """
    method = args.pruning_method
    if method.is_sequential(args.options) or method.wants_gram(args.options) or executor.runs_beside_walk:
        return _walk_layers(args, model, windows, arch, layers, progress, executor, clock, budget)
    return _walk_rounds(args, model, windows, arch, layers, progress, executor, clock, budget)


def _calibrate(layer: DecoderLayer, hidden: list[torch.Tensor], layer_kwargs: dict, want_gram: bool,
               arch: Architecture) -> tuple[dict, list[torch.Tensor]]:
    """The input statistics of the layer's linears (full names) and the layer's outputs for every window."""
    local = {layer.local_names[name]: lin for name, lin in layer.linears.items()}
    with collect_stats(local, want_gram, arch.shared_inputs) as local_stats:
        outputs = _run_layer(layer.module, hidden, layer_kwargs)
    return {name: local_stats[layer.local_names[name]] for name in layer.linears}, outputs


def _walk_layers(args: PruneArgs, model: nn.Module, windows: torch.Tensor | None, arch: Architecture,
                 layers: list[DecoderLayer], progress: Progress, executor: Executor, clock: PhaseClock,
                 budget: TimeBudget | None) -> _Eta:
    """Calibrate one layer, submit its jobs, go on (a sequential method first waits for the layer's jobs and runs
    the pruned layer again for the next layer's inputs). The ETA is taken after the first layer."""
    needs_data = windows is not None
    sequential = args.pruning_method.is_sequential(args.options)
    want_gram = args.pruning_method.wants_gram(args.options)
    if needs_data:
        with clock.phase("calibration"):
            hidden, layer_kwargs = _layer0_inputs(model, layers[0].module, windows, args.device)
    options = _job_options(args)
    sizes = [{n: lin.weight.numel() for n, lin in layer.linears.items() if not progress.done(n)} for layer in layers]
    saver = _Saver(progress, sum(len(layer.linears) for layer in layers), clock, "layers")
    for i, layer in enumerate(layers):
        linears = layer.linears
        todo = [name for name in linears if not progress.done(name)]
        stats = {}
        if needs_data and (todo or not sequential):
            with clock.phase("calibration"):
                stats, outputs = _calibrate(layer, hidden, layer_kwargs, want_gram, arch)
            pause_point("calibration")
        limits = {}
        if budget is not None and needs_data:
            budget.calibrated_layers = i + 1
        if budget is not None and todo and args.pruning_method.iterative:
            later = sum(sum(s.values()) for s in sizes[i + 1:])
            limits = budget.layer_limits(sizes[i], later, len(layers) - i - 1 if needs_data else 0)
        executor.submit(LayerJobs(i, {n: linears[n].weight for n in todo}, {n: stats.get(n) for n in todo},
                                  limits), options)
        with clock.phase("optimisation"):
            saver.save_all(executor.wait(todo) if sequential else executor.poll(), f"layer {i + 1}/{len(layers)}")
        if needs_data and sequential:
            with clock.phase("calibration"):
                for name, lin in linears.items():
                    lin.weight.copy_(fmt.reconstruct_weight(progress.load(name)[0]).to(lin.weight))
                outputs = _run_layer(layer.module, hidden, layer_kwargs)
        if needs_data:
            hidden = outputs
        saver.round_done()
    with clock.phase("optimisation"):
        saver.save_all(executor.wait(), f"layer {len(layers)}/{len(layers)}")
    saver.close()
    return saver.eta


def _walk_rounds(args: PruneArgs, model: nn.Module, windows: torch.Tensor | None, arch: Architecture,
                 layers: list[DecoderLayer], progress: Progress, executor: Executor, clock: PhaseClock,
                 budget: TimeBudget | None) -> _Eta:
    """Calibrate every layer on the dense model (keeping only the small per-input statistics), then run the jobs
    in ``depth_rounds``. The ETA is taken after the first round, from the optimisation time alone."""
    stats: dict = {}
    if windows is not None:
        with clock.phase("calibration"):
            hidden, layer_kwargs = _layer0_inputs(model, layers[0].module, windows, args.device)
            last = max((i for i, layer in enumerate(layers) if not all(map(progress.done, layer.linears))),
                       default=-1)
            for layer in tqdm(layers[:last + 1], desc="calibration", unit="layer"):
                layer_stats, hidden = _calibrate(layer, hidden, layer_kwargs, False, arch)
                stats.update(layer_stats)
                pause_point("calibration")
        if budget is not None:
            budget.calibrated_layers = len(layers)
    weights = {name: lin.weight for layer in layers for name, lin in layer.linears.items()}
    rounds = [[n for n in names if not progress.done(n)] for names in depth_rounds([list(x.linears) for x in layers])]
    rounds = [names for names in rounds if names]
    options = _job_options(args)
    saver = _Saver(progress, len(weights), clock, "rounds")
    for r, names in enumerate(rounds):
        limits = {}
        if budget is not None and args.pruning_method.iterative:
            later = sum(weights[n].numel() for later_names in rounds[r + 1:] for n in later_names)
            limits = budget.layer_limits({n: weights[n].numel() for n in names}, later, 0)
        executor.submit(LayerJobs(r, {n: weights[n] for n in names}, {n: stats.get(n) for n in names}, limits),
                        options)
        with clock.phase("optimisation"):
            saver.save_all(executor.poll(), f"round {r + 1}/{len(rounds)}")
        saver.round_done()
    with clock.phase("optimisation"):
        saver.save_all(executor.wait(), f"round {len(rounds)}/{len(rounds)}")
    saver.close()
    return saver.eta


def depth_rounds(layers: list[list[str]]) -> list[list[str]]:
    """The jobs of ``layers`` (each layer's linears in model order: q, k, v, o, gate, up, down) as rounds that
    each hold one linear of every kind, the kinds taken from layers spread evenly over the depth.

    Kind t of round r comes from layer (r + t*s + s//2) mod L with s = max(1, L // kinds): for a fixed kind
    this visits every layer once, so the rounds hold every job exactly once. SmolLM2 (30 layers, 7 kinds, s 4):
    round 0 = q of layer 2, k of 6, v of 10, o of 14, gate of 18, up of 22, down of 26."""
    n_layers = len(layers)
    kinds = max((len(x) for x in layers), default=0)
    stride = max(1, n_layers // max(kinds, 1))
    rounds = []
    for r in range(n_layers):
        picks = ((r + t * stride + stride // 2) % n_layers for t in range(kinds))
        rounds.append([layers[i][t] for t, i in enumerate(picks) if t < len(layers[i])])
    return rounds


@dataclass
class _Eta:
    """The bar's ETA after the first round of jobs (a layer, or a depth round), kept to check it against the time
    the rest really took."""

    order: str = "layers"
    predicted: float | None = None
    at: float | None = None  # run clock when the prediction was made

    def check(self, end: float) -> dict | None:
        if self.predicted is None or self.at is None:
            return None
        actual = end - self.at
        return {"order": self.order, "predicted_after_first_round_s": round(self.predicted, 1),
                "actual_s": round(actual, 1),
                "error": round((self.predicted - actual) / actual, 3) if actual > 0 else None}


class _Saver:
    """Writes finished jobs to OUT/.progress/; drives the bar (matrices done/total, mean loss, ETA).

    The ETA is the time per matrix since the saver started times the matrices left. In layer order the saver
    starts before calibration, so the rate includes the calibration still to come; in depth rounds it starts after
    it. After the first round the prediction is kept for the report's ``eta_check``."""

    def __init__(self, progress: Progress, total: int, clock: PhaseClock, order: str) -> None:
        self.progress = progress
        self.total = total
        self.clock = clock
        self.saved = sum(1 for _ in progress.dir.glob("*.safetensors"))
        self.start_saved, self.start = self.saved, clock.elapsed()
        self.losses: list[float] = []
        self.eta = _Eta(order)
        self.bar = tqdm(total=total, initial=self.saved, desc="matrices", unit="matrix", smoothing=0)

    def save_all(self, finished: Iterable[Finished], where: str) -> None:
        for done in finished:
            self.progress.save(done.name, done.tensors, done.report)
            self.saved += 1
            self.losses.append(done.report["loss_final_relative"])
            self.bar.set_postfix(self.postfix(where), refresh=False)
            self.bar.update(1)

    def predicted_left(self) -> float | None:
        new = self.saved - self.start_saved
        if new == 0:
            return None
        return (self.clock.elapsed() - self.start) / new * (self.total - self.saved)

    def round_done(self) -> None:
        if self.eta.predicted is None and self.saved > self.start_saved and self.saved < self.total:
            self.eta = _Eta(self.eta.order, self.predicted_left(), self.clock.elapsed())
            log.info("first %s done: ETA %.0f s for the other %d matrices",
                     "layer" if self.eta.order == "layers" else "depth round", self.eta.predicted,
                     self.total - self.saved)

    def postfix(self, where: str) -> dict:
        fig = {"at": where}
        if self.losses:
            fig["rel_loss"] = f"{sum(self.losses) / len(self.losses):.4f}"
        return fig

    def close(self) -> None:
        self.bar.close()


def _packable(found: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    kept = {}
    for name, lin in found.items():
        if lin.in_features % 8:
            log.warning("%s: input dimension %d is not a multiple of 8, left dense", name, lin.in_features)
        else:
            kept[name] = lin
    return kept


def _report(args: PruneArgs, source: str, reports: list[dict], clock: PhaseClock, executor: dict,
            size: fmt.Footprint, command: str | None, tuning: dict | None) -> dict:
    import transformers

    import offline_prune

    n = len(reports)
    return {
        "args": args.flat(),
        "method_options": dict(args.options),
        "source": source,
        "versions": {
            "vllm_armor": offline_prune.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "format_version": fmt.FORMAT_VERSION,
        "command": command,
        "calibration": {"data": args.calib or "self", "samples": args.calib_samples, "seqlen": args.calib_seqlen}
        if args.pruning_method.needs_calibration else None,
        "executor": executor,
        "summary": {
            "linears": n,
            "mean_loss_init_relative": sum(r["loss_init_relative"] for r in reports) / n,
            "mean_loss_final_relative": sum(r["loss_final_relative"] for r in reports) / n,
            "job_seconds": round(sum(r["seconds"] for r in reports), 3),
            "wall_seconds": round(clock.elapsed(), 3),
            "phase_seconds": clock.summary(),  # load, calibration, optimisation, write (this invocation)
            "time_budget_s": args.time_budget,
            "stopped": _count(r.get("stopped") for r in reports),  # why iterations ended, per matrix
            "optimizers": _count(r.get("optimizer") for r in reports),  # ARMOR: the one each matrix ran
            "ab_overhead": size.overhead,  # A+B parameters per kept core value
            "checkpoint_bytes": size.checkpoint_bytes,
            "dense_bytes": size.dense_bytes,  # pruned linears as dense weights in the model dtype
            "bytes_ratio": size.bytes_ratio,
            "tuning": tuning["summary"] if tuning else None,  # block tuning (offline_prune.reconstruct)
        },
        "tuning_layers": tuning["layers"] if tuning else [],
        "linears": reports,
    }


def _count(values: Iterable) -> dict:
    counts: dict = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _json(obj) -> str:
    return json.dumps(obj, indent=1) + "\n"


def _log_summary(report: dict, out: Path) -> None:
    s = report["summary"]
    args = report["args"]
    by_kind: dict[str, list[float]] = {}
    for r in report["linears"]:
        by_kind.setdefault(r["name"].rsplit(".", 1)[1], []).append(r["loss_final_relative"])
    used = f" (optimizer {', '.join(s['optimizers'])})" if s.get("optimizers") else ""
    log.info("pruned %d linears of %s with %s%s in %.1f s -> %s", s["linears"], args["model"], args["method"], used,
             s["wall_seconds"], out)
    log.info("relative proxy loss: NoWag-P %.4f -> %s %.4f (mean over linears)", s["mean_loss_init_relative"],
             args["method"], s["mean_loss_final_relative"])
    for kind, values in sorted(by_kind.items()):
        log.info("  %-10s %.4f", kind, sum(values) / len(values))
    log.info("A/B overhead %.4f parameters per kept value; weights %.3f GB = %.3fx dense", s["ab_overhead"],
             s["checkpoint_bytes"] / 1e9, s["bytes_ratio"])
    log.info("time per phase: %s", ", ".join(f"{k} {v:.1f} s" for k, v in s["phase_seconds"].items()))
    if s["stopped"]:
        log.info("iterations ended by: %s", ", ".join(f"{k} {v}" for k, v in s["stopped"].items()))
    if s["time_budget_s"] is not None:
        cut = s["stopped"].get("time_limit", 0)
        log.info("time budget %.0f s: used %.0f s; %d of %d matrices stopped early by it", s["time_budget_s"],
                 s["wall_seconds"], cut, s["linears"])
    if s.get("tuning") and s["tuning"].get("skipped"):
        log.info("block tuning skipped: %s", s["tuning"]["skipped"])
    elif s.get("tuning"):
        t = s["tuning"]
        log.info("block tuning (%g epochs, lr %g): layer output error x%s on average, last layer %s -> %s; "
                 "%d of %d layers kept their tuning, %d cut by the time budget (%d of them skipped)", t["epochs"],
                 t["lr"], t["mean_error_ratio"], *t["last_layer_error"], t["layers_kept"], t["layers"],
                 t["layers_time_limited"], t["layers_skipped"])
    if s.get("eta_check"):
        e = s["eta_check"]
        log.info("ETA after the first round (%s) %.0f s, actual %.0f s", e["order"],
                 e["predicted_after_first_round_s"], e["actual_s"])
