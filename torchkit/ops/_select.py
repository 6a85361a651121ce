"""The GPU radix-select driver shared by the Triton and the CUDA C++ kernels.

Both implementations provide the same four launches (a :class:`Launcher`): a one-program prediction, a
histogram pass, a one-program threshold step and an order-preserving select pass. This module sequences them (for
Triton; the CUDA build's ``tk_step`` in csrc/topk_ef_cuda.cu is the same sequence in C++, one host call, tested
against this one on a GPU); nothing here reads a device value on the host, so a step never synchronises and can be
captured in a CUDA graph.

Two sequences (``docs/kernels.md`` section 4, designs A and B):

- **one pass** (top-k, EF14, EF21): the lowest key of the top k is predicted (from a per-buffer ``hint`` of what
  the last step found, :func:`hint_of`; at a cold start, from a sample), and one streaming pass computes v (EF14
  stores it in e) and compacts every entry from that key up into the candidate buffer, in index order. When the
  buffer holds at least k entries and did not overflow (a hit), the rest runs on the candidates only: the vector is
  read once. A miss reads it again (the level-1 histogram, then the compaction from the true bin), with the same
  entries, values and state. Off on CUDA tensors unless ``GPU_ONE_PASS`` (not yet run on a GPU).
- **two passes** (EControl, whose one pass writes e <- e + g - h: v = eta e + g - h cannot be recomputed after it):
  a level-1 histogram pass, then a select pass; both read the whole vector.

Selection rule, identical to the CPU kernel's: the k entries of largest |v| (NaN above inf), ties at the k-th
magnitude to the lowest indices. Output order, the same on every run whatever order the GPU schedules the programs
in: exact one pass, the entries above the k-th magnitude in index order, then the ties; two passes, the entries
above the level-1 threshold bin in index order, then the rest; approximate, the entries above that bin, then the
lowest-indexed ones in it.
"""

from __future__ import annotations

import math
import os
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
# the one pass: the predicted lowest bin, the candidates it found, hit / rescan flags, the candidates in the buffer,
# whether a rescan refills the buffer, the buffer's capacity, the fourth select pass's ticket counter
S_LO, S_C, S_HIT, S_RESCAN, S_NC, S_REDO, S_CAPC, S_CTR4 = 19, 20, 21, 22, 23, 24, 25, 26
S_HINT = 27  # what the step leaves for the next one's prediction (see hint_of)
MARGIN = 1 << 19  # an exact one pass collects keys from 1/16 octave below the last step's k-th key
N_SCALARS = 32
SAMPLE = 4096  # entries a cold prediction reads (the CUDA kernels' kSample)
GATE, ONE_PASS_LEVEL1 = 0, 4  # threshold steps of the one pass: the hit check, and level 1 over what it counted
ALWAYS = -1  # a flag or count slot that is not read: always active / the host count
POISON = False  # tests set this: outputs and candidates start as NaN / -1 instead of uninitialised memory
TRACE: list[Tensor] | None = None  # tests set a list: each step run here appends its scalars (device memory)
ONE_PASS = True  # run's default sequence where the mode allows it (benchmarks time the two passes by turning it off)
# On CUDA tensors (Triton and the CUDA kernels) the one pass is off unless TORCHKIT_GPU_ONE_PASS=1: compiled for
# sm_90 and tested in the interpreter, it has not run on a GPU yet (benchmarks/gpu_run.sh, stage onepass, checks it).
GPU_ONE_PASS = os.environ.get("TORCHKIT_GPU_ONE_PASS") == "1"
# Likewise the many small segments of segments_step_ in one launch (torchkit/ops/_triton/segments.py): on CUDA tensors
# only with TORCHKIT_GPU_SEGMENTS=1 until a GPU has run it (the interpreter runs it on CPU tensors, impl="triton").
GPU_SEGMENTS = os.environ.get("TORCHKIT_GPU_SEGMENTS") == "1"
# Likewise the decode in two launches, tiled over out (torchkit/ops/_triton/decode.py): TORCHKIT_GPU_TILED_DECODE=1.
GPU_TILED_DECODE = os.environ.get("TORCHKIT_GPU_TILED_DECODE") == "1"

