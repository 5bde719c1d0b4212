"""The shape of the code: one import root, layers that only import downwards, no import cycle, one owner per
artifact file, a loop module that holds transitions only. Read from the source (imports inside functions too)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "recops": "recops",
    "training": "recops.training",
    "serving": "recops.serving",
    "ops": "recops.ops",
    "bench": "recops.bench",
    "configs": "recops.configs",
    "deploy": "recops.deploy",
    "triton_models": "recops.triton_models",
}
# A module may import modules of its own layer or a lower one. recops.cli sits on top.
RANKS = {
    "recops": 0,
    "recops.configs": 1,
    "recops.training": 2,
    "recops.serving": 3,
    "recops.ops": 4,
    "recops.triton_models": 4,  # python-backend code running serving inside Triton
    "recops.bench": 5,
    "recops.deploy": 5,
    "recops.cli": 6,
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """The recops modules ``path`` imports anywhere in its body (relative imports resolved)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = (
                    name.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else name.split(".")[: 1 - node.level or None]
                )
                base = ".".join([*package, base]) if base else ".".join(package)
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "recops" or m.startswith("recops.")}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for target in imports(path, name):
            while target not in known and "." in target:  # `from pkg import name`: the module is pkg
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and not name.startswith(target + "."):
                targets.add(target)
        edges[name] = targets
    return edges


def layer(module: str) -> str:
    return max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(graph()) == []


def test_layers_only_import_downwards() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if RANKS[layer(target)] > RANKS[layer(source)]
        or RANKS[layer(target)] == RANKS[layer(source)]
        and layer(target) != layer(source)
    ]
    assert upward == []


def test_the_checks_can_fail() -> None:
    """The graph checks see a planted cycle and a planted upward import."""
    edges = {"recops.training.a": {"recops.training.b"}, "recops.training.b": {"recops.training.a"}}
    assert cycles(edges) == [["recops.training.a", "recops.training.b"]]
    assert RANKS[layer("recops.ops.loop")] > RANKS[layer("recops.training.train")]
    assert "recops.training.checkpoint" in graph()["recops.training.train"]


ARTIFACT_FILES = {  # file name -> the only modules that may name it
    "manifest.json": {"recops.training.dataset"},
    "preprocessor.json": {"recops.training.dataset"},
    "trainer.json": {"recops.training.checkpoint"},
    "files.json": {"recops.training.checkpoint"},
    "export.json": {"recops.serving.onnx_model"},
    "preprocess.json": {"recops.serving.onnx_model"},
    "deploy_state.json": {"recops.serving.deploy"},
}


def code_strings(path: Path) -> list[str]:
    """The string constants a module's code works with: docstrings, error messages and ``help=`` texts left out."""
    tree = ast.parse(path.read_text())
    prose = [
        b.body[0].value
        for b in ast.walk(tree)
        if isinstance(b, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and b.body
        and isinstance(b.body[0], ast.Expr)
        and isinstance(b.body[0].value, ast.Constant)
    ]
    prose += [n for n in ast.walk(tree) if isinstance(n, ast.Raise) or isinstance(n, ast.keyword) and n.arg == "help"]
    skip = {id(c) for p in prose for c in ast.walk(p)}
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
    ]


@pytest.mark.parametrize("artifact", sorted(ARTIFACT_FILES))
def test_one_module_reads_and_writes_each_artifact(artifact: str) -> None:
    """No module outside an artifact's owner names its file in code."""
    pattern = re.compile(rf"(^|[/\s\"']){re.escape(artifact)}")
    readers = {name for name, path in modules().items() if any(pattern.search(c) for c in code_strings(path))}
    assert readers <= ARTIFACT_FILES[artifact], readers - ARTIFACT_FILES[artifact]


def test_the_loop_module_holds_transitions_only() -> None:
    assert len((ROOT / "ops" / "loop.py").read_text().splitlines()) < 300
