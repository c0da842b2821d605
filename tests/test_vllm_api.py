"""Every vLLM name the plugin uses (vllm_armor/vllm_api.py) exists in the installed vLLM with the parameters we use."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from vllm_armor.vllm_api import VLLM_API

PLUGIN_FILES = [Path(__file__).parent.parent / "vllm_armor" / f for f in ("plugin.py", "linear_method.py")]


def _resolve(ref: str):
    """(the object or None for an instance attribute, the owning class or module)."""
    module, _, qualname = ref.partition(":")
    owner = importlib.import_module(module)
    *path, last = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    if hasattr(owner, last):
        return getattr(owner, last), owner
    assert inspect.isclass(owner), f"{ref}: no such name in the installed vLLM"
    sources = [inspect.getsource(cls) for cls in owner.__mro__ if cls.__module__.startswith("vllm")]
    assert any(f"self.{last} =" in s or f"self.{last}:" in s for s in sources), f"{ref}: no such attribute"
    return None, owner


def _parameters(func) -> set[str]:
    return set(inspect.signature(func).parameters)


@pytest.mark.parametrize("ref", sorted(VLLM_API))
def test_vllm_name_exists_with_our_parameters(ref):
    obj, _ = _resolve(ref)
    wanted = set(VLLM_API[ref])
    if wanted:
        target = obj.__init__ if inspect.isclass(obj) else obj
        assert wanted <= _parameters(target), f"{ref}: {sorted(wanted - _parameters(target))} no longer accepted"


def test_our_overrides_accept_what_vllm_passes():
    import vllm_armor

    vllm_armor.register()
    from vllm_armor.linear_method import ArmorLinearMethod
    from vllm_armor.plugin import ArmorConfig

    ours = {"QuantizationConfig": ArmorConfig, "LinearMethodBase": ArmorLinearMethod}
    checked = 0
    for ref, params in VLLM_API.items():
        owner_name, _, member = ref.partition(":")[2].partition(".")
        if owner_name in ours and member and callable(getattr(ours[owner_name], member, None)):
            assert set(params) <= _parameters(getattr(ours[owner_name], member)), ref
            checked += 1
    assert checked >= 10
    assert ArmorConfig.from_config({"quant_method": "armor", "format_version": 1, "sparsity": "2:4",
                                    "pruned_modules": []}).packed_modules_mapping == {}


def _plugin_uses() -> set[str]:
    """``module:name`` for every ``from vllm... import name`` and ``envs.name`` in the plugin's modules."""
    uses = set()
    for path in PLUGIN_FILES:
        tree = ast.parse(path.read_text())
        env_aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                       for a in n.names if a.name == "vllm.envs"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm."):
                uses.update(f"{node.module}:{a.name}" for a in node.names)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in env_aliases:
                uses.add(f"vllm.envs:{node.attr}")
    return uses


def test_table_lists_every_vllm_name_the_plugin_imports():
    uses = _plugin_uses()
    assert "vllm.envs:environment_variables" in uses and "vllm.model_executor.parameter:BasevLLMParameter" in uses
    assert not uses - set(VLLM_API), f"add these to vllm_armor/vllm_api.py: {sorted(uses - set(VLLM_API))}"
