"""Command lines: `armor-prune MODEL OUT [options]` and `armor-eval ppl MODEL_DIR --data PATH`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path

from offline_prune.errors import UserError
from offline_prune.models import DEFAULT_MODEL
from vllm_armor.checkpoint_format import ArmorFormatError

log = logging.getLogger("offline_prune")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _guarded(main) -> int:
    """Run ``main``; a user error is one line on stderr and exit code 2, not a traceback."""
    try:
        return main()
    except (UserError, ArmorFormatError) as err:
        log.error("%s", err)
        return 2
    except OSError as err:  # full disk, read-only folder, ...: finished work under OUT/.progress is kept
        log.error("I/O error: %s (finished work is kept; fix this and rerun the same command to resume)", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: finished work is kept, rerun the same command to resume")
        return 130


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One flag per method option (offline_prune.methods); given only when typed, else the method's default."""
    from offline_prune.methods import all_options

    for option in all_options():
        p.add_argument(option.flag, dest=option.name, type=option.type, choices=option.choices,
                       default=argparse.SUPPRESS,
                       help=option.help if option.default is None else f"{option.help} (default: {option.default})")


def prune_parser() -> argparse.ArgumentParser:
    from offline_prune.methods import method_names

    p = argparse.ArgumentParser(prog="armor-prune", description="Prune a Hugging Face decoder model to 2:4.")
    p.add_argument("model", help=f"local HF folder, hub id, or '{DEFAULT_MODEL}' (bundled)")
    p.add_argument("out", help="output folder (an HF folder with an ARMOR quantization_config)")
    p.add_argument("--method", default="armor", choices=method_names())
    p.add_argument("--calib", default=None,
                   help="c4:PATH.jsonl (web text), chat:PATH.jsonl (conversations rendered with the model's chat "
                        "template), text:PATH or self (default: self = sampled from the model, with a warning)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="finish the whole run within this time (e.g. 90s, 30m, 2h): iterative methods share it "
                        "across matrices and stop early where it runs out (the report says where)")
    p.add_argument("--tune-epochs", type=float, default=None, metavar="E",
                   help="block tuning after the per-matrix jobs: E passes over the calibration windows fitting each "
                        "decoder layer's output from the pruned model's inputs (A, B and kept values; mask fixed); "
                        "0 = off (default: 1 for armor, 0 for the baselines)")
    p.add_argument("--tune-lr", type=float, default=None,
                   help="Adam learning rate of block tuning (default: TUNE_LR of offline_prune/reconstruct.py, 3e-4)")
    _add_method_options(p)
    p.add_argument("--skip", default=None, help="regex of module names to leave dense")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT instead of resuming it")
    ray = p.add_argument_group("Ray (docs/SCALING.md; needs the 'distributed' extra)")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the per-matrix jobs as Ray tasks: alone, on a Ray instance started here; "
                          "'auto' joins the cluster of `ray start`; or host:port / ray://host:port")
    ray.add_argument("--gpus-per-job", type=float, default=None,
                     help="GPUs per job, fractional allowed (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--cpus-per-job", type=float, default=1.0, help="CPUs per job (default 1)")
    ray.add_argument("--max-retries", type=int, default=3,
                     help="retries of a job whose worker or node died (default 3); job errors are not retried")
    return p


def _executor(a: argparse.Namespace):
    """None (jobs in this process) without --ray; nothing imports Ray then."""
    if a.ray is not None and a.time_budget is not None:
        raise UserError("--time-budget is not supported with --ray yet (jobs run in parallel there)")
    if a.ray is None:
        for flag, value, default in (("--gpus-per-job", a.gpus_per_job, None), ("--cpus-per-job", a.cpus_per_job, 1.0),
                                     ("--max-retries", a.max_retries, 3)):
            if value != default:
                raise UserError(f"{flag} needs --ray")
        return None
    try:
        from offline_prune.distributed import RayExecutor, RayOptions
    except ModuleNotFoundError as err:
        if err.name != "ray":
            raise
        raise UserError(f"--ray needs Ray: pip install 'vllm-armor[distributed]' ({err})") from err
    return RayExecutor(RayOptions(address=a.ray, gpus_per_job=a.gpus_per_job, cpus_per_job=a.cpus_per_job,
                                  max_retries=a.max_retries))


def prune_args(a: argparse.Namespace):
    """The run's PruneArgs from parsed `armor-prune` arguments (raises UserError on a bad value)."""
    import torch

    from offline_prune.budget import parse_duration
    from offline_prune.methods import get_method
    from offline_prune.run_args import PruneArgs

    return PruneArgs(
        model=a.model, out=a.out, method=a.method, calib=a.calib, calib_samples=a.calib_samples,
        calib_seqlen=a.calib_seqlen, seed=a.seed, skip=a.skip,
        device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        time_budget=parse_duration(a.time_budget) if a.time_budget is not None else None,
        tune_epochs=a.tune_epochs, tune_lr=a.tune_lr,
        options=get_method(a.method).select(vars(a)),  # options of other methods are ignored
    )


def prune_main(argv: list[str] | None = None) -> int:
    from offline_prune.pipeline import prune

    _setup_logging()
    a = prune_parser().parse_args(argv)

    def run() -> int:
        args = prune_args(a)
        command = shlex.join(["armor-prune", *(sys.argv[1:] if argv is None else argv)])
        prune(args, overwrite=a.overwrite, executor=_executor(a), command=command)
        return 0

    return _guarded(run)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="armor-eval", description="Evaluate dense or ARMOR checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity on a plain-text file (WikiText-2 protocol)")
    ppl.add_argument("model_dir")
    ppl.add_argument("--data", required=True, help="plain-text test file, e.g. ../shared/data/wikitext2/wiki.test.raw")
    ppl.add_argument("--ctx-len", type=int, default=2048)
    ppl.add_argument("--max-windows", type=int, default=None)
    ppl.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ppl.add_argument("--device", default=None)
    return p


def eval_main(argv: list[str] | None = None) -> int:
    _setup_logging()
    a = eval_parser().parse_args(argv)
    return _guarded(lambda: _eval_ppl(a))


def _eval_ppl(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from offline_prune.checkpoint import load_model
    from offline_prune.evaluate import perplexity, test_windows
    from offline_prune.models import resolve_model

    folder = resolve_model(a.model_dir)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, dtype=getattr(torch, a.dtype), device=device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows, split_tokens = test_windows(Path(a.data), tokenizer, a.ctx_len, a.max_windows)
    result = perplexity(model, windows, device)
    if not math.isfinite(result["ppl"]):
        raise UserError(f"{a.model_dir}: perplexity on {a.data} is not finite ({result['ppl']}): the model produced "
                        "NaN/Inf logits; not reported")
    line = {"ppl": round(result["ppl"], 4), "ctx_len": a.ctx_len, "windows": int(windows.shape[0]),
            "tokens": result["tokens"], "split_tokens": split_tokens, "model": str(a.model_dir)}
    sys.stdout.write(json.dumps(line) + "\n")
    return 0
