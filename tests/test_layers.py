"""editcore's folders are its layers: core < experiments < lab, and no import cycle among their modules.

Read from the source with `ast` (nothing is imported), so an import inside a function or under
TYPE_CHECKING counts like one at the top of a module.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "editcore"
LAYERS = ("core", "experiments", "lab")  # each may import the ones before it, never the ones after
TOP = ("__init__", "__main__", "cli")  # editcore's own files: the public API and the command line, above every layer


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layered_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of every layer (a layer's __init__ named as the layer)."""
    return {module_name(path, root): path for layer in LAYERS for path in sorted((root / layer).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that `path` (module `name`) imports, relative or absolute, anywhere in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:  # `from ..core import data` imports the module editcore.core.data
                found.add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem)
    root = package[0]
    return {target for target in found if target == root or target.startswith(root + ".")}


def rank(name: str) -> int:
    """A module's layer as a number (0 core, 1 experiments, 2 lab); editcore itself and its cli rank above all."""
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = layered_modules(root)
    known = set(modules) | {module_name(root / f"{top}.py", root) for top in TOP}
    return {name: imported_modules(path, name, known) - {name} for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                  if rank(target) > rank(source))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by a depth-first walk (empty: the graph is acyclic)."""
    cycles, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_every_module_but_the_api_and_the_cli_sits_in_a_layer():
    assert sorted(path.stem for path in PACKAGE.glob("*.py")) == sorted(TOP)
    assert sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__") == \
        sorted(LAYERS)
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file()


def test_no_layer_imports_a_layer_above_it():
    graph = import_graph(PACKAGE)
    assert len(graph) > len(LAYERS)  # the walk found the modules
    assert "editcore.core.edit" in graph["editcore.experiments.fixers"]  # ... and resolved their relative imports
    assert layer_violations(graph) == []


def test_no_import_cycle_among_the_layered_modules():
    assert import_cycles(import_graph(PACKAGE)) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    root = tmp_path / "editcore"
    files = {"__init__.py": "from .lab.a import A\n", "cli.py": "", "__main__.py": "",
             "core/__init__.py": "", "core/x.py": "def f():\n    from ..lab import a\n",
             "core/y.py": "from .z import Z\n", "core/z.py": "import editcore.core.y\n",
             "experiments/__init__.py": "", "experiments/e.py": "from editcore.lab.a import A\nfrom ..core import x\n",
             "lab/__init__.py": "", "lab/a.py": "from ..core.x import f\nfrom ..experiments import e\nA = 1\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert layer_violations(graph) == ["editcore.core.x imports editcore.lab.a",
                                       "editcore.experiments.e imports editcore.lab.a"]
    cycles = {frozenset(cycle) for cycle in import_cycles(graph)}
    assert frozenset({"editcore.core.y", "editcore.core.z"}) in cycles
    assert frozenset({"editcore.core.x", "editcore.lab.a"}) in cycles
