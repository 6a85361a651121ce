"""The package's imports go downward only.

Every top-level module or subpackage of ``torchkit/`` has a layer (``LAYER``). A module may import modules of a
lower layer; an import of a higher layer is reported, and so is an import of another module of the same layer
unless the pair (importer, imported) is in ``SAME_LAYER_ALLOWED`` with the reason it is needed: the front ends
``optim``, ``local_sgd``, ``ddp`` and ``sim`` do not import each other at all. From the bottom: kernels and small
utilities; compressors; feedback methods; the round state; the round and the method registry; the front-end
contract; what the optimizer front ends share and the checkpoint files; the front ends. Modules inside one
subpackage (``ops/``, ``sim/``, ``integrations/``, ``apps/``) import each other freely.

Every form of import counts, wherever it is written (module level or inside a function): ``from .x import y``,
``from . import x``, ``from ..x import y``, ``from torchkit.x import y``, ``import torchkit.x`` and
``import torchkit``/``import torchkit as tk``. Importing the package root (``import torchkit``, or a name such as
``from torchkit import EF21`` that is not a module) imports everything the root imports, so it counts as the layer
above every front end: only ``integrations`` and ``apps`` may do it. ``torchkit/apps/`` (the command-line tools,
demo, reproductions, benchmarks and training tasks) is the top layer: nothing in the library imports it. Imports
through ``importlib`` are not seen here; the only one, the root's lazy ``tk.ddp``/``tk.checkpoint``/
``tk.integrations``/``tk.fsdp``, is checked by :func:`test_the_root_imports_nothing_from_apps_lazily`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "torchkit"
ROOT = "torchkit"  # the package root, torchkit/__init__.py

LAYER = {
    "_validation": 0,
    "process_group": 0,  # init across torchrun restarts, destroyed at exit; the exchangers and the hook call it
    "ops": 0,
    "_results": 0,
    "metrics": 0,  # the counters every front end keeps
    "compress": 1,
    "theory": 1,
    "feedback": 2,
    "feedback_local": 3,  # the worker-side momentum/Adam methods (LocalMomentum, LocalAdam)
    "state": 3,  # the round state every front end keeps (blocks), its checkpoint format and envelope checks
    "registry": 4,  # the one registry of methods: name -> spec
    "comm": 4,  # the round, the exchangers, the non-finite protocol
    "node": 6,  # node-aware compression: shards of a node's mean, the dense collectives inside the node
    "coupling": 5,  # which method with which optimizer: advice and recommended configurations
    "frontend": 5,  # the front-end contract: checkpoint envelope, DCP Stateful, agreement between ranks
    "_wrapped": 6,  # what the optimizer front ends share (work records, flat buffers, the state_dict load)
    "checkpoint": 6,  # side files and DCP, through the contract only
    "optim": 7,
    "local_sgd": 7,
    "ddp": 7,
    "fsdp": 7,  # plain FSDP2's reduce-scatter as a round (an all-to-all of each shard's pieces)
    "sim": 7,
    ROOT: 8,  # imports the public names of every layer below
    "integrations": 9,
    "apps": 10,
}

# (importer, imported) within one layer, each with the reason; anything else in one layer is an error.
SAME_LAYER_ALLOWED = {
    ("ops", "_validation"): "the kernels' entry points check their arguments with the shared checks",
}


def component(rel: str) -> str:
    """The layered unit a file belongs to: ``comm.py`` -> comm, ``ops/_select.py`` -> ops, ``__init__.py`` -> the
    root, ``__main__.py`` -> apps."""
    if rel == "__init__.py":
        return ROOT
    if rel == "__main__.py":  # python -m torchkit: runs apps.cli, part of the apps
        return "apps"
    return rel.split("/")[0].removesuffix(".py")


def imported(source: str, rel: str):
    """``(line, component, statement)`` for every import of a torchkit module in ``source``, the text of the file
    ``rel`` (relative to ``torchkit/``, e.g. ``"ops/_select.py"``), at any depth of the syntax tree."""
    parts = rel.split("/")
    package = [ROOT, *parts[:-1]]  # the package relative imports start from (also for an __init__.py)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                path = alias.name.split(".")
                if path[0] == ROOT:
                    yield node.lineno, path[1] if len(path) > 1 else ROOT, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level <= len(package), f"{rel}:{node.lineno} imports from above the package"
                base = package[: len(package) - node.level + 1]
            else:
                base = []
            path = base + (node.module.split(".") if node.module else [])
            if not path or path[0] != ROOT:
                continue
            if len(path) > 1:
                yield node.lineno, path[1], ast.unparse(node)
            else:  # from torchkit import x / from .. import x: a submodule, or a name of the root (the root)
                for alias in node.names:
                    yield node.lineno, alias.name if alias.name in LAYER else ROOT, ast.unparse(node)


def violations(source: str, rel: str) -> list[str]:
    """What is wrong with the imports of ``source``, the text of ``torchkit/<rel>``."""
    me = component(rel)
    if me not in LAYER:
        return [f"{rel}: {me} has no layer in LAYER"]
    bad = []
    for line, target, stmt in imported(source, rel):
        if target == me:
            continue
        where = f"{rel}:{line} ({me}, layer {LAYER[me]}) `{stmt}`"
        if target not in LAYER:
            bad.append(f"{where}: {target} has no layer in LAYER")
        elif LAYER[target] > LAYER[me]:
            what = "the package root (everything)" if target == ROOT else target
            bad.append(f"{where}: imports {what}, layer {LAYER[target]}, upward")
        elif LAYER[target] == LAYER[me] and (me, target) not in SAME_LAYER_ALLOWED:
            bad.append(f"{where}: imports {target} of the same layer (not in SAME_LAYER_ALLOWED)")
    return bad


def _files():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_only_go_downward():
    bad = []
    for path in _files():
        rel = path.relative_to(PKG).as_posix()
        bad += violations(path.read_text(), rel)
    assert not bad, "\n".join(bad)


def test_every_module_has_a_layer():
    missing = {component(p.relative_to(PKG).as_posix()) for p in _files()} - set(LAYER)
    assert not missing, f"add to LAYER in tests/test_layering.py: {sorted(missing)}"


def test_same_layer_allowances_are_same_layer_one_way_and_used():
    used = set()
    for path in _files():
        rel = path.relative_to(PKG).as_posix()
        used |= {(component(rel), target) for _, target, _ in imported(path.read_text(), rel)}
    for (a, b), reason in SAME_LAYER_ALLOWED.items():
        assert LAYER[a] == LAYER[b] and reason, (a, b)
        assert (b, a) not in SAME_LAYER_ALLOWED, f"{a} and {b} would import each other"
        assert (a, b) in used, f"{a} no longer imports {b}: remove the pair from SAME_LAYER_ALLOWED"


def test_the_root_imports_nothing_from_apps_lazily():
    tree = ast.parse((PKG / "__init__.py").read_text())
    lazy = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "_LAZY"
    )
    assert all(name in LAYER and LAYER[name] < LAYER["apps"] for name in lazy), lazy


def test_the_checker_reports_what_it_should():
    """The checker itself can fail: a synthetic ``torchkit/ddp.py`` with each kind of forbidden import."""
    source = (
        "from .optim import CompressedOptimizer\n"  # same layer (front end -> front end), relative
        "import torchkit.local_sgd\n"  # same layer, plain import
        "from torchkit import sim\n"  # same layer, absolute from-import of a submodule
        "from .apps import cli\n"  # upward: the library importing apps
        "from . import compress, feedback\n"  # downward: fine
        "def f():\n"
        "    import torchkit as tk\n"  # the root, inside a function
        "    from torchkit import EF21\n"  # a name of the root: the root
        "    return tk\n"
    )
    bad = violations(source, "ddp.py")
    assert len(bad) == 6, "\n".join(bad)
    for line, needle in [
        (1, "imports optim of the same layer"),
        (2, "imports local_sgd of the same layer"),
        (3, "imports sim of the same layer"),
        (4, "imports apps, layer 10, upward"),
        (7, "imports the package root (everything), layer 8, upward"),
        (8, "imports the package root (everything), layer 8, upward"),
    ]:
        assert any(b.startswith(f"ddp.py:{line} ") and needle in b for b in bad), (line, bad)
    # the same imports, written absolutely, are fine from the top layer
    absolute = source.replace("from .", "from torchkit.").replace("from torchkit. import", "from torchkit import")
    assert violations(absolute, "apps/x.py") == []
    # relative imports resolve from the file's package: a subpackage's own modules are its own
    assert violations("from . import problems\nfrom .. import feedback\n", "sim/__init__.py") == []
    assert violations("from ..comm import start_round\nfrom . import _select\n", "ops/_padding.py") == [
        "ops/_padding.py:1 (ops, layer 0) `from ..comm import start_round`: imports comm, layer 4, upward"
    ]
    assert violations("from .state import Block\n", "comm.py") == []  # downward
    assert violations("from .comm import run_round\n", "state.py")  # but not the other way round
    assert violations("from ._validation import check_int\n", "ops/_x.py") == []  # allowed, with its reason
    assert violations("from .ops import padded_zeros\n", "_validation.py")  # but not the other way round
