"""The layout rules of the code base, checked over its syntax trees (``make lint`` runs this):

- no import circle between modules of hgscale/ (imports inside functions count too; importing a module
  imports its packages' ``__init__``);
- nothing in hgscale/ imports launchers/ (launchers may import hgscale.core and hgscale.config);
- no function over 60 lines and no file over 400 lines in hgscale/, launchers/, data_pipelines/, benchmarks/;
- the package root holds only __init__.py, __main__.py, train.py and config.py;
- arrows between hgscale's packages point down only, in the order of LEVELS (a module may import its own
  package and those listed before it): a circle between packages is refused as well as one between modules.

Prints one line per violation; exit status 1 if there is any.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("hgscale", "launchers", "data_pipelines", "benchmarks")
MAX_FUNCTION, MAX_FILE = 60, 400
ROOT_FILES = {"__init__.py", "__main__.py", "train.py", "config.py"}
#: bottom to top; ``train`` and ``__main__`` are the root's entry points, ``config`` its schema
LEVELS = ("core", "config", "models", "data", "tracking", "checkpoint", "evaluation", "training", "train", "sweep",
          "commands", "__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, mod: str, is_pkg: bool) -> set[str]:
    """Absolute names of the modules ``mod`` imports (``from a import b`` counts a.b when it is a module)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = mod if is_pkg else mod.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            full = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out.add(full)
            out.update(f"{full}.{a.name}" for a in node.names)
    return out


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for mod, path in modules.items():
        deps = set()
        for name in imported(ast.parse(path.read_text()), mod, path.name == "__init__.py"):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            while name:  # importing a.b.c runs a/__init__ and a/b/__init__ too
                if name in modules and name != mod:
                    deps.add(name)
                name = name.rpartition(".")[0]
        edges[mod] = {d for d in deps if not mod.startswith(d + ".")}  # a module's own packages run first
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def sizes(path: Path) -> list[str]:
    src = path.read_text()
    rel = path.relative_to(ROOT)
    out = [f"{rel}: {src.count(chr(10))} lines (at most {MAX_FILE})"] if src.count("\n") > MAX_FILE else []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION:
                out.append(f"{rel}:{node.lineno}: function {node.name} has {n} lines (at most {MAX_FUNCTION})")
    return out


def level(mod: str) -> int | None:
    """Rank of ``mod``'s package in LEVELS (hgscale.training.engine -> training), None for hgscale itself."""
    parts = mod.split(".")
    return LEVELS.index(parts[1]) if len(parts) > 1 and parts[1] in LEVELS else None


def upward(edges: dict[str, set[str]]) -> list[str]:
    """'a imports b' for each import of a package above the importer's own."""
    return [f"{a} imports {b}: {b.split('.')[1]} stands above {a.split('.')[1]} (order: {', '.join(LEVELS)})"
            for a in sorted(edges) for b in sorted(edges[a])
            if level(a) is not None and level(b) is not None and level(b) > level(a)]


def problems() -> list[str]:
    out = []
    modules = {module_name(p): p for p in (ROOT / "hgscale").rglob("*.py")}
    edges = graph(modules)
    for comp in circles(edges):
        out.append(f"import circle: {' <-> '.join(comp)}")
    out += upward(edges)
    for mod, path in sorted(modules.items()):
        if any(n == "launchers" or n.startswith("launchers.") for n in imported(ast.parse(path.read_text()), mod,
                                                                                path.name == "__init__.py")):
            out.append(f"{path.relative_to(ROOT)}: imports launchers/ (the library never does)")
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            out += sizes(path)
    extra = sorted(p.name for p in (ROOT / "hgscale").glob("*.py") if p.name not in ROOT_FILES)
    if extra:
        out.append(f"hgscale/ holds {', '.join(extra)}: the root keeps only {', '.join(sorted(ROOT_FILES))}")
    return out


if __name__ == "__main__":
    found = problems()
    for line in found:
        print(line)
    sys.exit(1 if found else 0)
