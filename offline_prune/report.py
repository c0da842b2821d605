"""The run's report, OUT/armor_report.json: its typed schema (`Report` and the records in it), how a run fills it,
the check that OUT already holds the finished run of the same arguments, and the summary logged at the end.

The report is also the model card's source (offline_prune.model_card) and what a rerun compares its arguments to.
No `from __future__ import annotations` here: TypedDict reads NotRequired from evaluated annotations.
"""

import json
import logging
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch

from offline_prune.progress import PROGRESS_DIR
from offline_prune.run import Run
from offline_prune.run_args import PruneArgs
from vllm_armor import checkpoint_format as fmt

log = logging.getLogger(__name__)
REPORT_FILE = "armor_report.json"


class Versions(TypedDict):
    vllm_armor: str
    torch: str
    transformers: str
    python: str


class Calibration(TypedDict):
    data: str  # c4:PATH, text:PATH or self
    samples: int
    seqlen: int


class TuningSummary(TypedDict):
    """Block tuning (offline_prune.reconstruct) over the whole model; only the first three and ``skipped`` when
    the time budget could not hold it."""

    epochs: float
    lr: float
    layers: int
    layers_kept: NotRequired[int]
    layers_time_limited: NotRequired[int]
    mean_error_ratio: NotRequired[float | None]
    last_layer_error: NotRequired[list[float | None] | None]
    layers_skipped: NotRequired[int]
    skipped: NotRequired[str]


class TuningLayer(TypedDict):
    layer: int
    loss_before: float | None  # None: skipped for want of time
    loss_after: float | None
    steps: int
    stopped: str  # "steps" or "time_limit"
    kept: bool  # False: the tuning raised the loss, the layer kept its untuned tensors
    seconds: float


class EtaCheck(TypedDict):
    order: str  # "layers" or "rounds"
    predicted_after_first_round_s: float
    actual_s: float
    error: float | None


class LinearReport(TypedDict):
    """One pruned linear (offline_prune.jobs), then the method's own keys (e.g. ARMOR: optimizer, stopped)."""

    name: str
    shape: list[int]
    method: str
    loss_init: float  # NoWag-P's proxy loss (ARMOR's starting point)
    loss_init_relative: float
    loss_final: float  # the method's
    loss_final_relative: float
    iterations: int
    seconds: float


class Summary(TypedDict):
    linears: int
    mean_loss_init_relative: float
    mean_loss_final_relative: float
    job_seconds: float
    wall_seconds: float
    phase_seconds: dict[str, float]  # load, calibration, optimisation, tuning, write (this invocation)
    time_budget_s: float | None
    stopped: dict[str, int]  # why iterations ended, per matrix
    optimizers: dict[str, int]  # ARMOR: the one each matrix ran
    ab_overhead: float  # A+B parameters per kept core value
    checkpoint_bytes: int
    dense_bytes: int  # pruned linears as dense weights in the model dtype
    bytes_ratio: float
    tuning: TuningSummary | None
    eta_check: NotRequired[EtaCheck | None]  # added once the run ends


class Report(TypedDict):
    args: dict[str, Any]  # PruneArgs.flat(): the generic fields and the method's options
    method_options: dict[str, Any]
    source: str
    versions: Versions
    format_version: int
    command: str | None
    calibration: Calibration | None  # None: the method uses no calibration data
    executor: dict[str, Any]
    summary: Summary
    tuning_layers: list[TuningLayer]
    linears: list[LinearReport]


class Tuning(TypedDict):
    summary: TuningSummary
    layers: list[TuningLayer]


def build_report(run: Run, linears: list[LinearReport], size: fmt.Footprint, tuning: Tuning | None) -> Report:
    """The report of ``run`` from its linears' reports (model order), the checkpoint's footprint, block tuning."""
    args = run.args
    n = len(linears)
    calibration = None
    if args.pruning_method.needs_calibration:
        calibration = Calibration(data=args.calib or "self", samples=args.calib_samples, seqlen=args.calib_seqlen)
    summary = Summary(
        linears=n,
        mean_loss_init_relative=sum(r["loss_init_relative"] for r in linears) / n,
        mean_loss_final_relative=sum(r["loss_final_relative"] for r in linears) / n,
        job_seconds=round(sum(r["seconds"] for r in linears), 3),
        wall_seconds=round(run.clock.elapsed(), 3), phase_seconds=run.clock.summary(), time_budget_s=args.time_budget,
        stopped=_count(r.get("stopped") for r in linears), optimizers=_count(r.get("optimizer") for r in linears),
        ab_overhead=size.overhead, checkpoint_bytes=size.checkpoint_bytes, dense_bytes=size.dense_bytes,
        bytes_ratio=size.bytes_ratio, tuning=tuning["summary"] if tuning else None,
    )
    return Report(args=args.flat(), method_options=dict(args.options), source=run.source, versions=_versions(),
                  format_version=fmt.FORMAT_VERSION, command=run.command, calibration=calibration,
                  executor=run.executor.describe(),
                  summary=summary, tuning_layers=tuning["layers"] if tuning else [], linears=linears)


def _versions() -> Versions:
    import transformers

    import offline_prune

    return Versions(vllm_armor=offline_prune.__version__, torch=torch.__version__,
                    transformers=transformers.__version__, python=platform.python_version())


def _count(values: Iterable) -> dict:
    counts: dict = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def write_report(out: Path, report: Report) -> None:
    fmt.atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=1) + "\n")


def finished_report(out: Path, args: PruneArgs) -> Report | None:
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


def log_summary(report: Report, out: Path) -> None:
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
    _log_tuning(s)


def _log_tuning(s: Summary) -> None:
    t = s.get("tuning")
    if t and t.get("skipped"):
        log.info("block tuning skipped: %s", t["skipped"])
    elif t:
        log.info("block tuning (%g epochs, lr %g): layer output error x%s on average, last layer %s -> %s; "
                 "%d of %d layers kept their tuning, %d cut by the time budget (%d of them skipped)", t["epochs"],
                 t["lr"], t["mean_error_ratio"], *t["last_layer_error"], t["layers_kept"], t["layers"],
                 t["layers_time_limited"], t["layers_skipped"])
    e = s.get("eta_check")
    if e:
        log.info("ETA after the first round (%s) %.0f s, actual %.0f s", e["order"],
                 e["predicted_after_first_round_s"], e["actual_s"])

