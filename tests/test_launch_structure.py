"""The import structure of launch/ (issue 26): no import cycles, and no training entry imports another entry."""

from __future__ import annotations

import ast
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
ENTRIES = {"pretrain", "pretrain_fsdp", "pretrain_megatron"}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The launch/ modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None or node.module == "launch":
                found.update(a.name for a in node.names)
            elif node.module and (node.module.startswith("launch.") or node.level == 1):
                found.add(node.module.split(".")[-1] if node.level == 1 else node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("launch."))
    return (found & modules) - {path.stem}


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in LAUNCH.glob("*.py")}
    return {p.stem: imports_of(p, modules) for p in LAUNCH.glob("*.py")}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_no_entry_imports_another_entry():
    g = graph()
    for entry in ENTRIES:
        assert not g[entry] & ENTRIES, f"{entry} imports {sorted(g[entry] & ENTRIES)}"


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("from launch import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from launch.a import x\n")
    assert imports_of(tmp_path / "a.py", {"a", "b"}) == {"b"} and imports_of(tmp_path / "b.py", {"a", "b"}) == {"a"}
