"""Hot-path kernels: exact/approximate top-k fused with the error-feedback state update.

Dispatch lives here and only here; each launch is one ``torch.library`` custom op (``torch.ops.torchkit.*``,
:mod:`torchkit.ops._library`) that ``torch.compile`` traces as one node. ``impl="auto"`` picks, for CUDA tensors,
the CUDA C++ kernels (compiled with nvcc on first use, once per machine) from ``AUTO_CUDA_MIN_D`` elements up and
the plain-torch reference below; for CPU tensors, the compiled csrc kernel when it has been built
(``torchkit.ops.build_extension()``), else the reference (:mod:`torchkit.ops._reference`). ``impl="triton"`` runs
the Triton kernels (on CPU tensors too under ``TRITON_INTERPRET=1``). A named ``impl`` that is unavailable raises.
Every implementation selects the same entries (ties at the k-th magnitude to the lowest indices; the reference's
``torch.topk`` breaks ties its own way); inputs a kernel does not take (fp64, d >= 2**30 on the GPU) run the reference.

Flat state that torchkit allocates (:func:`padded_zeros`: every front end's per-parameter-group or per-bucket
feedback vectors, and the optimizer's flat gradient) runs on to a multiple of 16 elements. The Triton kernels
launch over that padded length, so their loads and stores are 128-bit whatever d is; the tail is never selected.
The CUDA C++ kernels load four elements at a time from any 16-byte-aligned vector and finish the tail one by one.

Bytes each fused step must move per element (fp32 state): EF14 12 B (read g, e; write e),
EF21 8 B (read g, h; sparse write of h), EControl 16 B (read g, e, h; write e). See benchmarks/.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._validation import check_dense_float, check_int, check_unit_interval
from . import _cuda, _ext, _library, _reference, _select
from ._padding import PAD, owns_padding, padded_zeros
from ._reference import index_dtype

__all__ = [
    "topk",
    "ef14_step_",
    "ef21_step_",
    "econtrol_step_",
    "accumulate_",
    "segments_step_",
    "wire_round",
    "nonfinite_check",
    "poison_of",
    "prepare_",
    "index_dtype",
    "build_extension",
    "available_impls",
    "padded_zeros",
    "owns_padding",
    "PAD",
]

Impl = Literal["auto", "reference", "triton", "cuda", "cpp"]
_ext.available()  # look for a built csrc extension once, now: the dispatch below stays cheap and traceable
AUTO_CUDA_MIN_D = 10**6  # smallest d for which impl="auto" runs the CUDA kernels (see _choose)


def build_extension(verbose: bool = False, *, cuda: bool = False) -> bool:
    """Compile the csrc CPU kernel (and, with ``cuda=True``, the CUDA kernels for this GPU); True when all load."""
    ok = _ext.build(verbose=verbose)
    if cuda:
        ok = _cuda.build(verbose=verbose) and ok
    return ok


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    impls = ["reference"]
    if _triton_usable(device):
        impls.append("triton")
    if device.type == "cuda" and _cuda.available():
        impls.append("cuda")
    if device.type == "cpu" and _ext.available():
        impls.append("cpp")
    return impls


def _triton_usable(device: torch.device) -> bool:
    from . import _triton

    return _triton.available(device)


def _choose(impl: Impl, x: Tensor, rows: bool) -> str:
    if impl == "auto":
        if x.is_cuda and rows:  # batched rows ([n, d]): one vectorised reference call (the CUDA kernels take 1-D)
            return "reference"
        if x.is_cuda:
            # Measured on an H200 (benchmarks/results/nvidia-h200/kernels_run7.json, EF14/EF21/EControl/topk, 1%
            # fp32): since the whole step is one host call (tk_step) the CUDA C++ kernels beat the composed-torch
            # reference at 1e6 elements (0.13-0.15 against 0.20-0.31 ms), 1e7 (1.6-2.1x) and 1e8 (3.0-4.8x);
            # smaller sizes were not measured, so the switch sits at 1e6 (it was 2**21 while the Python driver's
            # launches made the kernels lose at 1e6). The Triton kernels were slower than the reference at every
            # size (tl.histogram with 2048 bins dominated); the ladder that replaced that pass is not timed on a
            # GPU yet: by name only.
            return "cuda" if x.shape[-1] >= AUTO_CUDA_MIN_D and _cuda.ensure_built() else "reference"
        if x.device.type == "cpu" and _ext.available():
            return "cpp"
        return "reference"
    if impl == "reference":
        return impl
    if impl == "triton":
        if not _triton_usable(x.device):
            raise RuntimeError(
                f"impl='triton' requested for a {x.device.type} tensor, but Triton cannot run there "
                "(needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors)"
            )
        return impl
    if impl == "cuda":
        if not x.is_cuda:
            raise RuntimeError(f"impl='cuda' runs on CUDA tensors only, got {x.device}")
        if not _cuda.available():
            raise RuntimeError(f"impl='cuda' requested but the CUDA kernels are not built: {_cuda.error()}")
        return impl
    if impl == "cpp":
        if x.device.type != "cpu":
            raise RuntimeError(f"impl='cpp' runs on CPU tensors only, got {x.device}")
        if not _ext.available():
            raise RuntimeError(f"impl='cpp' requested but the csrc extension is not built: {_ext.error()}")
        return impl
    raise ValueError(f"impl must be one of 'auto', 'reference', 'triton', 'cuda', 'cpp', got {impl!r}")


def _check_vector(name: str, t: Tensor, *, allow_rows: bool = True) -> bool:
    check_dense_float(name, t)
    if t.dim() not in ((1, 2) if allow_rows else (1,)):
        raise ValueError(f"{name} must be 1-D (or [rows, d]), got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one element")
    return t.dim() == 2


def _check_state(name: str, t: Tensor, like: Tensor) -> None:
    _check_vector(name, t)
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of grad {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but grad is on {like.device}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} (feedback state) must be float32 or float64, got {t.dtype}")


def _check_k(k: int, d: int) -> int:
    check_int("k", k)
    if k > d:
        raise ValueError(f"k must be <= d, got k={k} for d={d}")
    return k


def _kernels(name: str):
    kernels = _KERNEL_SETS.get(name)
    if kernels is None:  # Triton is imported on first use
        from ._triton import ef

        kernels = _KERNEL_SETS[name] = ef.OPS
    return kernels


_KERNEL_SETS = {"cuda": _cuda.OPS, "cpp": _ext, "reference": _reference}


def topk(x: Tensor, k: int, *, impl: Impl = "auto") -> tuple[Tensor, Tensor]:
    """Exact top-|x| along the last dim: ``(values, indices)``, indices int32 while d < 2**31, any order."""
    rows = _check_vector("x", x)
    _check_k(k, x.shape[-1])
    return _library.topk(x, k, _choose(impl, x, rows))


def ef14_step_(grad: Tensor, error: Tensor, k: int, approx: bool = False, *, impl: Impl = "auto"):
    r"""Classic EF (g-space), in place: :math:`v = e + g`, send top-k of v, :math:`e \leftarrow v - C(v)`.

    ``approx=True`` may send a slightly different set (kernels skip the exact resolve inside the
    threshold bin) but always exactly k entries, and whatever is not sent stays in ``error``.
    """
    rows = _check_vector("grad", grad)
    _check_state("error", error, grad)
    _check_k(k, grad.shape[-1])
    return _library.ef14_step_(grad, error, k, bool(approx), _choose(impl, grad, rows))


def ef21_step_(grad: Tensor, estimate: Tensor, k: int, approx: bool = False, *, impl: Impl = "auto"):
    r"""EF21 worker step, in place: send :math:`c = C(g - h)`, :math:`h \leftarrow h + c`."""
    rows = _check_vector("grad", grad)
    _check_state("estimate", estimate, grad)
    _check_k(k, grad.shape[-1])
    return _library.ef21_step_(grad, estimate, k, bool(approx), _choose(impl, grad, rows))


def econtrol_step_(grad, error, shift, k: int, eta: float, approx: bool = False, *, impl: Impl = "auto"):
    r"""EControl worker step, in place: :math:`\Delta = C(\eta e + g - h)`, :math:`e \leftarrow e + g - h - \Delta`,
    :math:`h \leftarrow h + \Delta`."""
    rows = _check_vector("grad", grad)
    _check_state("error", error, grad)
    _check_state("shift", shift, grad)
    _check_k(k, grad.shape[-1])
    check_unit_interval("eta", eta)
    return _library.econtrol_step_(grad, error, shift, k, float(eta), bool(approx), _choose(impl, grad, rows))


_SEGMENT_MODES = {  # the operator's kind (the GPU driver's numbering, which the C++ kernel follows) and state
    "ef14": (_select.EF14, ("error",)),
    "ef21": (_select.EF21, ("shift",)),
    "econtrol": (_select.ECONTROL, ("error", "shift")),
}


def segments_step_(
    method: str,
    grad: Tensor,
    state: Sequence[Tensor],
    sizes: Sequence[int],
    ks: Sequence[int],
    eta: float = 0.0,
    approx: bool = False,
    *,
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor]:
    """``method``'s fused step (``"ef14"``: state ``(error,)``; ``"ef21"``: ``(shift,)``; ``"econtrol"``:
    ``(error, shift)`` and ``eta``) on consecutive segments of 1-D vectors (``sizes``), each its own top-``ks[i]``,
    in one call: the segments' ``(values, indices)`` concatenated in order, indices into the whole vector. The
    same as one call per segment (views), which is what a bucket of many tensors compressed tensor by tensor
    (``granularity="tensor"``) needs; the C++ kernel runs the segments in one call (in parallel when there are
    many), the GPU kernels the segments of at most 65536 entries in one Triton launch and larger ones a step each
    (on CUDA tensors with ``TORCHKIT_GPU_SEGMENTS=1``; else one step per segment)."""
    if method not in _SEGMENT_MODES:
        raise ValueError(f"method must be one of {sorted(_SEGMENT_MODES)}, got {method!r}")
    mode, names = _SEGMENT_MODES[method]
    _check_vector("grad", grad, allow_rows=False)
    if len(state) != len(names):
        raise ValueError(f"{method} takes the state {names}, got {len(state)} tensor(s)")
    for name, t in zip(names, state):
        _check_state(name, t, grad)
    sizes, ks = [int(n) for n in sizes], [int(k) for k in ks]
    if len(sizes) != len(ks) or not sizes:
        raise ValueError(f"sizes and ks must be non-empty and of one length, got {len(sizes)} and {len(ks)}")
    if sum(sizes) != grad.numel():
        raise ValueError(f"sizes add up to {sum(sizes)}, grad has {grad.numel()} entries")
    for n, k in zip(sizes, ks):
        if n < 1 or not 1 <= k <= n:
            raise ValueError(f"each segment needs 1 <= k <= its size, got k={k} for size {n}")
    check_unit_interval("eta", eta)
    named = dict(zip(names, state))
    return _library.segments_step_(
        mode, grad, named.get("error"), named.get("shift"), sizes, ks, float(eta), bool(approx),
        _choose(impl, grad, False),
    )  # fmt: skip


def accumulate_(
    out: Tensor,
    values: Tensor,
    indices: Tensor,
    scale: float | Tensor = 1.0,
    *,
    zero: bool = False,
    poison: Tensor | None = None,
    impl: Impl = "auto",
):
    """``out[indices[w]] += scale[w] * values[w]`` for every worker row w (indices unique within a row), in row order.
    Indices outside ``out`` raise ``ValueError`` before anything changes on CPU tensors (not checked on a GPU).

    A round's whole decode in one call: ``zero=True`` starts ``out`` from zeros, and ``poison`` (float64 checks,
    one per worker or any number: :func:`nonfinite_check` of each worker's message) makes every entry of ``out``
    NaN when their sum is not finite, i.e. when some worker's message held a NaN or an Inf."""
    _check_vector("out", out, allow_rows=False)
    check_dense_float("values", values)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape")
    _check_decode(out, zero, poison)
    if values.numel() == 0:
        return prepare_(out, zero=zero, poison=poison, impl=impl)
    values, indices = _rowwise(values), _rowwise(indices)  # rows may sit apart: gathered wire bytes, in place
    scales = _reference._scales(scale, values.shape[0] if values.dim() == 2 else math.prod(values.shape[:-1]))
    _library.accumulate_(out, values, indices, scales, zero, poison, _choose(impl, out, False))
    return out


