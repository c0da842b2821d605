"""The prepared first check of the GPU path on one H100/H200: `python -m bench.gpu_check OUT` (at most ~8 minutes,
no network, no vLLM; the project installed with `pip install --no-deps -e .`; torch 2.11+ with CUDA, Triton 3.6+).

Writes OUT/gpu_check.json and OUT/gpu_check.md (rewritten after every part, so a cut run keeps what finished):

* ``tests``: tests/test_triton24.py compiled for real (``ARMOR_TRITON_TESTS=cuda``): the pytest summary.
* ``layers``: one layer's time with CUDA events (warm-up, median of repeats), eager and CUDA-graph replay, for the
  Llama shapes x M in `M_VALUES`: dense ``F.linear``, plain 2:4 by cuSPARSELt (`sparse24`) and by `triton24`, and
  ARMOR (`triton24` with A/B at the `auto` block sizes); `ROTATE` weight copies are cycled so that no layer is
  served from L2; every kernel's output is checked against the fp32 reference, and graph replay against eager.
* ``gemv_sweep``: the decode kernel's block configurations at M=1 (to set `triton24.GEMV_CONFIGS`).
* ``model``: a Llama of ~1B parameters (TinyLlama's shape, random weights) in transformers, every linear swapped for
  an ARMOR layer on `triton24`; logits against the same layers on the reference `factored` kernel; 128 greedy
  tokens at batch 1 and 16, tokens/s against the dense model.
* ``optimizer``: the ARMOR fast optimiser on one 4096x4096 and one 11008x4096 matrix: seconds per iteration.

Targets of the first run (reported as ratios, met or not): ARMOR at M=1 >= 1.3x dense on the 7B shapes; at
M >= 2048 >= 1.0x dense; CUDA-graph replay correct.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "layers", "gemv_sweep", "model", "optimizer")
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (14336, 4096), (4096, 14336))  # (d_out, d_in)
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))
M_VALUES = (1, 8, 32, 128, 512, 2048)
GEMV_SWEEP = ((32, 128, 4), (16, 128, 4), (64, 64, 4), (16, 256, 4), (32, 256, 8), (8, 256, 2), (64, 128, 8))
ROTATE = 4  # weight copies per kernel, cycled (4 x 32 MB > an H100's 50 MB of L2)
KERNELS = ("dense", "cusparselt", "triton24", "armor")
log = logging.getLogger("gpu_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new measurements after this")
    p.add_argument("--reps", type=int, default=20, help="timed calls per repeat (x ROTATE layers)")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    return args


def time_eager(calls: list[Callable[[], torch.Tensor]], reps: int, repeats: int = 5) -> float:
    """Median microseconds per call of the cycled calls, CUDA events around `reps` rounds."""
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            for call in calls:
                call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (reps * len(calls)))
    return sorted(times)[len(times) // 2]


def capture(calls: list[Callable[[], torch.Tensor]]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """One CUDA graph holding every call once (after a warm-up on a side stream, as torch documents)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    return graph, outs


