"""Dockerfile rules for deploy/: the Dockerfiles split into stages (BuildKit's parser, the `dockerfile` package),
the image rules every shipped Dockerfile follows, and Docker's .dockerignore semantics.

Used by tests/test_deploy.py (the rules on the shipped files) and tools/docker_test.py (the base image and
build settings of the image it builds)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import dockerfile

ENTRYPOINT_IN_IMAGE = "/usr/local/bin/armor-entrypoint"


@dataclass
class Stage:
    base: str
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)

    def of(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in self.of("ENV"):
            out.update(zip(c.value[::2], c.value[1::2], strict=True))
        return out


def stages(text: str) -> list[Stage]:
    """Split a parsed Dockerfile into stages (commands before the first FROM, i.e. global ARGs, are dropped)."""
    result: list[Stage] = []
    for command in dockerfile.parse_string(text):
        if command.cmd == "FROM":
            value = command.value
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else None
            result.append(Stage(base=value[0], name=name))
        elif result:
            result[-1].commands.append(command)
    return result


def flag(command: dockerfile.Command, name: str) -> str | None:
    for f in command.flags:
        if f.startswith(f"--{name}="):
            return f.split("=", 1)[1]
    return None


PINNED_TAG = re.compile(r":v?\d+\.\d+(\.\d+)?([.-][\w.-]+)?$")


def dockerfile_problems(text: str) -> list[str]:
    """Violations of the image rules; empty when the Dockerfile is acceptable."""
    problems: list[str] = []
    all_stages = stages(text)
    if not all_stages:
        return ["no FROM"]
    names = {s.name for s in all_stages if s.name}
    for s in all_stages:
        if s.base in names:
            continue
        if "@sha256:" in s.base:
            continue
        if s.base.endswith(":latest") or ":" not in s.base.rsplit("/", 1)[-1]:
            problems.append(f"base image {s.base} is not pinned (no tag or 'latest')")
        elif not PINNED_TAG.search(s.base):
            problems.append(f"base image {s.base} has no explicit version in its tag")
    for s in all_stages:
        for c in s.of("ADD"):
            if any(re.match(r"^(https?|git|ftp)://|^git@", v) for v in c.value[:-1]):
                problems.append(f"line {c.start_line}: ADD of a URL ({c.original})")
    syntax = re.match(r"#\s*syntax=(\S+)", text)
    if syntax and not PINNED_TAG.search(syntax.group(1)):
        problems.append(f"frontend {syntax.group(1)} is not pinned to a version")
    final = all_stages[-1]
    users = effective_users(all_stages, final)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("final stage does not switch to a non-root USER")
    healthchecks = final.of("HEALTHCHECK")
    if not healthchecks or healthchecks[-1].value[0].upper() != "CMD":
        problems.append("final stage has no HEALTHCHECK CMD")
    entrypoints = final.of("ENTRYPOINT")
    if not entrypoints or not entrypoints[-1].json or entrypoints[-1].value[0] != ENTRYPOINT_IN_IMAGE:
        problems.append(f"final stage ENTRYPOINT is not exec-form [{ENTRYPOINT_IN_IMAGE!r}]")
    return sorted(set(problems))


def effective_users(all_stages: list[Stage], stage: Stage) -> list[str]:
    """USER instructions in effect for ``stage``, following FROM <earlier stage> chains."""
    by_name = {s.name: s for s in all_stages if s.name}
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return [c.value[0] for s in reversed(chain) for c in s.of("USER")]


def copies_from_context(stage: Stage) -> list[tuple[str, str]]:
    """(source, destination) of every COPY/ADD of the build context (not --from another stage)."""
    out = []
    for c in stage.of("COPY") + stage.of("ADD"):
        if flag(c, "from") is None:
            out.extend((src, c.value[-1]) for src in c.value[:-1])
    return out


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics for one path: the last matching pattern wins, '!' re-includes, and a
    pattern that matches a parent folder matches everything below it."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], pattern[3:]) for c in candidates)
        else:
            hit = any(fnmatch.fnmatchcase(c, pattern) and c.count("/") == pattern.count("/") for c in candidates)
        if hit:
            included = negate
    return included
