"""The checks `make docker-test` (tools/docker_test.py) runs against the built serve image: the container as
shipped, compose.yaml's `cpu` profile through podman-compose, and deploy/k8s against the Kubernetes schemas.

The servers listen on 127.0.0.1 only; every wait has a deadline.
"""

from __future__ import annotations

import json
import logging
import resource
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tools.podman_env import ULIMITS, Podman

log = logging.getLogger("tools.docker_serve_checks")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
HEALTH_TIMEOUT = 900  # s: model load (and torch.compile without --enforce-eager) on a small shared CPU machine
STOP_TIMEOUT = 30
KERNEL_LINE = "ARMOR kernel: sparse24_cpu"
SERVE_FLAGS = ["--enforce-eager", "--max-model-len", "1024"]
# podman-compose and the schema validator, pinned, in a venv of their own (not the project's).
TOOLS = ["podman-compose==1.6.0", "kubernetes-validate==1.37.0"]
K8S_VERSION = "1.30.0"
# Prints the folders in the image that hold a source checkout (pyproject.toml next to vllm_armor/) and /src.
FIND_SOURCE = ('for f in $(find / -xdev -name pyproject.toml 2>/dev/null); do d=$(dirname "$f"); '
               '[ -d "$d/vllm_armor" ] && echo "$d"; done; [ -e /src ] && echo /src; true')


class CheckFailed(RuntimeError):
    """A docker-test check did not hold (the message says which and why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_log(podman: Podman, name: str) -> str:
    done = podman.run("logs", name, timeout=60, check=False)
    return done.stdout + done.stderr


def wait_healthy(podman: Podman, name: str, port: int, timeout: float = HEALTH_TIMEOUT) -> float:
    """Poll GET /health until 200; fail early when the container exits. Returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        state = podman.run("inspect", "--format", "{{.State.Status}}", name, timeout=60, check=False)
        if state.stdout.strip() not in ("running", "created", "starting"):
            raise CheckFailed(f"container {name} is {state.stdout.strip() or 'gone'} before /health answered:\n"
                              f"{container_log(podman, name)[-4000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(3)
    raise CheckFailed(f"{name}: /health not 200 within {timeout:.0f} s:\n{container_log(podman, name)[-4000:]}")


def check_api(port: int, key: str) -> str:
    """401 without the key, then one chat completion with it through the openai client; returns the reply."""
    base = f"http://127.0.0.1:{port}"
    bare = requests.get(f"{base}/v1/models", timeout=30)
    if bare.status_code != 401:
        raise CheckFailed(f"GET /v1/models without the API key answered {bare.status_code}, expected 401")
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=key, timeout=120, max_retries=0)
    reply = client.chat.completions.create(
        model="armor", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0.0)
    text = (reply.choices[0].message.content or "").strip()
    if not text or reply.usage.completion_tokens <= 0:
        raise CheckFailed(f"empty chat completion: {reply}")
    return text


def check_inside(podman: Podman, name: str, uid: int) -> None:
    """The server process runs as ``uid``, the HEALTHCHECK passes, and the image holds no source tree."""
    ids = podman.run("exec", name, "id", "-u", timeout=60).stdout.strip()
    if ids != str(uid):
        raise CheckFailed(f"{name} runs as uid {ids}, expected {uid}")
    health = podman.run("healthcheck", "run", name, timeout=60, check=False)
    if health.returncode != 0:
        raise CheckFailed(f"the image's HEALTHCHECK failed: {health.stdout}{health.stderr}")
    sources = podman.run("exec", name, "sh", "-c", FIND_SOURCE, timeout=120).stdout.split()
    if sources:
        raise CheckFailed(f"the image holds a source tree: {sources}")


def stop_with_sigterm(podman: Podman, name: str) -> str:
    """SIGTERM to the container; it must exit by itself within STOP_TIMEOUT s. Returns 'exit N after S s'."""
    start = time.monotonic()
    podman.run("kill", "--signal", "TERM", name, timeout=60)
    try:
        code = podman.run("wait", name, timeout=STOP_TIMEOUT).stdout.strip()
    except RuntimeError:
        raise CheckFailed(f"{name} still running {STOP_TIMEOUT} s after SIGTERM") from None
    took = time.monotonic() - start
    if code in ("137", "-1"):
        raise CheckFailed(f"{name} was killed, not stopped cleanly (exit {code})")
    return f"exit {code} after {took:.1f} s"


def check_serve(podman: Podman, image: str, checkpoint: Path, uid: int) -> dict[str, str]:
    """The serve image as shipped (its user, entrypoint, HEALTHCHECK) on ``checkpoint`` mounted read-only."""
    port, key = free_port(), secrets.token_hex(16)
    name = podman.container(f"{image.rsplit(':', 1)[1]}-serve")
    podman.run("run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
               "-e", f"PORT={port}", "-e", "HOST=127.0.0.1", "-e", f"VLLM_API_KEY={key}",
               "-e", "SERVED_MODEL_NAME=armor", "-e", "VLLM_CPU_KVCACHE_SPACE=1",
               "-v", f"{checkpoint}:/models/model:ro", image, *SERVE_FLAGS, timeout=120)
    healthy_after = wait_healthy(podman, name, port)
    reply = check_api(port, key)
    check_inside(podman, name, uid)
    server_log = container_log(podman, name)
    if KERNEL_LINE not in server_log:
        kernels = [line for line in server_log.splitlines() if "ARMOR kernel" in line]
        raise CheckFailed(f"the serve log does not name the sparse CPU kernel ({KERNEL_LINE!r}): {kernels}")
    if key in server_log:
        raise CheckFailed("the API key appears in the server log")
    stopped = stop_with_sigterm(podman, name)
    log.info("serve image: healthy after %.0f s, reply %r, %s, SIGTERM: %s", healthy_after, reply, KERNEL_LINE,
             stopped)
    return {"serve": f"/health after {healthy_after:.0f} s, 401 without key, chat {reply!r}, HEALTHCHECK ok, "
                     f"uid {uid}, no source tree, {KERNEL_LINE}",
            "sigterm": stopped}


