"""Plain-torch references of every op: the specification, the CPU fallback and the test oracle.

All of them accept a 1-D vector or a ``[rows, d]`` batch (one independent problem per row, as the
simulator uses them). Arithmetic is done in the state dtype (fp32 or fp64); ``grad`` may be bf16/fp16.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = [
    "index_dtype", "topk", "ef14_step_", "ef21_step_", "econtrol_step_", "accumulate_", "nonfinite_check",
    "poison_of", "prepare_",
]  # fmt: skip


def index_dtype(d: int) -> torch.dtype:
    """int32 indices while every offset fits, int64 beyond."""
    return torch.int32 if d < 2**31 else torch.int64


def _select(v: Tensor, k: int) -> Tensor:
    """Indices (int64) of the k largest |v| along the last dim; NaN ranks first, as in torch.topk."""
    return torch.topk(v.abs(), k, dim=-1, sorted=False).indices


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    idx = _select(x, k)
    return x.gather(-1, idx), idx.to(index_dtype(x.shape[-1]))


def ef14_step_(grad: Tensor, error: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """v = error + grad; send top-k of v; error <- v - sent (zero where sent)."""
    error.add_(grad.to(error.dtype))
    idx = _select(error, k)
    values = error.gather(-1, idx)
    error.scatter_(-1, idx, 0.0)
    return values, idx.to(index_dtype(error.shape[-1]))


def ef21_step_(grad: Tensor, estimate: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """diff = grad - estimate; send top-k of diff; estimate[idx] += diff[idx]."""
    diff = grad.to(estimate.dtype) - estimate
    idx = _select(diff, k)
    values = diff.gather(-1, idx)
    estimate.scatter_add_(-1, idx, values)
    return values, idx.to(index_dtype(estimate.shape[-1]))


def econtrol_step_(grad: Tensor, error: Tensor, shift: Tensor, k: int, eta: float) -> tuple[Tensor, Tensor]:
    """u = eta*e + (g - h); send D = top-k of u; e <- e + (g - h) - D; h[idx] += D."""
    t = grad.to(error.dtype) - shift
    u = error * eta + t
    idx = _select(u, k)
    values = u.gather(-1, idx)
    error.add_(t)
    error.scatter_add_(-1, idx, -values)
    shift.scatter_add_(-1, idx, values)
    return values, idx.to(index_dtype(error.shape[-1]))


def segments_step_(
    kind: int, grad: Tensor, error: Tensor | None, shift: Tensor | None, sizes, ks, eta: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The fused step of ``kind`` (1 EF14, 2 EF21, 3 EControl) on consecutive segments of 1-D vectors, each its own
    top-``k``: the segments' ``(values, indices)`` concatenated in order, indices into the whole vector."""
    return by_segments(sys.modules[__name__], kind, grad, error, shift, sizes, ks, eta)


def step_of(kernels, kind: int, eta: float, **kw):
    """``(g, e, h, k) -> (values, indices)``: the fused step of ``kind`` (1 EF14, 2 EF21, 3 EControl, as
    :mod:`torchkit.ops._select` numbers them) by a kernel set (``kernels.ef14_step_`` and its twins; ``kw``:
    ``approx``)."""
    if kind == 1:
        return lambda g, e, h, k: kernels.ef14_step_(g, e, k, **kw)
    if kind == 2:
        return lambda g, e, h, k: kernels.ef21_step_(g, h, k, **kw)
    return lambda g, e, h, k: kernels.econtrol_step_(g, e, h, k, eta, **kw)


def by_segments(kernels, kind: int, grad: Tensor, error, shift, sizes, ks, eta: float, **kw) -> tuple[Tensor, Tensor]:
    """One step per segment by a kernel set (:func:`step_of`) on each segment's views, the results concatenated
    with indices into the whole vector."""
    step = step_of(kernels, kind, eta, **kw)
    idt, vals, idxs, a = index_dtype(grad.numel()), [], [], 0
    for n, k in zip(sizes, ks):
        v, i = step(*(None if t is None else t[a : a + n] for t in (grad, error, shift)), k)
        vals.append(v)
        idxs.append(i.to(idt) + a)
        a += n
    return torch.cat(vals), torch.cat(idxs)


