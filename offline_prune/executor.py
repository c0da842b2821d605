"""Where the per-matrix jobs run: the layer walk submits them, an executor runs them and hands back results.

`LocalExecutor` runs each job in this process when its results are asked for (the single-process pipeline);
`PoolExecutor` runs them in worker processes of one thread each (bench/convergence_curve.py);
`offline_prune.distributed.RayExecutor` runs them as Ray tasks. The walk (offline_prune.walk) does:

    executor.submit(layer_jobs, options)   # after calibrating a layer
    for done in executor.poll(): save      # whatever has finished (Ray: without waiting, but bounded)
    for done in executor.wait(names): save # sequential methods: this layer's jobs before the next layer
    ...
    for done in executor.wait(): save      # at the end: everything
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from offline_prune import jobs
from offline_prune.jobs import Finished
from offline_prune.methods import TIME_LIMIT
from offline_prune.statistics import InputStats

JobFn = Callable[[str, torch.Tensor, "InputStats | None", jobs.JobOptions], Finished]


@dataclass
class LayerJobs:
    """The jobs of one decoder layer: the weights still to prune and their input statistics."""

    index: int
    weights: dict[str, torch.Tensor]  # full module name -> weight
    stats: dict[str, InputStats | None]  # full module name -> statistic (q/k/v and gate/up share one object)
    time_limits: dict[str, float] = field(default_factory=dict)  # --time-budget: seconds per job (iterative methods)

    def job_options(self, name: str, options: jobs.JobOptions) -> jobs.JobOptions:
        """The run's options, plus this job's time limit when it has one."""
        if name not in self.time_limits:
            return options
        return replace(options, options=(*options.options, (TIME_LIMIT, self.time_limits[name])))


class Executor(Protocol):
    runs_beside_walk: bool  # jobs run while the walk calibrates (worker processes, Ray); False: only when asked

    def submit(self, layer: LayerJobs, options: jobs.JobOptions) -> None: ...

    def poll(self) -> Iterator[Finished]:
        """Finished jobs; blocks only as much as the executor needs to bound the work in flight."""
        ...

    def wait(self, names: Collection[str] | None = None) -> Iterator[Finished]:
        """Finished jobs until every job in ``names`` (None: every submitted job) has been yielded."""
        ...

    def job_device(self, device: str) -> str:
        """The device the jobs run on when the driver calibrates on ``device``."""
        ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def _call_run_job(module: str, weight: torch.Tensor, stats: InputStats | None,
                  options: jobs.JobOptions) -> Finished:
    return jobs.run_job(module, weight, stats, options)  # looked up at call time (tests patch it)


class LocalExecutor:
    """Runs the jobs one after another in this process, each when the walk asks for results."""

    runs_beside_walk = False

    def __init__(self, job: JobFn = _call_run_job) -> None:
        self._job = job
        self._queue: list[tuple[str, torch.Tensor, InputStats | None, jobs.JobOptions]] = []

    def submit(self, layer: LayerJobs, options: jobs.JobOptions) -> None:
        self._queue.extend((name, w, layer.stats[name], layer.job_options(name, options))
                           for name, w in layer.weights.items())

    def poll(self) -> Iterator[Finished]:
        return self.wait()

    def wait(self, names: Collection[str] | None = None) -> Iterator[Finished]:
        while self._queue:
            name, weight, stats, options = self._queue.pop(0)
            yield self._job(name, weight, stats, options)

    def job_device(self, device: str) -> str:
        return device

    def describe(self) -> dict:
        return {"kind": "local"}

    def close(self) -> None:
        self._queue.clear()


def _one_thread() -> None:
    torch.set_num_threads(1)


class PoolExecutor:
    """Runs the jobs in ``workers`` processes of one torch thread each (spawned), in submission order.

    For a machine whose cores one job's thread pool does not fill (small matrices); ``job`` must be a module-level
    function (it is sent to the workers by name)."""

    runs_beside_walk = True

    def __init__(self, workers: int, job: JobFn = _call_run_job) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self._job = job
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_one_thread)
        self._futures: dict = {}  # name -> Future, until yielded

    def submit(self, layer: LayerJobs, options: jobs.JobOptions) -> None:
        for name, w in layer.weights.items():
            self._futures[name] = self._pool.submit(self._job, name, w, layer.stats[name],
                                                    layer.job_options(name, options))

    def poll(self) -> Iterator[Finished]:
        for name in [n for n, f in self._futures.items() if f.done()]:
            yield self._finished(name)

    def wait(self, names: Collection[str] | None = None) -> Iterator[Finished]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        pending = set(self._futures if names is None else names) & set(self._futures)
        while pending:
            wait_futures([self._futures[n] for n in pending], return_when=FIRST_COMPLETED)
            for name in [n for n in pending if self._futures[n].done()]:
                pending.discard(name)
                yield self._finished(name)

    def _finished(self, name: str) -> Finished:
        return self._futures.pop(name).result()

    def job_device(self, device: str) -> str:
        return device

    def describe(self) -> dict:
        return {"kind": "process-pool", "workers": self.workers}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
