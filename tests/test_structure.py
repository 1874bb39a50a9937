"""The layout of the project: imports run one way, from the model at the bottom to the scripts on top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(path):
    """Every module of ours that a file imports, wherever the import statement stands (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES.keys()


def reachable(start, graph):
    """Every module that importing `start` loads, itself excluded."""
    seen, todo = set(), [start]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_the_import_graph_has_no_circle():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert len(graph) >= 13 and graph["evaluate"] >= {"train", "sample", "metrics"}  # the parse sees real imports
    circles = sorted(name for name in graph if name in reachable(name, graph))
    assert circles == [], f"modules that import themselves through others: {circles}"


def test_the_model_and_sampling_load_no_training_code():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert reachable("letstalk", graph) == set() and reachable("diffusion", graph) == set()
    assert not reachable("sample", graph) & {"train", "config", "metrics", "evaluate", "world"}
    assert not reachable("metrics", graph) & {"train", "sample", "evaluate"}
