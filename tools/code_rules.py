"""The code rules of docs/ARCHITECTURE.md, checked from the source (nothing is imported or run):

- no module over `MAX_MODULE_LINES` lines and no function over `MAX_FUNCTION_LINES` lines;
- no private name (`_name`) imported from another module of the project;
- no import circle among the project's modules (imports under `if TYPE_CHECKING:` count too).

    python -m tools.code_rules        # one line per breach, exit 1 if any

Checked: the product packages and the developer code (`PACKAGES`); tests are left out.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("offline_prune", "vllm_armor", "bench", "tools")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)


def module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_modules(repo: Path) -> dict[str, Module]:
    paths = [p for pkg in PACKAGES for p in sorted((repo / pkg).rglob("*.py"))]
    return {module_name(p, repo): Module(module_name(p, repo), p, ast.parse(p.read_text(), str(p))) for p in paths}


def _imported(node: ast.ImportFrom, module: Module) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or '', line) of every project import in ``module``."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _imported(node, module)
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield (sub, "", node.lineno) if sub in known else (source, alias.name, node.lineno)


def size_breaches(module: Module, repo: Path) -> Iterator[str]:
    lines = len(module.path.read_text().splitlines())
    if lines > MAX_MODULE_LINES:
        yield f"{module.path.relative_to(repo)}: {lines} lines (at most {MAX_MODULE_LINES})"
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield (f"{module.path.relative_to(repo)}:{node.lineno}: function {node.name} has {length} lines "
                       f"(at most {MAX_FUNCTION_LINES})")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def breaches(repo: Path = REPO) -> list[str]:
    modules = load_modules(repo)
    found: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        found += size_breaches(module, repo)
        for source, name, line in import_edges(module, modules):
            if name.startswith("_") and not name.startswith("__") and source != module.name:
                found.append(f"{module.path.relative_to(repo)}:{line}: imports the private name {name} of {source}")
            if source in modules and source != module.name:
                graph[module.name].add(source)
    found += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return found


def main() -> int:
    found = breaches()
    for line in found:
        sys.stdout.write(line + "\n")
    sys.stdout.write(f"{len(found)} breaches of the code rules\n" if found else "code rules: all kept\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
