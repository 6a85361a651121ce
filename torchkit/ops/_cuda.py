"""The CUDA C++ kernels (csrc/topk_ef_cuda.cu), compiled with nvcc just in time and loaded with ctypes.

The source has no torch headers (plain launchers over raw pointers and the current stream), so building
it takes one nvcc call of a few seconds, for the GPU's own architecture. ``available()`` only loads a
library built before; :func:`build` (``torchkit build-ext --cuda``) compiles it. A fused step is one call of
``tk_step``, which issues the launches of the Triton kernels' driver (:mod:`torchkit.ops._select`) in C++;
``_run_python`` sequences the same kernels from Python, the specification the GPU tests hold ``tk_step`` to.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch import Tensor

from . import _select
from ._triton import segments_module

__all__ = ["OPS", "available", "ensure_built", "error", "build", "open_library", "nvcc_command"]

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "topk_ef_cuda.cu"
_lib: ctypes.CDLL | None = None
_error: str | None = None
_GTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_P, _I, _F, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_longlong
_SIGNATURES = {
    "tk_hist": [_I, _I, _P, _P, _P, _P, _P, _I, _F] + [_I] * 8 + [_P],
    "tk_threshold": [_P, _P, _I, _I, _I, _P],
    "tk_select": [_I, _I] + [_P] * 10 + [_I, _F] + [_I] * 14 + [_P],
    "tk_predict": [_I, _I] + [_P] * 5 + [_I, _F, _I, _I, _I, _P],
    "tk_scatter_add": [_P, _P, _P, _F, _I, _P],
    "tk_prepare": [_P, _P, _I, _L, _L, _I, _P],
    "tk_accumulate": [_P, _P, _L, _P, _L, _P, _I, _I, _P, _I, _L, _L, _I, _P],
    "tk_accumulate_tiled": [_P, _P, _L, _P, _L, _P, _I, _I, _P, _I, _L, _L, _I, _P, _I, _I, _I, _P],
    "tk_tiled_rows": [],
    "tk_block_elems": [],
    "tk_step_words": [_I, _I, _I, _I],
    "tk_sample_need": [_I, _I],
    "tk_step": [_I, _I, _P, _P, _P, _F, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P],
}
_RESTYPES = {"tk_step_words": _L}


def _arch() -> str:
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    return f"sm_{major}{minor}"


def _path() -> Path:
    h = hashlib.sha1(_SOURCE.read_bytes() if _SOURCE.exists() else b"missing").hexdigest()[:10]
    root = os.environ.get("TORCHKIT_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torchkit_ext"
    )
    return Path(root) / f"torchkit_cuda_{h}_{_arch()}" / "libtorchkit_cuda.so"


def open_library(path: Path) -> ctypes.CDLL:
    """Load a build of csrc/topk_ef_cuda.cu and declare its launchers' signatures."""
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _RESTYPES.get(name, ctypes.c_int)
    return lib


def _load(path: Path) -> None:
    global _lib, _error
    _lib, _error = open_library(path), None


def available() -> bool:
    global _error
    if _lib is not None:
        return True
    if not torch.cuda.is_available():
        _error = "no CUDA device"
        return False
    if not _path().exists():
        _error = f"not built (run torchkit.ops.build_extension(cuda=True); source {_SOURCE})"
        return False
    try:
        _load(_path())
    except OSError as exc:  # pragma: no cover - broken build on disk
        _error = f"failed to load {_path()}: {exc}"
    return _lib is not None


_tried = False


def ensure_built() -> bool:
    """Load the kernels, compiling them the first time (one nvcc call; a failure is logged once, never raised)."""
    global _tried
    if available():
        return True
    if not _tried:
        _tried = True
        log.info("torchkit: compiling the CUDA kernels for %s (once per machine)", _arch())
        if not build():
            log.warning("torchkit: CUDA kernels unavailable (%s); using the plain-torch reference", _error)
    return _lib is not None


def error() -> str | None:
    available()
    return _error


def nvcc_command(out: Path, arch: str, defines: dict[str, int] | None = None) -> list[str]:
    """The build command; ``defines`` set the source's tuning knobs (TK_HIST_COPIES, TK_VEC) for experiments."""
    nvcc = shutil.which("nvcc") or "nvcc"
    flags = [f"-D{k}={v}" for k, v in (defines or {}).items()]
    return [
        nvcc,
        "-std=c++17",
        "-O3",
        "-fmad=false",
        f"-arch={arch}",
        "-Xcompiler",
        "-fPIC",
        "-shared",
        *flags,
        str(_SOURCE),
        "-o",
        str(out),
    ]


