"""The compact wire format: chunked TopK with 16-bit chunk offsets, bf16 or int8 values (one scale per chunk):
round trips, exact byte accounting, the state absorbing the rounding, and the three front ends agreeing."""

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist
from torchkit.compress import chunk_wire_bytes, pack_message, unpack_message
from torchkit.sim import simulate

CHUNK = 1000


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16, torch.int8])
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


def test_three_bytes_per_entry_with_int8_values():
    comp = tk.TopK(ratio=0.01, chunk=65536)
    d = 10**7
    per_entry = chunk_wire_bytes(comp, [d], torch.int8) / comp.k_for(d)
    assert 3.0 <= per_entry < 3.01  # 1 value byte + 2 offset bytes + one fp32 scale per 656 entries
    assert chunk_wire_bytes(tk.TopK(ratio=0.01), [d], torch.float32) / tk.TopK(ratio=0.01).k_for(d) == 8.0
    assert comp.alpha(d) >= 0.01


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


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.int8])
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


# ---------------------------------------------------------------------------- three front ends, 3 Gloo ranks
D, STEPS, LR = 130, 5, 0.2


def _problem(n):
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, D, generator=g) * 3 + 0.1, torch.randn(n, D, generator=g)


def _fb():  # EF14: no dense first round, so the all-gathered rounds agree with the simulator bit for bit
    return tk.EF14(tk.TopK(ratio=0.1, chunk=48), granularity="tensor")


SIZES = (70, 60)


def _worker(rank, world):
    a, b = _problem(world)
    out = {}
    p1, p2 = torch.nn.Parameter(torch.zeros(SIZES[0])), torch.nn.Parameter(torch.zeros(SIZES[1]))
    opt = tk.CompressedOptimizer([p1, p2], torch.optim.SGD, lr=LR, feedback=_fb(), wire_dtype=torch.int8)
    for _ in range(STEPS):
        opt.zero_grad()
        x = torch.cat([p1, p2])
        (0.5 * (a[rank] * (x - b[rank]) ** 2).sum()).backward()
        opt.step()
    out["optimizer"] = torch.cat([p1, p2]).detach().clone()

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p1, self.p2 = torch.nn.Parameter(torch.zeros(SIZES[0])), torch.nn.Parameter(torch.zeros(SIZES[1]))

        def forward(self):
            x = torch.cat([self.p1, self.p2])
            return 0.5 * (a[rank] * (x - b[rank]) ** 2).sum()

    model = torch.nn.parallel.DistributedDataParallel(Two(), bucket_cap_mb=25)
    state = tk.ddp.register(model, _fb(), min_compression_rate=0, wire_dtype=torch.int8)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        sgd.zero_grad()
        model().backward()
        sgd.step()
    out["hook"] = torch.cat([model.module.p1, model.module.p2]).detach().clone()
    out["hook_bytes"] = state.bytes_sent
    return out


@pytest.mark.dist
def test_optimizer_hook_and_simulator_agree_with_the_compact_wire():
    per_rank = run_dist(_worker, 3)
    a, b = _problem(3)
    sim = simulate(_fb(), lambda x: a * (x - b), torch.zeros(D), n_workers=3, steps=STEPS, lr=LR, segments=SIZES,
                   wire_dtype=torch.int8)  # fmt: skip
    for r in per_rank:
        assert torch.equal(r["optimizer"], sim.x)
        torch.testing.assert_close(r["hook"], sim.x, rtol=1e-6, atol=1e-7)  # DDP's bucket order sums otherwise
    segs = _fb().segments_for(SIZES)
    assert per_rank[0]["hook_bytes"] == _fb().wire_bytes(segs, 1, torch.int8) + 1  # + the non-finite flag byte
    assert sim.wire_bytes[1] == _fb().wire_bytes(segs, 0, torch.int8)