__all__ = ["run", "capacity", "kernel_takes", "level1", "hint_of", "one_pass_takes", "Hist", "Select", "Launcher",
           "GpuOps"]  # fmt: skip


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
    hi_base slot's value, entries equal to it to ``eq`` from the eq_base slot's value (the first ``cap``).
    ``ge``: entries at or above it all go to ``eq`` (the one pass's candidates), and with ``count`` a slot, their
    number is added there."""

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
    ge: bool = False
    count: int = ALWAYS
    stored: bool = True  # EF14: v is already in e (False in the one pass, which stores it)

    def slots(self) -> tuple[int, ...]:
        return (self.active, self.n_slot, self.thr_slot, self.shift, self.hi_base, self.eq_base, self.cap, self.ctr)


class Launcher(Protocol):
    def predict(self, scal: Tensor, mode: int, n: int, k: int, cap: int, hint: Tensor, approx: bool) -> None:
        """Slot ``S_LO``: the lowest key the one pass collects. With a hint (>= 0): ``MARGIN`` below it (exact), or
        its bin's lowest key (approximate: a whole bin); else the lowest key of the bin from which a sample of the
        vector expects at least k entries. Slot ``S_CAPC``: ``cap``."""

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


CAP_PER_K, CAP_EXTRA = 4, 4096  # the candidate buffer: 4k + 4096 (the segments kernel's order follows it too)


def capacity(d: int, k: int) -> int:
    """Candidate buffer of the exact mode. The threshold bin is 1/8 octave wide: on Gaussian-like data it holds
    0.3k to 2.2k entries for densities from 10% down to 1e-6; a larger bin (heavy ties) takes the re-read path."""
    return min(d, CAP_PER_K * k + CAP_EXTRA)


def sample_need(n: int, k: int, sample: int) -> int:
    """The sampled rank whose bin the one pass predicts at a cold start: k's share of the sample plus four standard
    deviations and one, so that fewer than k entries lie from that bin up about 3e-5 of the time whatever the
    distribution (binomial tail); k itself when the sample is the whole vector."""
    if n <= sample:
        return k
    mean = k * sample / n
    return min(sample, math.ceil(mean + 4 * math.sqrt(mean) + 1))


POOL = 1 << 16  # hint slots per device (256 KiB): see hint_of
_POOLS: dict[torch.device, Tensor] = {}
_NEXT: dict[torch.device, int] = {}
_HINTS: dict[tuple, Tensor] = {}


def one_pass_takes(mode: int) -> bool:
    """Whether the one-pass sequence can run ``mode`` (not EControl: see the module docstring)."""
    return mode != ECONTROL


def default_one_pass(mode: int, device: torch.device) -> bool:
    """The sequence :func:`run` takes by default: one pass wherever it can run, unless ``ONE_PASS`` is off, or on
    CUDA tensors ``GPU_ONE_PASS``."""
    return ONE_PASS and one_pass_takes(mode) and (device.type != "cuda" or GPU_ONE_PASS)


def hint_of(
    mode: int, g: Tensor, e: Tensor | None, h: Tensor | None, k: int, rows: int = 1, approx: bool = False
) -> Tensor:
    """The one pass's per-buffer hint: an int32 per row (or segment) on the vector's device holding what the last
    step found (-1 before the first): its k-th largest key when exact, its level-1 bin's lowest key when approximate.
    Kept per (the vector the step updates: e for EF14, h for EF21, g for top-k; its address and length; k; the rows;
    the mode). Only a prediction: a stale hint, or one left by another buffer at the same address, costs a re-read,
    never a different result. Hints are slices of one tensor per device that is never freed: when it is used up the
    slots are handed out again from the start (their old owners then start cold), so a CUDA graph or another stream
    still writing an old hint can garble a prediction but never memory the allocator gave to something else.

    A new hint asked for while a CUDA graph is being captured is not initialised: a fill would be captured too and
    rerun at every replay, so every replay would start cold. A fresh slot holds -1 already; a reused one holds some
    other buffer's hint, again only a prediction. The pool itself is not made during a capture (its memory would come
    from the graph's private pool, which graph trees hand out again): without one, as for more rows than it holds,
    the capture gets a hint for that call only, cold at every replay."""
    owner = e if mode == EF14 else h if mode == EF21 else g
    dev = owner.device
    key = (dev, owner.data_ptr(), owner.numel(), k, rows, bool(approx))
    hint = _HINTS.get(key)
    if hint is not None:
        return hint
    capturing = _capturing(dev)
    pool = _POOLS.get(dev)
    if rows > POOL or (pool is None and capturing):  # a hint for this call only
        return torch.full((rows,), -1, dtype=torch.int32, device=dev)
    if pool is None:
        pool = _POOLS[dev] = torch.full((POOL,), -1, dtype=torch.int32, device=dev)
    at = _NEXT.get(dev, 0)
    if at + rows > POOL:  # used up: hand the slots out again from the start
        for old in [key_ for key_ in _HINTS if key_[0] == dev]:
            del _HINTS[old]
        at = 0
    _NEXT[dev] = at + rows
    hint = _HINTS[key] = pool[at : at + rows]
    if not capturing:
        hint.fill_(-1)
    return hint


def _capturing(dev: torch.device) -> bool:
    """Whether the current stream of ``dev`` is capturing a CUDA graph."""
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def run(
    launcher: Launcher,
    mode: int,
    g: Tensor,
    e: Tensor | None,
    h: Tensor | None,
    k: int,
    approx: bool,
    one_pass: bool | None = None,
    hint: Tensor | None = None,
):
    """Select and update the state in place; returns ``(values fp32, indices)``. ``one_pass``: the sequence
    (default: one pass wherever it can run, unless ``ONE_PASS`` is off, or on CUDA tensors ``GPU_ONE_PASS``);
    ``hint``: the one pass's prediction (default: :func:`hint_of`)."""
    if one_pass is None:
        one_pass = default_one_pass(mode, g.device)
    if one_pass and not one_pass_takes(mode):
        raise ValueError("one_pass: EControl runs two passes (its one pass would overwrite e before a rescan)")
    d = g.numel()
    dev = g.device
    idt = index_dtype(d)
    cap = capacity(d, k) if one_pass or not approx else 0
    n_lb = launcher.lookback_slots(d)
    n_lbc = launcher.lookback_slots(cap) if cap else 0
    n_vec = 3 if one_pass else 1 if approx else 2  # select passes over the vector, each with its look-back words
    head = (3 * NBINS + N_SCALARS) // 2
    ws = torch.zeros(head + n_vec * n_lb + (n_lbc if cap else 0), dtype=torch.int64, device=dev)
    i32 = ws[:head].view(torch.int32)
    lbs = ws[head:]
    passes = _Passes(
        launcher,
        mode,
        d,
        k,
        cap,
        [i32[j * NBINS : (j + 1) * NBINS] for j in range(3)],
        i32[3 * NBINS :],
        [lbs[j * n_lb : (j + 1) * n_lb] for j in range(n_vec)] + [lbs[n_vec * n_lb :]],
        (_empty(k, idt, dev), _empty(k, torch.float32, dev)),
        (_empty(cap, idt, dev), _empty(cap, torch.float32, dev)),
        # the passes over the vector: does each operand own padding to a multiple of 16 (see _padding)
        (owns_padding(g), any(t is not None for t in (e, h)) and all(owns_padding(t) for t in (e, h) if t is not None)),
    )
    if one_pass:
        passes.one_pass(approx, hint_of(mode, g, e, h, k, approx=approx) if hint is None else hint)
    else:
        passes.two_passes(approx)
    if TRACE is not None:
        TRACE.append(passes.scal)
    idx, vals = passes.out
    sent = idx.long()
    if mode == EF14:
        e.index_fill_(0, sent, 0.0)
    elif mode == EF21:
        h.index_add_(0, sent, vals)
    elif mode == ECONTROL:
        e.index_add_(0, sent, vals, alpha=-1.0)
        h.index_add_(0, sent, vals)
    return vals, idx


class _Passes(NamedTuple):
    """One step's launches over its workspace: histograms, scalars, look-back words per select pass (the last
    entry: the candidates' pass), the output and the candidate buffer."""

    launcher: Launcher
    mode: int
    d: int
    k: int
    cap: int
    hists: list[Tensor]
    scal: Tensor
    lbs: list[Tensor]
    out: tuple[Tensor, Tensor]
    cand: tuple[Tensor, Tensor]
    pad: tuple[bool, bool]

    def _select(self, **kw) -> None:
        self.launcher.select(self.scal, Select(**kw))

    def _vector(self) -> dict:
        return dict(mode=self.mode, write_e=True, n_slot=ALWAYS, n=self.d, pad=self.pad)

    def _in_cand(self, n_slot: int) -> dict:
        return dict(mode=CAND, write_e=False, active=S_FITS, n_slot=n_slot, n=self.cap, cand=self.cand)

    def one_pass(self, approx: bool, hint: Tensor) -> None:
        lch, scal, k, cap = self.launcher, self.scal, self.k, self.cap
        lch.predict(scal, self.mode, self.d, k, cap, hint, approx)
        into_cand = dict(hi=self.cand, eq=self.cand, ge=True, hi_base=S_ZERO, eq_base=S_ZERO, cap=S_CAPC)
        vector = self._vector()
        self._select(lb=self.lbs[0], active=ALWAYS, thr_slot=S_LO, shift=0, ctr=S_CTR1, count=S_C, stored=False,
                     **vector, **into_cand)  # fmt: skip
        lch.threshold(self.hists[0], scal, k, cap, GATE)  # a hit: k <= candidates <= cap
        lch.hist(scal, Hist(self.hists[0], CAND, True, S_HIT, S_NC, ALWAYS, 31, 20, cap, self.cand))
        lch.hist(scal, Hist(self.hists[0], self.mode, True, S_RESCAN, ALWAYS, ALWAYS, 31, 20, self.d, pad=self.pad))
        lch.threshold(self.hists[0], scal, k, cap, ONE_PASS_LEVEL1)
        self._select(lb=self.lbs[1], active=S_REDO, thr_slot=S_B1, shift=20, ctr=S_CTR2, **vector, **into_cand)
        if approx:  # the threshold bin's lowest-indexed entries fill the remaining slots
            fill = dict(hi=self.out, eq=self.out, thr_slot=S_B1, shift=20, hi_base=S_ZERO, eq_base=S_ABOVE1,
                        cap=S_NEED1)  # fmt: skip
            self._select(lb=self.lbs[2], active=S_OVER, ctr=S_CTR3, **vector, **fill)
            self._select(lb=self.lbs[3], ctr=S_CTR4, **self._in_cand(S_NC), **fill)
        else:
            self._levels_2_3(S_NC)
            exact = dict(hi=self.out, eq=self.out, thr_slot=S_T, shift=0, hi_base=S_ZERO, eq_base=S_A, cap=S_CAP)
            self._select(lb=self.lbs[2], active=S_OVER, ctr=S_CTR3, **vector, **exact)
            self._select(lb=self.lbs[3], ctr=S_CTR4, **self._in_cand(S_NC), **exact)
        hint.copy_(scal[S_HINT : S_HINT + 1])  # the next step's prediction (device to device)

    def two_passes(self, approx: bool) -> None:
        lch, scal, k, cap = self.launcher, self.scal, self.k, self.cap
        lch.hist(scal, level1(self.hists[0], self.mode, self.d, self.pad))
        lch.threshold(self.hists[0], scal, k, cap, 1)
        select1 = dict(lb=self.lbs[0], hi=self.out, thr_slot=S_B1, shift=20, hi_base=S_ZERO, ctr=S_CTR1)
        if approx:  # the threshold bin's lowest-indexed entries fill the remaining slots
            self._select(eq=self.out, active=ALWAYS, eq_base=S_ABOVE1, cap=S_NEED1, **select1, **self._vector())
            return
        self._select(eq=self.cand, active=S_FITS, eq_base=S_ZERO, cap=S_N1, **select1, **self._vector())
        self._levels_2_3(S_N1)
        exact = dict(hi=self.out, eq=self.out, thr_slot=S_T, shift=0, eq_base=S_A, cap=S_CAP)
        self._select(lb=self.lbs[1], active=S_OVER, hi_base=S_ZERO, ctr=S_CTR2, **self._vector(), **exact)
        self._select(lb=self.lbs[2], hi_base=S_ABOVE1, ctr=S_CTR3, **self._in_cand(S_N1), **exact)

    def _levels_2_3(self, n_slot: int) -> None:
        """The k-th key's next 11 and last 9 bits, within the level-1 bin: from the candidates (``n_slot`` of them)
        or, when the bin overflowed the buffer, from the vector, re-read; one of the two runs."""
        for level, shift_hi, shift_lo, prefix in ((2, 20, 9, S_B1), (3, 9, 0, S_P3)):
            hist = self.hists[level - 1]
            self.launcher.hist(self.scal, Hist(hist, self.mode, True, S_OVER, ALWAYS, prefix, shift_hi, shift_lo,
                                               self.d, pad=self.pad))  # fmt: skip
            self.launcher.hist(self.scal, Hist(hist, CAND, True, S_FITS, n_slot, prefix, shift_hi, shift_lo, self.cap,
                                               self.cand))  # fmt: skip
            self.launcher.threshold(hist, self.scal, self.k, self.cap, level)


_RUNS_TABLES: dict[torch.device, Tensor] = {}
RUN_SLOTS = 4  # the tiled decode's runs table: a count and the first three descents per row and span


def runs_spans(k: int, per_row: int = 64) -> tuple[int, int]:
    """``(span, spans)``: the index pairs each program of the tiled decode's first launch compares (1024 or more, a
    power of two) and the programs a row of ``k`` entries takes (at most ``per_row``); both kernel sets'."""
    span = max(1024, 1 << max(0, -(-k // per_row) - 1).bit_length())
    return span, max(1, -(-(k - 1) // span))


def runs_table(device: torch.device, rows: int, spans: int) -> Tensor:
    """The tiled decode's runs table (int32, ``rows x spans x RUN_SLOTS``: both kernel sets' layout), kept per
    device and grown when needed: no allocation per call, and never freed while a captured CUDA graph may read it."""
    need = rows * spans * RUN_SLOTS
    t = _RUNS_TABLES.get(device)
    if t is None or t.numel() < need:
        t = _RUNS_TABLES[device] = torch.empty(max(need, 1024), dtype=torch.int32, device=device)
    return t


class GpuOps:
    """The op set of one GPU implementation: ``run(mode, g, e, h, k, eta, approx)``,
    ``scatter(out, values [rows, k] fp32, indices, scales)`` and ``prepare(out, zero, checks)`` (one pass over
    ``out``: zeros, or NaN everywhere when the float64 ``checks``, a vector of any stride, sum to a non-finite
    value), and optionally ``accumulate(out, values, indices, scales, zero, checks)``, the two in one host call,
    ``segments()``, the module that runs many small segments in one launch, and ``decode()``, the one that decodes
    a round in two launches tiled over ``out`` (``None`` where they cannot load: ``torchkit/ops/_triton/``); inputs
    the kernels do not take go to the reference."""

    def __init__(self, run_fn, scatter_fn, prepare_fn, accumulate_fn=None, segments=None, decode=None):
        self._run, self._scatter, self._prepare, self._accumulate = run_fn, scatter_fn, prepare_fn, accumulate_fn
        self._segments, self._decode = segments, decode

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
        """The segments of at most ``segments.SMALL`` entries in one launch, one program each, and the larger ones
        one step each (launches of their own), the output as from one step per segment; on CUDA tensors only with
        ``GPU_SEGMENTS`` (else one step per segment)."""
        seg = self._segments() if self._segments is not None else None
        state = [t for t in (error, shift) if t is not None]
        out = None
        if seg is not None and kernel_takes(grad, *state) and (grad.device.type != "cuda" or GPU_SEGMENTS):
            step = _reference.step_of(self, kind, eta, approx=approx)
            one_pass = default_one_pass(kind, grad.device)
            out = seg.segments(step, kind, grad, error, shift, sizes, ks, eta, approx, one_pass)
        if out is None:  # no segment for its one launch
            out = _reference.by_segments(self, kind, grad, error, shift, sizes, ks, eta, approx=approx)
        return out

    def accumulate_(self, out: Tensor, values: Tensor, indices: Tensor, scale=1.0, zero=False, poison=None):
        """The per-row decode (a first pass over ``out``, then a launch per row), or on CUDA tensors with
        ``GPU_TILED_DECODE`` (and on CPU tensors, the interpreter's) the tiled one: two launches whatever the number
        of rows, bit for bit the same result."""
        if not kernel_takes(values, out):
            return _reference.accumulate_(out, values, indices, scale, zero, poison)
        _reference.check_indices(indices, out.numel())  # the interpreter's CPU tensors, as the CPU kernels do
        checks = None if poison is None else poison.reshape(-1)  # float64; gathered checks: in place, strided
        v2 = _reference.as_rows(values)
        scales = _reference._scales(scale, v2.shape[0])
        tiled = self._decode() if self._decode is not None and v2.numel() else None
        if tiled is not None and (out.device.type != "cuda" or GPU_TILED_DECODE):
            tiled.accumulate(out, v2, indices.reshape(v2.shape), scales, zero, checks)
            return out
        if self._accumulate is not None:
            self._accumulate(out, v2, indices.reshape(v2.shape), scales, zero, checks)
            return out
        if zero or poison is not None:
            self._prepare(out, zero, checks)
        if v2.numel():
            self._scatter(out, v2, indices.reshape(v2.shape), scales)
        return out
