"""Imports point one way: every module under mmt/ imports only its own layer or the layers below it, no two
packages import each other, no module-level import cycle exists, and an import inside a function only defers a
heavy optional dependency that a light command must not pay for. Pure AST: nothing is imported, well under 1 s.

The layer table is the README's "Architecture" table; change both together.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

MMT = Path(__file__).resolve().parents[1] / "mmt"

# Lowest first; a unit is a package directly under mmt/ or a top-level module. A module may import its own unit,
# the other units of its layer (no cycles, checked below) and every unit of a lower layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("utilities", ("mmt.atomic", "mmt.secrets", "mmt.cliargs", "mmt.clirun")),
    ("config", ("mmt.config",)),
    ("tracking", ("mmt.tracking",)),
    ("text and audio primitives", ("mmt.text", "mmt.audio")),
    ("model", ("mmt.model",)),
    ("data", ("mmt.data",)),
    ("DeepSpeed compat", ("mmt.precision", "mmt.ds_compat")),
    ("checkpoints", ("mmt.ckpt",)),
    ("inference", ("mmt.inference",)),
    ("training", ("mmt.training",)),
    ("launch and export", ("mmt.slurm", "mmt.export")),
    # `mmt` itself is the public facade: its names resolve lazily (importlib) into every layer, so importing it
    # from inside the package hides an upward import; `mmt.cli` dispatches to every subcommand.
    ("entry points", ("mmt", "mmt.cli", "mmt.train")),
)
LAYER = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}

# Third-party modules that may be imported inside a function (and only these), each for the one reason given:
# a command that does not need it must not pay for importing it.
DEFERRED: dict[str, str] = {
    "deepspeed": "~4 s and pulls in mlflow, scipy, pandas; config checks, `mmt ckpt` reading and `mmt slurm` run without it",
    "mlflow": "~2.5 s; only the MLflow logger and `mmt runs` talk to a tracking server",
    "sklearn": "~2.5 s; only building the digits demo dataset uses it",
    "matplotlib": "~0.7 s; only `mmt runs plot` draws",
    "onnxruntime": "only `mmt export --format onnx` checks and quantizes with it",
    "fsspec": "remote storage (s3fs, botocore behind it) only for s3:// and other remote URLs",
}

# Known exceptions, (file under mmt/, imported module): none left. An entry here must say why the import cannot
# follow the rules above.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(MMT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(MMT.rglob("*.py"))}


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    path: Path
    lineno: int
    target: str  # the imported module
    in_function: bool

    @property
    def file(self) -> str:
        return str(self.path.relative_to(MMT))

    def __str__(self) -> str:
        return f"mmt/{self.file}:{self.lineno} imports {self.target}"


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")[: len(module.split(".")) - (0 if path.name == "__init__.py" else 1)]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # `from mmt.data import storage` imports the module mmt.data.storage
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return subs or [base]


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _visit(module: str, path: Path, node: ast.AST, in_function: bool, found: list[Import]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                _visit(module, path, sub, in_function, found)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found += [
                Import(module, path, child.lineno, t, in_function) for t in _targets(module, path, child)
            ]
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        _visit(module, path, child, inner, found)


def _imports() -> list[Import]:
    """Every import statement under mmt/ that runs (``if TYPE_CHECKING:`` blocks are for type checkers only)."""
    found: list[Import] = []
    for module, path in MODULES.items():
        _visit(module, path, ast.parse(path.read_text(), str(path)), False, found)
    return found


IMPORTS = _imports()
INTERNAL = [i for i in IMPORTS if i.target == "mmt" or i.target.startswith("mmt.")]


def test_every_module_has_a_layer():
    assert not sorted({_unit(m) for m in MODULES} - set(LAYER))


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{i}: layer '{LAYERS[LAYER[_unit(i.target)]][0]}' is above '{LAYERS[LAYER[_unit(i.source)]][0]}'"
        for i in INTERNAL
        if LAYER[_unit(i.target)] > LAYER[_unit(i.source)] and (i.file, i.target) not in KNOWN_EXCEPTIONS
    ]
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := dfs(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for i in INTERNAL:
        a, b = _unit(i.source), _unit(i.target)
        if a != b and (i.file, i.target) not in KNOWN_EXCEPTIONS:
            graph.setdefault(a, set()).add(b)
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_cycle_between_modules():
    """Module-level imports only (what runs at import time): a cycle there is an import that can fail or see a
    half-initialised module depending on which side is imported first."""
    graph: dict[str, set[str]] = {}
    for i in INTERNAL:
        if not i.in_function and i.target in MODULES and i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_in_function_imports_only_defer_heavy_optional_dependencies():
    hidden = [
        str(i)
        for i in IMPORTS
        if i.in_function
        and i.target.split(".")[0] not in DEFERRED
        and (i.file, i.target) not in KNOWN_EXCEPTIONS
    ]
    assert not hidden, "move to the module top (or allowlist a heavy optional dependency):\n" + "\n".join(
        hidden
    )


@pytest.mark.parametrize("name", sorted(DEFERRED))
def test_each_deferred_dependency_is_deferred_somewhere(name):
    """An allowlist entry nobody needs any more goes: the list stays the set of real reasons."""
    assert any(i.in_function and i.target.split(".")[0] == name for i in IMPORTS)
