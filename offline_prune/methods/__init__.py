"""The pruning-method registry. Adding a method = adding one module (or subpackage) to this package.

Every public module or subpackage here (name not starting with "_") defines ``METHOD: PruningMethod`` (a
subpackage in its ``__init__``, e.g. ``armor/``): what the method needs from the layer walk (calibration data,
statistics of the already-pruned model, X^T X), its options (the CLI builds its flags from them) and ``prune``, a
pure function on one weight matrix. This file imports every module and subpackage of the package (pkgutil) and
registers their METHODs; offline_prune.jobs runs a method on one matrix,
offline_prune.pipeline walks the model.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from offline_prune.errors import UserError
from offline_prune.statistics import InputStats


@dataclass(frozen=True)
class MethodOption:
    """One option of a method; the CLI flag is ``--name`` with dashes (block_size -> --block-size)."""

    name: str
    default: Any
    type: Callable[[str], Any]
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class PruneOutput:
    """What a method returns for one matrix: the 2:4 core (float32, zero outside ``mask``) and, for ARMOR, the
    block-diagonal factors with A @ core @ B ~ W."""

    core: torch.Tensor
    mask: torch.Tensor
    a_blocks: torch.Tensor | None = None
    b_blocks: torch.Tensor | None = None
    iterations: int = 0
    report_extra: dict = field(default_factory=dict)  # added to the matrix's report after "method"


# A walk requirement: fixed, or decided by the method's resolved options (ARMOR: by its optimiser).
Flag = bool | Callable[[Mapping[str, Any]], bool]

# (weight float32 on device, statistics or None, cleaned h on device, options, per-matrix seed, device)
PruneFn = Callable[[torch.Tensor, "InputStats | None", torch.Tensor, Mapping[str, Any], int, str], PruneOutput]


@dataclass(frozen=True)
class PruningMethod:
    name: str
    prune: PruneFn
    order: int  # position in the CLI's --method choices
    needs_calibration: bool = True
    sequential: Flag = False  # statistics from the already-pruned earlier layers (SparseGPT, Wanda papers)
    needs_gram: Flag = False  # X^T X besides h
    options: tuple[MethodOption, ...] = ()
    # Iterative methods may be given options[TIME_LIMIT] (seconds for this matrix, or None) by --time-budget.
    iterative: bool = False
    # Default --tune-epochs: passes of block-wise reconstruction after the jobs (offline_prune.reconstruct).
    tune_epochs: float = 0.0

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def is_sequential(self, options: Mapping[str, Any]) -> bool:
        """Whether the walk must give this run statistics of the already-pruned earlier layers."""
        return bool(self.sequential(options) if callable(self.sequential) else self.sequential)

    def wants_gram(self, options: Mapping[str, Any]) -> bool:
        """Whether the walk must collect X^T X for this run."""
        return bool(self.needs_gram(options) if callable(self.needs_gram) else self.needs_gram)

    def select(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``values`` that are options of this method (the others are ignored)."""
        return {name: values[name] for name in self.option_names if name in values}

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` completed with the defaults, in declaration order; an unknown option is a UserError."""
        unknown = sorted(set(given) - set(self.option_names))
        if unknown:
            raise UserError(f"method {self.name!r} has no option {', '.join(map(repr, unknown))} "
                            f"(its options: {', '.join(self.option_names) or 'none'})")
        return {o.name: given.get(o.name, o.default) for o in self.options}


TIME_LIMIT = "time_limit"  # key of the per-matrix time allowance in an iterative method's options
_REGISTRY: dict[str, PruningMethod] = {}


def get_method(name: str) -> PruningMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"--method {name!r}: choose one of {', '.join(method_names())}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_options() -> list[MethodOption]:
    """Every method's options, once per name (first declaration), in --method order."""
    seen: dict[str, MethodOption] = {}
    for method in _REGISTRY.values():
        for option in method.options:
            seen.setdefault(option.name, option)
    return list(seen.values())


def _discover() -> None:
    found = []
    for info in pkgutil.iter_modules(__path__):  # modules and subpackages (info.ispkg) alike
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if not isinstance(getattr(module, "METHOD", None), PruningMethod):
                raise RuntimeError(f"{module.__name__} ({'package' if info.ispkg else 'module'}) defines no "
                                   "METHOD = PruningMethod(...); a helper module's name must start with '_'")
            found.append(module.METHOD)
    for method in sorted(found, key=lambda m: m.order):
        if method.name in _REGISTRY:
            raise RuntimeError(f"pruning method {method.name!r} is defined twice")
        _REGISTRY[method.name] = method


_discover()
