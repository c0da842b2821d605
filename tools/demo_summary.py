"""The last step of `make demo`: serve the demo's ARMOR checkpoint with `vllm serve --quantization armor`, ask it
the demo questions (`tools.demo_questions`), time one decode, and print a summary side by side with the dense model.

    python -m tools.demo_summary out/smollm2-armor [--armor-ppl out/smollm2-armor/demo_ppl.json] [--json FILE]

The dense side never changes, so it is computed once and cached as JSON under the cache folder (``VLLM_ARMOR_CACHE``
or ~/.cache/vllm-armor, `demo/dense-<key>.json`), keyed by the model, the prompts, the perplexity windows and the
vLLM version: the first run serves the dense model with plain `vllm serve` (no ``--quantization``) and runs
`armor-eval ppl` on the same WikiText-2 windows as the ARMOR side (while the server starts, never during its
requests), and says so. The ARMOR perplexity is read from
``--armor-ppl`` (the JSON line `make demo-eval` writes) when it is newer than the checkpoint, else computed here
while the ARMOR server starts (`make demo` runs no separate demo-eval step: this overlap keeps it short).
Progress goes to the log; the summary is written to stdout at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import logging
import sys
import time
from pathlib import Path

from bench.common import WIKITEXT, armor_eval_ppl
from offline_prune.models import DEFAULT_MODEL, cache_dir, resolve_model
from tools.demo_questions import ANSWER_TOKENS, chat_text, demo_items
from tools.demo_report import render
from tools.demo_serve import DECODE_PROMPT, DECODE_TOKENS, SERVE_ARGS, measure_served

log = logging.getLogger("tools.demo_summary")


def windows_spec(data: Path, ctx_len: int, windows: int) -> dict:
    return {"data": data.name, "data_bytes": data.stat().st_size, "ctx_len": ctx_len, "windows": windows}


def dense_key(model: str, folder: Path, windows: dict) -> dict:
    """What the dense side depends on: the model (name, config, weight file sizes), the prompts, the windows and
    the vLLM version."""
    weights = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    prompts = {"chat": [chat_text(it) for it in demo_items()], "answer_tokens": ANSWER_TOKENS,
               "decode_prompt": DECODE_PROMPT, "decode_tokens": DECODE_TOKENS, "serve_args": SERVE_ARGS}
    return {"model": model, "config_sha256": config, "weights": weights, "prompts": prompts, "windows": windows,
            "vllm": md.version("vllm")}


def dense_cache_folder() -> Path:
    """Where the dense sides are cached (nothing else is kept there)."""
    return cache_dir() / "demo"


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return dense_cache_folder() / f"dense-{digest}.json"


def dense_side(model: str, data: Path, ctx_len: int, windows: int) -> tuple[dict, str]:
    """The dense side ({"answers", "decode", "ppl", ...}) from the cache, or measured now and cached; and a note
    saying which."""
    folder = Path(resolve_model(model))
    key = dense_key(model, folder, windows_spec(data, ctx_len, windows))
    path = cache_path(key)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            log.info("dense side: cached in %s (measured %s)", path, cached["date"])
            return cached, f"Dense side: cached ({path}), measured {cached['date']} at load {cached['load']}."
    log.info("dense side: not cached yet, computing it once (vllm serve %s, armor-eval ppl) -> %s", folder, path)
    started = time.monotonic()
    side = measure_served(folder, None, meanwhile=lambda: armor_eval_ppl(folder, data, ctx_len, windows))
    side["ppl"] = side.pop("meanwhile")
    side["key"], side["seconds"] = key, round(time.monotonic() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(side, indent=1))
    tmp.replace(path)
    log.info("dense side computed in %.0f s and cached in %s", side["seconds"], path)
    return side, f"Dense side: computed by this run in {side['seconds']:.0f} s (load {side['load']}), cached in {path}."


def current_ppl(armor: Path, ppl_file: Path | None, ctx_len: int, windows: int) -> dict | None:
    """`make demo-eval`'s JSON line for the checkpoint, where it is newer than the checkpoint and on these windows."""
    if ppl_file is None or not ppl_file.is_file():
        return None
    fresh = ppl_file.stat().st_mtime >= (armor / "armor_report.json").stat().st_mtime
    row = json.loads(ppl_file.read_text().strip().splitlines()[-1])
    if fresh and row.get("ctx_len") == ctx_len and row.get("windows") == windows:
        log.info("ARMOR perplexity from %s", ppl_file)
        return row
    log.info("%s is stale or on other windows: not used", ppl_file)
    return None


def armor_side(armor: Path, ppl_file: Path | None, data: Path, ctx_len: int, windows: int) -> dict:
    """The ARMOR side, measured now; its perplexity runs while its server starts unless `current_ppl` has it."""
    ppl = current_ppl(armor, ppl_file, ctx_len, windows)
    side = measure_served(armor, "armor", None if ppl else lambda: armor_eval_ppl(armor, data, ctx_len, windows))
    side["ppl"] = side.pop("meanwhile") or ppl
    return side


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("armor", type=Path, help="the demo's ARMOR checkpoint folder")
    p.add_argument("--dense", default=DEFAULT_MODEL, help="the dense model it was pruned from")
    p.add_argument("--armor-ppl", type=Path, default=None, help="`armor-eval ppl` output of the checkpoint, if any")
    p.add_argument("--data", type=Path, default=WIKITEXT)
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="also write both sides here (bench/demo_time.py reads it)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = json.loads((a.armor / "armor_report.json").read_text())["summary"]
    dense, dense_note = dense_side(a.dense, a.data, a.ctx_len, a.windows)
    armor = armor_side(a.armor, a.armor_ppl, a.data, a.ctx_len, a.windows)
    notes = [dense_note, f"ARMOR side: measured now ({armor['date']}, load {armor['load']}); decode speed is one "
             "request on a shared machine, so it moves with the load."]
    if a.json:
        a.json.write_text(json.dumps({"dense": dense, "armor": armor, "report": report, "notes": notes}, indent=1))
    sys.stdout.write(render(dense, armor, report, notes, a.windows, a.ctx_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