def tools_venv(home: Path) -> Path:
    """A venv with podman-compose and kubernetes-validate from the package index (made once, then reused)."""
    venv = home / "tools-venv"
    marker = venv / ("installed-" + "+".join(TOOLS).replace("==", "-"))
    if marker.exists():
        return venv / "bin"
    for cmd in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                [str(venv / "bin" / "pip"), "install", "-q", *TOOLS]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise CheckFailed(f"cannot install {' '.join(TOOLS)}: {done.stderr.strip()[-500:]}")
    marker.touch()
    return venv / "bin"


def compose_override(work: Path) -> list[str]:
    """The test's override of compose.yaml's armor-cpu service: `--enforce-eager` (vLLM's torch.compile warm-up
    takes minutes on a small CPU machine; the serve check above runs the same way), and compose.yaml's nofile
    65535 lowered to this process's hard limit where that is lower and cannot be raised (no CAP_SYS_RESOURCE).
    Returns the extra `-f` arguments."""
    lines = ["services:", "  armor-cpu:", f"    command: {json.dumps(SERVE_FLAGS[:1])}"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 65535:
        # With `ulimits` given, podman drops containers.conf's default_ulimits and sets nproc over what runc may
        # set here ("error setting rlimit type 6"): the override sets both to this test's podman defaults.
        lines.append("    ulimits:")
        lines += [f"      {name}: {{soft: {value}, hard: {value}}}" for name, value in ULIMITS.items()]
        log.info("compose: this machine's hard nofile limit is %d < 65535: the override lowers it", hard)
    override = work / "compose.docker-test.yaml"
    override.write_text("\n".join(lines) + "\n")
    return ["-f", str(override)]


def compose_command(podman: Podman, work: Path, project: str) -> list[str]:
    """podman-compose on compose.yaml's `cpu` profile, driving this test's podman (own config and storage)."""
    wrapper = work / "podman"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(podman.base_cmd) + ' "$@"\n')
    wrapper.chmod(0o755)
    bin_dir = tools_venv(podman.home)
    return [str(bin_dir / "podman-compose"), "--podman-path", str(wrapper), "-p", project,
            "-f", str(DEPLOY / "compose.yaml"), *compose_override(work), "--profile", "cpu"]


def check_compose(podman: Podman, image: str, checkpoint: Path, work: Path) -> str:
    """`podman-compose --profile cpu up -d armor-cpu` with the built serve image under compose's image name,
    then /health, 401 without the key and a chat completion on 127.0.0.1; `down` at the end."""
    import yaml

    compose_image = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["armor-cpu"]["image"]
    podman.made_images.append(compose_image)  # only a second tag of the built image
    podman.run("tag", image, compose_image, timeout=60)
    port, key = free_port(), secrets.token_hex(16)
    project = f"armor-docker-test-{port}"
    cmd = compose_command(podman, work, project)
    env = {**podman.env, "VLLM_API_KEY": key, "MODEL_DIR": str(checkpoint), "HOST_PORT": f"127.0.0.1:{port}",
           "MAX_MODEL_LEN": "1024", "VLLM_CPU_KVCACHE_SPACE": "1", "SERVED_MODEL_NAME": "armor"}

    def compose(*args: str, timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise CheckFailed(f"podman-compose {args[0]} failed (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-1500:]}")
        return done

    try:
        compose("up", "-d", "--no-build", "armor-cpu", timeout=300)
        names = podman.run("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                           "--format", "{{.Names}}", timeout=60).stdout.split()
        if len(names) != 1:
            raise CheckFailed(f"podman-compose up made containers {names}, expected one (armor-cpu)")
        podman.container(names[0])
        healthy_after = wait_healthy(podman, names[0], port)
        reply = check_api(port, key)
    finally:
        compose("down", "-t", "30", timeout=180)
    log.info("compose cpu profile: healthy after %.0f s, reply %r", healthy_after, reply)
    return f"podman-compose --profile cpu up: /health after {healthy_after:.0f} s, 401 without key, chat {reply!r}"


def check_k8s(home: Path, versions: tuple[str, ...] = ("1.30.0", "1.37.0")) -> str:
    """deploy/k8s/*.yaml against the Kubernetes JSON schemas (strict: unknown fields fail) with
    kubernetes-validate; a manifest with a misspelt field must fail (the validator really validates)."""
    files = [str(p) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) if p.name != "kustomization.yaml"]
    validate = str(tools_venv(home) / "kubernetes-validate")
    for version in versions:
        done = subprocess.run([validate, "--strict", "-k", version, *files], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise CheckFailed(f"deploy/k8s is not valid for Kubernetes {version}: {done.stdout}{done.stderr}")
    broken = home / "k8s-negative-control.yaml"
    broken.write_text((DEPLOY / "k8s" / "deployment.yaml").read_text().replace("containerPort:", "containerPorts:"))
    control = subprocess.run([validate, "--strict", str(broken)], capture_output=True, text=True, timeout=300)
    broken.unlink()
    if control.returncode == 0:
        raise CheckFailed("kubernetes-validate accepted a Deployment with a misspelt field: it does not validate")
    names = ", ".join(Path(f).name for f in files)
    return f"{names} valid against the Kubernetes {' and '.join(versions)} schemas (kubernetes-validate --strict)"