def accumulate_(
    out: Tensor, values: Tensor, indices: Tensor, scale: float | Tensor = 1.0, zero: bool = False, poison=None
) -> Tensor:
    """out[indices[w]] += scale[w] * values[w], worker by worker in row order (deterministic); ``zero``: out starts
    from zeros; ``poison`` (non-finite checks, :func:`nonfinite_check`): every entry NaN when one is not finite."""
    check_indices(indices, out.numel())
    prepare_(out, zero, poison)
    values2, indices2 = as_rows(values), as_rows(indices).long()
    scales = _scales(scale, values2.shape[0])
    for w in range(values2.shape[0]):
        out.index_add_(0, indices2[w], values2[w].to(out.dtype) * scales[w])
    return out


def check_indices(indices: Tensor, d: int) -> None:
    """A decode's indices on CPU tensors within ``out`` (of ``d`` entries): else ``ValueError`` before anything
    changes (on a GPU not checked: it would cost a host read)."""
    if indices.device.type != "cpu" or not indices.numel():
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= d:
        raise ValueError(f"indices must be in [0, {d}) (the length of out), got {lo if lo < 0 else hi}")


def wire_round(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``values`` rounded to ``dtype`` (a narrower float is clamped to its largest value) and what the rounding
    removed, in the values' dtype: ``values = q.to(values.dtype) + r`` up to the last rounding of the subtraction."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(values.dtype).max:
        big = torch.finfo(dtype).max  # beyond the wire's range: send the largest value, keep the rest
        q = values.clamp(-big, big).to(dtype)
    else:  # a new tensor even in the values' own dtype (the operator's outputs alias nothing)
        q = values.to(dtype, copy=True)
    return q, values - q.to(values.dtype)


def nonfinite_check(t: Tensor) -> Tensor:
    """0-d float64, finite exactly when ``t`` holds no NaN or Inf: one launch, ``t``'s float64 sum (fp32, bf16 and
    fp16 sums cannot overflow in float64: fewer than 2**31 terms, each below 3.5e38; a NaN or an Inf anywhere makes
    it NaN or Inf). Checks add up: the sum of several is finite exactly when each is. fp64 ``t``, whose sum could
    overflow, gives 0 or NaN. For messages (k entries, where launches cost more than bytes); a whole gradient takes
    :func:`torchkit.comm.nonfinite_flag` (one ``aminmax`` pass, about 12x faster than a float64 sum at 16.8M fp32
    elements on the CPU)."""
    if t.dtype == torch.float64:
        return torch.where(torch.isfinite(t).all(), 0.0, float("nan")).to(torch.float64)
    return t.sum(dtype=torch.float64)


def poison_of(checks: Tensor) -> Tensor:
    """0-d float64: 0 when every check is finite, else NaN (x - x is 0 for finite x and NaN for NaN and Inf)."""
    p = checks.sum(dtype=torch.float64)
    return p - p


def prepare_(out: Tensor, zero: bool, poison: Tensor | None) -> Tensor:
    """What a decode does to ``out`` before it adds: zero it (``zero``), and make every entry NaN when a ``poison``
    check is not finite (then whatever is added stays NaN)."""
    if poison is None:
        return out.zero_() if zero else out
    p = poison_of(poison).to(out.dtype)
    return out.copy_(p.expand_as(out)) if zero else out.masked_fill_(p.isnan(), float("nan"))


def as_rows(t: Tensor) -> Tensor:
    """A message's ``[k]`` or ``[rows, k]`` tensor as ``[rows, k]`` (a view; also when k is 0)."""
    return t if t.dim() == 2 else t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])


def _scales(scale: float | Tensor | list, n: int) -> list:
    if isinstance(scale, (list, tuple)):
        if len(scale) != n:
            raise ValueError(f"scale must have one entry per worker row ({n}), got {len(scale)}")
        return [float(s) for s in scale]
    if isinstance(scale, Tensor):
        if scale.numel() != n:
            raise ValueError(f"scale must have one entry per worker row ({n}), got {scale.numel()}")
        return [float(s) for s in scale.reshape(-1).tolist()]
    return [float(scale)] * n