def build(verbose: bool = False) -> bool:
    """Compile csrc/topk_ef_cuda.cu for this GPU with nvcc; returns True when it loads."""
    global _error
    if available():
        return True
    if not torch.cuda.is_available():
        return False
    out = _path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        proc = subprocess.run(nvcc_command(tmp, _arch()), capture_output=True, text=True)
    except OSError as exc:
        _error = f"nvcc not found: {exc}"
        return False
    if verbose or proc.returncode:
        log.log(logging.WARNING if proc.returncode else logging.INFO, "nvcc: %s", proc.stderr.strip())
    if proc.returncode:
        _error = f"nvcc failed: {proc.stderr.strip()[-2000:]}"
        return False
    tmp.replace(out)
    return available()


def _one_pass(mode: int) -> bool:
    """The one pass (``_select.GPU_ONE_PASS``: compiled for sm_90 and checked on the host here, not yet run on a GPU,
    so off unless TORCHKIT_GPU_ONE_PASS=1 until benchmarks/gpu_run.sh's onepass stage has checked and timed it)."""
    return _select.default_one_pass(mode, torch.device("cuda"))  # the Triton set's rule: the segments launch follows it


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"torchkit CUDA kernel {what} failed: CUDA error {rc}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _aligned(*ts: Tensor | None) -> int:
    """1 when every operand starts on a 16-byte boundary: the kernels then load four elements at a time."""
    return int(all(t is None or t.data_ptr() % 16 == 0 for t in ts))


