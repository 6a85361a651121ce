"""The compact wire format: chunked TopK with 12- or 16-bit chunk offsets, bf16, int8 (one scale per chunk) or
2-bit values (two magnitudes per chunk): round trips, exact byte accounting, the state absorbing the rounding, and
the front ends agreeing with the simulator."""

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist
from torchkit.compress import chunk_wire_bytes, dequantize_2bit, pack_message, quantize_2bit, unpack_message
from torchkit.sim import simulate, simulate_local

CHUNK = 1000
WIRES = [torch.float32, torch.bfloat16, torch.int8, torch.int2]


@pytest.mark.parametrize("wire", [*WIRES, torch.float16])
@pytest.mark.parametrize("comp", [tk.TopK(ratio=0.1), tk.RandK(ratio=0.1), tk.TopK(ratio=0.1, chunk=256)], ids=repr)
def test_a_compressors_wire_bytes_is_its_packed_message(comp, wire):
    """``Compressor.wire_bytes(d, dtype)`` is the packed message's length for every sparsifier (RandK's left out
    int8's scale and int2's packing: 4 bytes low and 17% high at d = 3101)."""
    d = 3101
    fb = tk.EF14(comp)
    state = fb.init_state(d)
    msg = fb.round_values_(state, fb.worker_step(state, torch.randn(d), 0), wire)
    assert pack_message(msg)[0].numel() == comp.wire_bytes(d, wire) == fb.wire_bytes((d,), 0, wire)


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("granularity,segments", [("global", (4321,)), ("tensor", (1500, 999, 2500))])
def test_round_trip_and_exact_bytes(wire, granularity, segments):
    comp = tk.TopK(ratio=0.03, chunk=CHUNK)
    fb = tk.EF14(comp, granularity=granularity)
    d = sum(segments)
    state = fb.init_state(d)
    g = torch.randn(d) * torch.randn(d).exp()
    segs = fb.segments_for(segments)
    msg = fb.round_values_(state, fb.worker_step(state, g, 0, segments=segs), wire)
    buf, layout = pack_message(msg)
    assert buf.numel() == fb.wire_bytes(segs, 0, wire) == chunk_wire_bytes(comp, segs, wire)
    back = unpack_message(buf[None].clone(), layout)
    assert torch.equal(back.indices, msg.indices.to(back.indices.dtype))
    assert torch.equal(back.values.float(), msg.values.float())
    # every chunk keeps ceil(0.03 * its length) entries, all inside the chunk
    for a, n in ((a, c) for a, c in msg.groups):
        assert ((msg.indices[0] >= a) & (msg.indices[0] < a + CHUNK)).sum() >= n
    assert layout.index_bits == 12  # chunks of at most 4096 entries: two offsets in three bytes


def test_three_bytes_per_entry_with_int8_values():
    comp = tk.TopK(ratio=0.01, chunk=65536)
    d = 10**7
    per_entry = chunk_wire_bytes(comp, [d], torch.int8) / comp.k_for(d)
    assert 3.0 <= per_entry < 3.01  # 1 value byte + 2 offset bytes + one fp32 scale per 656 entries
    assert chunk_wire_bytes(tk.TopK(ratio=0.01), [d], torch.float32) / tk.TopK(ratio=0.01).k_for(d) == 8.0
    assert comp.alpha(d) >= 0.01


@pytest.mark.parametrize("chunk,offset_bits", [(4096, 12), (4097, 16), (65536, 16)])
@pytest.mark.parametrize("k_odd", [0, 1])
def test_offsets_and_2bit_codes_pack_to_whole_bytes(chunk, offset_bits, k_odd):
    """Offsets of 12 bits where every chunk fits in 4096 entries, of 16 bits above; codes of 2 bits: a row of k
    entries takes ceil(2k / 8) code bytes, two fp32 magnitudes per chunk and ceil(bits * k / 8) offset bytes, and
    unpacks to the same message for odd k too (the padding bits are never read)."""
    comp = tk.TopK(ratio=0.01, chunk=chunk)
    d = 2 * chunk + 301 + k_odd * 100
    fb = tk.EF14(comp)
    state = fb.init_state(d)
    msg = fb.round_values_(state, fb.worker_step(state, torch.randn(d), 0), torch.int2)
    k, groups = msg.values.shape[1], len(msg.groups)
    buf, layout = pack_message(msg)
    assert comp.offset_bits == offset_bits and layout.index_bits == (12 if offset_bits == 12 else None)
    assert (
        buf.numel()
        == (2 * k + 7) // 8 + 8 * groups + (offset_bits * k + 7) // 8
        == chunk_wire_bytes(comp, [d], torch.int2)
    )
    back = unpack_message(torch.stack([buf, buf.flip(0).flip(0)]), layout)  # two workers' rows
    assert torch.equal(back.indices[1], msg.indices[0].to(back.indices.dtype))
    assert torch.equal(back.q[0], msg.q[0]) and torch.equal(back.values[1], msg.values[0].float())
    assert back.indices.max() < d and ((back.indices[0] - back.group_bases()) < chunk).all()


