"""What a package owes its users beyond code: the license it declares, type hints type checkers read (PEP 561),
an API reference built from the docstrings, and no result folders committed by accident."""

import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_declared_license_ships():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "BSD-3-Clause" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Neither the name of the copyright holder" in text


def test_type_hints_are_marked_for_type_checkers():
    assert resources.files("torchkit").joinpath("py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["torchkit"]  # so that a wheel carries it too


def test_result_folders_of_the_cli_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "torchkit-demo/" in ignored and "torchkit-repro/" in ignored


def test_the_api_reference_builds_from_the_docstrings(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pdoc", "torchkit", "-o", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    index = (tmp_path / "torchkit.html").read_text()
    for name in ("CompressedOptimizer", "LocalSGD", "init_process_group", "recommended", "NonFiniteGradientError"):
        assert name in index, name
    assert "load_dcp" in (tmp_path / "torchkit" / "checkpoint.html").read_text()
    assert "register" in (tmp_path / "torchkit" / "ddp.html").read_text()


def test_cli_help_cites_nothing_the_package_does_not_ship():
    src = (ROOT / "torchkit" / "apps" / "cli.py").read_text()
    assert "docs/algorithms.md" not in src
