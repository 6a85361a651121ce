"""The README's Python examples run as written (fragments marked as such are skipped)."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- fragment[^>]*-->\n)?```python\n(.*?)```", re.S)


def _blocks():
    text = (ROOT / "README.md").read_text()
    return [code for marker, code in BLOCK.findall(text) if not marker]


def test_readme_has_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    first = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(first) == 2
    assert "torchkit demo" in first[0] and "pytest" in first[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1].split("#")[0].strip().replace("pip install", "pip install -q") in ci


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs(i, request, monkeypatch):
    from tests.dist_utils import _free_port

    if "shared/data" in _blocks()[i]:
        request.getfixturevalue("shared_data")  # skips, naming the path, where the LIBSVM files are absent
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # the example's setdefault keeps this one
    code = _blocks()[i]
    exec(compile(code, f"README.md block {i}", "exec"), {"__name__": "__readme__"})
    assert os.getcwd() == str(ROOT)