def test_sparseloco_layout_is_under_a_quarter_bit_per_parameter():
    """TopK 1.56% in chunks of 4096 with 2-bit values (Covenant-72B's setting): 2 + 12 bits per entry and 8 bytes
    per chunk, 0.235 bits per parameter per sync; int8 values with 16-bit offsets took 3 bytes per entry."""
    d = 4096 * 1000
    comp = tk.TopK(ratio=0.0156, chunk=4096)
    bits = 8 * chunk_wire_bytes(comp, [d], torch.int2) / d
    assert bits == pytest.approx(8 * (64 * 14 / 8 + 8) / 4096) and bits < 0.25
    assert 8 * chunk_wire_bytes(tk.TopK(ratio=0.0156, chunk=65536), [d], torch.int8) / d > 0.37


def _levels_reference(v: torch.Tensor):
    """quantize_2bit written out for one group in float64: split the magnitudes at their mean, each side's level
    its mean."""
    m = v.abs()
    large = m >= m.mean()
    lo = m[~large].mean() if (~large).any() else m.mean()
    hi = m[large].mean()
    return torch.where(large, hi, lo) * torch.where(v < 0, -1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_2bit_levels_match_a_float64_reference_and_beat_one_magnitude(dtype):
    g = torch.Generator().manual_seed(3)
    groups = ((0, 7), (50, 1), (90, 30), (400, 12))
    k = sum(c for _, c in groups)
    values = (torch.randn(3, k, generator=g, dtype=torch.float64) * torch.rand(3, k, generator=g).exp()).to(dtype)
    values[1, 38:50] = 0.75  # a group of equal magnitudes: one level, the sign kept
    values[1, 40] = -0.75
    codes, scales, deq = quantize_2bit(values, groups)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 3 and scales.shape == (3, 2 * len(groups))
    assert torch.equal(dequantize_2bit(codes, scales, groups, k), deq)
    off = 0
    for _, c in groups:
        v = values[:, off : off + c].double()
        for r in range(3):
            ref = _levels_reference(v[r])
            torch.testing.assert_close(deq[r, off : off + c].double(), ref, rtol=1e-6, atol=0)
            one = v[r].abs().mean() * torch.where(v[r] < 0, -1.0, 1.0)  # scaled sign: one magnitude per group
            assert (deq[r, off : off + c].double() - v[r]).pow(2).sum() <= (one - v[r]).pow(2).sum() * (1 + 1e-6)
        off += c
    assert torch.equal(deq.sign(), values.float().sign())  # every entry keeps its sign


def test_chunked_topk_contracts_and_matches_per_chunk_topk():
    comp = tk.TopK(ratio=0.05, chunk=64)
    x = torch.randn(3, 300, dtype=torch.float64)
    msg = comp.compress(x)
    dense = msg.to_dense()
    for a in range(0, 300, 64):
        n = min(64, 300 - a)
        k = -(-5 * n // 100)
        ref = torch.topk(x[:, a : a + n].abs(), k).values.sort().values
        got = dense[:, a : a + n].abs().sort(dim=1).values[:, -k:]
        assert torch.equal(got, ref)
        assert int((dense[:, a : a + n] != 0).sum()) == 3 * k
    err = (x - dense).pow(2).sum(1)
    assert (err <= (1 - comp.alpha(300)) * x.pow(2).sum(1) + 1e-12).all()


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.int8, torch.int2])
def test_the_state_absorbs_what_the_wire_rounds_away(wire):
    """EF21's server stays the mean of the shifts; EF14's error plus what was decoded is the input."""
    n, d = 3, 700
    fb = tk.EF21(tk.TopK(ratio=0.05, chunk=256))
    state = fb.init_state(d, rows=n, dtype=torch.float64)
    server = torch.zeros(d, dtype=torch.float64)
    opts = tk.comm.RoundOptions(wire_dtype=wire)
    for t in range(6):
        g = torch.randn(n, d, dtype=torch.float64)
        tk.comm.run_round(fb, tk.comm.LocalExchanger(n), state, server, g, t, options=opts)
        torch.testing.assert_close(server, state["shift"].mean(0), rtol=0, atol=1e-12)
    ef14 = tk.EF14(tk.TopK(ratio=0.05, chunk=256))
    st = ef14.init_state(d, dtype=torch.float64)
    st["error"] += torch.randn(d, dtype=torch.float64)
    v = st["error"] + (g := torch.randn(d, dtype=torch.float64))
    msg = ef14.round_values_(st, ef14.worker_step(st, g, 1), wire)
    torch.testing.assert_close(st["error"] + msg.to_dense()[0], v, rtol=0, atol=1e-12)
    if wire == torch.int8:  # int8: the values are what receivers decode (q times the chunk's step)
        assert msg.q.dtype == torch.int8 and msg.values.dtype == torch.float64
    elif wire == torch.int2:  # 2-bit: codes, and the values receivers decode from them
        assert msg.q.dtype == torch.uint8 and msg.values.dtype == torch.float64
    else:
        assert msg.q is None and msg.values.dtype == wire


