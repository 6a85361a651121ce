"""Triton kernels for the fused error-feedback steps (design B of shared/docs/kernels.md).

pass 1 (``_hist_kernel``): compute v (EF14 stores it in e), 2048-bin histogram of |v| (8 exponent + 3
mantissa bits: 1/8 octave per bin), merged with one atomic add per bin and program.
device: the bin holding the k-th largest |v| (cumulative sum of the histogram from the top).
pass 2 (``_select_kernel``): entries above that bin go to the output, entries inside it to a candidate
buffer (exact mode; its size is read from the histogram on the host, the one synchronisation) or
straight into the remaining output slots (approximate mode: no host synchronisation at all), all
compacted with one atomic ticket per program (output order is not deterministic on a GPU, and in
approximate mode neither is which threshold-bin entries fill the last slots). EControl writes
e <- e + g - h here, after reading the old e.
resolve: exact mode takes the r largest candidates (torch.topk on the small buffer); then the sparse
state update on the k sent indices.

Bytes per element (fp32): EF14 16 (read g, e; write e; read e), EF21 16, EControl 28, top-k 8; the
single-pass floors are 12 / 8 / 16 / 4 (benchmarks/ reports the ratio).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._reference import _scales, index_dtype

__all__ = ["topk", "ef14_step_", "ef21_step_", "econtrol_step_", "accumulate_"]

NBINS = 2048
TOPK, EF14, EF21, ECONTROL = 0, 1, 2, 3
POISON = False  # tests set this: outputs start as NaN / -1 instead of uninitialised memory


def _empty(n: int, dtype: torch.dtype, device) -> Tensor:
    if not POISON:
        return torch.empty(n, dtype=dtype, device=device)
    return torch.full((n,), -1 if not dtype.is_floating_point else float("nan"), dtype=dtype, device=device)


@triton.jit
def _value(g_ptr, e_ptr, h_ptr, offs, live, eta, MODE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
    if MODE == 0:
        v = g
    elif MODE == 1:
        v = tl.load(e_ptr + offs, mask=live, other=0.0) + g
    elif MODE == 2:
        v = g - tl.load(h_ptr + offs, mask=live, other=0.0)
    else:
        t = g - tl.load(h_ptr + offs, mask=live, other=0.0)
        v = tl.load(e_ptr + offs, mask=live, other=0.0) * eta + t
    return v


@triton.jit
def _bin(v):
    key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # monotone in |v|; NaN ranks above inf
    return key >> 20


@triton.jit
def _hist_kernel(g_ptr, e_ptr, h_ptr, hist_ptr, d, eta, MODE: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # d up to 1e9: 64-bit offsets
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < d
    v = _value(g_ptr, e_ptr, h_ptr, offs, live, eta, MODE)
    if MODE == 1:
        tl.store(e_ptr + offs, v, mask=live)  # e now holds v = e + g
    b = tl.where(live, _bin(v), 0)
    counts = tl.histogram(b, NB)
    counts = counts - tl.where(tl.arange(0, NB) == 0, BLOCK - tl.sum(live.to(tl.int32), axis=0), 0)
    tl.atomic_add(hist_ptr + tl.arange(0, NB), counts)


@triton.jit
def _select_kernel(
    g_ptr,
    e_ptr,
    h_ptr,
    thr_ptr,
    out_idx,
    out_val,
    eq_idx,
    eq_val,
    eq_base_ptr,
    eq_cap_ptr,
    tickets,
    d,
    eta,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # thr, and where the threshold bin's entries go, are read from device memory: no host round trip
    thr = tl.load(thr_ptr)
    eq_base = tl.load(eq_base_ptr)
    eq_cap = tl.load(eq_cap_ptr)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < d
    if MODE == 1:
        v = tl.load(e_ptr + offs, mask=live, other=0.0)
    else:
        v = _value(g_ptr, e_ptr, h_ptr, offs, live, eta, MODE)
    if MODE == 3:
        t = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32) - tl.load(h_ptr + offs, mask=live, other=0.0)
        tl.store(e_ptr + offs, tl.load(e_ptr + offs, mask=live, other=0.0) + t, mask=live)
    b = _bin(v)
    hi = live & (b > thr)
    eq = live & (b == thr)
    hi_i = hi.to(tl.int32)
    eq_i = eq.to(tl.int32)
    base_hi = tl.atomic_add(tickets, tl.sum(hi_i, axis=0))
    base_eq = tl.atomic_add(tickets + 1, tl.sum(eq_i, axis=0))
    pos_hi = base_hi + tl.cumsum(hi_i, axis=0) - hi_i
    pos_eq = base_eq + tl.cumsum(eq_i, axis=0) - eq_i
    keep_eq = eq & (pos_eq < eq_cap)
    tl.store(out_idx + pos_hi, offs.to(out_idx.dtype.element_ty), mask=hi)
    tl.store(out_val + pos_hi, v, mask=hi)
    tl.store(eq_idx + eq_base + pos_eq, offs.to(eq_idx.dtype.element_ty), mask=keep_eq)
    tl.store(eq_val + eq_base + pos_eq, v, mask=keep_eq)


@triton.jit
def _scatter_add_kernel(out_ptr, val_ptr, idx_ptr, scale, k, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < k
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    val = tl.load(val_ptr + offs, mask=live, other=0.0).to(tl.float32)
    cur = tl.load(out_ptr + idx, mask=live, other=0.0)
    tl.store(out_ptr + idx, cur + val * scale, mask=live)  # indices unique within one worker: no race


def _block(d: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 2048
    # interpreter: each program costs ~1 ms of Python, so use few, large programs
    return max(1024, min(1 << 16, triton.next_power_of_2(max(1, -(-d // 32)))))


def _device_threshold(hist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The bin holding the k-th largest |v| and the count strictly above it, computed on the device."""
    rev = hist.flip(0)
    cum = rev.cumsum(0)
    j = (cum >= k).to(torch.int32).argmax()  # first bin from the top whose running count reaches k
    thr = (NBINS - 1 - j).to(torch.int32).reshape(1)
    above = (cum[j] - rev[j]).to(torch.int32).reshape(1)
    return thr, above


