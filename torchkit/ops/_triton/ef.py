"""Triton kernels for the fused error-feedback steps: an 11-bit radix select (AIR top-k's design) fused with
the state update, deterministic and free of host synchronisation. The driver is shared with the CUDA C++
kernels (:mod:`torchkit.ops._select`); this module only launches.

Key of an entry: the bits of |v| (31 bits, monotone in |v|, NaN above inf). Three levels of 11 + 11 + 9 bits.

1. Level 1, the one pass over the vector that counts (no ``tl.histogram`` there: its cost grows with the bins,
   96 GB/s at 2048 on an H200, ``triton_histogram`` in ``benchmarks/results/nvidia-h200/tune.json``):
   a. ``_predict_kernel`` (one program): the bin of ``key >> 20`` (1/8 octave) that the k-th key should fall
      in, from 4096 entries spread over the vector, found bit by bit with ``tl.sum`` counts;
   b. ``_ladder_kernel`` (persistent grid): v (EF14 stores it in e) and a ladder of 14 bins around that bin,
      plus one lump below and one above, counted in byte-wide fields of two 64-bit words per entry slot (its
      inner loop: 111 sm_90 SASS instructions per 4 entries a thread, ``inner_loop`` in
      ``benchmarks/results/aot-sm90/sass.json``);
   c. ``_window_kernel`` (one program): whether the k-th key's bin fell inside the window. On a miss (a sample
      that misjudged the tail) it clears the window and sets a device flag, and ``_hist_kernel`` counts all 2048
      bins, re-reading v (EF14: from e). Either way the histogram answers the threshold step identically, but a
      miss costs more than the old single pass: the sample is every d/4096-th entry, so a top-k concentrated in
      a small tensor of a flat buffer that the sample never sees misses on every step.
2. ``_threshold_kernel`` (one program): the bin holding the k-th largest key, counts above it, and whether
   that bin fits the candidate buffer. Every scalar stays in device memory.
3. ``_select_kernel``: entries above the bin go to the output, entries in it to the candidate buffer (exact
   mode) or straight into the remaining output slots (approximate mode: the lowest indices win). Positions
   come from an order-preserving compaction (per-program counts, decoupled look-back over program tickets),
   so the output is the same whatever order the GPU runs the programs in. EControl writes e <- e + g - h here.
4. exact mode: levels 2 and 3 histogram the candidates with ``tl.histogram`` (at most 4k + 4096 entries; or,
   when the bin overflowed the buffer, the whole vector, re-read) and a last select pass writes the exact k:
   every entry above the k-th key, then the lowest-indexed entries equal to it. The pass over the path not taken
   is launched too and exits at once (a device flag), so no host read is ever needed.

Every launch passes ``enable_fp_fusion=False``: the reference rounds ``e * eta`` and the add separately.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _padding, _select
from . import decode_module, segments_module

__all__ = ["OPS"]

NB = _select.NBINS
NUM_WARPS = 8  # 2048-element programs: 8 entries per thread
CAND = _select.CAND
PAD: tl.constexpr = tl.constexpr(_padding.PAD)  # what padded_zeros pads to
FLAG_A: tl.constexpr = tl.constexpr(1 << 60)  # look-back word: this program's own counts are published
FLAG_P: tl.constexpr = tl.constexpr(1 << 61)  # look-back word: the inclusive prefix is published
VALS: tl.constexpr = tl.constexpr((1 << 60) - 1)  # hi count << 30 | eq count
S_BASE: tl.constexpr = tl.constexpr(_select.S_BASE)
S_MISS: tl.constexpr = tl.constexpr(_select.S_MISS)
S_LO: tl.constexpr = tl.constexpr(_select.S_LO)
S_C: tl.constexpr = tl.constexpr(_select.S_C)
S_HIT: tl.constexpr = tl.constexpr(_select.S_HIT)
S_RESCAN: tl.constexpr = tl.constexpr(_select.S_RESCAN)
S_NC: tl.constexpr = tl.constexpr(_select.S_NC)
S_REDO: tl.constexpr = tl.constexpr(_select.S_REDO)
S_CAPC: tl.constexpr = tl.constexpr(_select.S_CAPC)
S_HINT: tl.constexpr = tl.constexpr(_select.S_HINT)
MARGIN: tl.constexpr = tl.constexpr(_select.MARGIN)
LADDER = 16  # rungs of the level-1 ladder (the counters in _ladder_kernel pack exactly 16)
SAMPLE = _select.SAMPLE  # entries the level-1 prediction reads
LADDER_BLOCK = 1024  # the ladder pass's block on a GPU: 4 entries per thread


@triton.jit
def _load_v(g_ptr, e_ptr, h_ptr, offs, gm, sm, eta, MODE: tl.constexpr, STORED: tl.constexpr):
    """v of the method (fp32); ``gm``/``sm`` mask the loads of g and of the state (padding included when the caller
    owns it). STORED: EF14 already holds v in e. CAND: e_ptr is the candidate values."""
    if MODE == 0:
        v = tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32)
    elif MODE == 1:
        if STORED:
            v = tl.load(e_ptr + offs, mask=sm, other=0.0)
        else:
            v = tl.load(e_ptr + offs, mask=sm, other=0.0) + tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32)
    elif MODE == 2:
        v = tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32) - tl.load(h_ptr + offs, mask=sm, other=0.0)
    elif MODE == 3:
        t = tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32) - tl.load(h_ptr + offs, mask=sm, other=0.0)
        v = tl.load(e_ptr + offs, mask=sm, other=0.0) * eta + t
    else:
        v = tl.load(e_ptr + offs, mask=sm, other=0.0)
    return v


@triton.jit
def _masks(offs, live, d, G_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """Load/store masks of g and of the state: ``live`` (entries < d), or, where the caller owns padding to a
    multiple of PAD (16) elements, entries < that padded length, a mask constant over PAD entries: 128-bit
    accesses."""
    dp = tl.multiple_of(tl.cdiv(d, PAD) * PAD, PAD)
    if G_PAD:
        gm = offs < dp
    else:
        gm = live
    if S_PAD:
        sm = offs < dp
    else:
        sm = live
    return gm, sm


@triton.jit
def _block_v(g_ptr, e_ptr, h_ptr, offs, live, d, eta, MODE: tl.constexpr, STORED: tl.constexpr,
             G_PAD: tl.constexpr, S_PAD: tl.constexpr):  # fmt: skip
    """v of one block of a pass over the method's vector; EF14's first pass (not STORED) stores it in e."""
    gm, sm = _masks(offs, live, d, G_PAD, S_PAD)
    v = _load_v(g_ptr, e_ptr, h_ptr, offs, gm, sm, eta, MODE, STORED)
    if MODE == 1 and not STORED:
        tl.store(e_ptr + offs, v, mask=sm)  # e now holds v = e + g (and the padding e + g there)
    return v


@triton.jit
def _key(v):
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _flag(scal_ptr, slot):
    """A device-side switch: slot < 0 means always on."""
    return (slot < 0) | (tl.load(scal_ptr + tl.maximum(slot, 0)) != 0)


@triton.jit
def _count(scal_ptr, d, n_slot):
    """d, or a count in device memory (slot >= 0)."""
    return tl.where(n_slot < 0, d, tl.load(scal_ptr + tl.maximum(n_slot, 0)))


_SLOTS = [
    "active",
    "n_slot",
    "prefix_slot",
    "shift_hi",
    "shift_lo",
    "thr_slot",
    "shift",
    "hi_base",
    "eq_base",
    "cap_slot",
    "ctr_slot",
]


@triton.jit(do_not_specialize=["d", "eta"] + _SLOTS[:5])
def _hist_kernel(
    g_ptr,
    e_ptr,
    h_ptr,
    hist_ptr,
    scal_ptr,
    d,
    eta,
    active,
    n_slot,
    prefix_slot,
    shift_hi,
    shift_lo,
    MODE: tl.constexpr,
    STORED: tl.constexpr,
    BLOCK: tl.constexpr,
    NBINS: tl.constexpr,
    G_PAD: tl.constexpr = False,
    S_PAD: tl.constexpr = False,
):
    """Histogram of ``(key >> shift_lo)`` over the entries whose ``key >> shift_hi`` equals the prefix
    (level 1: no prefix), merged into ``hist`` once per program (persistent grid, zero bins skipped)."""
    if _flag(scal_ptr, active):
        n = _count(scal_ptr, d, n_slot)
        nblk = tl.cdiv(n, BLOCK)
        width_mask = (1 << (shift_hi - shift_lo)) - 1
        prefix = tl.load(scal_ptr + tl.maximum(prefix_slot, 0))
        lane = tl.arange(0, BLOCK)
        acc = tl.zeros([NBINS], dtype=tl.int32)
        for blk in range(tl.program_id(0), nblk, tl.num_programs(0)):
            offs = blk * BLOCK + lane  # int32: d < 2**30
            live = offs < n
            key = _key(_block_v(g_ptr, e_ptr, h_ptr, offs, live, d, eta, MODE, STORED, G_PAD, S_PAD))
            m = live & (((key >> shift_hi) == prefix) | (prefix_slot < 0))
            b = tl.where(m, (key >> shift_lo) & width_mask, 0)
            dead = BLOCK - tl.sum(m.to(tl.int32), axis=0)
            acc += tl.histogram(b, NBINS) - tl.where(tl.arange(0, NBINS) == 0, dead, 0)
        bins = tl.arange(0, NBINS)
        tl.atomic_add(hist_ptr + bins, acc, mask=acc != 0, sem="relaxed")


@triton.jit(do_not_specialize=["d", "eta"])
def _ladder_kernel(
    g_ptr,
    e_ptr,
    h_ptr,
    hist_ptr,
    scal_ptr,
    d,
    eta,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    LADDER: tl.constexpr,
    G_PAD: tl.constexpr = False,
    S_PAD: tl.constexpr = False,
):
    """Level 1's streaming pass (persistent grid; EF14 stores v in e): instead of all 2048 bins of ``key >> 20``,
    the R - 2 bins from the predicted base (slot ``S_BASE``) on, and two lumps: every entry below the window counted
    in bin base - 1, every entry above it in bin base + R - 2. No histogram instruction: an entry adds
    ``1 << 8 * (rung % 8)`` to one of two 64-bit words, eight byte-wide counters each, which are unpacked and summed
    over the block every 255 blocks (before a byte can overflow) and merged into ``hist`` once per program."""
    tl.static_assert(LADDER == 16, "the counters pack 16 rungs: 8 bytes in each of two words")
    base = tl.load(scal_ptr + S_BASE)
    nblk = tl.cdiv(d, BLOCK)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    rung = tl.arange(0, LADDER)
    count = tl.zeros([LADDER], dtype=tl.int32)
    for first in range(pid, nblk, nprog * 255):
        lo = tl.zeros([BLOCK], dtype=tl.int64)  # rungs 0-7, a byte each
        hi = tl.zeros([BLOCK], dtype=tl.int64)  # rungs 8-15
        for blk in range(first, tl.minimum(nblk, first + nprog * 255), nprog):
            offs = blk * BLOCK + lane  # int32: d < 2**30
            live = offs < d
            v = _block_v(g_ptr, e_ptr, h_ptr, offs, live, d, eta, MODE, False, G_PAD, S_PAD)
            # the rung: 0 below the window, 1 + (bin - base) in it, R - 1 above; dead lanes add nothing
            t = tl.minimum(tl.maximum((_key(v) >> 20) - base + 1, 0), LADDER - 1)
            one = tl.where(live, tl.full([BLOCK], 1, tl.int64) << ((t & 7) * 8).to(tl.int64), 0)
            lo += tl.where(t < 8, one, 0)
            hi += tl.where(t < 8, 0, one)
        word = tl.where(rung[:, None] < 8, lo[None, :], hi[None, :])
        count += tl.sum(((word >> ((rung[:, None] & 7) * 8).to(tl.int64)) & 255).to(tl.int32), axis=1)
    # count 0 is 0 when base is 0: bin -1 is never written
    tl.atomic_add(hist_ptr + base - 1 + rung, count, mask=count != 0, sem="relaxed")


@triton.jit(do_not_specialize=["d", "eta", "need", "cap"])
def _predict_kernel(
    g_ptr,
    e_ptr,
    h_ptr,
    scal_ptr,
    hint_ptr,
    d,
    eta,
    need,
    cap,
    MODE: tl.constexpr,
    SAMPLE: tl.constexpr,
    LADDER: tl.constexpr,
    ONE_PASS: tl.constexpr,
    APPROX: tl.constexpr = False,
):
    """One program: the level-1 bin of the ``need``-th largest key among SAMPLE entries spread evenly over the
    vector (all of it when d <= SAMPLE), found bit by bit with counts (no histogram). The ladder: writes its base to
    slot ``S_BASE`` so that the predicted bin sits a third of the way up the window (a sample's estimate errs low
    when few of its entries lie above the threshold). ONE_PASS: writes slot ``S_LO``, the lowest key to collect
    (with a hint, the sample is not read: MARGIN below it, or when APPROX its bin's lowest key; else the sampled
    bin's lowest key), and the buffer's capacity to ``S_CAPC``."""
    prev = tl.load(hint_ptr) if ONE_PASS else -1
    b = tl.zeros([], dtype=tl.int32)
    if prev < 0:
        i = tl.arange(0, SAMPLE)
        pos = tl.where(d <= SAMPLE, i, (i.to(tl.int64) * d // SAMPLE).to(tl.int32))
        live = i < d
        v = _load_v(g_ptr, e_ptr, h_ptr, pos, live, live, eta, MODE, False)
        bins = tl.where(live, _key(v) >> 20, -1)
        for j in tl.static_range(11):  # the largest b with at least ``need`` sampled bins >= b, from the top bit
            c = b | (1 << (10 - j))
            b = tl.where(tl.sum((bins >= c).to(tl.int32), axis=0) >= need, c, b)
    if ONE_PASS:
        if APPROX:
            warm = prev >> 20 << 20
        else:
            warm = tl.maximum(prev - MARGIN, 0)
        tl.store(scal_ptr + S_LO, tl.where(prev < 0, b << 20, warm))
        tl.store(scal_ptr + S_CAPC, cap)
    else:
        base = tl.minimum(tl.maximum(b - (LADDER - 2) // 3, 0), 2049 - LADDER)
        tl.store(scal_ptr + S_BASE, base)


@triton.jit
def _window_kernel(hist_ptr, scal_ptr, k, LADDER: tl.constexpr):
    """One program after the ladder pass: whether the k-th largest key's bin lies inside the window (then the
    level-1 histogram's bins from base - 1 on answer the threshold step exactly as the full histogram would). On a
    miss it clears the window's bins and sets slot ``S_MISS``: the full-histogram pass runs instead."""
    base = tl.load(scal_ptr + S_BASE)
    r = tl.arange(0, LADDER)
    b = base - 1 + r  # bin -1 (base 0: no lump below) is never read or written
    w = tl.load(hist_ptr + b, mask=b >= 0, other=0)
    at_or_above = tl.sum(tl.where(r > 0, w, 0), axis=0)  # entries in the window or above it
    above = tl.sum(tl.where(r == LADDER - 1, w, 0), axis=0)  # entries above the window
    miss = (at_or_above < k) | (above >= k)
    tl.store(scal_ptr + S_MISS, miss.to(tl.int32))
    # every lane's store depends on the sums, so on every lane's load: no lane clears a bin before it was read
    clear = (b >= 0) & ((r * 0 + miss.to(tl.int32)) != 0)  # (a scalar & a vector: a mask the interpreter refuses)
    tl.store(hist_ptr + b, r * 0, mask=clear)


@triton.jit
def _pick(hist, need, NB: tl.constexpr):
    """The highest bin from which ``need`` entries lie at or above it: (bin, entries above it, entries in it)."""
    r = tl.arange(0, NB)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    b = tl.max(tl.where(at_or_above >= need, r, -1), axis=0)
    return b, tl.sum(tl.where(r > b, hist, 0), axis=0), tl.sum(tl.where(r == b, hist, 0), axis=0)


@triton.jit
def _threshold_kernel(hist_ptr, scal_ptr, k, cap, LEVEL: tl.constexpr, NBINS: tl.constexpr):
    """One program: the bin of the k-th largest key at this level; writes the level's scalars. LEVEL 0 (the one
    pass's gate): whether its candidates hold the answer; LEVEL 4: level 1 of the one pass (the buffer must hold
    every entry from the bin up)."""
    if LEVEL == 0:
        c = tl.load(scal_ptr + S_C)
        tl.store(scal_ptr + S_HIT, ((c >= k) & (c <= cap)).to(tl.int32))
        tl.store(scal_ptr + S_RESCAN, ((c < k) | (c > cap)).to(tl.int32))
        tl.store(scal_ptr + S_NC, tl.minimum(c, cap))
    else:
        r = tl.arange(0, NBINS)
        h = tl.load(hist_ptr + r)
        if LEVEL == 2:
            need = tl.load(scal_ptr + 2)  # S_NEED1
        elif LEVEL == 3:
            need = tl.load(scal_ptr + 8)  # S_NEED2
        else:
            need = k
        b, above, in_bin = _pick(h, need, NBINS)
        if LEVEL == 2:
            tl.store(scal_ptr + 6, b)  # S_B2
            tl.store(scal_ptr + 7, above)  # S_ABOVE2
            tl.store(scal_ptr + 8, need - above)  # S_NEED2
            tl.store(scal_ptr + 9, (tl.load(scal_ptr + 0) << 11) | b)  # S_P3
        elif LEVEL == 3:
            t = (tl.load(scal_ptr + 0) << 20) | (tl.load(scal_ptr + 6) << 9) | b
            tl.store(scal_ptr + 10, t)  # S_T
            tl.store(scal_ptr + 11, k - (need - above))  # S_A: entries with a key above T
            tl.store(scal_ptr + 12, need - above)  # S_CAP: entries equal to T that are sent
            tl.store(scal_ptr + S_HINT, t)  # the k-th key: the next exact one pass's hint
        else:
            tl.store(scal_ptr + 0, b)  # S_B1
            tl.store(scal_ptr + 1, above)  # S_ABOVE1
            tl.store(scal_ptr + 2, need - above)  # S_NEED1
            tl.store(scal_ptr + 3, in_bin)  # S_N1
            tl.store(scal_ptr + S_HINT, b << 20)  # the bin's lowest key: the next approximate one pass's hint
            if LEVEL == 1:  # two passes: the buffer takes the bin's entries
                held = in_bin
            else:  # one pass: the buffer takes every entry from the bin up
                held = above + in_bin
                rescan = tl.load(scal_ptr + S_RESCAN) != 0
                tl.store(scal_ptr + S_REDO, (rescan & (held <= cap)).to(tl.int32))
                tl.store(scal_ptr + S_NC, tl.where(rescan, held, tl.load(scal_ptr + S_NC)))
            tl.store(scal_ptr + 4, (held > cap).to(tl.int32))  # S_OVER
            tl.store(scal_ptr + 5, (held <= cap).to(tl.int32))  # S_FITS


@triton.jit
def _lookback(lb_ptr, vpid, agg):
    """Exclusive prefix of ``agg`` over the programs before ``vpid`` (decoupled look-back)."""
    excl = tl.zeros([], dtype=tl.int64)
    if vpid == 0:
        tl.atomic_xchg(lb_ptr, agg | FLAG_P, sem="relaxed")
    else:
        tl.atomic_xchg(lb_ptr + vpid, agg | FLAG_A, sem="relaxed")
        j = vpid - 1
        while j >= 0:
            w = tl.atomic_add(lb_ptr + j, 0, sem="relaxed")  # flags and counts in one word: no ordering needed
            if (w & FLAG_P) != 0:
                excl += w & VALS
                j = -1
            elif (w & FLAG_A) != 0:
                excl += w & VALS
                j -= 1
        tl.atomic_xchg(lb_ptr + vpid, (excl + agg) | FLAG_P, sem="relaxed")
    return excl


@triton.jit(do_not_specialize=["d", "eta", "active", "n_slot"] + _SLOTS[5:] + ["count_slot"])
def _select_kernel(
    g_ptr,
    e_ptr,
    h_ptr,
    ci_ptr,
    scal_ptr,
    lb_ptr,
    hi_idx,
    hi_val,
    eq_idx,
    eq_val,
    d,
    eta,
    active,
    n_slot,
    thr_slot,
    shift,
    hi_base,
    eq_base,
    cap_slot,
    ctr_slot,
    count_slot,
    MODE: tl.constexpr,
    STORED: tl.constexpr,
    WRITE_E: tl.constexpr,
    BLOCK: tl.constexpr,
    G_PAD: tl.constexpr = False,
    S_PAD: tl.constexpr = False,
    GE: tl.constexpr = False,
):
    """Entries with ``key >> shift`` above the threshold go to ``hi_*`` (from its base), entries equal to it
    to ``eq_*`` (from its base, the first ``cap`` in index order); order-preserving compaction. GE: every entry
    at or above it goes to ``eq_*``, and (``count_slot`` >= 0) their number is added to that slot. EF14's pass that
    is not STORED stores v in e."""
    if _flag(scal_ptr, active):
        vpid = tl.atomic_add(scal_ptr + ctr_slot, 1, sem="relaxed")  # tickets in start order: no deadlock
        n = _count(scal_ptr, d, n_slot)
        lane = tl.arange(0, BLOCK)
        offs = vpid * BLOCK + lane
        live = offs < n
        gm, sm = _masks(offs, live, d, G_PAD, S_PAD)
        v = _block_v(g_ptr, e_ptr, h_ptr, offs, live, d, eta, MODE, STORED, G_PAD, S_PAD)  # (the one pass stores v)
        if MODE == 3 and WRITE_E:
            t = tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32) - tl.load(h_ptr + offs, mask=sm, other=0.0)
            tl.store(e_ptr + offs, tl.load(e_ptr + offs, mask=sm, other=0.0) + t, mask=sm)
        b = _key(v) >> shift
        thr = tl.load(scal_ptr + thr_slot)
        if GE:
            hi = (live & (b < 0)).to(tl.int32)  # none: keys are non-negative
            eq = (live & (b >= thr)).to(tl.int32)
        else:
            hi = (live & (b > thr)).to(tl.int32)
            eq = (live & (b == thr)).to(tl.int32)
        n_eq = tl.sum(eq, axis=0)
        if count_slot >= 0:
            tl.atomic_add(scal_ptr + count_slot, n_eq, sem="relaxed")
        agg = (tl.sum(hi, axis=0).to(tl.int64) << 30) | n_eq.to(tl.int64)
        excl = _lookback(lb_ptr, vpid, agg)
        if MODE == 4:
            idx = tl.load(ci_ptr + offs, mask=live, other=0)
        else:
            idx = offs.to(hi_idx.dtype.element_ty)
        pos_hi = tl.load(scal_ptr + hi_base).to(tl.int64) + (excl >> 30) + (tl.cumsum(hi, axis=0) - hi)
        pos_eq = (excl & ((1 << 30) - 1)) + (tl.cumsum(eq, axis=0) - eq)
        keep = (eq != 0) & (pos_eq < tl.load(scal_ptr + cap_slot))
        pos_eq += tl.load(scal_ptr + eq_base).to(tl.int64)
        tl.store(hi_idx + pos_hi, idx, mask=hi != 0)
        tl.store(hi_val + pos_hi, v, mask=hi != 0)
        tl.store(eq_idx + pos_eq, idx, mask=keep)
        tl.store(eq_val + pos_eq, v, mask=keep)


