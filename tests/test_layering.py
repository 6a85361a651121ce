"""Imports only go downward (style guide §6): the front ends do not import each other."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "torchkit"
LAYER = {
    "_validation": 0,
    "process_group": 0,  # init across torchrun restarts, destroyed at exit; the exchangers and the hook call it
    "ops": 0,
    "compress": 1,
    "theory": 1,
    "feedback": 2,
    "comm": 3,
    "state": 3,
    "checkpoint": 3,  # per-rank checkpoints; optim and ddp use it, it imports neither
    "_frontend": 3,
    "coupling": 3,
    "optim": 4,
    "local_sgd": 4,
    "ddp": 4,
    "sim": 4,
    "_results": 0,
    "metrics": 0,  # the counters every front end keeps
    "bench": 5,
    "netbench": 5,
    "demo": 5,
    "repro": 5,
    "cli": 5,
    "__main__": 5,
    "integrations": 5,
    "tasks": 5,
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            depth_pkg = len(path.relative_to(PKG).parts) - 1
            if node.level > depth_pkg:  # reaches the torchkit package itself
                target = (node.module or "").split(".")[0]
                names = [a.name for a in node.names] if not target else [target]
                yield from names
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchkit."):
            yield node.module.split(".")[1]


def test_imports_only_go_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        mine = _module_of(path)
        for target in _imports(path):
            if target in LAYER and target != mine:
                if LAYER[target] > LAYER[mine] or (LAYER[target] == LAYER[mine] == 4):
                    bad.append(f"{path.relative_to(PKG)} imports {target}")
    assert not bad, bad
