"""Many small segments' fused steps in one launch (``segments_step_``: the per-tensor granularity of a bucket or a
parameter group), one program per segment.

A program selects its segment's top k on its own, in passes over the segment (small: at most ``SMALL`` entries,
so from L2 on a GPU): the level-1 histogram of ``key >> 20`` (EF14's pass stores v in e), then, exact, levels 2
and 3 within the threshold's bin, then one pass that writes the k entries and updates the state. Nothing is
shared between programs, so there is no look-back, no atomic and no host read; the output is the one the
per-segment launches of :mod:`torchkit.ops._select` give, entries, values, order and state, bit for bit:

- exact, one pass: the entries above the k-th key in index order, then its lowest-indexed ties;
- exact, two passes: when the level-1 bin fits the candidate buffer (``_select.capacity``), the entries above that
  bin, then those in it above the k-th key, then the ties; otherwise as the one pass;
- approximate: the entries above the level-1 bin, then the lowest-indexed ones in it.

Segments larger than ``SMALL`` keep their own launches (their passes would run in one program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _select
from .ef import _block_v, _key, _pick

SMALL = 1 << 16  # the largest segment a program takes
CAP_K: tl.constexpr = tl.constexpr(_select.CAP_PER_K)  # _select.capacity: min(n, CAP_K k + CAP_ADD)
CAP_ADD: tl.constexpr = tl.constexpr(_select.CAP_EXTRA)


@triton.jit
def _segment_hist(g_ptr, e_ptr, h_ptr, start, n, eta, prefix, PSHIFT: tl.constexpr, SHIFT: tl.constexpr,
                  NB: tl.constexpr, MODE: tl.constexpr, STORED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Histogram of ``(key >> SHIFT) & (NB - 1)`` over the segment's entries whose ``key >> PSHIFT`` is ``prefix``
    (PSHIFT 31: every entry). EF14's pass that is not STORED stores v in e."""
    lane = tl.arange(0, BLOCK)
    acc = tl.zeros([NB], dtype=tl.int32)
    for off in range(0, n, BLOCK):
        offs = start + off + lane
        live = off + lane < n
        key = _key(_block_v(g_ptr, e_ptr, h_ptr, offs, live, n, eta, MODE, STORED, False, False))
        m = live & ((key >> PSHIFT) == prefix)
        b = tl.where(m, (key >> SHIFT) & (NB - 1), 0)
        dead = BLOCK - tl.sum(m.to(tl.int32), axis=0)
        acc += tl.histogram(b, NB) - tl.where(tl.arange(0, NB) == 0, dead, 0)
    return acc


