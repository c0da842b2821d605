"""Crash-safe progress under OUT/.progress/: one safetensors file per finished linear, written atomically.

A rerun of the same command finds the finished linears and continues; a rerun with other arguments is refused
unless --overwrite (which starts over), except one that differs only in block tuning's settings (`retune_keys`): it
keeps the finished linears and starts tuning over. Every file is written to a temporary name, fsynced and renamed
(`checkpoint_format.atomic_save_file`), so a kill -9 at any moment leaves either the whole file or none, never half
a file that a rerun would trust. The final checkpoint is written while .progress/ still exists; only then is
.progress/ retired (renamed, then removed), so a run killed during its final write is finished by a rerun.

`pause_point` is a test hook: with ARMOR_PRUNE_PAUSE_AT=POINT[:N] in the environment, the N-th time the run passes
POINT it writes ``ARMOR_PRUNE_PAUSED POINT`` to stderr and sleeps, so that a test can SIGKILL it right there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from offline_prune.errors import UserError
from vllm_armor import checkpoint_format as fmt

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
PROGRESS_DIR = ".progress"
TUNED_DIR = "tuned"  # block-tuned layers (offline_prune.reconstruct), one file per decoder layer
RETIRED_DIR = ".progress.done"  # .progress/ renamed once the checkpoint is complete, then removed
PAUSE_ENV = "ARMOR_PRUNE_PAUSE_AT"
PAUSE_MARK = "ARMOR_PRUNE_PAUSED"
_pause_hits: dict[str, int] = {}


def remove_retired(out: Path) -> None:
    """Remove what a run killed while removing its retired progress (`Progress.finish`) left behind."""
    shutil.rmtree(out / RETIRED_DIR, ignore_errors=True)


def pause_point(point: str) -> None:
    """Test hook (see the module docstring); does nothing unless ARMOR_PRUNE_PAUSE_AT names ``point``."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _pause_hits[point] = _pause_hits.get(point, 0) + 1
    if _pause_hits[point] == int(nth or 1):
        sys.stderr.write(f"{PAUSE_MARK} {point}\n")
        sys.stderr.flush()
        time.sleep(3600)


class Progress:
    def __init__(self, out: Path, run_args: dict, overwrite: bool, retune_keys: tuple[str, ...] = ()) -> None:
        self.dir = out / PROGRESS_DIR
        if overwrite and out.exists():
            shutil.rmtree(out)
        remove_retired(out)
        if out.exists() and any(out.iterdir()) and not (self.dir / RUN_FILE).exists():
            raise UserError(f"output folder {out} exists and is not an unfinished run: pass --overwrite to replace it")
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / RUN_FILE
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            diff = sorted(k for k in set(previous) | set(run_args) if previous.get(k) != run_args.get(k))
            if diff and set(diff) <= set(retune_keys):
                self._retune(run_args, {k: (previous.get(k), run_args.get(k)) for k in diff})
            elif diff:
                raise UserError(
                    f"{out} holds an unfinished run with other arguments (differ: {', '.join(diff)}); "
                    "rerun the same command to resume, or pass --overwrite to start over"
                )
        else:
            fmt.atomic_write_text(run_file, json.dumps(run_args, indent=1, sort_keys=True))

    def _retune(self, run_args: dict, changed: dict[str, tuple]) -> None:
        """Other tuning settings: drop the tuned layers (first, so that a kill in between leaves no tuned layer that
        the new settings would trust), then record the new arguments."""
        done = len(list(self.dir.glob("*.safetensors")))
        shutil.rmtree(self.dir / TUNED_DIR, ignore_errors=True)
        fmt.atomic_write_text(self.dir / RUN_FILE, json.dumps(run_args, indent=1, sort_keys=True))
        log.info("%s: block tuning settings changed (%s): the %d finished linears are kept, tuning starts over",
                 self.dir.parent, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), done)

    @classmethod
    def existing(cls, out: Path) -> Progress:
        """The unfinished run in ``out`` as it stands, without the argument check: for a process that only adds
        finished work to it (bench/convergence_curve.py's workers)."""
        progress = cls.__new__(cls)
        progress.dir = out / PROGRESS_DIR
        if not (progress.dir / RUN_FILE).is_file():
            raise UserError(f"{out} is not an unfinished run (no {PROGRESS_DIR}/{RUN_FILE})")
        return progress

    def _file(self, module: str) -> Path:
        return self.dir / f"{module}.safetensors"

    def done(self, module: str) -> bool:
        return self._file(module).exists()

    def save(self, module: str, tensors: dict[str, torch.Tensor], report: dict) -> None:
        fmt.atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, self._file(module),
                             metadata={"report": json.dumps(report)},
                             before_replace=lambda: pause_point("progress_write"))

    def load(self, module: str) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(self._file(module), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            report = json.loads(f.metadata()["report"])
        return tensors, report

    def _tuned_file(self, layer: int) -> Path:
        return self.dir / TUNED_DIR / f"layer-{layer:05d}.safetensors"

    def save_tuned(self, layer: int, tensors: dict[str, dict[str, torch.Tensor]], report: dict) -> None:
        """The block-tuned format tensors (module -> suffix -> tensor) of decoder layer ``layer``."""
        self._tuned_file(layer).parent.mkdir(exist_ok=True)
        flat = {fmt.tensor_name(module, s): t.contiguous() for module, ts in tensors.items() for s, t in ts.items()}
        modules = sorted(tensors)
        fmt.atomic_save_file(flat, self._tuned_file(layer),
                             metadata={"report": json.dumps(report), "modules": json.dumps(modules)})

    def load_tuned(self, layer: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
        file = self._tuned_file(layer)
        if not file.exists():
            return None
        with safe_open(file, framework="pt") as f:
            flat = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        return {m: fmt.linear_tensors(flat, m) for m in json.loads(meta["modules"])}, json.loads(meta["report"])

    def finish(self) -> None:
        """Retire .progress/ in one step (the checkpoint beside it is complete), then remove it."""
        retired = self.dir.parent / RETIRED_DIR
        os.replace(self.dir, retired)
        pause_point("retire")
        shutil.rmtree(retired)
