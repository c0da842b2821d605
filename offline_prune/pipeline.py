"""The model walk: calibrate one decoder layer at a time, run the per-matrix jobs, write the checkpoint.

1. Load the model (float32 for calibration) and the calibration windows.
2. Capture the inputs of decoder layer 0 for every window (a pre-hook that stops the forward there).
3. For each decoder layer: hook its target linears and run the layer over all windows, which gives the
   statistics (h, and X^T X for SparseGPT) and the layer's outputs = the next layer's inputs. ARMOR and
   NoWag-P use statistics of the dense model; SparseGPT and Wanda see the already-pruned earlier layers
   (their papers' setting), so for them the layer is pruned and run again to produce its outputs.
   Every finished matrix is saved to OUT/.progress/ at once (resume).
4. Assemble the checkpoint (docs/FORMAT.md) and armor_report.json.
Peak memory is the model plus one layer's activations for all windows.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from offline_prune import methods
from offline_prune.calibration import load_calibration
from offline_prune.checkpoint import checkpoint_state, dtype_of_config, write_checkpoint
from offline_prune.models import UserError, decoder_layers, resolve_model, target_linears
from offline_prune.progress import Progress
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
    block_size: int = 128
    optimizer: str = "fast"
    iters: int = 2000
    skip: str | None = None
    device: str = "cpu"

    def run_key(self) -> dict:
        """What must match for a rerun to resume (everything that changes the result)."""
        key = asdict(self)
        key.pop("out")
        if self.method != "armor":
            for name in ("block_size", "optimizer", "iters"):
                key.pop(name)
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
def _layer0_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, device: str):
    """Hidden states entering decoder layer 0 for every window, and the layer's keyword arguments."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def stop(_module, args, kw):
        captured.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
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


def _options(args: PruneArgs) -> methods.JobOptions:
    return methods.JobOptions(args.method, args.block_size, args.optimizer, args.iters, args.seed, args.device)


@torch.no_grad()
def prune(args: PruneArgs, overwrite: bool = False) -> dict:
    """Run the whole job; return the report (also written to OUT/armor_report.json)."""
    if args.method not in methods.METHODS:
        raise UserError(f"--method {args.method!r}: choose one of {', '.join(methods.METHODS)}")
    skip = re.compile(args.skip) if args.skip else None
    out = Path(args.out)
    started = time.perf_counter()
    source, tokenizer, model, out_dtype = _load(args)
    layers = decoder_layers(model)
    linears_per_layer = [
        target_linears(layer, skip, f"model.layers.{i}") for i, layer in enumerate(layers)
    ]
    linears_per_layer = [_packable(found) for found in linears_per_layer]
    if not any(linears_per_layer):
        raise UserError(f"model {args.model!r} has no supported linear layers to prune (q/k/v/o/gate/up/down)")
    needs_data = args.method in methods.NEEDS_CALIBRATION
    if needs_data:  # read the data before touching OUT: a bad file leaves nothing behind
        windows = load_calibration(args.calib or "self", tokenizer, model, args.calib_samples, args.calib_seqlen,
                                   args.seed)
    progress = Progress(out, args.run_key(), overwrite)
    if needs_data:
        hidden, layer_kwargs = _layer0_inputs(model, layers, windows, args.device)
    options = _options(args)
    sequential = args.method in methods.SEQUENTIAL_METHODS
    results: dict[str, dict[str, torch.Tensor]] = {}
    reports: list[dict] = []
    bar = tqdm(list(enumerate(layers)), desc=f"{args.method} layers", unit="layer")
    for i, layer in bar:
        linears = linears_per_layer[i]
        local = {name.removeprefix(f"model.layers.{i}."): lin for name, lin in linears.items()}
        todo = [name for name in linears if not progress.done(name)]
        stats = {}
        if needs_data and (todo or not sequential):
            with collect_stats(local, want_gram=args.method == "sparsegpt") as local_stats:
                outputs = _run_layer(layer, hidden, layer_kwargs)
            stats = {f"model.layers.{i}.{k}": v for k, v in local_stats.items()}
        for name in linears:
            if name in todo:
                job = methods.run_job(name, linears[name].weight, stats.get(name), options)
                progress.save(name, job.tensors, job.report)
            results[name], report = progress.load(name)
            reports.append(report)
        if linears:
            mean = sum(r["loss_final_relative"] for r in reports[-len(linears):]) / len(linears)
            bar.set_postfix(rel_loss=f"{mean:.4f}")
        if needs_data and sequential:
            for name, lin in linears.items():
                lin.weight.copy_(fmt.reconstruct_weight(results[name]).to(lin.weight))
            outputs = _run_layer(layer, hidden, layer_kwargs)
        if needs_data:
            hidden = outputs

    state = checkpoint_state(model, results, out_dtype)  # pruned weights are replaced by their cores
    quant = fmt.make_quant_config(args.method, args.block_size if args.method == "armor" else None, list(results))
    write_checkpoint(out, source, model.config, tokenizer, state, quant, out_dtype)
    report = _report(args, source, reports, time.perf_counter() - started)
    (out / REPORT_FILE).write_text(_json(report))
    progress.finish()
    _log_summary(report, out)
    return report


def _packable(found: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    kept = {}
    for name, lin in found.items():
        if lin.in_features % 8:
            log.warning("%s: input dimension %d is not a multiple of 8, left dense", name, lin.in_features)
        else:
            kept[name] = lin
    return kept


def _report(args: PruneArgs, source: str, reports: list[dict], seconds: float) -> dict:
    import transformers

    import offline_prune

    n = len(reports)
    return {
        "args": asdict(args),
        "source": source,
        "versions": {
            "vllm_armor": offline_prune.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "format_version": fmt.FORMAT_VERSION,
        "summary": {
            "linears": n,
            "mean_loss_init_relative": sum(r["loss_init_relative"] for r in reports) / n,
            "mean_loss_final_relative": sum(r["loss_final_relative"] for r in reports) / n,
            "job_seconds": round(sum(r["seconds"] for r in reports), 3),
            "wall_seconds": round(seconds, 3),
        },
        "linears": reports,
    }


def _json(obj) -> str:
    import json

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
