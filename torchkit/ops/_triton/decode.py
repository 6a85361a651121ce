"""A round's decode in two launches whatever the number of workers: ``out[idx_w] += scale_w * val_w`` for the rows
w = 0..n-1 in rank order, tile by tile (docs/kernels.md 6.1, R2 in one launch).

The per-row decode (``_scatter_add_kernel``, one launch per row after a first pass over ``out``) reads and writes
a 32-byte sector of ``out`` in DRAM for every entry of every row: at d = 1e8 and 8 rows of 1 % that is 0.5 GB of
sector traffic, 22.8x the decode's floor on an H200 (run 3). Here a program owns a tile of ``out`` (4096 entries,
16 KB: the tiles in flight fit in L2), writes its first pass (zeros, the value it had, or the NaN poison), then adds
each row's entries that fall in the tile, row after row with a barrier between rows. The read-modify-writes hit
the tile just written, in L2; DRAM sees ``out`` written once and the messages read once. The sum of every entry
is taken in rank order, with the per-row decode's arithmetic (``cur + val * scale``, no fused multiply-add), so
the two decodes agree bit for bit, and no atomic is needed: a tile has one owner, and a row's indices are unique.

A program finds a row's entries in its tiles by binary search, which needs each row's indices in a few
increasing runs. The whole-vector GPU kernels' exact output is two or three such runs (the entries above the
k-th key, then its ties, each in index order; docs/kernels.md 4.A), index-sorted messages one. The first launch
(``_runs_kernel``) finds where each row's runs start (at most ``MAXR``); the second carries one position per row
and run from tile to tile. A row in more runs (the reference's ``torch.topk`` output, RandK's, a per-tensor
message's segments) is still decoded exactly: its programs then take their whole range as one tile and scan the
row once each, which is slower than the per-row decode; callers choose this decode where messages are few-run.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _select

MAXR = _select.RUN_SLOTS  # runs per row the binary search takes (the exact GPU output has at most 3)
MAXD: tl.constexpr = tl.constexpr(MAXR - 1)  # the descents a row may have
TILE = 4096  # entries of out a program owns at a time, on a GPU
CHUNK = 128  # entries of a row read at a time
RUN_BLOCK = 1024  # indices a program of _runs_kernel compares at a time
NUM_WARPS = 4  # (8 warps spill a register in the tiled kernel with ZERO, sm_90)


@triton.jit
def _runs_kernel(idx_ptr, istride, k, span, table_ptr, S, BLOCK: tl.constexpr):
    """Program (w, s): the descents (``idx[i + 1] < idx[i]``) of row w among i in ``[s span, (s + 1) span)``:
    ``table[w, s] = [count, i_1 + 1, ..., i_MAXD + 1]``, the positions where a new run starts, the first MAXD of
    them in increasing order (the count may exceed MAXD). Every program writes its count: nothing to clear."""
    w = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    row = idx_ptr + w * istride
    lane = tl.arange(0, BLOCK)
    slots = tl.arange(0, MAXD + 1)
    found = tl.zeros([MAXD + 1], dtype=tl.int32)  # slot 0 unused here: the count is kept apart
    count = 0
    lo = s * span
    hi = tl.minimum(lo + span, k - 1)  # pairs (i, i + 1) with i + 1 < k
    for off in range(lo, hi, BLOCK):
        i = off + lane
        live = i < hi
        a = tl.load(row + i, mask=live, other=0).to(tl.int64)
        b = tl.load(row + i + 1, mask=live, other=0).to(tl.int64)
        down = (live & (b < a)).to(tl.int32)
        rank = count + tl.cumsum(down, axis=0)  # 1-based among this program's descents
        for j in tl.static_range(1, MAXD + 1):
            here = (down != 0) & (rank == j)
            found += tl.where(slots == j, tl.sum(tl.where(here, i + 1, 0), axis=0).to(tl.int32), 0)
        count += tl.sum(down, axis=0)
    base = table_ptr + (w * S + s) * (MAXD + 1)
    tl.store(base + slots, tl.where(slots == 0, count, found))


@triton.jit
def _tiled_kernel(
    out_ptr, val_ptr, idx_ptr, vstride, istride, scale_ptr, scale, n, k, d, table_ptr, S, checks_ptr, n_checks,
    cstride, tiles_per_program, steps, ZERO: tl.constexpr, POISON: tl.constexpr, ROW_SCALES: tl.constexpr,
    NR: tl.constexpr, SP: tl.constexpr, NC: tl.constexpr, TILE_: tl.constexpr, CHUNK_: tl.constexpr,
):  # fmt: skip
    """One program's tiles: the first pass over each tile, then every row's entries in it, in rank order."""
    pid = tl.program_id(0).to(tl.int64)
    # the runs of every row: lane j = w * (MAXD + 1) + r holds run r of row w as [start, end)
    lane = tl.arange(0, NR)
    lane_row = lane // (MAXD + 1)
    lane_run = lane % (MAXD + 1)
    start = tl.zeros([NR], dtype=tl.int64)
    end = tl.zeros([NR], dtype=tl.int64)
    scan = tl.zeros([NR], dtype=tl.int1)  # a row in more than MAXR runs: scanned whole, run 0
    s_lane = tl.arange(0, SP)
    d_lane = tl.arange(0, MAXD + 1)
    for w in range(n):
        cell = table_ptr + (w * S + s_lane[:, None]) * (MAXD + 1) + d_lane[None, :]
        t = tl.load(cell, mask=s_lane[:, None] < S, other=0)
        counts = tl.sum(tl.where(d_lane[None, :] == 0, t, 0), axis=1)  # [SP]
        total = tl.sum(counts, axis=0)
        kept = tl.minimum(counts, MAXD)
        before = tl.cumsum(kept, axis=0) - kept
        rank = before[:, None] + d_lane[None, :]  # 1-based rank of the descent in slot j (j >= 1)
        valid = (d_lane[None, :] >= 1) & (d_lane[None, :] <= kept[:, None])
        mine = lane_row == w
        run_start = tl.zeros([NR], dtype=tl.int64)
        run_end = tl.zeros([NR], dtype=tl.int64) + k
        for r in tl.static_range(1, MAXD + 1):
            b = tl.sum(tl.sum(tl.where(valid & (rank == r), t, 0), axis=1), axis=0).to(tl.int64)
            run_start = tl.where((lane_run == r) & (r <= total), b, run_start)
            run_end = tl.where((lane_run == r - 1) & (r <= total), b, run_end)
        empty = lane_run > total  # runs past the last
        many = total > MAXD
        run_start = tl.where(empty | (many & (lane_run > 0)), k, run_start)
        run_end = tl.where(empty | (many & (lane_run > 0)), k, tl.where(many, k, run_end))
        start = tl.where(mine, run_start, start)
        end = tl.where(mine, run_end, end)
        scan = tl.where(mine, many, scan)
    any_scan = tl.max(scan.to(tl.int32), axis=0) != 0
    # the tiles of this program: consecutive ones, or its whole range as one when a row must be scanned
    first = pid * tiles_per_program * TILE_
    last = tl.minimum(first + tiles_per_program * TILE_, d)
    width = tl.where(any_scan, last - first, TILE_)
    # each sorted run's position at this program's first entry: a binary search on every lane at once
    lo = start
    hi = end
    live_row = lane_row < n
    for _ in range(steps):
        mid = (lo + hi) // 2
        go = live_row & (lo < hi) & ~scan
        at = tl.load(idx_ptr + lane_row.to(tl.int64) * istride + mid, mask=go, other=0).to(tl.int64)
        lo = tl.where(go & (at < first), mid + 1, lo)
        hi = tl.where(go & (at >= first), mid, hi)
    pos = tl.where(scan, start, lo)
    c = tl.arange(0, NC)
    total_checks = tl.sum(tl.load(checks_ptr + c * cstride, mask=POISON & (c < n_checks), other=0.0), axis=0)
    bad = (total_checks - total_checks) != 0  # x - x: 0 for finite x, NaN for NaN and Inf
    chunk = tl.arange(0, CHUNK_)
    for a in range(first, last, width):
        b_end = tl.minimum(a + width, last)
        if ZERO or POISON:  # the first pass over the tile
            for off in range(a, b_end, TILE_):
                offs = tl.multiple_of(off, TILE_) + tl.arange(0, TILE_)  # every tile starts at a multiple of TILE_
                m = offs < b_end
                if ZERO:
                    cur = tl.zeros([TILE_], dtype=tl.float32)
                else:
                    cur = tl.load(out_ptr + offs, mask=m, other=0.0)
                if POISON:
                    cur = tl.where(bad, float("nan"), cur)
                tl.store(out_ptr + offs, cur, mask=m)
            tl.debug_barrier()
        for w in range(n):
            if ROW_SCALES:
                sw = tl.load(scale_ptr + w)
            else:
                sw = scale
            w64 = tl.cast(w, tl.int64)
            vrow = val_ptr + w64 * vstride
            irow = idx_ptr + w64 * istride
            for r in tl.static_range(MAXD + 1):
                j = w * (MAXD + 1) + r
                p = tl.sum(tl.where(lane == j, pos, 0), axis=0)
                e = tl.sum(tl.where(lane == j, end, 0), axis=0)
                whole = tl.sum(tl.where(lane == j, scan.to(tl.int32), 0), axis=0) != 0
                more = p < e
                while more:
                    at = p + chunk
                    m = at < e
                    ix = tl.load(irow + at, mask=m, other=0).to(tl.int64)
                    here = m & (ix < b_end) & (ix >= a)
                    v = tl.load(vrow + at, mask=here, other=0.0).to(tl.float32)
                    cur = tl.load(out_ptr + ix, mask=here, other=0.0)
                    tl.store(out_ptr + ix, cur + v * sw, mask=here)  # unique indices within a row: no race
                    if whole:
                        p += CHUNK_  # a scanned row: every entry, in every order
                        more = p < e
                    else:
                        taken = tl.sum(here.to(tl.int32), axis=0)
                        p += taken  # a sorted run: the entries below the tile's end come first
                        more = (taken == CHUNK_) & (p < e)
                if not whole:
                    pos = tl.where(lane == j, p, pos)
            tl.debug_barrier()  # this row's adds are seen by the next row's loads


def _scales(scales: list[float], device: torch.device) -> tuple[Tensor | None, float]:
    """One scalar when every row has the same scale (bit for bit: -0.0 is not 0.0), else a tensor of them."""
    if len({struct.pack("<f", s) for s in scales}) == 1:
        return None, float(scales[0])
    return torch.tensor(scales, dtype=torch.float32, device=device), 0.0


def _layout(k: int, d: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(span, spans, tile, programs)``: :func:`torchkit.ops._select.runs_spans` for ``_runs_kernel``, the entries
    of ``out`` a tile holds and the most programs of ``_tiled_kernel`` (each takes consecutive tiles). The
    interpreter, where every program costs about a millisecond of Python, takes a few large ones."""
    if device.type != "cuda":
        return (*_select.runs_spans(k, per_row=1), max(TILE, triton.next_power_of_2(triton.cdiv(d, 8))), 8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return (*_select.runs_spans(k), TILE, 4 * sms)


def accumulate(out: Tensor, values: Tensor, indices: Tensor, scales: list[float], zero: bool, checks) -> None:
    """``out`` (fp32, contiguous) from its first pass and the rows ``values``/``indices`` ``[n, k]`` (each row one
    contiguous run in memory), in two launches."""
    n, k = values.shape
    d = out.numel()
    span, S, tile, programs = _layout(k, d, out.device)
    table = _select.runs_table(out.device, n, S)
    _runs_kernel[(n, S)](indices, indices.stride(0), k, span, table, S, BLOCK=RUN_BLOCK, num_warps=NUM_WARPS)
    tiles = triton.cdiv(d, tile)
    per = triton.cdiv(tiles, min(programs, tiles))
    programs = triton.cdiv(tiles, per)
    row_scales, scale = _scales(scales, out.device)
    n_checks, cstride = (0, 1) if checks is None else (checks.numel(), checks.stride(0))
    _tiled_kernel[(programs,)](
        out, values, indices, values.stride(0), indices.stride(0), out if row_scales is None else row_scales, scale,
        n, k, d, table, S, out if checks is None else checks, n_checks, cstride, per, max(1, k.bit_length()),
        ZERO=bool(zero), POISON=checks is not None, ROW_SCALES=row_scales is not None,
        NR=triton.next_power_of_2(n * MAXR), SP=triton.next_power_of_2(S), NC=triton.next_power_of_2(max(n_checks, 1)),
        TILE_=tile, CHUNK_=CHUNK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
