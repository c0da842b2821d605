"""A rootful podman for `make docker-test` (tools/docker_test.py): installed with apt where missing, configured
through its own containers.conf and storage, and a local stand-in for the Dockerfile's base image where no
registry can be reached.

Everything goes through :class:`Podman`, which bounds every command with a timeout and remembers the images
and containers it made so that :meth:`Podman.cleanup` removes exactly those.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tools.podman_env")

APT_PACKAGES = ["podman", "runc", "buildah", "netavark", "aardvark-dns", "iptables", "conmon", "mmdebstrap",
                "uidmap"]
# crun fails on this kind of machine ("cgroups in hybrid mode not supported"); podman's default ulimits fail
# `podman run` with "error setting rlimit type 7: operation not permitted"; no systemd/journald here.
ULIMITS = {"nofile": 20000, "nproc": 32768}
CONTAINERS_CONF = f"""\
[containers]
default_ulimits = [{", ".join(f'"{k}={v}:{v}"' for k, v in ULIMITS.items())}]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
"""
# The stand-in base image: Debian bookworm's python3 (3.11) with pip, made to behave like python:3.11-slim
# where the Dockerfiles rely on it (pip installs system-wide as root, `python`/`pip` on PATH).
BASE_PACKAGES = "python3,python3-pip,python3-venv,ca-certificates"
LOCAL_BASE_LABEL = "org.vllm-armor.local-base"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


class RuntimeUnavailable(RuntimeError):
    """The container runtime cannot be installed or started here (the message is the one line to print)."""


def tail(text: str, lines: int = 1) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def ensure_installed() -> None:
    """apt-get install the runtime where `podman` (or mmdebstrap) is missing; needs root."""
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeUnavailable(f"{', '.join(missing)} missing and cannot be installed here "
                                 "(needs root and apt-get): install podman, runc and mmdebstrap")
    log.info("installing %s with apt-get (missing: %s)", " ".join(APT_PACKAGES), ", ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise RuntimeUnavailable(f"{' '.join(cmd[:2])} took over 900 s") from None
        if done.returncode != 0:
            raise RuntimeUnavailable(f"{' '.join(cmd[:2])} failed: {tail(done.stderr or done.stdout)}")


@dataclass
class Podman:
    """Rootful podman with its own config and storage under ``home`` (nothing of the host's podman is used)."""

    home: Path
    made_images: list[str] = field(default_factory=list)
    made_containers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.conf = self.home / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.base_cmd = ["podman", "--root", str(self.home / "storage"), "--runroot", str(self.home / "run")]

    def run(self, *args: str, timeout: float, check: bool = True, stream: bool = False,
            stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """One podman command, killed after ``timeout`` s; ``stream`` sends its output to our stdout (builds)."""
        cmd = [*self.base_cmd, *args]
        log.debug("$ %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, env=self.env, timeout=timeout, input=stdin,
                                  capture_output=not stream, text=stdin is None)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"podman {args[0]} did not finish within {timeout:.0f} s") from None
        if check and done.returncode != 0:
            detail = tail(done.stderr or done.stdout, 3) if not stream else "see the output above"
            raise RuntimeError(f"podman {' '.join(args[:2])} failed (exit {done.returncode}): {detail}")
        return done

    def check_runtime(self) -> None:
        """`podman info` answers (storage, config and OCI runtime found), else RuntimeUnavailable."""
        info = self.run("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=120, check=False)
        if info.returncode != 0:
            raise RuntimeUnavailable(f"podman cannot start here: {tail(info.stderr)}")
        log.info("podman runtime %s, config %s, storage %s", info.stdout.strip(), self.conf, self.home)

    def smoke(self, image: str) -> None:
        """Run `true` in ``image``: the OCI runtime can start a container here, else RuntimeUnavailable."""
        done = self.run("run", "--rm", "--network", "none", image, "true", timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeUnavailable(f"podman cannot run a container here: {tail(done.stderr)}")

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, timeout=60, check=False).returncode == 0

    def label(self, image: str, key: str) -> str | None:
        out = self.run("image", "inspect", "--format", f'{{{{index .Labels "{key}"}}}}', image, timeout=60)
        value = out.stdout.strip()
        return value if value and value != "<no value>" else None

    def build(self, dockerfile: Path, context: Path, target: str, tag: str, build_args: dict[str, str],
              timeout: float, cache: bool = True) -> None:
        args = ["build", "--format", "docker", "--network", "host", "--pull=never", "-f", str(dockerfile),
                "--ignorefile", f"{dockerfile}.dockerignore", "--target", target, "-t", tag]
        if not cache:
            args.append("--no-cache")
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        self.made_images.append(tag)
        self.run(*args, str(context), timeout=timeout, stream=True)

    def container(self, name: str) -> str:
        """Register a container name for cleanup (call before `podman run --name`)."""
        self.made_containers.append(name)
        return name

    def cleanup(self, keep_images: bool = False) -> None:
        """Remove the containers and images this run made, then the build's dangling layers (own storage)."""
        for name in reversed(self.made_containers):
            self.run("rm", "-f", "-t", "10", name, timeout=120, check=False)
        if keep_images:
            log.info("removed %d container(s); kept the images %s", len(self.made_containers), self.made_images)
            return
        for image in reversed(self.made_images):
            self.run("rmi", "-f", image, timeout=300, check=False)
        self.run("image", "prune", "-f", timeout=300, check=False)
        log.info("removed %d container(s) and %d image(s) made by this run", len(self.made_containers),
                 len(self.made_images))


def ensure_base_image(podman: Podman, name: str, pull_timeout: float = 180) -> str:
    """Make ``name`` (the Dockerfile's FROM) available locally; return how: cached, pulled or built."""
    if podman.image_exists(name):
        how = "a local stand-in" if podman.label(name, LOCAL_BASE_LABEL) else "pulled earlier"
        log.info("base image %s: reusing the cached image (%s)", name, how)
        return "cached"
    log.info("base image %s: trying to pull it from its registry (at most %.0f s)", name, pull_timeout)
    try:
        pulled = podman.run("pull", "-q", f"docker.io/library/{name}", timeout=pull_timeout, check=False)
        if pulled.returncode == 0:
            log.info("base image %s: pulled the real image from docker.io", name)
            return "pulled"
        reason = tail(pulled.stderr)
    except RuntimeError as err:
        reason = str(err)
    log.info("base image %s cannot be pulled (%s): building a local stand-in with mmdebstrap (Debian "
             "bookworm python3); a Docker/podman with registry access uses the real image", name, reason)
    build_local_base(podman, name)
    return "built"


def build_local_base(podman: Podman, name: str, timeout: float = 900) -> None:
    """mmdebstrap bookworm minbase + python3/pip/venv + this machine's CA certificates, `podman import`ed."""
    hooks = [
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        'ln -sf python3 "$1"/usr/bin/python',
        'ln -sf pip3 "$1"/usr/bin/pip',
        'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
    ]
    if HOST_CA_DIR.is_dir() and any(HOST_CA_DIR.glob("*.crt")):
        # The machine's own CAs (e.g. an egress proxy's): pip inside the image must trust what the host does.
        hooks.insert(0, f'cp {HOST_CA_DIR}/*.crt "$1"/usr/local/share/ca-certificates/ '
                        '&& chroot "$1" update-ca-certificates')
    with tempfile.TemporaryDirectory(prefix="armor-base-", dir=podman.home) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        cmd = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "--quiet"]
        cmd += [f"--customize-hook={hook}" for hook in hooks] + ["bookworm", str(rootfs)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"mmdebstrap did not finish within {timeout} s") from None
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed (exit {done.returncode}): {tail(done.stderr, 3)}")
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                   f"LABEL {LOCAL_BASE_LABEL}=mmdebstrap-bookworm", 'CMD ["python3"]']
        args = ["import"] + [f"--change={c}" for c in changes] + [str(rootfs), name]
        podman.run(*args, timeout=600)
    size = podman.run("image", "inspect", "--format", "{{.Size}}", name, timeout=60).stdout.strip()
    log.info("base image %s: built locally (%.0f MB)", name, int(size) / 1e6)
