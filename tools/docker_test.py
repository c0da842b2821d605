"""`make docker-test`: build deploy/Dockerfile.cpu (targets `serve` and `prune`, the file unchanged) with a real
container runtime (rootful podman) and check the built images end to end, on a machine without Docker Hub.

1. podman (installed with apt where missing, tools/podman_env.py); the Dockerfile's FROM image pulled, or a
   cached/locally built stand-in where no registry answers (the log says which);
2. `podman build --format docker --network host --pull=never` of both targets; torch from a one-wheel local
   index on 127.0.0.1 where pip finds the wheel on this machine (else the Dockerfile's PyTorch index);
3. prune image: `armor-prune` of the bundled SmolLM2-135M (short schedule) onto a mounted folder as uid 10001,
   no network; `armor-check` on the result;
4. serve image on that checkpoint (tools/docker_serve_checks.py): /health, a chat completion through the
   openai client, 401 without the key, the HEALTHCHECK, the sparse CPU kernel in the log, uid 10001, no
   source tree, SIGTERM stops it within 30 s; then compose.yaml's `cpu` profile through podman-compose;
5. deploy/k8s validated against the Kubernetes schemas (kubernetes-validate).

Only 127.0.0.1 is contacted by the checks; every wait has a deadline; the images and containers made are
removed at the end (the base image stays cached). Exit 0 when every check passed; when the runtime cannot
start, one line saying why and exit 1.

    python -m tools.docker_test [--data ../shared/data] [--keep-work]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tools.docker_serve_checks import CheckFailed, check_compose, check_k8s, check_serve
from tools.dockerfile_rules import stages
from tools.podman_env import Podman, RuntimeUnavailable, ensure_base_image, ensure_installed

log = logging.getLogger("tools.docker_test")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile.cpu"
BUNDLED_MODEL = "smollm2-135m"
# A short ARMOR schedule: the whole run (calibration, matrices, block tuning) within the time budget, blocks of
# 32 as in the end-to-end tests (tests/conftest.py E2E_PRUNE).
PRUNE_FLAGS = ["--method", "armor", "--calib-samples", "4", "--calib-seqlen", "128", "--seed", "0",
               "--block-size", "32", "--time-budget", "90s"]
IMAGE = "localhost/vllm-armor-docker-test"
BUILD_TIMEOUT = 1800
PRUNE_TIMEOUT = 900


class Timings(dict):
    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        log.info("--- %s", name)
        try:
            yield
        finally:
            self[name] = time.monotonic() - start
            log.info("--- %s: %.0f s", name, self[name])


def dockerfile_facts(text: str) -> dict[str, str]:
    """The external base image, the torch pin and the uid of deploy/Dockerfile.cpu (read, never edited)."""
    all_stages = stages(text)
    names = {s.name for s in all_stages}
    bases = {s.base for s in all_stages if s.base not in names}
    if len(bases) != 1:
        raise CheckFailed(f"{DOCKERFILE}: expected one external base image, found {sorted(bases)}")
    args = dict(c.value[0].split("=", 1) for s in all_stages for c in s.of("ARG") if "=" in c.value[0])
    runs = " ".join(c.value[0] for s in all_stages for c in s.of("RUN"))
    pins = [word.strip('"') for word in runs.split() if word.strip('"').startswith("torch==")]
    if not pins or "ARMOR_UID" not in args:
        raise CheckFailed(f"{DOCKERFILE}: no torch==... pin or no ARG ARMOR_UID=...")
    return {"base": bases.pop(), "torch": pins[0], "uid": args["ARMOR_UID"]}


@contextlib.contextmanager
def torch_index(work: Path, pin: str) -> Iterator[dict[str, str]]:
    """A one-wheel package index on 127.0.0.1 holding ``pin`` where pip gets the wheel on this machine (its
    cache, find-links or index); else no build arg, so the Dockerfile's PyTorch CPU index is used."""
    root = work / "torch-index"
    cmd = [sys.executable, "-m", "pip", "download", "-q", pin, "--no-deps", "-d", str(root / "torch")]
    try:
        got = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        got = None
    if got is None or got.returncode != 0:
        log.info("%s: not found by pip here, the build uses the Dockerfile's TORCH_CPU_INDEX", pin)
        yield {}
        return
    handler = partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    log.info("%s: from a one-wheel local index %s (%s)", pin, url, next((root / "torch").iterdir()).name)
    try:
        yield {"TORCH_CPU_INDEX": url}
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server API)
        log.debug(format, *args)


def stage_model(work: Path, uid: int) -> tuple[Path, Path]:
    """The bundled model copied world-readable (its cache may be 0600) and an output folder owned by ``uid``."""
    from offline_prune.models import resolve_model

    src = Path(resolve_model(BUNDLED_MODEL))
    model = work / "in" / BUNDLED_MODEL
    shutil.copytree(src, model)
    for path in [model.parent, *model.rglob("*"), model]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = work / "out"
    out.mkdir()
    os.chown(out, uid, uid)
    return model, out


def build_images(podman: Podman, run_id: str, build_args: dict[str, str]) -> dict[str, str]:
    images = {}
    # serve first, without the layer cache: buildah 1.28 (Debian 12) cannot bind-mount a stage that came from
    # the cache (`RUN --mount=...,from=wheel`: "couldn't find .../merged/wheels on host"); prune then reuses the
    # runtime layers just built.
    for target, cache in (("serve", False), ("prune", True)):
        tag = f"{IMAGE}:{target}-{run_id}"
        log.info("podman build --target %s%s (output follows)", target, "" if cache else " --no-cache")
        podman.build(DOCKERFILE, REPO, target, tag, build_args, timeout=BUILD_TIMEOUT, cache=cache)
        images[target] = tag
    return images


