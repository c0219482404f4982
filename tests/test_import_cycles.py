"""No two library modules import each other, directly or around a loop (function-level imports
included): an interface module is imported by its implementations, a factory imports them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports (`from pkg import mod` counts as pkg.mod)."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in sources else node.module
                    for a in node.names
                ]
            else:
                continue
            graph[name] |= {target for target in found if target in sources and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each loop once, as the path from its smallest module back to itself."""
    found = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                found.add(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in graph:
        walk(start, start, [start])
    return [list(c) + [c[0]] for c in sorted(found)]


def test_the_check_finds_a_loop_through_a_function_level_import():
    sources = {
        "lib.a": "from lib.b import f\n",
        "lib.b": "def f():\n    from lib import c\n",
        "lib.c": "import lib.a\n",
        "lib.d": "import lib.a\n",
    }
    assert cycles(import_graph(sources)) == [["lib.a", "lib.b", "lib.c", "lib.a"]]


def test_library_modules_import_without_cycles():
    sources = {
        module_name(p): p.read_text(encoding="utf-8") for p in sorted((ROOT / "cogvideo").rglob("*.py"))
    }
    loops = cycles(import_graph(sources))
    assert not loops, "\n".join(" -> ".join(loop) for loop in loops)


def test_tokenizers_do_not_import_evaluation():
    sources = {
        module_name(p): p.read_text(encoding="utf-8") for p in sorted((ROOT / "cogvideo").rglob("*.py"))
    }
    graph = import_graph(sources)
    offenders = [
        f"{m} imports {t}"
        for m in graph
        if m.startswith("cogvideo.tokenizers")
        for t in graph[m]
        if t.startswith("cogvideo.eval")
    ]
    assert not offenders, offenders