def _run(mode: int, g: Tensor, e: Tensor | None, h: Tensor | None, k: int, eta: float, approx: bool):
    """Exact mode reads the 8 KB histogram to the host once (to size the candidate buffer and resolve
    it); approximate mode stays on the device: the threshold bin's entries fill the remaining slots."""
    d = g.numel()
    dev = g.device
    block = _block(d, dev)
    grid = (triton.cdiv(d, block),)
    dummy = g if e is None else e
    e_, h_ = (e if e is not None else dummy), (h if h is not None else dummy)
    hist = torch.zeros(NBINS, dtype=torch.int32, device=dev)
    _hist_kernel[grid](g, e_, h_, hist, d, eta, MODE=mode, BLOCK=block, NB=NBINS)
    idt = index_dtype(d)
    out_idx = _empty(k, idt, dev)
    out_val = _empty(k, torch.float32, dev)
    tickets = torch.zeros(2, dtype=torch.int32, device=dev)
    thr, above = _device_threshold(hist, k)
    if approx:
        cap = k - above
        args = (out_idx, out_val, above, cap)
    else:
        counts = hist.tolist()  # the exact path's one host synchronisation
        n_above, t = 0, NBINS - 1
        while t > 0 and n_above + counts[t] < k:  # same bin as _device_threshold's
            n_above += counts[t]
            t -= 1
        n_cand = counts[t]
        cand_idx = _empty(max(n_cand, 1), idt, dev)
        cand_val = _empty(max(n_cand, 1), torch.float32, dev)
        zero = torch.zeros(1, dtype=torch.int32, device=dev)
        args = (cand_idx, cand_val, zero, zero + n_cand)
    _select_kernel[grid](g, e_, h_, thr, out_idx, out_val, *args, tickets, d, eta, MODE=mode, BLOCK=block)
    if not approx and k > n_above:
        need = k - n_above
        pick = torch.topk(cand_val[:n_cand].abs(), need, sorted=False).indices if need < n_cand else slice(0, need)
        out_idx[n_above:] = cand_idx[pick]
        out_val[n_above:] = cand_val[pick]
    idx = out_idx.long()
    if mode == EF14:
        e.index_fill_(0, idx, 0.0)
    elif mode == EF21:
        h.index_add_(0, idx, out_val)
    elif mode == ECONTROL:
        e.index_add_(0, idx, out_val, alpha=-1.0)
        h.index_add_(0, idx, out_val)
    return out_val, out_idx


def _fp32_state(*ts: Tensor) -> None:
    for t in ts:
        if t.dtype != torch.float32:
            raise TypeError(f"the Triton kernels keep fp32 state, got {t.dtype}")


def topk(x: Tensor, k: int):
    v, i = _run(TOPK, x, None, None, k, 0.0, False)
    return v.to(x.dtype), i


def ef14_step_(grad: Tensor, error: Tensor, k: int, approx: bool = False):
    _fp32_state(error)
    return _run(EF14, grad, error, None, k, 0.0, approx)


def ef21_step_(grad: Tensor, estimate: Tensor, k: int, approx: bool = False):
    _fp32_state(estimate)
    return _run(EF21, grad, None, estimate, k, 0.0, approx)


def econtrol_step_(grad: Tensor, error: Tensor, shift: Tensor, k: int, eta: float, approx: bool = False):
    _fp32_state(error, shift)
    return _run(ECONTROL, grad, error, shift, k, float(eta), approx)


def accumulate_(out: Tensor, values: Tensor, indices: Tensor, scale=1.0):
    _fp32_state(out)
    v2 = values.reshape(-1, values.shape[-1])
    i2 = indices.reshape(v2.shape)
    k = v2.shape[1]
    block = 1024 if out.is_cuda else max(1024, triton.next_power_of_2(k))
    for w, s in enumerate(_scales(scale, v2.shape[0])):  # one launch per worker: deterministic order
        _scatter_add_kernel[(triton.cdiv(k, block),)](out, v2[w], i2[w], s, k, BLOCK=block)
    return out
