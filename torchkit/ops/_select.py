"""The GPU radix-select driver shared by the Triton and the CUDA C++ kernels.

Both implementations provide the same three launches (a :class:`Launcher`): a histogram pass, a one-program
threshold step and an order-preserving select pass. This module sequences them (for Triton; the CUDA build's
``tk_step`` in csrc/topk_ef_cuda.cu is the same sequence in C++, one host call, tested against this one on a
GPU); nothing here reads a device value on the host, so a step never synchronises and can be captured in a CUDA
graph.

Selection rule, identical to the CPU kernel's: the k entries of largest |v| (NaN above inf), ties at the k-th
magnitude to the lowest indices. Output order: the entries above the level-1 threshold bin in index order,
then the rest; the same on every run whatever order the GPU schedules the programs in.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from . import _reference
from ._padding import owns_padding
from ._reference import index_dtype

TOPK, EF14, EF21, ECONTROL, CAND = 0, 1, 2, 3, 4
NBINS = 2048
MAX_D = 1 << 30  # the look-back word packs two 30-bit counts

# int32 scalar slots in device memory, written by the threshold step (see the kernels' threshold step)
S_B1, S_ABOVE1, S_NEED1, S_N1, S_OVER, S_FITS = 0, 1, 2, 3, 4, 5
S_B2, S_ABOVE2, S_NEED2, S_P3 = 6, 7, 8, 9
S_T, S_A, S_CAP = 10, 11, 12
S_ZERO, S_CTR1, S_CTR2, S_CTR3 = 13, 14, 15, 16
S_BASE, S_MISS = 17, 18  # the Triton level-1 ladder's window base and miss flag (its launcher's own passes)
N_SCALARS = 32
ALWAYS = -1  # a flag or count slot that is not read: always active / the host count
POISON = False  # tests set this: outputs and candidates start as NaN / -1 instead of uninitialised memory

__all__ = ["run", "capacity", "kernel_takes", "level1", "Hist", "Select", "Launcher", "GpuOps"]


class Hist(NamedTuple):
    """A histogram pass: bins ``(key >> shift_lo)`` of the entries whose ``key >> shift_hi`` equals the prefix
    slot's value (no prefix: ``ALWAYS``), over ``n`` entries of the method's vector or of ``cand``."""

    hist: Tensor
    mode: int
    stored: bool  # EF14: v is already in e (False on the first pass, which stores it)
    active: int  # slot of the flag that switches the pass on, or ALWAYS
    n_slot: int  # slot holding the entry count, or ALWAYS (then n)
    prefix_slot: int
    shift_hi: int
    shift_lo: int
    n: int
    cand: tuple[Tensor, Tensor] | None = None  # (indices, values) when the pass reads the candidates
    pad: tuple[bool, bool] = (False, False)  # (g, state) own padding to a multiple of 16: see _padding

    def slots(self) -> tuple[int, ...]:
        return self.active, self.n_slot, self.prefix_slot, self.shift_hi, self.shift_lo


def level1(hist: Tensor | None, mode: int, n: int, pad: tuple[bool, bool] = (False, False)) -> Hist:
    """The first pass over the method's vector: bins of ``key >> 20`` of every entry (EF14: v not stored yet)."""
    return Hist(hist, mode, False, ALWAYS, ALWAYS, ALWAYS, 31, 20, n, pad=pad)


class Select(NamedTuple):
    """A select pass: entries with ``key >> shift`` above the threshold slot's value go to ``hi`` from the
    hi_base slot's value, entries equal to it to ``eq`` from the eq_base slot's value (the first ``cap``)."""

    lb: Tensor  # look-back words, one per block
    hi: tuple[Tensor, Tensor]
    eq: tuple[Tensor, Tensor]
    mode: int
    write_e: bool  # EControl: this pass writes e <- e + g - h
    active: int
    n_slot: int
    thr_slot: int
    shift: int
    hi_base: int
    eq_base: int
    cap: int
    ctr: int  # slot of the block-ticket counter
    n: int
    cand: tuple[Tensor, Tensor] | None = None
    pad: tuple[bool, bool] = (False, False)

    def slots(self) -> tuple[int, ...]:
        return (self.active, self.n_slot, self.thr_slot, self.shift, self.hi_base, self.eq_base, self.cap, self.ctr)


