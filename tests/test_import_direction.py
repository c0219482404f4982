"""The library (`cogvideo/`) never imports a stage (`data_prep/`, `pretrain/`, `cluster/`) or the demo."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data_prep", "pretrain", "cluster", "demo")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def stage_imports(source: str) -> list[tuple[int, str]]:
    return [(line, name) for line, name in imported_modules(source) if name.split(".")[0] in STAGES]


def test_the_check_sees_every_form_of_import():
    source = (
        "import data_prep.synthetic\nfrom pretrain import train\n"
        "def f():\n    from cluster.plan import main\nimport cogvideo.models.cogvideo.config\nfrom . import x\n"
    )
    assert stage_imports(source) == [(1, "data_prep.synthetic"), (2, "pretrain"), (4, "cluster.plan")]


def test_library_never_imports_a_stage():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in sorted((ROOT / "cogvideo").rglob("*.py"))
        for line, name in stage_imports(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "\n".join(offenders)
