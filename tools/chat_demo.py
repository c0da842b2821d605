"""Serve a checkpoint with `vllm serve`, ask one chat question through the `openai` client, print the answer,
stop the server (the serving step of `make demo`).

    python -m tools.chat_demo out/smollm2-armor --question "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tools.vllm_server import VllmServer

log = logging.getLogger("tools.chat_demo")


def ask(model: Path, question: str, max_tokens: int, extra_args: list[str]) -> str:
    with VllmServer(model, ["--quantization", "armor", *extra_args]) as srv:
        log.info("vllm serve ready in %.1f s (%s)", srv.startup_s, srv.base_url)
        reply = srv.client().chat.completions.create(
            model=str(model), messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0.0,
        )
        return reply.choices[0].message.content or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="ARMOR checkpoint folder")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="pass --enforce-eager (faster start-up)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = ["--max-model-len", "2048"] + (["--enforce-eager"] if args.eager else [])
    answer = ask(args.model, args.question, args.max_tokens, extra)
    sys.stdout.write(f"Q: {args.question}\nA: {answer}\n")


if __name__ == "__main__":
    main()
