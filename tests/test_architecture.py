"""The architecture's rules, checked on the source with ``ast`` (no import, no Docker, no Airflow run).

The modules of ``plugins/batchscore`` and ``include/batchscore_runtime`` and the imports between
them form a graph, imports inside functions (and under ``if TYPE_CHECKING:``) included: an import
put inside a function to dodge a cycle still runs, and is still a dependency. The rules:

* no import cycle (no strongly connected component of more than one module);
* no module over :data:`MAX_LINES` lines;
* every module opens with a docstring saying what it owns;
* the runtime (``batchscore_runtime``, which runs inside user images) never imports Airflow,
  pydantic or ``batchscore``;
* the Airflow-free modules of the Airflow side (:data:`AIRFLOW_FREE`) never import Airflow,
  not even through another module of the project.

``import a.b.c`` is an edge to the longest of ``a.b.c``, ``a.b``, ``a`` that is a module here;
``from p import n`` an edge to ``p.n`` where that is a module, else to ``p``; relative imports are
resolved against the importing module's package. Importing a submodule runs its package's
``__init__`` too, but that is not counted: a package that imports its own submodules is the usual
layout, and not a cycle of the project's making.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Top-level package -> its folder.
ROOTS = {"batchscore": REPO / "plugins" / "batchscore", "batchscore_runtime": REPO / "include" / "batchscore_runtime"}
MAX_LINES = 800
#: Modules of the Airflow side that must work without Airflow: the containers and everything that scores a mini-batch.
AIRFLOW_FREE = (
    "batchscore.intake",
    "batchscore.output_log",
    "batchscore.gpus",
    "batchscore.gpu_holder",
    "batchscore.engine",
    "batchscore.security",
    "batchscore.scratch",
    "batchscore.containers",
    "batchscore.images",
    "batchscore.scoring",
    "batchscore.scoring.attempt",
    "batchscore.scoring.contract",
    "batchscore.scoring.executor",
    "batchscore.scoring.per_mini_batch",
    "batchscore.scoring.warm",
    "batchscore.scoring.workers",
    "batchscore.busy",
    "batchscore.ui.report",
)
#: What the runtime never imports: it runs in the user's image, which has none of them.
RUNTIME_FORBIDDEN = ("airflow", "pydantic", "batchscore")


@dataclass
class Module:
    """One source file: its dotted name, path, parsed tree, and what it imports."""

    name: str
    path: Path
    tree: ast.Module
    lines: int
    #: Every absolute name it imports (``a.b`` for ``import a.b``; ``p`` and ``p.n`` for ``from p import n``) -> first line.
    imports: dict[str, int] = field(default_factory=dict)
    #: Modules of the scanned packages it imports -> the line of the first such import.
    edges: dict[str, int] = field(default_factory=dict)

    def where(self, line: int | None = None) -> str:
        """Its path (relative to the checkout when inside it), with ``:line`` when given."""
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{line}" if line is not None else str(path)

    @property
    def package(self) -> str:
        """The package relative imports are resolved against."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def scan(roots: dict[str, Path]) -> dict[str, Module]:
    """Every module under ``roots`` (top-level package name -> folder), with its imports and edges."""
    modules: dict[str, Module] = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            text = path.read_text()
            modules[".".join(parts)] = Module(".".join(parts), path, ast.parse(text, str(path)), len(text.splitlines()))
    for module in modules.values():
        for names, line in _imports(module):
            for name in names:
                module.imports.setdefault(name, line)
            target = _resolve(names, modules)
            if target is not None and target != module.name:
                module.edges.setdefault(target, line)
    return modules


def _imports(module: Module) -> Iterator[tuple[list[str], int]]:
    """For each imported name, anywhere in the module: the absolute names it may be, most specific first."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield [alias.name], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.package.split(".")
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                yield ([f"{base}.{alias.name}"] if alias.name != "*" else []) + [base], node.lineno


def _resolve(names: list[str], modules: dict[str, Module]) -> str | None:
    """The module of the scanned packages that an import of ``names`` (most specific first) runs, if any."""
    for name in names:
        if name in modules:
            return name
    name = names[-1]
    while "." in name:
        name = name.rpartition(".")[0]
        if name in modules:
            return name
    return None


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].edges:
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
                cycles.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _describe_cycle(cycle: list[str], modules: dict[str, Module]) -> str:
    """The cycle's modules, and each import between them with its file and line."""
    inside = [
        f"    {m} -> {t} ({modules[m].where(line)})" for m in cycle for t, line in sorted(modules[m].edges.items()) if t in cycle
    ]
    return f"  {' <-> '.join(cycle)}:\n" + "\n".join(inside)


