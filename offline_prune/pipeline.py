"""The pruner's run, end to end: `prune(PruneArgs)` (what `armor-prune` calls).

1. Load the model (float32 for calibration) and the calibration windows (offline_prune.run: the run object every
   step takes; its arguments and resume key: offline_prune.run_args).
2. The walk (offline_prune.walk): capture the inputs of decoder layer 0 (offline_prune.capture), calibrate the
   layers (h, and X^T X for SparseGPT), hand the per-matrix jobs (offline_prune.jobs) to an executor
   (offline_prune.executor: in this process, or Ray tasks with --ray, offline_prune.distributed); every finished
   matrix is saved to OUT/.progress/ as it arrives (offline_prune.saver, offline_prune.progress: resume).
   ARMOR and NoWag-P use statistics of the dense model; SparseGPT and Wanda see the already-pruned earlier layers.
   What a method needs and its options come from its registry entry (offline_prune.methods); the layers and
   linears from offline_prune.architectures.
3. Block tuning (offline_prune.tuning, the method in offline_prune.reconstruct; ARMOR's default, --tune-epochs):
   tune each layer's pruned linears so that the layer fed the pruned stream reproduces the dense layer's outputs.
4. Assemble the checkpoint (docs/FORMAT.md, offline_prune.checkpoint), armor_report.json (offline_prune.report)
   and the model card.
Peak memory is the model plus one layer's activations for all windows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from offline_prune.checkpoint import checkpoint_state, write_checkpoint
from offline_prune.executor import Executor, LocalExecutor
from offline_prune.model_card import CARD_FILE, model_card
from offline_prune.progress import pause_point, remove_retired
from offline_prune.report import Report, Tuning, build_report, finished_report, log_summary, write_report
from offline_prune.run import Run, open_run
from offline_prune.run_args import PruneArgs
from offline_prune.tuning import Tuned, block_tuning
from offline_prune.walk import walk
from vllm_armor import checkpoint_format as fmt

log = logging.getLogger(__name__)


@torch.no_grad()
def prune(args: PruneArgs, overwrite: bool = False, executor: Executor | None = None,
          command: str | None = None) -> Report:
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


def _prune(args: PruneArgs, overwrite: bool, executor: Executor, command: str | None) -> Report:
    out = Path(args.out)
    finished = None if overwrite else finished_report(out, args)
    if finished is not None:
        remove_retired(out)  # a kill while the finished run removed its progress
        log.info("%s already holds the finished run of these arguments: nothing to do", out)
        return finished
    run = open_run(args, overwrite, executor, command)
    eta = walk(run)
    eta_check = eta.check(run.clock.elapsed())  # the jobs' ETA is checked against the jobs (tuning has its own bar)
    tuned, tuning = block_tuning(run)
    with run.clock.phase("write"):
        report = write_output(run, tuned, tuning)
    report["summary"].update(wall_seconds=round(run.clock.elapsed(), 3), phase_seconds=run.clock.summary(),
                             eta_check=eta_check)
    write_report(out, report)
    run.progress.finish()  # only now: a run killed before this point is finished by a rerun
    log_summary(report, out)
    return report


def write_output(run: Run, tuned: Tuned, tuning: Tuning | None) -> Report:
    """The checkpoint from OUT/.progress (and the tuned layers), then its report and model card."""
    names = [name for layer in run.layers for name in layer.linears]
    results: Tuned = {}
    reports = []
    for name in names:  # from OUT/.progress, in model order: the same bytes however the jobs ran
        results[name], report = run.progress.load(name)
        results[name] = tuned.get(name, results[name])
        reports.append(report)
    # pruned weights are replaced by their cores
    state = checkpoint_state(run.model, results, run.out_dtype, run.ab_dtype)
    size = fmt.footprint({k: fmt.info_of(v) for k, v in state.items()}, list(results))
    options = run.args.options
    quant = fmt.make_quant_config(run.args.method, options.get("block_size"), list(results),
                                  options.get("max_overhead") if options.get("block_size") == "auto" else None, size)
    write_checkpoint(run.out, run.source, run.model.config, run.tokenizer, state, quant, run.out_dtype)
    pause_point("final_write")
    report = build_report(run, reports, size, tuning)
    write_report(run.out, report)
    fmt.atomic_write_text(run.out / CARD_FILE, model_card(report))
    return report
