"""Imports go one way: vlmft → deployments → flows → tasks → vlm_core, and no module imports itself back.

Read from the source with `ast`, so imports inside functions (the lazy ones that keep start-up fast)
count too: a lazy import that points up a layer is still a dependency in the wrong direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["vlmft", "deployments", "flows", "tasks", "vlm_core"]  # each may import only those after it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """{module: project modules it imports (anywhere in its body)}, resolved to modules that exist."""
    files = {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] not in LAYERS:
                    continue
                while target and target not in files:  # `from pkg.mod import func` -> pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_layer_has_modules():
    graph = project_imports()
    assert {m.split(".")[0] for m in graph} == set(LAYERS)
    assert "vlmft.cli" in graph and "vlm_core.train" in graph


def test_imports_only_go_down_the_layers():
    upward = sorted(f"{m} imports {t}" for m, targets in project_imports().items() for t in targets if layer(t) < layer(m))
    assert upward == []


def test_no_import_cycles():
    assert find_cycle(project_imports()) is None


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above could fail: a made-up graph with both faults is caught."""
    graph = {"flows.a": {"vlmft.cli"}, "vlm_core.x": {"vlm_core.y"}, "vlm_core.y": {"vlm_core.x"}}
    assert find_cycle(graph) == ["vlm_core.x", "vlm_core.y", "vlm_core.x"]
    assert layer("vlmft.cli") < layer("flows.a")


def readme_layout() -> dict[str, set[str]]:
    """{folder: names listed for it} from the README's Layout table (continuation rows have no folder)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Layout"):].split("\n\n")[1]
    listed: dict[str, set[str]] = {}
    folder = ""
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        folder = cells[0].strip("`") or folder
        listed.setdefault(folder, set()).update(name.strip("`") for name in cells[1].split(", "))
    return listed


def test_readme_layout_table_matches_the_tree():
    listed = readme_layout()
    for layer_name in LAYERS:
        folder = ROOT / layer_name
        for sub in [folder, *(p for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file())]:
            key = f"{sub.relative_to(ROOT).as_posix()}/"
            actual = {p.name for p in sub.glob("*.py") if p.name != "__init__.py" and p.name != "__main__.py"}
            actual |= {f"{p.name}/" for p in sub.iterdir() if p.is_dir() and not (p / "__init__.py").is_file()
                       and p.name != "__pycache__"}
            actual |= {p.name for p in sub.glob("*.yaml")}
            assert listed.get(key, set()) == actual, key
