"""What the bench scripts share: paths, running the console scripts, and recording a result.

Every script records the same way (`record`): its JSON under bench/results/ and its markdown appended to
docs/BENCHMARKS.md (and echoed), so no figure there is typed by hand.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.jsonl"
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"
BIN = Path(sys.executable).parent  # armor-prune / armor-eval of the interpreter running the bench
RESULTS = REPO / "bench" / "results"
log = logging.getLogger("bench")
if str(REPO) not in sys.path:  # the repository's tools/ package (not installed) for the scripts that use it
    sys.path.insert(0, str(REPO))


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; on failure show the end of its stderr and stop the bench."""
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def armor_eval_ppl(model_dir: str | Path, data: Path, ctx_len: int, max_windows: int | None,
                   env: dict[str, str] | None = None) -> dict:
    """`armor-eval ppl` of one model: its JSON line {ppl, ctx_len, windows, tokens, ...}."""
    cmd = [str(BIN / "armor-eval"), "ppl", str(model_dir), "--data", str(data), "--ctx-len", str(ctx_len)]
    if max_windows:
        cmd += ["--max-windows", str(max_windows)]
    return json.loads(run(cmd, env).strip().splitlines()[-1])


def command_line(script: str) -> str:
    return f"python bench/{script} " + " ".join(sys.argv[1:])


def record(name: str, payload: dict, markdown: str) -> None:
    """Write bench/results/NAME.json, append MARKDOWN to docs/BENCHMARKS.md and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    with (REPO / "docs" / "BENCHMARKS.md").open("a") as f:
        f.write(markdown)
    sys.stdout.write(markdown)
