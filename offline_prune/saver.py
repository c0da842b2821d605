"""The walk's saver: every finished job goes to OUT/.progress/ as it arrives, while a bar shows matrices done/total,
the mean relative loss and the ETA; the ETA after the first round is kept to check it against the real time."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from tqdm import tqdm

from offline_prune.budget import PhaseClock
from offline_prune.jobs import Finished
from offline_prune.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Eta:
    """The bar's ETA after the first round of jobs (a layer, or a depth round), kept to check it against the time
    the rest really took."""

    order: str = "layers"
    predicted: float | None = None
    at: float | None = None  # run clock when the prediction was made

    def check(self, end: float) -> dict | None:
        """The report's ``summary.eta_check`` (offline_prune.report.EtaCheck), None without a prediction."""
        if self.predicted is None or self.at is None:
            return None
        actual = end - self.at
        return {"order": self.order, "predicted_after_first_round_s": round(self.predicted, 1),
                "actual_s": round(actual, 1),
                "error": round((self.predicted - actual) / actual, 3) if actual > 0 else None}


class Saver:
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
        self.eta = Eta(order)
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
            self.eta = Eta(self.eta.order, self.predicted_left(), self.clock.elapsed())
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
