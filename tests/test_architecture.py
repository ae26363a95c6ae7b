"""The seams between the project's packages, checked from the source (no imports are executed).

Every import statement counts, the ones inside functions too (a lazy import is still a dependency):

- `core/` (what crosses roles) imports none of the roles or the driver;
- `actors/` (rollout) and `learner/` never import each other: what both need lives in `core/` or
  `weightsync/`;
- `envs/` imports none of the roles or the driver (env servers run without them);
- `weightsync/` imports neither role (each role plugs its own model into it);
- no import cycle between modules of the project;
- no function longer than 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "actors", "learner", "weightsync", "cluster", "envs")
# package -> the project packages it must never import
FORBIDDEN = {
    "core": {"actors", "learner", "cluster", "envs", "weightsync"},
    "actors": {"learner", "cluster"},
    "learner": {"actors", "cluster"},
    "weightsync": {"actors", "learner", "cluster", "envs"},
    "envs": {"actors", "learner", "cluster", "weightsync"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        base = ROOT / pkg
        if base.is_dir():
            for path in base.rglob("*.py"):
                found[_module_name(path)] = path
    return found


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports (resolved to the longest existing module name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and ".".join(parts) != module:
            out.add(".".join(parts))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _project_modules()
    return {m: _imports(p, m, modules) for m, p in modules.items()}


def test_no_import_crosses_a_forbidden_seam():
    bad = []
    for module, deps in sorted(_graph().items()):
        banned = FORBIDDEN.get(module.split(".")[0], set())
        bad += [f"{module} -> {d}" for d in sorted(deps) if d.split(".")[0] in banned]
    assert not bad, "imports across role seams:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = _graph()
    # A package's __init__ importing its own submodules is how Python packages re-export; it is
    # not a dependency of the submodule on its package, so edges into a package's own __init__
    # from its submodules are what would make cycles. Tarjan's SCC over the module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The walker must not be blind: a lazy cross-role import inside a function is found.
    modules = {"actors.x": tmp_path / "x.py", "learner.y": tmp_path / "y.py"}
    (tmp_path / "x.py").write_text("def f():\n    from learner.y import z\n    return z\n")
    assert _imports(modules["actors.x"], "actors.x", modules) == {"learner.y"}


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    # A function that does not fit on a screen hides its steps; split it into named ones.
    long = []
    for base in (*PACKAGES, "bench", "tests", "scripts"):
        for path in sorted((ROOT / base).rglob("*.py")) if (ROOT / base).is_dir() else []:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
