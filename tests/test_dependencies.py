"""The dependency direction of ARCHITECTURE.md, checked on every import statement:

    jobs -> serve, train, data -> model -> (torch, triton only)

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
    "data": {"data", "config", "errors"},
    "train": {"train", "data", "model", "config", "errors"},
    "serve": {"serve", "train", "data", "model", "config", "errors"},
    "config": {"errors"},
    "errors": set(),
    "runtime": {"config", "errors"},
    "reports": set(),
}


def module_name(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(PLATFORM).with_suffix("").parts)
    return ["genrec", *(parts[:-1] if parts[-1] == "__init__" else parts)]


def imports(path: pathlib.Path):
    """(absolute module name, line) of every import in a file of the genrec package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path)[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module, node.lineno
            else:
                assert node.level <= len(package), f"{path}:{node.lineno}: relative import above genrec"
                base = package[: len(package) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno


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


def test_every_subpackage_is_covered():
    assert set(SUBPACKAGES) <= set(ALLOWED_INTERNAL)
    covered = {part_of(p) for p in platform_files()}
    assert covered >= {"model", "data", "train", "serve", "config", "runtime"}


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")),
                         ids=lambda p: p.name)
def test_jobs_and_benchmarks_import_no_job_script(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            assert name.split(".")[0] not in JOB_SCRIPTS, f"{path.name}:{node.lineno} imports job script {name}"
