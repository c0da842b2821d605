"""The per-matrix jobs as Ray tasks (`armor-prune --ray`). Imported only then: without --ray nothing imports Ray.

Each job is one Ray task (`jobs.run_job` on a worker) with one GPU (`--gpus-per-job`, fractional allowed) when
the cluster has GPUs, else `--cpus-per-job` CPUs. What a job needs travels through the object store exactly once:
the driver `ray.put`s every distinct statistic of a decoder layer once (q/k/v share one, gate/up share one) and
every weight once, and passes the references, so a layer costs one put per statistic and per matrix, never one
per (matrix, statistic) pair. Results come back to the driver, which saves each into OUT/.progress/ as it
arrives (`ray.wait`), so resume works exactly as without Ray.

Failures: a task whose worker dies (process killed, node lost) is retried up to `--max-retries` times by Ray;
an exception raised by the job itself is not retried (a genuine error repeats). When a job is lost for good, or
fails, the driver first saves every other finished job, cancels the rest and raises; a rerun resumes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace

import ray
import torch
from ray.exceptions import RayError, RayTaskError

from offline_prune import jobs
from offline_prune.errors import UserError
from offline_prune.executor import JobFn, LayerJobs
from offline_prune.jobs import Finished
from offline_prune.statistics import InputStats

log = logging.getLogger(__name__)

LOCAL = "local"  # --ray without an address: start a Ray instance on this machine


class JobLostError(UserError):
    """A job could not be completed on the cluster (its retries ran out, or it failed)."""


@dataclass(frozen=True)
class RayOptions:
    address: str = LOCAL  # "local", "auto" (join the cluster started with `ray start`), or host:port / ray://...
    gpus_per_job: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU tasks)
    cpus_per_job: float = 1.0
    max_retries: int = 3  # retries of a task whose worker or node died
    num_cpus: int | None = None  # CPUs of a local instance (None: all cores)
    max_in_flight: int | None = None  # jobs submitted but not yet saved (None: 2 x the cluster's parallel slots)


def _remote_job(job: JobFn, threads: int, module: str, weight: torch.Tensor, stats: InputStats | None,
                options: jobs.JobOptions) -> tuple[dict[str, torch.Tensor], dict]:
    """Body of a Ray task; returns what the driver saves.

    ``threads``: torch's intra-op threads for the job. CPU results of some methods (SparseGPT: measured) depend in the
    last bits on it, so it is fixed (= the job's whole CPUs) rather than left to the worker's environment.
    """
    torch.set_num_threads(threads)
    result = job(module, weight, stats, options)
    return result.tensors, result.report


def _cpu_stats(stats: InputStats) -> InputStats:
    out = copy.copy(stats)
    out.h = stats.h.cpu()
    out.gram = stats.gram.cpu() if stats.gram is not None else None
    return out


def _connect(options: RayOptions) -> bool:
    """Connect to (or start) Ray; True when this executor owns the connection and must shut it down."""
    if ray.is_initialized():
        log.info("ray: using this process's existing Ray connection")
        return False
    try:
        if options.address == LOCAL:
            ray.init(address="local", num_cpus=options.num_cpus, include_dashboard=False)
        else:
            ray.init(address=options.address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"--ray {options.address}: cannot start or join a Ray cluster: {err}") from err
    return True


class RayExecutor:
    """Submits each matrix as a Ray task; yields results as they finish."""

    runs_beside_walk = True

    def __init__(self, options: RayOptions | None = None, job: JobFn = jobs.run_job) -> None:
        self.options = options or RayOptions()
        self._job = job
        self._owns = _connect(self.options)
        try:
            self._resources = ray.cluster_resources()
            self._gpus, self._slots = self._placement()
        except BaseException:
            self.close()
            raise
        self._max_in_flight = self.options.max_in_flight or 2 * self._slots
        self._threads = max(1, math.floor(self.options.cpus_per_job))
        self._task = ray.remote(_remote_job)
        self._task_options = dict(num_cpus=self.options.cpus_per_job, num_gpus=self._gpus,
                                  max_retries=self.options.max_retries, retry_exceptions=False)
        self._pending: dict[ray.ObjectRef, str] = {}
        log.info("ray: cluster %s; %s and %d torch threads per job; %d jobs at a time; at most %d in flight",
                 {k: v for k, v in self._resources.items() if k in ("CPU", "GPU")},
                 f"{self._gpus:g} GPU" if self._gpus else f"{self.options.cpus_per_job:g} CPU", self._threads,
                 self._slots, self._max_in_flight)

    def _placement(self) -> tuple[float, int]:
        """(GPUs per job, how many jobs the cluster runs at once); refuses requests it can never place."""
        cluster_gpus = self._resources.get("GPU", 0.0)
        cluster_cpus = self._resources.get("CPU", 0.0)
        gpus = self.options.gpus_per_job
        if gpus is None:
            gpus = 1.0 if cluster_gpus > 0 else 0.0
        if gpus < 0 or self.options.cpus_per_job < 0 or self.options.max_retries < 0:
            raise UserError("--gpus-per-job, --cpus-per-job and --max-retries must not be negative")
        if gpus > 0 and cluster_gpus < gpus:
            raise UserError(f"--gpus-per-job {gpus:g}: the Ray cluster has {cluster_gpus:g} GPUs")
        if self.options.cpus_per_job > cluster_cpus:
            raise UserError(f"--cpus-per-job {self.options.cpus_per_job:g}: the Ray cluster has {cluster_cpus:g} CPUs")
        limits = [cluster_cpus / self.options.cpus_per_job] if self.options.cpus_per_job > 0 else [cluster_cpus]
        if gpus > 0:
            limits.append(cluster_gpus / gpus)
        return gpus, max(1, math.floor(min(limits) + 1e-9))

    def job_device(self, device: str) -> str:
        return "cuda" if self._gpus > 0 else "cpu"

    def describe(self) -> dict:
        return {
            "kind": "ray", "address": self.options.address,
            "cluster": {k: v for k, v in self._resources.items() if k in ("CPU", "GPU")},
            "gpus_per_job": self._gpus, "cpus_per_job": self.options.cpus_per_job,
            "threads_per_job": self._threads,
            "max_retries": self.options.max_retries, "max_in_flight": self._max_in_flight,
        }

    def submit(self, layer: LayerJobs, options: jobs.JobOptions) -> None:
        job_options = replace(options, device=self.job_device(options.device))
        stat_refs: dict[int, ray.ObjectRef] = {}  # one put per distinct statistic object of the layer
        for name, weight in layer.weights.items():
            stats = layer.stats[name]
            stats_ref = None
            if stats is not None:
                if id(stats) not in stat_refs:
                    stat_refs[id(stats)] = ray.put(_cpu_stats(stats))
                stats_ref = stat_refs[id(stats)]
            weight_ref = ray.put(weight.detach().cpu())
            task = self._task.options(name=name, **self._task_options)
            ref = task.remote(self._job, self._threads, name, weight_ref, stats_ref, job_options)
            self._pending[ref] = name

    def poll(self) -> Iterator[Finished]:
        yield from self._take(len(self._pending), timeout=0)
        while len(self._pending) > self._max_in_flight:
            yield from self._take(1, timeout=None)

    def wait(self, names: Collection[str] | None = None) -> Iterator[Finished]:
        def outstanding() -> bool:
            return any(names is None or name in names for name in self._pending.values())

        while outstanding():
            yield from self._take(1, timeout=None)

    def _take(self, num_returns: int, timeout: float | None) -> Iterator[Finished]:
        if not self._pending:
            return
        ready, _ = ray.wait(list(self._pending), num_returns=min(num_returns, len(self._pending)), timeout=timeout)
        for ref in ready:
            if ref not in self._pending:  # already salvaged
                continue
            name = self._pending.pop(ref)
            try:
                tensors, report = ray.get(ref)
            except RayTaskError as err:  # the job itself raised: not retried, reported as its own exception
                yield from self._salvage()
                self._cancel_pending()
                raise err.as_instanceof_cause() from None
            except RayError as err:  # worker or node lost beyond the retries
                yield from self._salvage()
                self._cancel_pending()
                raise JobLostError(self._lost_message(name, err)) from err
            yield Finished(name, tensors, report)

    def _lost_message(self, name: str, err: RayError) -> str:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return (f"job {name} was lost after {self.options.max_retries} retries ({type(err).__name__}: {first_line}); "
                "finished matrices are kept in OUT/.progress: rerun the same command to resume")

    def _salvage(self) -> Iterator[Finished]:
        """Every other job that has already finished successfully."""
        if not self._pending:
            return
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        for ref in ready:
            name = self._pending.pop(ref)
            try:
                tensors, report = ray.get(ref)
            except RayError:
                continue
            yield Finished(name, tensors, report)

    def _cancel_pending(self) -> None:
        for ref in list(self._pending):
            try:
                ray.cancel(ref)
            except RayError:
                pass
        self._pending.clear()

    def close(self) -> None:
        if not ray.is_initialized():
            return
        if hasattr(self, "_pending"):
            self._cancel_pending()
        if self._owns:
            ray.shutdown()