def test_int8_needs_a_sparse_message_and_bad_wires_are_refused():
    with pytest.raises(TypeError, match="wire_dtype must be one of"):
        tk.comm.RoundOptions(wire_dtype=torch.int32)
    with pytest.raises(ValueError, match="chunk must be <= 65536"):
        tk.TopK(ratio=0.1, chunk=70000)
    with pytest.raises(ValueError, match="chunk needs a compressor given by ratio"):
        tk.TopK(5, chunk=100)
    fb = tk.EF21(tk.TopK(ratio=0.1, chunk=100))
    st = fb.init_state(50)
    first = fb.worker_step(st, torch.randn(50), 0)  # EF21's dense first round
    assert fb.round_values_(st, first, torch.int8) is first
    assert fb.round_values_(st, first, torch.int2) is first


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.int8, torch.float32])
def test_dense_rounds_count_the_state_dtype_they_are_all_reduced_in(wire):
    """A dense round (EF21's first, EF14 with Identity) goes through all_reduce in the feedback state's dtype in
    every front end (DistExchanger), so the simulator counts 4 bytes per value for a narrower wire, not the wire's."""
    d, n = 50, 2
    x0 = torch.zeros(d)
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    width = max(4, torch.empty((), dtype=wire).element_size())
    for fb in (tk.EF21(tk.TopK(ratio=0.1), init="full"), tk.EF14(tk.Identity())):
        res = simulate(fb, lambda x: g, x0, n_workers=n, steps=2, lr=0.1, wire_dtype=wire)
        assert res.wire_bytes[1] == d * width  # round 0: dense for both
    assert tk.EF21(tk.TopK(ratio=0.1)).wire_bytes((d,), 0, torch.bfloat16) == 4 * d


# ---------------------------------------------------------------------------- three front ends, 3 Gloo ranks
D, STEPS, LR = 130, 5, 0.2


def _problem(n):
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, D, generator=g) * 3 + 0.1, torch.randn(n, D, generator=g)


def _fb():  # EF14: no dense first round, so the all-gathered rounds agree with the simulator bit for bit
    return tk.EF14(tk.TopK(ratio=0.1, chunk=48), granularity="tensor")


SIZES = (70, 60)


def _worker(rank, world, wire):
    a, b = _problem(world)
    out = {}
    for name, make, steps in (
        ("optimizer", lambda ps: tk.CompressedOptimizer(ps, torch.optim.SGD, lr=LR, feedback=_fb(), wire_dtype=wire),
         STEPS),
        ("local_sgd", lambda ps: tk.LocalSGD(ps, torch.optim.SGD, lr=LR, sync_every=2, feedback=_fb(), wire_dtype=wire),
         2 * STEPS),
    ):  # fmt: skip
        p1, p2 = torch.nn.Parameter(torch.zeros(SIZES[0])), torch.nn.Parameter(torch.zeros(SIZES[1]))
        opt = make([p1, p2])
        for _ in range(steps):
            opt.zero_grad()
            x = torch.cat([p1, p2])
            (0.5 * (a[rank] * (x - b[rank]) ** 2).sum()).backward()
            opt.step()
        out[name] = torch.cat([p1, p2]).detach().clone()

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p1, self.p2 = torch.nn.Parameter(torch.zeros(SIZES[0])), torch.nn.Parameter(torch.zeros(SIZES[1]))

        def forward(self):
            x = torch.cat([self.p1, self.p2])
            return 0.5 * (a[rank] * (x - b[rank]) ** 2).sum()

    model = torch.nn.parallel.DistributedDataParallel(Two(), bucket_cap_mb=25)
    state = tk.ddp.register(model, _fb(), min_compression_rate=0, wire_dtype=wire)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        sgd.zero_grad()
        model().backward()
        sgd.step()
    out["hook"] = torch.cat([model.module.p1, model.module.p2]).detach().clone()
    out["hook_bytes"] = state.bytes_sent
    return out


@pytest.mark.dist
@pytest.mark.parametrize("wire", [torch.int8, torch.int2])
def test_optimizer_hook_local_sgd_and_simulator_agree_with_the_compact_wire(wire):
    per_rank = run_dist(_worker, 3, wire)
    a, b = _problem(3)
    grad = lambda x: a * (x - b)  # noqa: E731
    sim = simulate(_fb(), grad, torch.zeros(D), n_workers=3, steps=STEPS, lr=LR, segments=SIZES, wire_dtype=wire)
    local = simulate_local(_fb(), grad, torch.zeros(D), n_workers=3, rounds=STEPS, sync_every=2, inner_optimizer=LR,
                           segments=SIZES, wire_dtype=wire)  # fmt: skip
    for r in per_rank:
        assert torch.equal(r["optimizer"], sim.x)
        assert torch.equal(r["local_sgd"], local.x)
        torch.testing.assert_close(r["hook"], sim.x, rtol=1e-6, atol=1e-7)  # DDP's bucket order sums otherwise
    segs = _fb().segments_for(SIZES)
    msg = _fb().wire_bytes(segs, 1, wire)
    assert per_rank[0]["hook_bytes"] == -(-msg // 8) * 8 + 8  # zeros to 8 bytes, then the float64 non-finite check
    assert sim.wire_bytes[1] == _fb().wire_bytes(segs, 0, wire)
