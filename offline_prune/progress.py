"""Crash-safe progress under OUT/.progress/: one safetensors file per finished linear, written atomically.

A rerun of the same command finds the finished linears and continues; a rerun with other arguments is
refused unless --overwrite (which starts over).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offline_prune.models import UserError

RUN_FILE = "run.json"


class Progress:
    def __init__(self, out: Path, run_args: dict, overwrite: bool) -> None:
        self.dir = out / ".progress"
        if overwrite and out.exists():
            shutil.rmtree(out)
        if out.exists() and any(out.iterdir()) and not (self.dir / RUN_FILE).exists():
            raise UserError(f"output folder {out} exists and is not an unfinished run: pass --overwrite to replace it")
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / RUN_FILE
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != run_args:
                diff = sorted(k for k in set(previous) | set(run_args) if previous.get(k) != run_args.get(k))
                raise UserError(
                    f"{out} holds an unfinished run with other arguments (differ: {', '.join(diff)}); "
                    "rerun the same command to resume, or pass --overwrite to start over"
                )
        else:
            _atomic_write_text(run_file, json.dumps(run_args, indent=1, sort_keys=True))

    def _file(self, module: str) -> Path:
        return self.dir / f"{module}.safetensors"

    def done(self, module: str) -> bool:
        return self._file(module).exists()

    def save(self, module: str, tensors: dict[str, torch.Tensor], report: dict) -> None:
        path = self._file(module)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"report": json.dumps(report)})
        os.replace(tmp, path)

    def load(self, module: str) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(self._file(module), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            report = json.loads(f.metadata()["report"])
        return tensors, report

    def finish(self) -> None:
        shutil.rmtree(self.dir)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
