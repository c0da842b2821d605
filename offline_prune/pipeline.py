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
4. Assemble the checkpoint (docs/FORMAT.md) and armor_report.json.
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
from offline_prune.calibration import load_calibration
from offline_prune.checkpoint import checkpoint_state, dtype_of_config, write_checkpoint
from offline_prune.executor import Executor, Finished, LayerJobs, LocalExecutor
from offline_prune.jobs import JobOptions
from offline_prune.methods import PruningMethod, get_method
from offline_prune.model_card import CARD_FILE, model_card
from offline_prune.models import UserError, resolve_model
from offline_prune.progress import PROGRESS_DIR, Progress, pause_point
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
    # Options of the method (offline_prune.methods): missing ones get the method's defaults, unknown ones are refused.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", get_method(self.method).resolve(self.options))

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
    started = time.perf_counter()
    source, tokenizer, model, out_dtype = _load(args)
    arch = architecture_of(model)
    layers = decoder_layers(model, arch, skip)
    for layer in layers:
        layer.linears = _packable(layer.linears)
    if not any(layer.linears for layer in layers):
        raise UserError(f"model {args.model!r} has no supported linear layers to prune (q/k/v/o/gate/up/down)")
    windows = None
    if args.pruning_method.needs_calibration:  # read the data before touching OUT: a bad file leaves nothing
        windows = load_calibration(args.calib or "self", tokenizer, model, args.calib_samples, args.calib_seqlen,
                                   args.seed)
    progress = Progress(out, _run_key(args, executor), overwrite)
    _walk(args, model, windows, arch, layers, progress, executor)

    names = [name for layer in layers for name in layer.linears]
    results: dict[str, dict[str, torch.Tensor]] = {}
    reports: list[dict] = []
    for name in names:  # from OUT/.progress, in model order: the same bytes however the jobs ran
        results[name], report = progress.load(name)
        reports.append(report)
    state = checkpoint_state(model, results, out_dtype)  # pruned weights are replaced by their cores
    quant = fmt.make_quant_config(args.method, args.options.get("block_size"), list(results))
    write_checkpoint(out, source, model.config, tokenizer, state, quant, out_dtype)
    pause_point("final_write")
    size = fmt.footprint({k: fmt.info_of(v) for k, v in state.items()}, list(results))
    report = _report(args, source, reports, time.perf_counter() - started, executor.describe(), size, command)
    fmt.atomic_write_text(out / REPORT_FILE, _json(report))
    fmt.atomic_write_text(out / CARD_FILE, model_card(report))
    progress.finish()  # only now: a run killed before this point is finished by a rerun
    _log_summary(report, out)
    return report


def _run_key(args: PruneArgs, executor: Executor) -> dict:
    key = args.run_key()
    job_device = executor.job_device(args.device)
    if job_device != args.device:  # e.g. a CPU driver with GPU workers: results differ from a CPU run
        key["job_device"] = job_device
    return key


def _walk(args: PruneArgs, model: nn.Module, windows: torch.Tensor | None, arch: Architecture,
          layers: list[DecoderLayer], progress: Progress, executor: Executor) -> None:
    """Calibrate layer by layer and hand the jobs to the executor; every result is saved as it arrives.

    Methods on statistics of the dense model (ARMOR, NoWag-P, magnitude) let the walk go on while jobs run.
    Sequential ones (SparseGPT, Wanda) see the pruned earlier layers: the walk waits for a layer's jobs and applies
    them before going on.
    """
    needs_data = windows is not None
    method = args.pruning_method
    sequential = method.sequential
    if needs_data:
        hidden, layer_kwargs = _layer0_inputs(model, layers[0].module, windows, args.device)
    options = _job_options(args)
    saver = _Saver(progress, sum(len(layer.linears) for layer in layers))
    bar = tqdm(list(enumerate(layers)), desc=f"{args.method} layers", unit="layer")
    for i, layer in bar:
        linears = layer.linears
        todo = [name for name in linears if not progress.done(name)]
        stats = {}
        if needs_data and (todo or not sequential):
            local = {layer.local_names[name]: lin for name, lin in linears.items()}
            with collect_stats(local, method.needs_gram, arch.shared_inputs) as local_stats:
                outputs = _run_layer(layer.module, hidden, layer_kwargs)
            stats = {name: local_stats[layer.local_names[name]] for name in linears}
            pause_point("calibration")
        executor.submit(LayerJobs(i, {n: linears[n].weight for n in todo}, {n: stats.get(n) for n in todo}), options)
        saver.save_all(executor.wait(todo) if sequential else executor.poll())
        bar.set_postfix(saver.postfix())
        if needs_data and sequential:
            for name, lin in linears.items():
                lin.weight.copy_(fmt.reconstruct_weight(progress.load(name)[0]).to(lin.weight))
            outputs = _run_layer(layer.module, hidden, layer_kwargs)
        if needs_data:
            hidden = outputs
    saver.save_all(executor.wait())
    bar.set_postfix(saver.postfix())
    bar.close()


class _Saver:
    """Writes finished jobs to OUT/.progress/ and keeps a running figure for the progress bar."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.saved = sum(1 for _ in progress.dir.glob("*.safetensors"))
        self.losses: list[float] = []

    def save_all(self, finished: Iterable[Finished]) -> None:
        for done in finished:
            self.progress.save(done.name, done.tensors, done.report)
            self.saved += 1
            self.losses.append(done.report["loss_final_relative"])

    def postfix(self) -> dict:
        fig = {"saved": f"{self.saved}/{self.total}"}
        if self.losses:
            fig["rel_loss"] = f"{sum(self.losses) / len(self.losses):.4f}"
        return fig


def _packable(found: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    kept = {}
    for name, lin in found.items():
        if lin.in_features % 8:
            log.warning("%s: input dimension %d is not a multiple of 8, left dense", name, lin.in_features)
        else:
            kept[name] = lin
    return kept


def _report(args: PruneArgs, source: str, reports: list[dict], seconds: float, executor: dict,
            size: fmt.Footprint, command: str | None) -> dict:
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
            "wall_seconds": round(seconds, 3),
            "ab_overhead": size.overhead,  # A+B parameters per kept core value
            "checkpoint_bytes": size.checkpoint_bytes,
            "dense_bytes": size.dense_bytes,  # pruned linears as dense weights in the model dtype
            "bytes_ratio": size.bytes_ratio,
        },
        "linears": reports,
    }


def _json(obj) -> str:
    return json.dumps(obj, indent=1) + "\n"


def _log_summary(report: dict, out: Path) -> None:
    s = report["summary"]
    args = report["args"]
    by_kind: dict[str, list[float]] = {}
    for r in report["linears"]:
        by_kind.setdefault(r["name"].rsplit(".", 1)[1], []).append(r["loss_final_relative"])
    log.info("pruned %d linears of %s with %s in %.1f s -> %s", s["linears"], args["model"], args["method"],
             s["wall_seconds"], out)
    log.info("relative proxy loss: NoWag-P %.4f -> %s %.4f (mean over linears)", s["mean_loss_init_relative"],
             args["method"], s["mean_loss_final_relative"])
    for kind, values in sorted(by_kind.items()):
        log.info("  %-10s %.4f", kind, sum(values) / len(values))
    log.info("A/B overhead %.4f parameters per kept value; weights %.3f GB = %.3fx dense", s["ab_overhead"],
             s["checkpoint_bytes"] / 1e9, s["bytes_ratio"])