def _rowwise(t: Tensor) -> Tensor:
    """``t`` with each row's entries contiguous (rows may be apart, as long as each is one run)."""
    return t if t.stride(-1) == 1 and (t.dim() == 1 or t.stride(0) >= t.shape[-1]) else t.contiguous()


def _check_decode(out: Tensor, zero, poison) -> None:
    if not isinstance(zero, bool):
        raise TypeError(f"zero must be a bool, got {type(zero).__name__}")
    if poison is not None and (not isinstance(poison, Tensor) or poison.dtype != torch.float64):
        raise TypeError(f"poison must be a float64 tensor of non-finite checks, got {_what(poison)}")
    if poison is not None and poison.device != out.device:
        raise ValueError(f"poison is on {poison.device} but out is on {out.device}")


def _what(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__


def wire_round(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(q, r)``: ``values`` rounded to the wire ``dtype`` (clamped to its range) and what the rounding removed.

    Eager, the composed torch ops. Under ``torch.compile`` it is one registered operator (``torchkit::wire_round``):
    inductor fuses a round trip through a narrower dtype away unless ``emulate_precision_casts`` is set (off by
    default), and ``r`` would come out zero (measured on CPU and on an H200: the feedback state then differs from
    eager's and loses what the wire rounded away).
    """
    if torch.compiler.is_compiling():
        return _library.wire_round(values, dtype)
    return _reference.wire_round(values, dtype)


def prepare_(out: Tensor, *, zero: bool = False, poison: Tensor | None = None, impl: Impl = "auto") -> Tensor:
    """What a decode does before it adds, alone: ``out`` zeroed (``zero``), NaN everywhere when the ``poison`` checks
    are not all finite. One launch (:func:`accumulate_` of a message without entries)."""
    _check_vector("out", out, allow_rows=False)
    _check_decode(out, zero, poison)
    if not zero and poison is None:
        return out
    values, indices = _NO_ENTRIES.get(out.device) or _NO_ENTRIES.setdefault(
        out.device, (torch.empty(1, 0, device=out.device), torch.empty(1, 0, dtype=torch.int32, device=out.device))
    )
    _library.accumulate_(out, values, indices, [1.0], zero, poison, _choose(impl, out, False))
    return out


_NO_ENTRIES: dict[torch.device, tuple[Tensor, Tensor]] = {}
nonfinite_check = _reference.nonfinite_check
poison_of = _reference.poison_of
