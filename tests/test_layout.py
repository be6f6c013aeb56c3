"""The house's shape: imports flow one way, down the pipeline, and no module imports itself round a cycle.

Every `import` of an earful module is read from the source (module-level and inside functions
alike: a lazy import is still a dependency), so a backward import cannot hide in a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "earful"

# Pipeline order: a stage may import the stages before it (and itself), never one after it.
# train and eval share a rank: neither imports the other (the trainer receives its evaluation hooks).
STAGES = {
    "errors": 0, "atomic": 0,
    "audio": 1,
    "pretrained": 2,
    "models": 3,
    "tokenizers": 4,
    "data": 5,
    "vocoders": 5.5,  # units -> audio: uses data.synth's Piper voice; eval and serve speak through it
    "train": 6, "eval": 6,
    "serve": 7,
    "cli": 8,
}
ENTRY_POINTS = {"earful", "earful.__main__"}  # the package's front door may reach anything


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The earful modules `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "earful")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "earful":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known  # `from . import atomic` names a module
            found.update(subs or {target})
    return {m for m in found if m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {m for m in _imports(name, path, known) if m in known} for name, path in modules.items()}


def _stage(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_module_has_a_stage():
    unknown = sorted({_stage(m) for m in _graph() if m not in ENTRY_POINTS} - set(STAGES))
    assert not unknown, f"give these parts of src/earful a place in STAGES: {unknown}"


def test_imports_flow_down_the_pipeline():
    backward = sorted(f"{m} -> {t}" for m, targets in _graph().items() if m not in ENTRY_POINTS
                      for t in targets if STAGES[_stage(t)] > STAGES[_stage(m)]
                      or (STAGES[_stage(t)] == STAGES[_stage(m)] and _stage(t) != _stage(m)))
    assert not backward, "imports that run back up the pipeline:\n" + "\n".join(backward)


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_models_import_nothing_from_train():
    assert not [t for m, ts in _graph().items() if _stage(m) == "models" for t in ts if _stage(t) == "train"]


def test_train_reads_as_one_loop():
    """`train()` reads top to bottom on a few screens: at most ~150 lines."""
    from earful.train import trainer

    import inspect

    lines = len(inspect.getsource(trainer.train).splitlines())
    assert lines <= 150, f"train() is {lines} lines; move set-up and bookkeeping into named helpers"