class Launcher(Protocol):
    def hist(self, scal: Tensor, p: Hist) -> None: ...

    def threshold(self, hist: Tensor, scal: Tensor, k: int, cap: int, level: int) -> None: ...

    def select(self, scal: Tensor, p: Select) -> None: ...

    def lookback_slots(self, n: int) -> int: ...


def kernel_takes(grad: Tensor, *state: Tensor) -> bool:
    """The GPU kernels compute in fp32 from fp32/bf16/fp16 gradients with fp32 state, d < 2**30; the rest
    (fp64 above all) goes to the reference, as on the CPU."""
    return (
        grad.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and all(t.dtype == torch.float32 for t in state)
        and grad.numel() < MAX_D
    )


def _empty(n: int, dtype: torch.dtype, device) -> Tensor:
    if not POISON:
        return torch.empty(n, dtype=dtype, device=device)
    return torch.full((n,), float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


def capacity(d: int, k: int) -> int:
    """Candidate buffer of the exact mode. The threshold bin is 1/8 octave wide: on Gaussian-like data it holds
    0.3k to 2.2k entries for densities from 10% down to 1e-6; a larger bin (heavy ties) takes the re-read path."""
    return min(d, 4 * k + 4096)


def run(launcher: Launcher, mode: int, g: Tensor, e: Tensor | None, h: Tensor | None, k: int, approx: bool):
    """Select and update the state in place; returns ``(values fp32, indices)``."""
    d = g.numel()
    dev = g.device
    idt = index_dtype(d)
    cap = 0 if approx else capacity(d, k)
    n_lb = launcher.lookback_slots(d)
    n_lbc = launcher.lookback_slots(cap) if cap else 0
    head = (3 * NBINS + N_SCALARS) // 2
    ws = torch.zeros(head + (n_lb if approx else 2 * n_lb + n_lbc), dtype=torch.int64, device=dev)
    i32 = ws[:head].view(torch.int32)
    hists = [i32[j * NBINS : (j + 1) * NBINS] for j in range(3)]
    scal = i32[3 * NBINS :]
    lbs = ws[head:]
    out = (_empty(k, idt, dev), _empty(k, torch.float32, dev))
    state = [t for t in (e, h) if t is not None]
    pad = (owns_padding(g), bool(state) and all(owns_padding(t) for t in state))  # the passes over the vector

    launcher.hist(scal, level1(hists[0], mode, d, pad))
    launcher.threshold(hists[0], scal, k, cap, 1)
    select1 = dict(  # the level-1 select pass
        lb=lbs[:n_lb],
        hi=out,
        mode=mode,
        write_e=True,
        n_slot=ALWAYS,
        thr_slot=S_B1,
        shift=20,
        hi_base=S_ZERO,
        ctr=S_CTR1,
        n=d,
        pad=pad,
    )
    if approx:  # the threshold bin's lowest-indexed entries fill the remaining slots
        launcher.select(scal, Select(eq=out, active=ALWAYS, eq_base=S_ABOVE1, cap=S_NEED1, **select1))
    else:
        cand = (_empty(cap, idt, dev), _empty(cap, torch.float32, dev))
        launcher.select(scal, Select(eq=cand, active=S_FITS, eq_base=S_ZERO, cap=S_N1, **select1))
        for level, shift_hi, shift_lo, prefix in ((2, 20, 9, S_B1), (3, 9, 0, S_P3)):
            hist = hists[level - 1]  # the re-read of the vector and the pass over the candidates: one runs
            launcher.hist(scal, Hist(hist, mode, True, S_OVER, ALWAYS, prefix, shift_hi, shift_lo, d, pad=pad))
            launcher.hist(scal, Hist(hist, CAND, True, S_FITS, S_N1, prefix, shift_hi, shift_lo, cap, cand))
            launcher.threshold(hist, scal, k, cap, level)
        exact = dict(hi=out, eq=out, thr_slot=S_T, shift=0, eq_base=S_A, cap=S_CAP)
        launcher.select(
            scal,
            Select(
                lbs[n_lb : 2 * n_lb],
                mode=mode,
                write_e=True,
                active=S_OVER,
                n_slot=ALWAYS,
                hi_base=S_ZERO,
                ctr=S_CTR2,
                n=d,
                pad=pad,
                **exact,
            ),
        )
        launcher.select(
            scal,
            Select(
                lbs[2 * n_lb :],
                mode=CAND,
                write_e=False,
                active=S_FITS,
                n_slot=S_N1,
                hi_base=S_ABOVE1,
                ctr=S_CTR3,
                n=cap,
                cand=cand,
                **exact,
            ),
        )
    idx, vals = out
    sent = idx.long()
    if mode == EF14:
        e.index_fill_(0, sent, 0.0)
    elif mode == EF21:
        h.index_add_(0, sent, vals)
    elif mode == ECONTROL:
        e.index_add_(0, sent, vals, alpha=-1.0)
        h.index_add_(0, sent, vals)
    return vals, idx


class GpuOps:
    """The op set of one GPU implementation: ``run(mode, g, e, h, k, eta, approx)``,
    ``scatter(out, values [rows, k] fp32, indices, scales)`` and ``prepare(out, zero, checks)`` (one pass over
    ``out``: zeros, or NaN everywhere when the float64 ``checks``, a vector of any stride, sum to a non-finite
    value); inputs the kernels do not take go to the reference."""

    def __init__(self, run_fn, scatter_fn, prepare_fn):
        self._run, self._scatter, self._prepare = run_fn, scatter_fn, prepare_fn

    def topk(self, x: Tensor, k: int):
        if not kernel_takes(x):
            return _reference.topk(x, k)
        v, i = self._run(TOPK, x, None, None, k, 0.0, False)
        return v.to(x.dtype), i

    def ef14_step_(self, grad: Tensor, error: Tensor, k: int, approx: bool = False):
        if not kernel_takes(grad, error):
            return _reference.ef14_step_(grad, error, k)
        return self._run(EF14, grad, error, None, k, 0.0, approx)

    def ef21_step_(self, grad: Tensor, estimate: Tensor, k: int, approx: bool = False):
        if not kernel_takes(grad, estimate):
            return _reference.ef21_step_(grad, estimate, k)
        return self._run(EF21, grad, None, estimate, k, 0.0, approx)

    def econtrol_step_(self, grad: Tensor, error: Tensor, shift: Tensor, k: int, eta: float, approx: bool = False):
        if not kernel_takes(grad, error, shift):
            return _reference.econtrol_step_(grad, error, shift, k, eta)
        return self._run(ECONTROL, grad, error, shift, k, float(eta), approx)

    def segments_step_(self, kind: int, grad: Tensor, error, shift, sizes, ks, eta: float = 0.0, approx=False):
        """One step per segment (launches of their own; the CPU kernel runs them in one call)."""
        return _reference.by_segments(self, kind, grad, error, shift, sizes, ks, eta, approx=approx)

    def accumulate_(self, out: Tensor, values: Tensor, indices: Tensor, scale=1.0, zero=False, poison=None):
        if not kernel_takes(values, out):
            return _reference.accumulate_(out, values, indices, scale, zero, poison)
        if zero or poison is not None:
            checks = None if poison is None else poison.reshape(-1)  # float64; gathered checks: in place, strided
            self._prepare(out, zero, checks)
        v2 = _reference.as_rows(values)
        if v2.numel():
            self._scatter(out, v2, indices.reshape(v2.shape), _reference._scales(scale, v2.shape[0]))
        return out
