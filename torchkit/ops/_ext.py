"""The optional csrc extension: built just in time by :func:`build`, never required.

``available()`` only loads an extension that was built before (same source hash, same torch), so
importing torchkit never compiles; ``build()`` (or ``python -m torchkit build-ext``) compiles it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from . import _reference, _select

__all__ = ["available", "error", "build", "topk", "ef14_step_", "ef21_step_", "econtrol_step_", "accumulate_"]

log = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CPU_SOURCES = ["torchkit_ops.cpp"]
_module = None
_error: str | None = None
_looked = False  # whether _try_load has looked on disk (a build found later comes through build())


@functools.cache
def _name() -> str:
    h = hashlib.sha1(torch.__version__.encode())
    for src in _CPU_SOURCES:
        p = _CSRC / src
        h.update(p.read_bytes() if p.exists() else b"missing")
    return f"torchkit_cpu_{h.hexdigest()[:10]}"


def _build_dir() -> Path:
    root = os.environ.get("TORCHKIT_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torchkit_ext"
    )
    return Path(root) / _name()


def _try_load() -> None:
    global _module, _error, _looked
    if _module is not None or _looked:
        return
    _looked = True
    so = next(iter(sorted(_build_dir().glob(f"{_name()}*.so"))), None) if _build_dir().exists() else None
    if so is None:
        _error = f"not built (run torchkit.ops.build_extension(); sources in {_CSRC})"
        return
    try:
        spec = importlib.util.spec_from_file_location(_name(), so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[_name()] = mod
        _module, _error = mod, None
    except Exception as exc:  # pragma: no cover - broken build on disk
        _error = f"failed to load {so}: {exc}"


def available() -> bool:
    _try_load()
    return _module is not None


def error() -> str | None:
    _try_load()
    return _error


def build(verbose: bool = False) -> bool:
    """Compile csrc/torchkit_ops.cpp with the local C++ compiler; returns True when it loads."""
    global _module, _error
    if available():
        return True
    if not (_CSRC / _CPU_SOURCES[0]).exists():
        _error = f"csrc sources not found at {_CSRC} (installed without the source tree?)"
        return False
    from torch.utils.cpp_extension import load

    out = _build_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _module = load(
            name=_name(),
            sources=[str(_CSRC / s) for s in _CPU_SOURCES],
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"]
            if sys.platform == "linux"
            else ["-O3", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"] if sys.platform == "linux" else [],
            build_directory=str(out),
            verbose=verbose,
        )
        _error = None
    except Exception as exc:
        _module, _error = None, f"build failed: {exc}"
        log.warning("torchkit csrc extension build failed; using the plain-torch reference: %s", exc)
    return _module is not None


# The one pass (csrc/torchkit_ops.cpp): top-k, EF14 and EF21 keep a per-row hint (the last step's threshold bin) and
# read the vector once when it holds. Off: the two passes every time (benchmarks time both).
ONE_PASS = True


def _hint(mode: int, grad: Tensor, error, estimate, k: int, approx: bool = False, rows: int | None = None):
    """The one pass's hint for this vector (one int32 per row, or per segment), or None when ONE_PASS is off."""
    if not ONE_PASS:
        return None
    rows = rows or (1 if grad.dim() == 1 else grad.shape[0])
    return _select.hint_of(mode, grad, error, estimate, k, rows, approx)


def _int_idx(idx: Tensor, d: int) -> Tensor:
    want = _reference.index_dtype(d)
    return idx if idx.dtype == want else idx.to(want)


def _kernel_takes(grad: Tensor, *state: Tensor) -> bool:
    """The C++ kernel computes in fp32: fp32/bf16/fp16 inputs with fp32 state; anything else uses the reference."""
    return grad.dtype != torch.float64 and all(t.dtype == torch.float32 for t in state)


def topk(x: Tensor, k: int):
    if not _kernel_takes(x):
        return _reference.topk(x, k)
    v, i = _module.topk(x, k, _hint(_select.TOPK, x, None, None, k))
    v = v.to(x.dtype)
    return v, _int_idx(i, x.shape[-1])


def ef14_step_(grad: Tensor, error: Tensor, k: int, approx: bool = False):
    if not _kernel_takes(grad, error):
        return _reference.ef14_step_(grad, error, k)
    v, i = _module.ef14_step(grad, error, k, approx, _hint(_select.EF14, grad, error, None, k, approx))
    return v, _int_idx(i, error.shape[-1])


def ef21_step_(grad: Tensor, estimate: Tensor, k: int, approx: bool = False):
    if not _kernel_takes(grad, estimate):
        return _reference.ef21_step_(grad, estimate, k)
    v, i = _module.ef21_step(grad, estimate, k, approx, _hint(_select.EF21, grad, None, estimate, k, approx))
    return v, _int_idx(i, estimate.shape[-1])


def econtrol_step_(grad: Tensor, error: Tensor, shift: Tensor, k: int, eta: float, approx: bool = False):
    if not _kernel_takes(grad, error, shift):
        return _reference.econtrol_step_(grad, error, shift, k, eta)
    v, i = _module.econtrol_step(grad, error, shift, k, eta, approx)
    return v, _int_idx(i, error.shape[-1])


def segments_step_(mode: int, grad: Tensor, error, shift, sizes, ks, eta: float = 0.0, approx: bool = False):
    state = [t for t in (error, shift) if t is not None]
    if not _kernel_takes(grad, *state):
        return _reference.segments_step_(mode, grad, error, shift, sizes, ks, eta)
    hint = _hint(mode, grad, error, shift, sum(ks), approx, len(sizes)) if mode != _select.ECONTROL else None
    v, i = _module.segments_step(mode, grad, error, shift, list(sizes), list(ks), eta, approx, hint)
    return v, _int_idx(i, grad.shape[-1])


def accumulate_(out: Tensor, values: Tensor, indices: Tensor, scale=1.0, zero: bool = False, poison=None):
    if not _kernel_takes(values, out):
        return _reference.accumulate_(out, values, indices, scale, zero, poison)
    v2 = _reference.as_rows(values)
    scales = scale if type(scale) is list and len(scale) == v2.shape[0] else _reference._scales(scale, v2.shape[0])
    _module.accumulate(out, v2, _reference.as_rows(indices), scales, zero, poison)
    return out
