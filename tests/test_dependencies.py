"""The dependency direction of docs/ARCHITECTURE.md, checked on every import statement:

    jobs -> serve, train -> artifact -> data, model -> (torch, triton only)

`artifact` (config -> model -> folder / MLflow URI) is what training and serving share, so
nothing in serve imports train; `metrics` (numpy only) is the one home of the metrics,
read by data (the synthetic oracle), train and serve. And no module imports itself back
through others: the package has no import cycle.

Relative imports are resolved to the module they name, so an arrow hidden in
`from ...train import x` is caught like an absolute one."""

import ast
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
JOB_SCRIPTS = {p.stem for p in (REPO / "jobs").glob("*.py")}
SUBPACKAGES = sorted(p.name for p in PLATFORM.iterdir() if (p / "__init__.py").is_file())
# what each part of genrec may import from genrec (itself included)
ALLOWED_INTERNAL = {
    "model": {"model"},
    "data": {"data", "metrics", "config", "storage", "errors"},
    "artifact": {"data", "model", "config", "storage", "errors"},
    "train": {"train", "artifact", "data", "model", "metrics", "config", "storage", "errors"},
    "serve": {"serve", "artifact", "data", "model", "metrics", "config", "storage", "errors"},
    "metrics": set(),
    "config": {"storage", "errors"},
    "storage": {"errors"},  # where files live (paths and object-store URIs): every layer reads through it
    "errors": set(),
    "runtime": {"config", "errors"},
    "reports": set(),
}
# the third-party packages a part may import besides the standard library (parts not named: any)
ALLOWED_THIRD_PARTY = {"metrics": {"numpy"}}


def module_name(path: pathlib.Path, root: pathlib.Path = PLATFORM) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ["genrec", *(parts[:-1] if parts[-1] == "__init__" else parts)]


def import_from(path: pathlib.Path, node: ast.ImportFrom, root: pathlib.Path = PLATFORM) -> str:
    """The absolute module a `from ... import` statement of a genrec file reads from."""
    if node.level == 0:
        return node.module
    package = module_name(path, root) if path.name == "__init__.py" else module_name(path, root)[:-1]
    assert node.level <= len(package), f"{path}:{node.lineno}: relative import above genrec"
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: pathlib.Path):
    """(absolute module name, line) of every import in a file of the genrec package."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield import_from(path, node), node.lineno


def platform_files():
    return sorted(PLATFORM.rglob("*.py"))


def part_of(path: pathlib.Path) -> str:
    return module_name(path)[1] if len(module_name(path)) > 1 else "genrec"


@pytest.mark.parametrize("path", platform_files(), ids=lambda p: str(p.relative_to(PLATFORM)))
def test_imports_follow_the_dependency_direction(path):
    part = part_of(path)
    allowed = ALLOWED_INTERNAL[part]
    source = path.read_text()
    for name, line in imports(path):
        root, *rest = name.split(".")
        where = f"{path.relative_to(REPO)}:{line} imports {name}"
        assert root not in JOB_SCRIPTS, f"{where}: nothing imports a job script"
        if root == "genrec":
            assert f"from {name}" not in source and f"import {name}" not in source, (
                f"{where}: inside the package, import relatively")
            assert rest and rest[0] in allowed, f"{where}: {part} may import only {sorted(allowed)} of genrec"
        elif part == "model":
            third_party = root not in sys.stdlib_module_names
            assert not third_party or root == "torch" or (root == "triton" and "triton" in path.name), (
                f"{where}: genrec.model imports torch only (triton inside its *triton* ops)")
        elif part in ALLOWED_THIRD_PARTY and root not in sys.stdlib_module_names:
            assert root in ALLOWED_THIRD_PARTY[part], (
                f"{where}: genrec.{part} may import only {sorted(ALLOWED_THIRD_PARTY[part])} besides the standard library")


def test_every_subpackage_is_covered():
    assert set(SUBPACKAGES) <= set(ALLOWED_INTERNAL)
    covered = {part_of(p) for p in platform_files()}
    assert covered >= {"model", "data", "train", "serve", "artifact", "metrics", "config", "storage", "runtime"}


def import_graph(root: pathlib.Path = PLATFORM) -> dict[str, set[str]]:
    """Module -> the genrec modules it imports, at the top or inside a function (a circle closed
    by a deferred import is still a circle). `from package import name` points at the module
    package.name where there is one, else at the package (its __init__)."""
    files = {".".join(module_name(p, root)): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = import_from(path, node, root)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None (depth-first search)."""
    done, path = set(), []

    def visit(module):
        path.append(module)
        for target in sorted(graph[module]):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if module not in done and (cycle := visit(module))), None)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"genrec.artifact", "genrec.metrics", "genrec.serve.model", "genrec.train.loop"} <= set(graph)
    assert "genrec.artifact" in graph["genrec.serve.model"]  # the edges are read (relative imports resolved)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_a_cycle_closed_by_a_deferred_relative_import_is_found(tmp_path):
    """The checker on a package of its own: the circle it exists to forbid (an artifact module whose
    function imports the trainer module that imports the artifact back) is found; without the
    deferred import it is not."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "__init__.py").write_text("")
    (tmp_path / "config.py").write_text("")
    (tmp_path / "train" / "ranking.py").write_text("from ..config import x\nfrom . import artifact\n")
    (tmp_path / "train" / "artifact.py").write_text("import json\n\ndef build():\n    from .ranking import y\n")
    graph = import_graph(tmp_path)
    assert graph["genrec.train.ranking"] == {"genrec.config", "genrec.train.artifact"}
    assert find_cycle(graph) == ["genrec.train.artifact", "genrec.train.ranking", "genrec.train.artifact"]
    (tmp_path / "train" / "artifact.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path)) is None