def _top_level(name: str) -> str:
    return name.partition(".")[0]


def _reachable(start: str, modules: dict[str, Module]) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not -> a path of imports that leads there from ``start``."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in modules[current].edges:
            if target not in paths:
                paths[target] = [*paths[current], target]
                todo.append(target)
    return paths


# --------------------------------------------------------------------------- the scanner itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_scanner_finds_cycles_through_imports_in_functions(tmp_path: Path) -> None:
    """A test that could not fail would prove nothing: a synthetic package with a hidden cycle."""
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": '"""A package."""\n',
            "a.py": '"""A."""\nfrom pkg.b import helper\n',
            "b.py": '"""B."""\n\n\ndef helper():\n    from . import a  # hidden in a function\n    return a\n',
            "c.py": '"""C: imports names, not modules."""\nimport os\nfrom pkg import __doc__ as d\nfrom .b import helper\n',
            "sub/__init__.py": "from ..c import d\n",  # no docstring
        },
    )
    modules = scan({"pkg": tmp_path / "pkg"})
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.sub"]
    assert modules["pkg.a"].edges == {"pkg.b": 2}
    assert modules["pkg.b"].edges == {"pkg.a": 5}  # relative, inside a function
    assert modules["pkg.c"].edges == {"pkg": 3, "pkg.b": 4}  # a name of a module is an edge to the module
    assert modules["pkg.sub"].edges == {"pkg.c": 1}  # relative from a package's __init__
    assert "os" in modules["pkg.c"].imports
    assert import_cycles(modules) == [["pkg.a", "pkg.b"]]
    assert f"pkg.a -> pkg.b ({tmp_path}/pkg/a.py:2)" in _describe_cycle(["pkg.a", "pkg.b"], modules)
    assert [m for m in modules.values() if not ast.get_docstring(m.tree)] == [modules["pkg.sub"]]


# --------------------------------------------------------------------------- the rules

MODULES = scan(ROOTS)


def test_no_import_cycles() -> None:
    cycles = import_cycles(MODULES)
    assert not cycles, f"{len(cycles)} import cycle(s), imports inside functions included:\n" + "\n".join(
        _describe_cycle(c, MODULES) for c in cycles
    )


def test_no_module_over_the_line_limit() -> None:
    long = {m.name: m.lines for m in MODULES.values() if m.lines > MAX_LINES}
    assert not long, f"module(s) over {MAX_LINES} lines: " + ", ".join(
        f"{name} ({MODULES[name].where()}: {lines} lines)" for name, lines in sorted(long.items())
    )


def test_every_module_opens_with_a_docstring() -> None:
    missing = [m.where() for m in MODULES.values() if not (ast.get_docstring(m.tree) or "").strip()]
    assert not missing, "module(s) without a docstring saying what they own: " + ", ".join(missing)


def test_the_runtime_imports_neither_airflow_nor_pydantic_nor_batchscore() -> None:
    found = [
        f"{m.name} imports {name} ({m.where(line)})"
        for m in MODULES.values()
        if m.name.partition(".")[0] == "batchscore_runtime"
        for name, line in sorted(m.imports.items(), key=lambda kv: kv[1])
        if _top_level(name) in RUNTIME_FORBIDDEN
    ]
    assert not found, (
        "the runtime runs inside user images, which have none of " + ", ".join(RUNTIME_FORBIDDEN) + ":\n" + "\n".join(found)
    )


def test_the_airflow_free_modules_never_import_airflow() -> None:
    assert set(AIRFLOW_FREE) <= set(MODULES)  # the list names real modules
    found = []
    for start in AIRFLOW_FREE:
        for reached, path in sorted(_reachable(start, MODULES).items()):
            airflow = sorted((line, name) for name, line in MODULES[reached].imports.items() if _top_level(name) == "airflow")
            if airflow:
                line, name = airflow[0]
                through = f" through {' -> '.join(path)}" if len(path) > 1 else ""
                found.append(f"{start} imports {name}{through} ({MODULES[reached].where(line)})")
    assert not found, "modules that must work without Airflow import it:\n" + "\n".join(found)
