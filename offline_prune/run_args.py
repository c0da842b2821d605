"""What a run is asked to do (`PruneArgs`, from `armor-prune`'s flags or the Python API) and its resume key: what
must match for a rerun to continue the unfinished run in OUT/.progress (offline_prune.progress)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from offline_prune.errors import UserError
from offline_prune.methods import PruningMethod, get_method
from offline_prune.reconstruct import TUNE_LR

if TYPE_CHECKING:
    from offline_prune.executor import Executor


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
        """What must match for a rerun to resume (everything that changes the result), as far as the arguments
        say; `run_key` (the function) adds the executor's part."""
        key = self.flat()
        key.pop("out")
        return key

    def retune_keys(self) -> tuple[str, ...]:
        """The run_key fields that change block tuning only: a rerun that differs in these alone keeps the finished
        jobs and tunes again. With a time budget the tuning plan also sets the jobs' time limits: none then."""
        return () if self.time_budget is not None else ("tune_epochs", "tune_lr")

    def ab_dtype(self, out_dtype: torch.dtype) -> torch.dtype:
        """The checkpoint dtype of ARMOR's A and B (--ab-dtype): float32, or the model's ``out_dtype``."""
        return torch.float32 if self.options.get("ab_dtype") == "float32" else out_dtype


def run_key(args: PruneArgs, executor: Executor | None = None) -> dict:
    """The resume key of a run of ``args`` on ``executor`` (None: in this process), as OUT/.progress/run.json holds
    it: the arguments' key, plus the jobs' device where the executor runs them elsewhere than ``args.device`` (e.g. a
    CPU driver with GPU workers: the results differ from a CPU run)."""
    key = args.run_key()
    job_device = executor.job_device(args.device) if executor is not None else args.device
    if job_device != args.device:
        key["job_device"] = job_device
    return key
