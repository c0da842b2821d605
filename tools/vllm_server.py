"""Start and stop a real `vllm serve` subprocess: used by `make demo`, `bench/serve_speed.py` and the tests.

Imports no vLLM (it runs the `vllm` CLI of the same environment)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

log = logging.getLogger("tools.vllm_server")
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    """``with VllmServer(model_dir, ...) as srv:`` starts `vllm serve`, waits until healthy, stops it on exit
    (SIGINT to its process group, then SIGKILL after a grace period)."""

    model: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 400.0
    log_path: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(VENV_BIN / "vllm"), "serve", str(self.model), "--port", str(self.port), *self.args]

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.update(self.env)
        return env

    def start(self) -> VllmServer:
        self.log_path = self.log_path or Path(f"/tmp/vllm-armor-serve-{self.port}.log")
        out = open(self.log_path, "w")  # noqa: SIM115 - closed with the process
        t0 = time.monotonic()
        log.info("starting %s (log %s)", " ".join(self.command()), self.log_path)
        self.proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, env=self._environ(), start_new_session=True
        )
        while time.monotonic() - t0 < self.timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    log.info("server ready in %.1f s", self.startup_s)
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Engine/worker children share the process group; make sure none is left behind.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ----------------------------------------------------------------------------------

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key="EMPTY")

    def greedy(self, prompt: str, max_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt token ids, generated token ids) of a greedy completion."""
        r = self.client().completions.create(
            model=str(self.model),
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        choice = r.choices[0]
        return list(choice.prompt_token_ids), list(choice.token_ids)

    def prompt_nll(self, token_ids: list[int]) -> float:
        """Summed next-token NLL of ``token_ids[1:]`` given their prefixes, from the server's prompt logprobs
        (the quantity `armor-eval ppl` sums per window)."""
        r = requests.post(
            f"{self.base_url}/v1/completions",
            json={"model": str(self.model), "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
                  "prompt_logprobs": 0},
            timeout=600,
        )
        r.raise_for_status()
        rows = r.json()["choices"][0]["prompt_logprobs"]
        if len(rows) != len(token_ids) or rows[0] is not None:
            raise RuntimeError(f"prompt_logprobs: expected {len(token_ids)} rows, the first None; got {len(rows)}")
        return -sum(row[str(tok)]["logprob"] for tok, row in zip(token_ids[1:], rows[1:], strict=True))


def run_failing(model: Path, args: list[str], env: dict[str, str] | None = None, timeout_s: float = 240) -> str:
    """Run `vllm serve` on a checkpoint that must fail at start-up; return its output (asserts it exited)."""
    srv = VllmServer(model, args, env or {})
    proc = subprocess.Popen(
        srv.command(), env=srv._environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"vllm serve {model} did not fail within {timeout_s} s:\n{out[-3000:]}") from None
    assert proc.returncode != 0, f"vllm serve {model} started although the checkpoint is malformed"
    return out
