"""Packaging per Flower 1.42: ``flwr build`` makes a FAB without warnings that holds the
app, the library and the embedded data set; every third-party import is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.common.constant import FAB_MAX_SIZE

from simulations.app import datasets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCAL_PACKAGES = {"flwr_fedtan", "simulations", "tests"}


def pyproject() -> dict:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def third_party_imports(path: Path) -> set[str]:
    """Top-level modules imported by ``path``, except fallbacks in ``except ImportError``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    fallbacks = {
        id(node)
        for handler in ast.walk(tree) if isinstance(handler, ast.ExceptHandler)
        for statement in handler.body for node in ast.walk(statement)
    }
    local = LOCAL_PACKAGES | {p.stem for p in path.parent.glob("*.py")}
    names = set()
    for node in ast.walk(tree):
        if id(node) in fallbacks:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in local}


def test_every_third_party_import_is_a_declared_dependency():
    project = pyproject()["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {requirement_name(r) for r in extra}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for package in sorted(LOCAL_PACKAGES):
        for path in sorted((PROJECT_ROOT / package).glob("*.py")):
            for module in third_party_imports(path):
                names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                if not names & declared:
                    undeclared.setdefault(module, []).append(str(path.relative_to(PROJECT_ROOT)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_python_floor_is_flowers():
    ours = pyproject()["project"]["requires-python"]
    flowers = importlib.metadata.metadata("flwr")["Requires-Python"]

    def floor(spec: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))

    assert floor(ours) >= floor(flowers) >= (3, 11), (ours, flowers)


def _copy_app(target: Path) -> Path:
    """The project as a user's checkout holds it, minus environments and build output."""
    top_level_skip = {".git", ".venv", "results", "build", "dist", ".pytest_cache", ".ruff_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".fab", ".egg-info"))}
        if Path(folder) == PROJECT_ROOT:
            skip |= top_level_skip & set(names)
        return skip

    shutil.copytree(PROJECT_ROOT, target, ignore=ignore)
    return target


@pytest.mark.slow
def test_flwr_build_makes_a_fab_without_warnings_holding_the_app_and_its_data(tmp_path):
    app = _copy_app(tmp_path / "flwr-fedtan")  # flwr build requires a valid app name as folder name
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run([str(BIN / "flwr"), "build"], cwd=app, env=env, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Successfully built" in output
    assert "recommended" not in output and "warning" not in output.lower(), output
    fabs = list(app.glob("*.fab"))
    assert len(fabs) == 1, output
    assert fabs[0].stat().st_size <= FAB_MAX_SIZE

    with zipfile.ZipFile(fabs[0]) as fab:
        names = set(fab.namelist())
        config = tomllib.loads(fab.read("pyproject.toml").decode())
        fab.extractall(tmp_path / "unpacked")
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "simulations.app.server_app:app", "clientapp": "simulations.app.node_app:app"}
    embedded = sorted(p.relative_to(app).as_posix() for p in (app / "simulations" / "app" / "embedded_data").rglob("*")
                      if p.is_file())
    expected = {"LICENSE", "README.md", *embedded}
    for package in ("flwr_fedtan", "simulations"):
        expected |= {p.relative_to(app).as_posix() for p in (app / package).rglob("*.py")
                     if "__pycache__" not in p.parts}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("docs/", "tests/"))]  # results and tests stay out

    # The data in the FAB is the data in the project.
    unpacked = tmp_path / "unpacked" / "simulations" / "app" / "embedded_data" / "fashion-mnist"
    _, from_fab = datasets._decode_embedded(unpacked)
    _, from_project = datasets._decode_embedded(app / "simulations" / "app" / "embedded_data" / "fashion-mnist")
    assert from_fab.keys() == from_project.keys()
    assert all(np.array_equal(from_fab[key], from_project[key]) for key in from_fab)


# ---------------------------------------------------------------------- a lean install
# The experiments' stack: none of it may come with `pip install flwr-fedtan`.
APP_ONLY = {"ray", "flwr-datasets", "datasets", "torchvision", "matplotlib", "timm"}
# Imported by flwr_fedtan only inside functions, only where it is already running (Ray homes
# in Flower's simulation engine); it comes with the `app` extra's flwr[simulation].
OPTIONAL_IMPORTS = {"ray"}


def _imports_by_level(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, inside-functions) top-level names of third-party imports of ``path``;
    imports under ``if TYPE_CHECKING`` never run and are left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {id(node) for block in ast.walk(tree)
               if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for node in ast.walk(block)}
    deferred = {id(node) for function in ast.walk(tree)
                if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                for node in ast.walk(function)}
    module_level, in_functions = set(), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        names = {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL_PACKAGES}
        (in_functions if id(node) in deferred else module_level).update(names)
    return module_level, in_functions


def _distribution(module: str) -> str:
    names = importlib.metadata.packages_distributions().get(module, [module])
    return names[0].lower().replace("_", "-")


def test_the_library_dependencies_are_what_flwr_fedtan_imports():
    """`dependencies` covers every import of the package (module level, and inside
    functions except the optional Ray), and holds nothing the package does not import."""
    core = {requirement_name(r) for r in pyproject()["project"]["dependencies"]}
    imported, optional = set(), set()
    for path in sorted((PROJECT_ROOT / "flwr_fedtan").rglob("*.py")):
        module_level, in_functions = _imports_by_level(path)
        imported |= {_distribution(m) for m in module_level}
        optional |= {_distribution(m) for m in in_functions - module_level}
    uncovered = imported - core
    assert not uncovered, f"flwr_fedtan imports at module level what `dependencies` lacks: {uncovered}"
    assert optional - core <= OPTIONAL_IMPORTS, optional - core
    assert core == imported | (optional & core), f"declared but never imported: {core - imported - optional}"
    assert not core & APP_ONLY


def test_the_app_extra_is_what_flower_installs_for_a_fab_run():
    """Flower's runtime installation runs `uv sync` (dependencies plus uv's default
    groups): the `app` group must list what the `app` extra does."""
    project = pyproject()
    assert project["dependency-groups"]["app"] == project["project"]["optional-dependencies"]["app"]
    assert project["tool"]["uv"]["default-groups"] == ["app"]
    extras = project["project"]["optional-dependencies"]
    assert {requirement_name(r) for r in extras["app"]} >= {"flwr", "flwr-datasets", "datasets", "torchvision"}
    assert "flwr-fedtan[app]" in extras["experiments"] and "flwr-fedtan[app,experiments]" in extras["dev"]


def test_the_wheels_core_requirements_leave_out_the_experiments_stack(tmp_path):
    source = tmp_path / "flwr-fedtan"  # what a wheel is built from
    shutil.copytree(PROJECT_ROOT / "flwr_fedtan", source / "flwr_fedtan", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("flwr_fedtan-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [line.removeprefix("Requires-Dist:").strip()
                    for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert {requirement_name(r) for r in core} == {"flwr", "torch", "numpy", "greenlet", "cryptography"}, core
    assert not [r for r in core if "[" in r.split(";")[0]], f"core requirement with extras (Ray?): {core}"
    app = [r for r in requires if "extra == \"app\"" in r]
    assert {requirement_name(r) for r in app} == {"flwr", "flwr-datasets", "datasets", "torchvision"}, requires
