"""The package as a user's own code meets it: installed (scripts/setup.sh runs `pip install -e .`), it imports
from any folder, and the benchmarks find it without touching sys.path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_installed_package_imports_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the installation finds it
    code = "import myrtle_vision, myrtle_vision.config; print(myrtle_vision.__file__); print(myrtle_vision.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    where, version = proc.stdout.split()
    assert Path(where).resolve() == REPO / "myrtle_vision" / "__init__.py"
    metadata = subprocess.run(
        [sys.executable, "-m", "pip", "show", "myrtle-vision"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert metadata.returncode == 0 and f"Version: {version}" in metadata.stdout, metadata.stdout + metadata.stderr


def test_pyproject_names_the_pinned_torch_and_every_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {line.split("==")[0]: line for line in (REPO / "requirements.txt").read_text().split() if "==" in line}
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(project["dependencies"])
    named = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert named == set(pins), named ^ set(pins)  # the same packages as the pinned set, no more, no fewer


def test_benchmarks_import_the_package_without_path_tricks():
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        assert "sys.path" not in script.read_text(), script.name


# House rules: the package's shape, read from its source (nothing is imported or run).

PACKAGE = REPO / "myrtle_vision"
SCRIPTS = sorted(p.stem for p in REPO.glob("*.py"))


def _trees(*folders: Path):
    for folder in folders:
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else [folder]:
            yield path, ast.parse(path.read_text(), str(path))


def _imported(path: Path, tree: ast.AST) -> set[str]:
    """Every module ``path`` imports (anywhere in it), by absolute name; ``from M import n`` counts as M and M.n."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _calls(node: ast.AST) -> set[str]:
    return {
        call.func.id if isinstance(call.func, ast.Name) else call.func.attr
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and isinstance(call.func, (ast.Name, ast.Attribute))
    }


def test_the_package_prints_through_reporting_alone():
    """Every line the package shows its user goes through reporting.say (rank 0 alone, where it is told the
    processes); a bare print elsewhere is a line that skips that channel."""
    bare = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path, tree in _trees(PACKAGE)
        if path != PACKAGE / "reporting.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert not bare, bare


def test_imports_run_one_way():
    """Models and weights know nothing of training, evaluation or the reports; evaluation knows neither training
    nor the reports (they use it); the entry scripts never import each other."""
    below = {
        "myrtle_vision/models": ("myrtle_vision.training", "myrtle_vision.reports", "myrtle_vision.evaluation"),
        "myrtle_vision/weights": ("myrtle_vision.training", "myrtle_vision.reports", "myrtle_vision.evaluation"),
        "myrtle_vision/evaluation.py": ("myrtle_vision.training", "myrtle_vision.reports"),
    }
    upward = [
        f"{path.relative_to(REPO)} imports {module}"
        for where, forbidden in below.items()
        for path, tree in _trees(REPO / where)
        for module in sorted(_imported(path, tree))
        if module.startswith(forbidden)
    ]
    assert not upward, upward
    between_scripts = [
        f"{path.name} imports {module}"
        for path, tree in _trees(*(REPO / f"{name}.py" for name in SCRIPTS))
        for module in sorted(_imported(path, tree))
        if module.split(".")[0] in SCRIPTS
    ]
    assert not between_scripts, between_scripts


def test_one_function_turns_a_checkpoint_into_a_model():
    """Building a ViT and loading a checkpoint's weights into it happen together in checkpoint.ready_model alone
    (test.py, test_quantize.py, predict.py, export.py and the benchmarks call it)."""
    together = {
        f"{path.relative_to(REPO)}:{node.name}"
        for path, tree in _trees(PACKAGE, REPO / "benchmarks", *(REPO / f"{name}.py" for name in SCRIPTS))
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and {"build_model", "load_model_weights"} <= _calls(node)
    }
    assert together == {"myrtle_vision/checkpoint.py:ready_model"}, together


def test_every_module_imports():
    """The fast tier's floor: every module of the package imports (an import error anywhere fails here first)."""
    import importlib
    import pkgutil

    import myrtle_vision

    names = [m.name for m in pkgutil.walk_packages(myrtle_vision.__path__, "myrtle_vision.")]
    assert {"myrtle_vision.checkpoint", "myrtle_vision.reports.export", "myrtle_vision.training.trainer"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_the_readme_layout_names_every_module():
    """The README's Layout section is the map of the house: each module and sub-package of myrtle_vision is on it."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)]
    package = REPO / "myrtle_vision"
    missing = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if path.name != "__init__.py"
        and path.parent == package
        and path.name not in layout
        or path.parent != package
        and f"{path.parent.relative_to(package)}/" not in layout
    ]
    assert not missing, missing
