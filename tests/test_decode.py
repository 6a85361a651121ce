"""The tiled decode (torchkit/ops/_triton/decode.py) under Triton's interpreter: a round's decode in two launches,
bit for bit the per-row decode (a first pass over ``out``, then one scatter-add launch per row)."""

import pytest
import torch

import torchkit as tk
from torchkit.ops import _reference

pytestmark = pytest.mark.skipif(
    "triton" not in tk.ops.available_impls("cpu"), reason="Triton's interpreter runs the kernels on CPU tensors"
)


def _decode():
    from torchkit.ops._triton import decode

    return decode


def _per_row(out, values, indices, scales, zero, checks):
    from torchkit.ops._triton import ef

    if zero or checks is not None:
        ef._prepare(out, zero, checks)
    ef._scatter(out, values, indices, scales)


def _ordered(d: int, k: int, order: str, g: torch.Generator) -> torch.Tensor:
    """k distinct indices below d: in increasing order, in three increasing runs (the exact GPU output's shape),
    in random order, or increasing with one pair swapped (a second run of one entry)."""
    idx = torch.randperm(d, generator=g)[:k]
    if order == "sorted":
        return idx.sort().values
    if order == "runs":
        a, b = sorted(torch.randint(0, k + 1, (2,), generator=g).tolist())
        return torch.cat([idx[:a].sort().values, idx[a:b].sort().values, idx[b:].sort().values])
    if order == "one swap" and k > 1:
        idx = idx.sort().values
        j = int(torch.randint(0, k - 1, (1,), generator=g))
        idx[[j, j + 1]] = idx[[j + 1, j]]
    return idx


def _rows(n, k, d, orders, g, dtype=torch.float32, apart=0):
    """``[n, k]`` values and int32 indices, row w in ``orders[w % len(orders)]``; ``apart``: rows that many entries
    apart in memory (gathered wire rows)."""
    values = torch.randn(n, k + apart, generator=g).to(dtype)[:, :k]
    idx = torch.stack([_ordered(d, k, orders[w % len(orders)], g) for w in range(n)]).int()
    wide = torch.zeros(n, k + apart, dtype=torch.int32)
    wide[:, :k] = idx
    return values, wide[:, :k]


