"""The package as a user's own code meets it: installed (scripts/setup.sh runs `pip install -e .`), it imports
from any folder, and the benchmarks find it without touching sys.path."""

from __future__ import annotations

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