@triton.jit(do_not_specialize=["eta"])
def _segments_kernel(
    g_ptr,
    e_ptr,
    h_ptr,
    table_ptr,
    out_idx,
    out_val,
    eta,
    MODE: tl.constexpr,
    APPROX: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program s: the segment of row s of ``table`` (int64: start, size, k, output offset)."""
    row = table_ptr + tl.program_id(0) * 4
    start = tl.load(row)
    n = tl.load(row + 1).to(tl.int32)
    k = tl.load(row + 2).to(tl.int32)
    base = tl.load(row + 3)
    h1 = _segment_hist(g_ptr, e_ptr, h_ptr, start, n, eta, 0, 31, 20, 2048, MODE, False, BLOCK)
    if MODE == 1:  # EF14's pass stored v in e, which the later passes read: every thread's stores first
        tl.debug_barrier()
    b1, above1, in1 = _pick(h1, k, 2048)
    need1 = k - above1
    if APPROX:  # the final pass: nothing in the bin is above T (the bin's highest key), its entries are the ties
        t = (b1 << 20) | ((1 << 20) - 1)
        sent_ties = need1
        split = in1 < 0  # never
        tie_shift = 20
    else:
        p2 = _segment_hist(g_ptr, e_ptr, h_ptr, start, n, eta, b1, 20, 9, 2048, MODE, True, BLOCK)
        b2, above2, _ = _pick(p2, need1, 2048)
        need2 = need1 - above2
        p3 = _segment_hist(g_ptr, e_ptr, h_ptr, start, n, eta, (b1 << 11) | b2, 9, 0, 512, MODE, True, BLOCK)
        b3, above3, _ = _pick(p3, need2, 512)
        sent_ties = need2 - above3
        t = (b1 << 20) | (b2 << 9) | b3
        split = (not ONE_PASS) & (in1 <= tl.minimum(n, CAP_K * k + CAP_ADD))
        tie_shift = 0
    first_tie = k - sent_ties  # the ties' place in the output, after every entry above
    lane = tl.arange(0, BLOCK)
    run_top = tl.zeros([], dtype=tl.int32)  # entries above the level-1 bin so far
    run_mid = tl.zeros([], dtype=tl.int32)  # entries in it above T so far
    run_tie = tl.zeros([], dtype=tl.int32)  # entries at T (approximate: in the bin) so far, sent or not
    for off in range(0, n, BLOCK):
        offs = start + off + lane
        live = off + lane < n
        v = _block_v(g_ptr, e_ptr, h_ptr, offs, live, n, eta, MODE, True, False, False)
        key = _key(v)
        top = (live & ((key >> 20) > b1)).to(tl.int32)
        mid = (live & (key > t) & ((key >> 20) == b1)).to(tl.int32)
        tie = (live & ((key >> tie_shift) == (t >> tie_shift))).to(tl.int32)
        tie_rank = run_tie + tl.cumsum(tie, axis=0) - tie
        sent_tie = (tie != 0) & (tie_rank < sent_ties)
        top_rank = run_top + tl.cumsum(top, axis=0) - top
        mid_rank = run_mid + tl.cumsum(mid, axis=0) - mid
        above_t = tl.where(top != 0, tl.where(split, top_rank, top_rank + mid_rank),
                           tl.where(split, above1, top_rank) + mid_rank)  # fmt: skip
        pos = tl.where(sent_tie, first_tie + tie_rank, above_t)
        sent = sent_tie | (top != 0) | (mid != 0)
        tl.store(out_idx + base + pos, (offs).to(out_idx.dtype.element_ty), mask=sent)
        tl.store(out_val + base + pos, v, mask=sent)
        if MODE == 1:
            tl.store(e_ptr + offs, tl.zeros_like(v), mask=sent)  # e holds v (the first pass stored it)
        elif MODE == 2:
            tl.store(h_ptr + offs, tl.load(h_ptr + offs, mask=sent, other=0.0) + v, mask=sent)
        elif MODE == 3:
            g = tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs, mask=live, other=0.0)
            e = tl.load(e_ptr + offs, mask=live, other=0.0) + (g - h)  # e <- e + g - h, then - u where sent
            tl.store(e_ptr + offs, tl.where(sent, e - v, e), mask=live)
            tl.store(h_ptr + offs, h + v, mask=sent)
        run_top += tl.sum(top, axis=0)
        run_mid += tl.sum(mid, axis=0)
        run_tie += tl.sum(tie, axis=0)


def _block(largest: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 1024
    return max(16, min(SMALL, triton.next_power_of_2(largest)))  # interpreter: one block per pass


def _layout(sizes, ks) -> tuple[tuple, list]:
    """``(rows, large)``: (start, size, k, output offset) of the segments one program takes, and of the others."""
    rows, large, start, base = [], [], 0, 0
    for n, k in zip(sizes, ks):
        (rows if n <= SMALL else large).append((start, n, k, base))
        start, base = start + n, base + k
    return tuple(rows), large


_TABLES: dict[tuple, Tensor] = {}


def _table(rows: tuple, device: torch.device) -> Tensor:
    """The segments' table on the device, made once per layout (a round's segments are the same at every step) and
    never freed (32 bytes a segment): a CUDA graph that captured a launch reads it at every replay, so memory the
    allocator handed out again would be read as segments (the one-pass hints are kept alike, ``_select.hint_of``)."""
    table = _TABLES.get((device, rows))
    if table is None:
        table = _TABLES[(device, rows)] = torch.tensor(rows, dtype=torch.int64).to(device)
    return table


def segments(step_of, mode: int, grad: Tensor, error, shift, sizes, ks, eta: float, approx: bool, one_pass: bool):
    """The fused step of ``mode`` on consecutive segments: the small ones in one launch of ``_segments_kernel``, the
    others one by one through ``step_of(g, e, h, k)`` (the kernel set's own op of that mode). ``(values fp32,
    indices)``, indices into the whole vector, in the order of the per-segment launches (module docstring); ``None``
    where no launch of its own would run: no segment small enough for one program, or a CUDA-graph capture that
    would need a new table (a copy from the host captured in a graph would be replayed from host memory that may
    have been reused by then)."""
    rows, large = _layout(sizes, ks)
    if not rows or (_select._capturing(grad.device) and (grad.device, rows) not in _TABLES):
        return None
    idt = _select.index_dtype(grad.numel())
    total = sum(ks)
    vals, idx = _select._empty(total, torch.float32, grad.device), _select._empty(total, idt, grad.device)
    dummy = grad if error is None else error
    _segments_kernel[(len(rows),)](
        grad, dummy, shift if shift is not None else dummy, _table(rows, grad.device), idx, vals, float(eta),
        MODE=mode, APPROX=bool(approx), ONE_PASS=bool(one_pass) and not approx,
        BLOCK=_block(max(r[1] for r in rows), grad.device), num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    for a, n, k, at in large:
        v, i = step_of(*(None if t is None else t[a : a + n] for t in (grad, error, shift)), k)
        vals[at : at + k].copy_(v)
        idx[at : at + k].copy_(i.to(idt) + a)
    return vals, idx