def _gpu_like(k, d, device):
    """The tiled decode's layout as on a GPU, at interpreter scale: spans of 1024 pairs, tiles of 4096 entries, three
    programs (several tiles each, positions carried from tile to tile)."""
    decode = _decode()
    return decode.RUN_BLOCK, max(1, -(-(k - 1) // decode.RUN_BLOCK)), decode.TILE, 3


def _equal(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


ORDERS = [("sorted",), ("runs",), ("random",), ("sorted", "random", "runs"), ("one swap", "sorted")]
# gpu_like: tiles of 4096 entries, several per program (positions carried from tile to tile), 3 programs; slow in
# the interpreter, so the default run takes the mixed rows only
GPU_LIKE = [
    pytest.param(o, True, id="+".join(o) + "-gpu-like", marks=[] if len(o) == 3 else [pytest.mark.slow]) for o in ORDERS
]


@pytest.mark.parametrize(
    "orders,gpu_like", [pytest.param(o, False, id="+".join(o)) for o in ORDERS] + GPU_LIKE
)  # fmt: skip
def test_the_tiled_decode_equals_the_per_row_decode(monkeypatch, orders, gpu_like):
    """Against the per-row decode, bit for bit, and a float64 decode written here: rows in one increasing run, in
    three (the whole-vector kernels' exact output), in random order (scanned whole by each program) and mixed;
    start kept or zeroed, the NaN poison, one scale or one per row, bf16 values, rows apart in memory, one row and
    one entry, a vector much longer than the entries (empty tiles)."""
    decode = _decode()
    if gpu_like:
        monkeypatch.setattr(decode, "_layout", _gpu_like)
    g = torch.Generator().manual_seed(len(orders))
    cases = [
        dict(n=3, k=50, d=4099, scales=[0.25, 0.5, -2.0]),
        dict(n=8, k=700, d=70_001, scales=[0.125] * 8, apart=5),
        dict(n=2, k=3000, d=3001, scales=[1.0, 1.0], dtype=torch.bfloat16),  # dense: most tiles full
        dict(n=1, k=1, d=1, scales=[3.0]),
        dict(n=2, k=40, d=200_000, scales=[1.0, 0.5]),  # most tiles hold nothing
    ]
    for case in cases:
        n, k, d = case["n"], case["k"], case["d"]
        values, indices = _rows(n, k, d, orders, g, case.get("dtype", torch.float32), case.get("apart", 0))
        for zero, poison in ((False, None), (True, None), (False, 0.0), (True, float("inf"))):
            checks = None
            if poison is not None:  # as the exchanger passes them: one per gathered row, a stride apart
                checks = torch.tensor([[1.0, 0.0]] * n, dtype=torch.float64)
                checks[-1, 0] = poison
                checks = checks[:, 0]
            start = torch.randn(d, generator=g)
            ours, theirs = start.clone(), start.clone()
            decode.accumulate(ours, values, indices, case["scales"], zero, checks)
            _per_row(theirs, values, indices, case["scales"], zero, checks)
            assert _equal(ours, theirs), (case, zero, poison)
            expect = torch.zeros(d, dtype=torch.float64) if zero else start.double()
            for w in range(n):
                expect.index_add_(0, indices[w].long(), values[w].double() * case["scales"][w])
            if poison is not None and poison != 0.0:
                expect.fill_(float("nan"))
            torch.testing.assert_close(ours.double(), expect, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_the_runs_table_marks_where_each_row_descends(monkeypatch):
    """``_runs_kernel``: for each row and span, the number of descents (``idx[i + 1] < idx[i]``) and where the first
    three new runs start, against a count written here; spans of 1024 pairs, so a row's descents are split among
    programs, one of them on a span's boundary."""
    decode = _decode()
    g = torch.Generator().manual_seed(3)
    k, span = 5000, decode.RUN_BLOCK
    rows = [torch.arange(k), torch.arange(k).flip(0), torch.randperm(k, generator=g)]
    rows.append(torch.cat([torch.arange(3976, k), torch.arange(3976)]))  # one descent, at span 0's last pair
    three = torch.arange(k)
    rows.append(torch.cat([three[10:20], three[:10], three[3000:], three[20:3000]]))  # descents at 9 and 2019
    indices = torch.stack(rows).int()
    S = -(-(k - 1) // span)
    table = torch.full((len(rows) * S * decode.MAXR,), -7, dtype=torch.int32)
    decode._runs_kernel[(len(rows), S)](indices, indices.stride(0), k, span, table, S, BLOCK=decode.RUN_BLOCK)
    table = table.reshape(len(rows), S, decode.MAXR)
    for w, row in enumerate(rows):
        for s in range(S):
            i = torch.arange(s * span, min((s + 1) * span, k - 1))
            down = i[row[i + 1] < row[i]]
            assert table[w, s, 0] == down.numel(), (w, s)
            first = (down[: decode.MAXR - 1] + 1).tolist()
            assert table[w, s, 1 : 1 + len(first)].tolist() == first, (w, s)
    assert table[3, :, 0].tolist() == [1, 0, 0, 0, 0] and table[3, 0, 1] == 1024
    assert table[4, :, 0].tolist() == [1, 1, 0, 0, 0] and table[4, 0, 1] == 10 and table[4, 1, 1] == 2020


def test_a_row_in_few_runs_is_found_by_binary_search_not_scanned(monkeypatch):
    """The tiled kernel trusts the runs table: told that a row in two runs is one run (``_runs_kernel`` replaced by
    one that records no descent), it leaves most entries out (each program's binary search lands in one of the two
    runs, and the early exit stops at the first entry past a tile), which a scan would not. With the true table it
    decodes all of them."""
    decode = _decode()
    monkeypatch.setattr(decode, "_layout", _gpu_like)
    d, k = 40_000, 400
    idx = torch.cat([torch.arange(20_000, 40_000, 100), torch.arange(0, 20_000, 100)]).int()[None]
    values = torch.ones(1, k)
    out = torch.zeros(d)
    decode.accumulate(out, values, idx, [1.0], True, None)
    assert out.sum() == k

    class _NoDescents:
        def __getitem__(self, grid):
            return lambda idx, istride, k, span, table, S, **kw: table.zero_()

    monkeypatch.setattr(decode, "_runs_kernel", _NoDescents())
    told = torch.zeros(d)
    decode.accumulate(told, values, idx, [1.0], True, None)
    assert told.sum() < k / 2 and bool(((told == 0) | (told == out)).all())  # entries left out, none wrong


def test_accumulate_takes_the_tiled_decode_for_the_kernels_own_messages(monkeypatch):
    """``torchkit.ops.accumulate_`` with the Triton kernels on CPU tensors (the interpreter) goes through the tiled
    decode (on CUDA tensors only with ``TORCHKIT_GPU_TILED_DECODE=1`` until a GPU has run it). The rows are the
    exact EF14 kernel's own messages on random, tied and mostly-zero gradients: each in at most MAXR increasing runs
    (what the binary search needs), and the decode equals the reference's bit for bit."""
    decode = _decode()
    calls = []
    real = decode.accumulate
    monkeypatch.setattr(decode, "accumulate", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    d, k = 30_000, 300
    grads = {
        "random": torch.randn(d, generator=g),
        "tied": torch.full((d,), 0.5),
        "mostly zero": torch.randn(d, generator=g).round() * (torch.rand(d, generator=g) < 0.3),
    }
    rows = [tk.ops.ef14_step_(grad, torch.zeros(d), k, impl="triton") for grad in grads.values()]
    values = torch.stack([v for v, _ in rows])
    indices = torch.stack([i for _, i in rows]).int()
    for row, kind in zip(indices, grads):
        descents = int((row[1:] < row[:-1]).sum())
        assert descents < decode.MAXR, (kind, descents)
    out = torch.randn(d, generator=g)
    ref = out.clone()
    tk.ops.accumulate_(out, values, indices, [1.0, 0.5, 0.25], impl="triton")
    _reference.accumulate_(ref, values, indices, [1.0, 0.5, 0.25])
    assert calls == [1] and torch.equal(out, ref)
