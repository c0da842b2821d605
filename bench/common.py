"""What the bench scripts share: paths, the matrices of a decoder layer, running the console scripts (prune
commands, perplexity), lanes of parallel work, the load average, the weights and input statistics of chosen
layers, and recording a result.

Every script records the same way (`record`): its JSON under bench/results/ (ignored by git), the run in an
envelope (date, machine, load, command) under bench/results/runs/BENCHMARK/ (committed; `python -m
bench.results_page` builds docs/RESULTS.md and the README's results block from the newest of each), and its
markdown appended to docs/BENCHMARKS.md, the history log (and echoed), so no figure there is typed by hand. Scripts
run as modules from the repository root (`python -m bench.NAME`), which also makes the repository's tools/ package
importable.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.jsonl"
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"
BIN = Path(sys.executable).parent  # armor-prune / armor-eval of the interpreter running the bench
RESULTS = REPO / "bench" / "results"
# The linears of a Llama-style decoder layer that ARMOR prunes (names local to the layer).
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
log = logging.getLogger("bench")


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; on failure show the end of its stderr and stop the bench."""
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def prune_argv(model: str, out: Path, calib: Path, samples: int, seqlen: int, *extra: str) -> list[str]:
    """`armor-prune`'s arguments: MODEL OUT with C4 calibration (SAMPLES x SEQLEN tokens, seed 0), then EXTRA."""
    return [model, str(out), "--calib", f"c4:{calib}", "--calib-samples", str(samples), "--calib-seqlen",
            str(seqlen), "--seed", "0", *extra]


def prune_command(model: str, out: Path, calib: Path, samples: int, seqlen: int, *extra: str) -> list[str]:
    """The `armor-prune` command line of `prune_argv` (the interpreter's own console script)."""
    return [str(BIN / "armor-prune"), *prune_argv(model, out, calib, samples, seqlen, *extra)]


def armor_eval_ppl(model_dir: str | Path, data: Path, ctx_len: int, max_windows: int | None,
                   env: dict[str, str] | None = None) -> dict:
    """`armor-eval ppl` of one model: its JSON line {ppl, ctx_len, windows, tokens, ...}."""
    cmd = [str(BIN / "armor-eval"), "ppl", str(model_dir), "--data", str(data), "--ctx-len", str(ctx_len)]
    if max_windows:
        cmd += ["--max-windows", str(max_windows)]
    return json.loads(run(cmd, env).strip().splitlines()[-1])


def lane_env(threads: int, jobs: int) -> dict[str, str]:
    """The environment of one of ``jobs`` lanes: threads / jobs torch threads (at least one)."""
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // jobs))}


def in_lanes(jobs: int, tasks: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Run the tasks (name -> thunk) ``jobs`` at a time; results in the tasks' order."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = {name: pool.submit(task) for name, task in tasks.items()}
        return {name: future.result() for name, future in futures.items()}


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as a table cell states them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cost_cells(name: str, summary: dict) -> str:
    """A row's cost cells from its report summary: weight bytes / dense and A+B params / core values."""
    if summary:
        return f"{summary['bytes_ratio']:.3f} | {summary['ab_overhead']:.4f}"
    return "1.000 | 0" if name == "dense" else "- | -"


def layer_statistics(model: str, calib: Path, layers: Sequence[int], matrices: Sequence[str], samples: int,
                     seqlen: int, gram: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"layers.I.MATRIX": (W float32, input statistic)} of the chosen decoder layers of the dense ``model``,
    from SAMPLES C4 windows of SEQLEN tokens (seed 0): the statistic is h = diag(X^T X), or X^T X with ``gram``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_prune.architectures import architecture_of, layer_list
    from offline_prune.calibration import c4_windows
    from offline_prune.models import resolve_model
    from offline_prune.statistics import collect_stats

    if not calib.is_file():
        raise SystemExit(f"calibration data {calib} not found (expected ../shared/data/c4/ beside the repo)")
    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    arch = architecture_of(dense)
    _, decoder = layer_list(dense, arch)
    del decoder[max(layers) + 1:]  # later layers do not change these layers' inputs
    linears = {f"layers.{i}.{m}": decoder[i].get_submodule(m) for i in layers for m in matrices}
    shared = [[f"layers.{i}.{m}" for m in group] for i in layers for group in arch.shared_inputs]
    windows = c4_windows(calib, tok, samples, seqlen, seed=0)
    with torch.no_grad(), collect_stats(linears, gram, shared) as stats:
        for batch in windows.split(8):
            dense.model(input_ids=batch)
    log.info("statistics of layers %s from %d x %d tokens", list(layers), *windows.shape)
    return {name: (lin.weight.detach().float().clone(), (stats[name].gram if gram else stats[name].h).clone())
            for name, lin in linears.items()}


def command_line(script: str) -> str:
    """How the running script was called, e.g. `python -m bench.quality --jobs 2` (SCRIPT: its module name)."""
    return f"python -m bench.{script.removesuffix('.py')} " + " ".join(sys.argv[1:])


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string where that file says none)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine a run is recorded on: platform, CPU model and core count."""
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count()}


def write_run(benchmark: str, payload: dict, command: str, now: dt.datetime | None = None) -> Path:
    """Write one run of BENCHMARK, in its envelope (date, machine, load, command, payload), to
    bench/results/runs/BENCHMARK/STAMP.json (STAMP: the UTC time, e.g. 20261206T043000Z); return its path."""
    now = now or dt.datetime.now(dt.timezone.utc)
    envelope = {"benchmark": benchmark, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(),
                "load": loadavg(), "command": command, "payload": payload}
    folder = RESULTS / "runs" / benchmark
    folder.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    path, n = folder / f"{stamp}.json", 1
    while path.exists():  # two runs within one second: STAMP-2, STAMP-3, ...
        n += 1
        path = folder / f"{stamp}-{n}.json"
    path.write_text(json.dumps(envelope, indent=1, default=str) + "\n")
    log.info("recorded %s", path)
    return path


def record(name: str, payload: dict, markdown: str, command: str | None = None) -> Path:
    """Write bench/results/NAME.json, the run's envelope under bench/results/runs/ (`write_run`; the benchmark is
    NAME's first path part, so `soak/soak-STAMP` is a run of `soak`), append MARKDOWN to docs/BENCHMARKS.md and
    print it. COMMAND: how the bench was called (default: `command_line` of the benchmark). Returns the run's path."""
    benchmark = name.split("/")[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    run_path = write_run(benchmark, payload, command or command_line(benchmark))
    with (REPO / "docs" / "BENCHMARKS.md").open("a") as f:
        f.write(markdown)
    sys.stdout.write(markdown)
    return run_path