def time_graph(graph: torch.cuda.CUDAGraph, n_calls: int, reps: int, repeats: int = 5) -> float:
    return time_eager([graph.replay], reps, repeats) / n_calls


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def random_shard(d_out: int, d_in: int, with_ab: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Format tensors of one random 2:4 linear on the GPU (A/B near identity at the `auto` block sizes)."""
    from offline_prune.methods.armor import auto_block_sizes
    from vllm_armor import checkpoint_format as fmt

    dev = gen.device
    keep = torch.rand(d_out, d_in // 4, 4, generator=gen, device=dev).argsort(-1)[..., :2]
    mask = torch.zeros(d_out, d_in // 4, 4, dtype=torch.bool, device=dev).scatter_(2, keep, True).view(d_out, d_in)
    core = torch.randn(d_out, d_in, generator=gen, device=dev) * mask / d_in ** 0.5
    values, meta = fmt.pack_2to4(core, mask)
    tensors = {fmt.CORE_VALUES: values.to(torch.bfloat16), fmt.CORE_META: meta}
    if with_ab:
        bo, bi = auto_block_sizes(d_out, d_in, 0.125)
        for name, n, bs in ((fmt.ARMOR_A, d_out // bo, bo), (fmt.ARMOR_B, d_in // bi, bi)):
            noise = torch.randn(n, bs, bs, generator=gen, device=dev) / bs ** 0.5
            tensors[name] = (torch.eye(bs, device=dev) + 0.1 * noise).to(torch.bfloat16)
    return tensors


def build_layers(kind: str, d_out: int, d_in: int, gen: torch.Generator):
    """ROTATE (apply, reference weight or None) pairs of one kernel kind."""
    from vllm_armor import checkpoint_format as fmt
    from vllm_armor.kernels import LayerSpec
    from vllm_armor.kernels.sparse24 import Sparse24Kernel
    from vllm_armor.kernels.triton24 import Triton24Kernel

    layers = []
    for _ in range(ROTATE):
        if kind == "dense":
            w = torch.randn(d_out, d_in, generator=gen, device=gen.device).to(torch.bfloat16) / d_in ** 0.5
            layers.append((lambda x, w=w: F.linear(x, w), w.float()))
            continue
        tensors = random_shard(d_out, d_in, kind == "armor", gen)
        spec = LayerSpec(gen.device, torch.bfloat16, (d_out,), d_in, kind == "armor")
        kernel = (Sparse24Kernel if kind == "cusparselt" else Triton24Kernel)(spec)
        module = nn.Module()
        kernel.process_weights(module, [tensors])
        layers.append((lambda x, k=kernel, m=module: k.apply(m, x, None), fmt.reconstruct_weight(tensors)))
    return layers


def measure_kind(kind: str, shape: tuple[int, int], gen: torch.Generator, reps: int, deadline: float) -> dict:
    d_out, d_in = shape
    layers = build_layers(kind, d_out, d_in, gen)
    rows = {}
    for m in M_VALUES:
        if time.monotonic() > deadline:
            rows[m] = {"skipped": "time budget"}
            continue
        x = torch.randn(m, d_in, generator=gen, device=gen.device).to(torch.bfloat16)
        calls = [lambda f=f, x=x: f(x) for f, _ in layers]
        eager = [call() for call in calls]
        err = max(rel_err(y, x.float() @ w.t()) for y, (_, w) in zip(eager, layers, strict=True))
        row = {"eager_us": time_eager(calls, max(1, reps // 4)), "rel_err": err}
        graph, outs = capture(calls)
        graph.replay()
        torch.cuda.synchronize()
        row["graph_replay_equal"] = all(torch.equal(a, b) for a, b in zip(outs, eager, strict=True))
        row["graph_us"] = time_graph(graph, len(calls), reps)
        rows[m] = row
        del graph, outs
    return rows


def part_layers(args: argparse.Namespace, deadline: float) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {}
    for shape in SHAPES:
        for kind in KERNELS:
            key = f"{shape[0]}x{shape[1]}"
            try:
                result.setdefault(key, {})[kind] = measure_kind(kind, shape, gen, args.reps, deadline)
            except Exception as err:  # one kernel failing must not lose the others' figures
                result.setdefault(key, {})[kind] = {"error": f"{type(err).__name__}: {err}"[:500]}
            torch.cuda.empty_cache()
    return result


def part_gemv_sweep(args: argparse.Namespace, deadline: float) -> dict:
    from vllm_armor.kernels import triton24

    gen = torch.Generator(device="cuda").manual_seed(1)
    saved, result = triton24.GEMV_CONFIGS[1], {}
    try:
        for shape in SHAPES:
            layers = build_layers("triton24", *shape, gen)
            x = torch.randn(1, shape[1], generator=gen, device="cuda").to(torch.bfloat16)
            for cfg in GEMV_SWEEP:
                if time.monotonic() > deadline:
                    break
                triton24.GEMV_CONFIGS[1] = cfg
                calls = [lambda f=f, x=x: f(x) for f, _ in layers]
                err = max(rel_err(c(), x.float() @ w.t()) for c, (_, w) in zip(calls, layers, strict=True))
                graph, _ = capture(calls)
                result.setdefault(f"{shape[0]}x{shape[1]}", {})[str(cfg)] = {
                    "graph_us": time_graph(graph, len(calls), args.reps), "rel_err": err}
    finally:
        triton24.GEMV_CONFIGS[1] = saved
    return result


LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def swap_linears(model: nn.Module, shards: dict[str, dict[str, torch.Tensor]], kernel: type) -> None:
    from vllm_armor.torch_module import ArmorLinear

    for name, tensors in shards.items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, ArmorLinear(tensors, None, torch.bfloat16, kernel=kernel))


def tokens_per_s(model: nn.Module, batch: int, new_tokens: int, gen: torch.Generator) -> float:
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (batch, 16), generator=gen, device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up (compiles the kernels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    torch.cuda.synchronize()
    return batch * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def part_model(args: argparse.Namespace, deadline: float) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_armor.kernels.factored import FactoredKernel
    from vllm_armor.kernels.triton24 import Triton24Kernel

    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to("cuda", torch.bfloat16).eval()
    result = {"config": LLAMA_1B, "new_tokens": 128}
    with torch.inference_mode():
        for batch in (1, 16):
            result[f"dense_tok_s_b{batch}"] = tokens_per_s(model, batch, 128, gen)
        names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS]
        shards = {n: random_shard(*model.get_submodule(n).weight.shape, True, gen) for n in names}
        ids = torch.randint(0, LLAMA_1B["vocab_size"], (2, 64), generator=gen, device="cuda")
        swap_linears(model, shards, FactoredKernel)
        reference = model(ids).logits.float()
        swap_linears(model, shards, Triton24Kernel)
        result["logits_rel_err_vs_factored"] = rel_err(model(ids).logits, reference)
        for batch in (1, 16):
            if time.monotonic() < deadline:
                result[f"armor_tok_s_b{batch}"] = tokens_per_s(model, batch, 128, gen)
                result[f"ratio_b{batch}"] = result[f"armor_tok_s_b{batch}"] / result[f"dense_tok_s_b{batch}"]
    return result


def seconds_per_iteration(shape: tuple[int, int], device: str, iters: tuple[int, int] = (2, 12)) -> float:
    """The ARMOR fast optimiser's time per iteration on one random matrix: the difference of two capped runs."""
    from offline_prune.methods import get_method

    method = get_method("armor")
    gen = torch.Generator(device=device).manual_seed(3)
    weight = torch.randn(*shape, generator=gen, device=device)
    h = torch.rand(shape[1], generator=gen, device=device) + 0.1
    times = []
    for n in iters:
        options = method.resolve({"optimizer": "fast", "iters": n, "plateau_tol": 0.0})
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = method.prune(weight, None, h, options, 0, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.iterations == n, f"asked for {n} iterations, ran {out.iterations}"
    return (times[1] - times[0]) / (iters[1] - iters[0])


def part_optimizer(args: argparse.Namespace, deadline: float) -> dict:
    return {f"{d_out}x{d_in}": {"s_per_iter": seconds_per_iteration((d_out, d_in), "cuda")}
            for d_out, d_in in ((4096, 4096), (11008, 4096)) if time.monotonic() < deadline}


def part_tests(args: argparse.Namespace, deadline: float) -> dict:
    env = dict(os.environ, ARMOR_TRITON_TESTS="cuda")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton24.py"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(30.0, min(240.0, deadline - time.monotonic())))
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "failures": [ln for ln in lines if ln.startswith("FAILED")][:20]}


def _ratio(dense: dict, other: dict, key: str = "graph_us") -> str:
    if key not in dense or key not in other:
        return other.get("error", other.get("skipped", "-"))[:40] if isinstance(other, dict) else "-"
    return f"{dense[key] / other[key]:.2f}x"


def layer_table(layers: dict) -> list[str]:
    lines = ["| shape (out x in) | M | dense us (graph) | cuSPARSELt 2:4 | triton24 2:4 | ARMOR | ARMOR eager "
             "| max rel err | graph = eager |", "|" + " --- |" * 9]
    for shape, kinds in layers.items():
        for m in M_VALUES:
            row = {k: kinds.get(k, {}).get(m, kinds.get(k, {})) for k in KERNELS}
            dense = row["dense"]
            errs = [r["rel_err"] for r in row.values() if "rel_err" in r]
            same = all(r.get("graph_replay_equal", True) for r in row.values())
            lines.append(f"| {shape} | {m} | {dense.get('graph_us', float('nan')):.1f} | "
                         f"{_ratio(dense, row['cusparselt'])} | {_ratio(dense, row['triton24'])} | "
                         f"{_ratio(dense, row['armor'])} | {_ratio(dense, row['armor'], 'eager_us')} | "
                         f"{max(errs) if errs else float('nan'):.1e} | {'yes' if same else 'NO'} |")
    return lines


def targets(layers: dict) -> list[str]:
    def ratios(m: int, shapes) -> list[float]:
        out = []
        for d_out, d_in in shapes:
            kinds = layers.get(f"{d_out}x{d_in}", {})
            dense, armor = kinds.get("dense", {}).get(m, {}), kinds.get("armor", {}).get(m, {})
            if "graph_us" in dense and "graph_us" in armor:
                out.append(dense["graph_us"] / armor["graph_us"])
        return out

    low, high = ratios(1, SHAPES_7B), ratios(max(M_VALUES), SHAPES)
    replay = all(r.get("graph_replay_equal", False) for kinds in layers.values() for k in kinds.values()
                 for r in k.values() if isinstance(r, dict) and "graph_us" in r)
    return [f"- ARMOR at M=1 vs dense on the 7B shapes (target >= 1.3x): {_listed(low)}",
            f"- ARMOR at M={max(M_VALUES)} vs dense (target >= 1.0x): {_listed(high)}",
            f"- CUDA-graph replay equal to eager everywhere: {'yes' if replay else 'NO'}"]


def _listed(ratios: list[float]) -> str:
    return ", ".join(f"{x:.2f}x" for x in ratios) or "not measured"


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"# GPU check ({env.get('device', '?')})", "",
             f"{env.get('date')}; torch {env.get('torch')}, triton {env.get('triton')}; "
             f"{results.get('wall_s', 0):.0f} s. Ratios are dense time / kernel time (higher is faster).", ""]
    parts = results["parts"]
    for name in PARTS:
        if name not in parts:
            continue
        part = parts[name]
        lines += [f"## {name}", ""]
        if "error" in part:
            lines += [f"FAILED: {part['error']}", ""]
        elif name == "layers":
            lines += [*targets(part), "", *layer_table(part), ""]
        else:
            lines += ["```json", json.dumps(part, indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results))


def environment() -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log.error("gpu_check: no CUDA device here (torch %s): run it on a GPU machine", torch.__version__)
        return 2
    start = time.monotonic()
    deadline = start + args.budget_s
    results = {"env": environment(), "args": {"parts": args.parts, "budget_s": args.budget_s}, "parts": {}}
    runners = {"tests": part_tests, "layers": part_layers, "gemv_sweep": part_gemv_sweep, "model": part_model,
               "optimizer": part_optimizer}
    for name in args.parts:
        log.info("part %s (%.0f s left)", name, deadline - time.monotonic())
        try:
            results["parts"][name] = runners[name](args, deadline)
        except Exception as err:  # one part failing must not lose the others
            log.exception("part %s failed", name)
            results["parts"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        results["wall_s"] = time.monotonic() - start
        write_outputs(args.out, results)
    failed = [n for n, p in results["parts"].items() if "error" in p]
    log.info("wrote %s/gpu_check.md in %.0f s%s", args.out, results["wall_s"],
             f"; failed parts: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
