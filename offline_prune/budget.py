"""Time of a pruning run: the phase clock (load, calibration, optimisation, write) and ``--time-budget``.

With a budget T the walk (offline_prune.pipeline) gives every decoder layer, when its jobs are submitted, the
time still left minus what the remaining layers' calibration (measured on the layers so far) and the final write
will take, shared in proportion to the matrices' sizes (d_out x d_in): layer share = left x W_layer / W_left,
job share = layer share x w_job / W_layer, times SAFETY for the work around the optimiser (scoring, saving).
An iterative method (offline_prune.methods, ``iterative``) stops before an iteration that would end past its
share; time a job leaves unused goes to the later layers because the shares are recomputed from the clock.
Block tuning (offline_prune.reconstruct) is planned once the first layer is calibrated: its estimated cost, every
layer's passes over the data (TUNE_FORWARDS + 3 per epoch for the steps, each timed as a calibration pass), is
reserved if it is at most TUNE_SHARE of the budget; otherwise the run skips tuning and the jobs get the whole budget
(the report says so). Each layer's tuning then gets an equal share of what is left (less the write) and steps
only while its share allows.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from offline_prune.errors import UserError

PHASES = ("load", "calibration", "optimisation", "tuning", "write")
SAFETY = 0.85  # share of a job's time given to the optimiser loop
WRITE_BYTES_PER_S = 100e6  # conservative write rate for the final checkpoint (measured ~300 MB/s here)
TUNE_SHARE = 0.5  # of a --time-budget that block tuning may take; more: it is skipped
TUNE_FORWARDS = 3  # block tuning's passes of a layer over all windows besides its steps (target, before, after)
TUNE_PASSES_PER_EPOCH = 3  # forward + backward of every window, as calibration passes
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '1.5h' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--time-budget {text!r}: expected a positive duration such as 90s, 30m or 1.5h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


class PhaseClock:
    """Seconds spent per phase of the run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begun

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def summary(self) -> dict[str, float]:
        return {name: round(self.seconds.get(name, 0.0), 3) for name in PHASES}


class TimeBudget:
    """Shares ``seconds`` of wall time (counted from the run's start) across the remaining jobs."""

    def __init__(self, seconds: float, clock: PhaseClock, write_bytes: int, tune_epochs: float = 0.0,
                 layers: int = 0) -> None:
        self.seconds = seconds
        self.clock = clock
        self.write_reserve = 2.0 + write_bytes / WRITE_BYTES_PER_S
        self.tune_epochs = tune_epochs
        self.layers = layers  # decoder layers (block tuning passes over each)
        self.calibrated_layers = 0
        self.tune_planned: float | None = None  # seconds reserved for block tuning, once decided (0: skipped)

    def calibration_per_layer(self) -> float:
        return self.clock.seconds["calibration"] / max(self.calibrated_layers, 1)

    def tune_reserve(self) -> float:
        """Seconds kept for block tuning, decided once the first layer is calibrated (0: tuning is skipped)."""
        if self.tune_planned is None:
            if not self.tune_epochs:
                self.tune_planned = 0.0
            elif self.calibrated_layers:
                passes = TUNE_FORWARDS + TUNE_PASSES_PER_EPOCH * self.tune_epochs
                need = passes * self.calibration_per_layer() * self.layers
                self.tune_planned = need if need <= TUNE_SHARE * self.seconds else 0.0
            else:
                return 0.0
        return self.tune_planned

    def left(self, layers_to_calibrate: int) -> float:
        """Seconds the jobs may still use."""
        reserve = self.calibration_per_layer() * layers_to_calibrate + self.write_reserve + self.tune_reserve()
        return self.seconds - self.clock.elapsed() - reserve

    def tune_limit(self, layers_left: int) -> float:
        """Seconds of block tuning for the next layer: an equal share of the time left before the write."""
        return max(self.seconds - self.clock.elapsed() - self.write_reserve, 0.0) / max(layers_left, 1)

    def layer_limits(self, sizes: dict[str, int], later_size: int, layers_to_calibrate: int) -> dict[str, float]:
        """Seconds for each job of this layer (name -> d_out x d_in); ``later_size``: the later layers' total."""
        total = sum(sizes.values())
        layer_share = max(self.left(layers_to_calibrate), 0.0) * total / max(total + later_size, 1)
        return {name: SAFETY * layer_share * size / total for name, size in sizes.items()}