class _Launcher:
    """The three launches of :class:`torchkit.ops._select.Launcher`, through ctypes on the current stream."""

    def __init__(self, g: Tensor, e: Tensor | None, h: Tensor | None, eta: float):
        self.g, self.e, self.h, self.eta = g, e, h, float(eta)
        self.stream = _stream(g.device)
        self.sms = torch.cuda.get_device_properties(g.device).multi_processor_count
        self.block = _lib.tk_block_elems()

    def predict(self, scal, mode, n, k, cap, hint, approx):
        need = _select.sample_need(n, k, _select.SAMPLE)
        rc = _lib.tk_predict(mode, _GTYPE[self.g.dtype], _ptr(self.g), _ptr(self.e), _ptr(self.h), _ptr(scal),
                             _ptr(hint), n, self.eta, need, cap, int(approx), self.stream)  # fmt: skip
        _check(rc, "tk_predict")

    def hist(self, scal, p: _select.Hist):
        e = self.e if p.cand is None else p.cand[1]
        grid = max(1, min(-(-p.n // 512), 4 * self.sms))
        rc = _lib.tk_hist(
            p.mode,
            _GTYPE[self.g.dtype],
            _ptr(self.g),
            _ptr(e),
            _ptr(self.h),
            _ptr(p.hist),
            _ptr(scal),
            p.n,
            self.eta,
            int(p.stored),
            _aligned(self.g, e, self.h),
            *p.slots(),
            grid,
            self.stream,
        )
        _check(rc, "tk_hist")

    def threshold(self, hist, scal, k, cap, level):
        _check(_lib.tk_threshold(_ptr(hist), _ptr(scal), k, cap, level, self.stream), "tk_threshold")

    def select(self, scal, p: _select.Select):
        ci, e = (None, self.e) if p.cand is None else p.cand
        ptrs = [_ptr(t) for t in (self.g, e, self.h, ci, scal, p.lb, *p.hi, *p.eq)]
        rc = _lib.tk_select(
            p.mode,
            _GTYPE[self.g.dtype],
            *ptrs,
            p.n,
            self.eta,
            int(p.mode == 1 and p.stored),
            int(p.write_e),
            _aligned(self.g, e, self.h),
            *p.slots(),
            int(p.ge),
            p.count,
            self.lookback_slots(p.n),
            self.stream,
        )
        _check(rc, "tk_select")

    def lookback_slots(self, n: int) -> int:
        return max(1, -(-n // self.block))


def _run_python(mode: int, g: Tensor, e: Tensor | None, h: Tensor | None, k: int, eta: float, approx: bool):
    """The same step sequenced launch by launch from Python (``_select.run``): the specification ``tk_step``
    follows, kept for tests and per-kernel timings."""
    return _select.run(_Launcher(g, e, h, eta), mode, g, e, h, k, approx, _one_pass(mode))


_workspaces: dict[tuple[int | None, int], Tensor] = {}
_sms: dict[int | None, int] = {}
_step_lock = threading.Lock()  # ctypes drops the GIL in tk_step: one thread at a time enqueues on a kept workspace
KEEP_WORDS = 8 << 20  # workspaces up to 64 MiB are kept (d = 1e8 at k = 1% exact needs 32 MiB); larger ones are not


def _workspace(device: torch.device, stream: int, words: int) -> Tensor:
    """Device memory for ``tk_step``, one buffer per (device, stream) kept and grown across calls (the calls on one
    stream run in order, so they can share it) up to ``KEEP_WORDS``; larger ones, and any while a CUDA graph is
    being captured on the device (the graph keeps its own), are allocated for the call."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or words > KEEP_WORDS:
        ws = torch.empty(words, dtype=torch.int64, device=device)
    else:
        key = (device.index, stream)
        ws = _workspaces.get(key)
        if ws is None or ws.numel() < words:
            ws = _workspaces[key] = torch.empty(words, dtype=torch.int64, device=device)
    if _select.POISON:  # tests: candidates start as NaN / -1 rather than what the last call left
        ws.fill_(-1)
    return ws


def _run(mode: int, g: Tensor, e: Tensor | None, h: Tensor | None, k: int, eta: float, approx: bool):
    """One fused step in one host call (``tk_step``: 13 launches issued from C++ when exact, 5 when approximate;
    the one pass 18 and 12); returns ``(values fp32, indices int32)``."""
    dev, d = g.device, g.numel()
    sms = _sms.get(dev.index)
    if sms is None:
        sms = _sms[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    stream = _stream(dev)
    idx, vals = _select._empty(k, torch.int32, dev), _select._empty(k, torch.float32, dev)
    one_pass = _one_pass(mode)
    hint = _select.hint_of(mode, g, e, h, k, approx=approx) if one_pass else None
    with _step_lock:  # two threads on one stream must not interleave their launches over one workspace
        ws = _workspace(dev, stream, _lib.tk_step_words(d, k, int(approx), int(one_pass)))
        rc = _lib.tk_step(
            mode, _GTYPE[g.dtype], g.data_ptr(), _ptr(e), _ptr(h), float(eta), d, k, int(approx), int(one_pass),
            _ptr(hint), ws.data_ptr(), idx.data_ptr(), vals.data_ptr(), sms, stream,
        )  # fmt: skip
    _check(rc, "tk_step")
    return vals, idx


def _rows(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 values and int32 indices, each row one run (rows may be apart: gathered wire bytes, read in place)."""
    values, indices = values.float(), indices.int()
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (values, indices))


def _scatter(out: Tensor, values: Tensor, indices: Tensor, scales: list[float]) -> None:
    values, indices = _rows(values, indices)
    stream = _stream(out.device)
    for w, s in enumerate(scales):  # one launch per worker: deterministic order
        rc = _lib.tk_scatter_add(_ptr(out), _ptr(values[w]), _ptr(indices[w]), s, values.shape[1], stream)
        _check(rc, "tk_scatter_add")


def _prepare(out: Tensor, zero: bool, checks: Tensor | None) -> None:
    n, stride = (0, 1) if checks is None else (checks.numel(), checks.stride(0))
    rc = _lib.tk_prepare(_ptr(out), _ptr(checks), n, stride, out.numel(), int(zero), _stream(out.device))
    _check(rc, "tk_prepare")


def _accumulate(out: Tensor, values: Tensor, indices: Tensor, scales: list[float], zero: bool, checks) -> None:
    """:func:`_prepare` and :func:`_scatter` in one host call (``tk_accumulate``: the same launches, from C++); with
    ``GPU_TILED_DECODE``, the tiled decode (``tk_accumulate_tiled``: two launches, the tile in shared memory) for at
    most ``tk_tiled_rows()`` rows."""
    values, indices = _rows(values, indices)
    n, k = values.shape
    n_checks, check_stride = (0, 1) if checks is None else (checks.numel(), checks.stride(0))
    if _select.GPU_TILED_DECODE and 0 < n <= _lib.tk_tiled_rows() and k > 0:
        span, spans = _select.runs_spans(k)
        table = _select.runs_table(out.device, n, spans)
        blocks = 4 * torch.cuda.get_device_properties(out.device).multi_processor_count
        rc = _lib.tk_accumulate_tiled(
            _ptr(out), _ptr(values), values.stride(0), _ptr(indices), indices.stride(0), (_F * n)(*scales), n, k,
            _ptr(checks), n_checks, check_stride, out.numel(), int(zero), _ptr(table), span, spans, blocks,
            _stream(out.device),
        )  # fmt: skip
        return _check(rc, "tk_accumulate_tiled")
    rc = _lib.tk_accumulate(
        _ptr(out), _ptr(values), values.stride(0), _ptr(indices), indices.stride(0), (_F * max(n, 1))(*scales), n, k,
        _ptr(checks), n_checks, check_stride, out.numel(), int(zero), _stream(out.device),
    )  # fmt: skip
    _check(rc, "tk_accumulate")


def _stream(device: torch.device) -> int:
    """The device's current stream as a raw handle (``torch.cuda.current_stream`` builds a Stream object per call:
    tens of microseconds of host time in a round, measured on an H200 under the profiler)."""
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda index: torch.cuda.current_stream(index).cuda_stream)


# many small segments: the Triton kernel (the tiled decode is the CUDA one, in _accumulate)
OPS = _select.GpuOps(_run, _scatter, _prepare, _accumulate, segments_module)