def check_prune(podman: Podman, image: str, model: Path, out: Path, calib: Path, uid: int) -> Path:
    """armor-prune in the prune image (no network, as the image's user) onto ``out``; armor-check on it."""
    name = podman.container(f"{image.rsplit(':', 1)[1]}-prune")
    podman.run("run", "--rm", "--name", name, "--network", "none", "-e", "HF_HUB_OFFLINE=1",
               "-v", f"{model}:/models/in:ro", "-v", f"{calib.parent}:/data:ro", "-v", f"{out}:/models/out",
               image, "/models/in", "/models/out/model", "--calib", f"c4:/data/{calib.name}", *PRUNE_FLAGS,
               timeout=PRUNE_TIMEOUT, stream=True)
    checkpoint = out / "model"
    owners = {p.stat().st_uid for p in checkpoint.rglob("*")}
    if not (checkpoint / "armor_report.json").is_file() or owners != {uid}:
        raise CheckFailed(f"prune container: no armor_report.json in {checkpoint} or files not owned by "
                          f"uid {uid} (owners {sorted(owners)})")
    check = podman.run("run", "--rm", "--network", "none", "--entrypoint", "armor-check",
                       "-v", f"{out}:/models/out:ro", image, "/models/out/model", timeout=300, check=False)
    if check.returncode != 0:
        raise CheckFailed(f"armor-check in the prune image failed: {check.stdout[-2000:]}{check.stderr[-2000:]}")
    log.info("prune image: checkpoint written as uid %d, armor-check passed: %s", uid, check.stdout.strip()[-300:])
    return checkpoint


def image_facts(podman: Podman, image: str) -> dict[str, str]:
    fmt = "{{.Size}} {{.Config.User}} {{if .Config.Healthcheck}}healthcheck{{end}}"
    size, user, *health = podman.run("image", "inspect", "--format", fmt, image, timeout=60).stdout.split()
    return {"size_gb": f"{int(size) / 1e9:.2f}", "user": user, "healthcheck": "yes" if health else "no"}


def run_all(podman: Podman, work: Path, data: Path, timings: Timings, prebuilt: str | None) -> dict[str, str]:
    facts = dockerfile_facts(DOCKERFILE.read_text())
    uid = int(facts["uid"])
    calib = data / "c4" / "c4_validation_2k.jsonl"
    if not calib.is_file():
        raise CheckFailed(f"calibration data {calib} not found (--data)")
    run_id = f"{os.getpid()}-{int(time.time())}"
    with timings.step("base image"):
        summary = {"base": f"{facts['base']} ({ensure_base_image(podman, facts['base'])})"}
        podman.smoke(facts["base"])
    if prebuilt:
        images = {target: f"{IMAGE}:{target}-{prebuilt}" for target in ("serve", "prune")}
    else:
        with timings.step("build serve+prune"), torch_index(work, facts["torch"]) as build_args:
            images = build_images(podman, run_id, build_args)
    serve_facts = image_facts(podman, images["serve"])
    summary.update(size_gb=serve_facts["size_gb"], user=serve_facts["user"])
    if serve_facts["healthcheck"] != "yes":
        raise CheckFailed(f"{images['serve']} has no HEALTHCHECK (built without --format docker?)")
    with timings.step("prune container"):
        model, out = stage_model(work, uid)
        checkpoint = check_prune(podman, images["prune"], model, out, calib, uid)
    with timings.step("serve container"):
        summary.update(check_serve(podman, images["serve"], checkpoint, uid))
    with timings.step("compose cpu profile"):
        summary["compose"] = check_compose(podman, images["serve"], checkpoint, work)
    with timings.step("k8s validation"):
        summary["k8s"] = check_k8s(podman.home)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder with c4/c4_validation_2k.jsonl (default: ../shared/data)")
    parser.add_argument("--podman-home", type=Path,
                        default=Path(os.environ.get("ARMOR_PODMAN_HOME", "/var/lib/vllm-armor-docker-test")),
                        help="podman config and storage of this test (the base image stays cached there)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoint, logs)")
    parser.add_argument("--prebuilt", metavar="SUFFIX",
                        help="skip the build: check the images vllm-armor-docker-test:{serve,prune}-SUFFIX of an "
                             "earlier run started with --keep-images (they are kept)")
    parser.add_argument("--keep-images", action="store_true", help="keep the images built by this run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.monotonic()
    try:
        ensure_installed()
        podman = Podman(args.podman_home)
        podman.check_runtime()
    except RuntimeUnavailable as err:
        print(f"docker-test: container runtime unavailable: {err}", file=sys.stderr)
        return 1
    timings = Timings()
    work = Path(tempfile.mkdtemp(prefix="armor-docker-test-", dir=args.podman_home))
    work.chmod(0o755)
    try:
        summary = run_all(podman, work, args.data.resolve(), timings, args.prebuilt)
    except RuntimeUnavailable as err:
        print(f"docker-test: container runtime unavailable: {err}", file=sys.stderr)
        return 1
    except (CheckFailed, RuntimeError) as err:
        log.error("docker-test FAILED: %s", err)
        return 1
    finally:
        with timings.step("cleanup"):
            podman.cleanup(keep_images=args.keep_images)
            if not args.keep_work:
                shutil.rmtree(work, ignore_errors=True)
    log.info("docker-test PASSED in %.0f s", time.monotonic() - start)
    for key, value in summary.items():
        log.info("  %-14s %s", key, value)
    log.info("  timings        %s", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