@triton.jit
def _scatter_add_kernel(out_ptr, val_ptr, idx_ptr, scale, k, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < k
    idx = tl.load(idx_ptr + offs, mask=live, other=0).to(tl.int64)
    val = tl.load(val_ptr + offs, mask=live, other=0.0).to(tl.float32)
    cur = tl.load(out_ptr + idx, mask=live, other=0.0)
    tl.store(out_ptr + idx, cur + val * scale, mask=live)  # indices unique within one worker: no race


@triton.jit
def _prepare_kernel(
    out_ptr, checks_ptr, n_checks, stride, d, ZERO: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr
):
    """out = 0 (``ZERO``) or left as it is, and NaN everywhere when the checks' sum is not finite."""
    c = tl.arange(0, NC)
    p = tl.sum(tl.load(checks_ptr + c * stride, mask=c < n_checks, other=0.0), axis=0)
    bad = (p - p) != 0  # x - x: 0 for finite x, NaN for NaN and Inf
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < d
    if ZERO:
        cur = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        cur = tl.load(out_ptr + offs, mask=live, other=0.0)
    tl.store(out_ptr + offs, tl.where(bad, float("nan"), cur), mask=live)


def _block(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 2048
    # interpreter: each program costs ~1 ms of Python, so use few, large programs
    return max(1024, min(1 << 16, triton.next_power_of_2(max(1, -(-n // 32)))))


def _programs(nblk: int, device: torch.device) -> int:
    if device.type != "cuda":
        return nblk
    return max(1, min(nblk, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


class _Launcher:
    """The three launches the shared driver asks for (:class:`torchkit.ops._select.Launcher`)."""

    def __init__(self, g: Tensor, e: Tensor, h: Tensor, k: int, eta: float):
        self.g, self.e, self.h, self.k, self.eta = g, e, h, k, eta
        self.dev = g.device

    def predict(self, scal, mode, n, k, cap, hint, approx):
        _predict_kernel[(1,)](
            self.g, self.e, self.h, scal, hint, n, self.eta, _select.sample_need(n, k, SAMPLE), cap, MODE=mode,
            SAMPLE=SAMPLE, LADDER=LADDER, ONE_PASS=True, APPROX=bool(approx), num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )  # fmt: skip

    def hist(self, scal, p: _select.Hist):
        if p._replace(hist=None) != _select.level1(None, p.mode, p.n, p.pad):
            return self._hist(scal, p)
        # level 1: predict the threshold's bin from a sample, count a ladder of bins around it in the streaming
        # pass, and run the full histogram only when the k-th key fell outside (a device flag, never read here)
        sample = min(p.n, SAMPLE)
        need = max(1, -(-self.k * sample // p.n))
        _predict_kernel[(1,)](
            self.g, self.e, self.h, scal, scal, p.n, self.eta, need, 0, MODE=p.mode, SAMPLE=SAMPLE, LADDER=LADDER,
            ONE_PASS=False, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
        block = LADDER_BLOCK if self.dev.type == "cuda" else _block(p.n, self.dev)
        grid = (_programs(triton.cdiv(p.n, block), self.dev),)
        _ladder_kernel[grid](
            self.g, self.e, self.h, p.hist, scal, p.n, self.eta, MODE=p.mode, BLOCK=block, LADDER=LADDER,
            G_PAD=p.pad[0], S_PAD=p.pad[1], num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
        _window_kernel[(1,)](p.hist, scal, self.k, LADDER=LADDER, num_warps=1, enable_fp_fusion=False)
        self._hist(scal, p._replace(active=_select.S_MISS, stored=True))

    def _hist(self, scal, p: _select.Hist):
        block = _block(p.n, self.dev)
        grid = (_programs(triton.cdiv(p.n, block), self.dev),)
        e = self.e if p.cand is None else p.cand[1]
        _hist_kernel[grid](
            self.g,
            e,
            self.h,
            p.hist,
            scal,
            p.n,
            self.eta,
            *p.slots(),
            MODE=p.mode,
            STORED=p.stored and p.mode == 1,
            BLOCK=block,
            NBINS=NB,
            G_PAD=p.pad[0],
            S_PAD=p.pad[1],
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )

    def threshold(self, hist, scal, k, cap, level):
        _threshold_kernel[(1,)](hist, scal, k, cap, LEVEL=level, NBINS=NB, enable_fp_fusion=False)

    def select(self, scal, p: _select.Select):
        block = _block(p.n, self.dev)
        ci, e = (self.g, self.e) if p.cand is None else p.cand
        _select_kernel[(triton.cdiv(p.n, block),)](
            self.g,
            e,
            self.h,
            ci,
            scal,
            p.lb,
            *p.hi,
            *p.eq,
            p.n,
            self.eta,
            *p.slots(),
            p.count,
            MODE=p.mode,
            STORED=p.stored and p.mode == 1,
            WRITE_E=p.write_e and p.mode == 3,
            BLOCK=block,
            G_PAD=p.pad[0],
            S_PAD=p.pad[1],
            GE=p.ge,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )

    def lookback_slots(self, n: int) -> int:
        return triton.cdiv(n, _block(n, self.dev))


def _run(mode: int, g: Tensor, e: Tensor | None, h: Tensor | None, k: int, eta: float, approx: bool):
    dummy = g if e is None else e
    launcher = _Launcher(g, e if e is not None else dummy, h if h is not None else dummy, k, eta)
    return _select.run(launcher, mode, g, e, h, k, approx)


def _scatter(out: Tensor, values: Tensor, indices: Tensor, scales: list[float]) -> None:
    k = values.shape[1]
    block = 1024 if out.is_cuda else max(1024, triton.next_power_of_2(k))
    for w, s in enumerate(scales):  # one launch per worker: deterministic order
        _scatter_add_kernel[(triton.cdiv(k, block),)](
            out, values[w], indices[w], s, k, BLOCK=block, enable_fp_fusion=False
        )


def _prepare(out: Tensor, zero: bool, checks: Tensor | None) -> None:
    d = out.numel()
    block = 1024 if out.is_cuda else max(1024, triton.next_power_of_2(min(d, 1 << 16)))
    n, stride = (0, 1) if checks is None else (checks.numel(), checks.stride(0))
    _prepare_kernel[(triton.cdiv(d, block),)](
        out, out if checks is None else checks, n, stride, d, ZERO=bool(zero), NC=triton.next_power_of_2(max(n, 1)),
        BLOCK=block,
    )  # fmt: skip


# what torchkit.ops dispatches to
OPS = _select.GpuOps(_run, _scatter, _prepare, segments=segments_module, decode=decode_module)
