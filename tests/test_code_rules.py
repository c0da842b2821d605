"""tools/code_rules.py: the tree keeps the code rules, and the checker finds each kind of breach."""

from __future__ import annotations

from pathlib import Path

from tools import code_rules


def test_the_tree_keeps_the_code_rules():
    assert code_rules.breaches() == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_each_kind_of_breach_is_found(tmp_path):
    _write(tmp_path, "offline_prune/__init__.py", "")
    _write(tmp_path, "offline_prune/a.py", "from offline_prune.b import _hidden\n")
    _write(tmp_path, "offline_prune/b.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from offline_prune import a\n_hidden = 1\n")
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    _write(tmp_path, "vllm_armor/long.py", f"def long():\n{body}\n" + "\n" * 400)
    _write(tmp_path, "vllm_armor/ok.py", "from . import long\nfrom .long import long as f\n")
    found = code_rules.breaches(tmp_path)
    assert "offline_prune/a.py:1: imports the private name _hidden of offline_prune.b" in found
    assert "import circle: offline_prune.a -> offline_prune.b" in found
    assert "vllm_armor/long.py:1: function long has 61 lines (at most 60)" in found
    assert any(line.startswith("vllm_armor/long.py: 46") and line.endswith("lines (at most 400)") for line in found)
    assert len(found) == 4, found
