"""On a CUDA GPU: the kernels at sizes the interpreter cannot reach, without host synchronisation and under
CUDA-graph capture, and the optimizer wrapper and the DDP hook (one-rank NCCL group) on CUDA tensors.

Every test here is marked ``gpu``; on a machine without CUDA they are skipped with that reason (conftest.py).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import torchkit as tk
import torchkit.ops as ops
from torchkit.ops import _reference

pytestmark = pytest.mark.gpu

IMPLS = ["triton", "cuda"]


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_built():
    assert ops.build_extension(cuda=True), ops._cuda.error()


def _rand(d, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(d, generator=g, device="cuda") * torch.randn(d, generator=g, device="cuda").exp()).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_large_steps_equal_the_reference(impl, method, gdtype):
    """d = 2**24 + 3 (about 8000 programs, several look-back chains): the set, values and state of the reference."""
    d, k = (1 << 24) + 3, 167_773
    g, e, h = _rand(d, 1, gdtype), _rand(d, 2), _rand(d, 3)
    e1, h1, e2, h2 = e.clone(), h.clone(), e.clone(), h.clone()
    fused = {
        "ef14": lambda: ops.ef14_step_(g, e1, k, impl=impl),
        "ef21": lambda: ops.ef21_step_(g, h1, k, impl=impl),
        "econtrol": lambda: ops.econtrol_step_(g, e1, h1, k, 0.3, impl=impl),
    }[method]
    ref = {
        "ef14": lambda: _reference.ef14_step_(g, e2, k),
        "ef21": lambda: _reference.ef21_step_(g, h2, k),
        "econtrol": lambda: _reference.econtrol_step_(g, e2, h2, k, 0.3),
    }[method]
    (v, i), (rv, ri) = fused(), ref()
    order, rorder = i.long().argsort(), ri.long().argsort()
    assert torch.equal(i.long()[order], ri.long()[rorder])
    assert torch.equal(v[order], rv[rorder].float())
    assert torch.equal(e1, e2) and torch.equal(h1, h2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("approx", [False, True])
def test_no_synchronising_call_and_graph_capture(impl, approx):
    d, k = 1 << 22, 1 << 15
    g, e0 = _rand(d, 4), _rand(d, 5)
    e = e0.clone()
    ops.ef14_step_(g, e, k, approx=approx, impl=impl)  # compile / load outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.ef14_step_(g, e, k, approx=approx, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # one step captured in a graph, replayed from the same state, equals the eager step
    e.copy_(e0)
    eager_v, eager_i = ops.ef14_step_(g, e, k, approx=approx, impl=impl)
    eager_e = e.clone()
    e.copy_(e0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.ef14_step_(g, e, k, approx=approx, impl=impl)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v, i = ops.ef14_step_(g, e, k, approx=approx, impl=impl)
    for _ in range(2):
        e.copy_(e0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(v, eager_v) and torch.equal(i, eager_i) and torch.equal(e, eager_e)


@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
def test_a_one_worker_round_is_capturable_in_a_cuda_graph(method):
    """The hook's whole round on one rank (worker step, the message's non-finite check, the decode into the
    estimate: ``start_round`` over a one-worker exchange, the DDP hook's path at world size 1) captured in a CUDA
    graph and replayed from the same state and gradient: the estimate and the state of the eager round, bit for
    bit (issue 21 item 5: no host synchronisation, no allocation whose address a replay would miss)."""
    from torchkit.comm import LocalExchanger, RoundOptions, start_round
    from torchkit.state import Block

    fb = {"ef14": tk.EF14, "ef21": tk.EF21, "econtrol": lambda c: tk.EControl(c, eta=0.2)}[method](tk.TopK(ratio=0.01))
    d = 4_000_000
    blk = Block.zeros(fb, ["x"], [d], dtype=torch.float32, device="cuda", with_server=False)
    grad, out = _rand(d, 3), torch.empty(d, device="cuda")
    options = RoundOptions(nonfinite="flag")
    for step in range(2):  # the dense first round and one compressed round, eagerly: kernels built, state warm
        start_round(fb, LocalExchanger(1), blk, grad.clone(), step, options, out=out).wait()
    saved = {k: v.clone() for k, v in blk.vectors().items()}
    g_in = grad.clone()
    eager = start_round(fb, LocalExchanger(1), blk, g_in, 2, options, out=out).wait().estimate.clone()
    eager_state = {k: v.clone() for k, v in blk.vectors().items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # a warm-up on the side stream, as torch.cuda.graph asks
        for k, v in blk.vectors().items():
            v.copy_(saved[k])
        g_in.copy_(grad)
        start_round(fb, LocalExchanger(1), blk, g_in, 2, options, out=out).wait()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        start_round(fb, LocalExchanger(1), blk, g_in, 2, options, out=out).wait()
    for _ in range(2):
        for k, v in blk.vectors().items():
            v.copy_(saved[k])
        g_in.copy_(grad)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager) and all(torch.equal(v, eager_state[k]) for k, v in blk.vectors().items())


@pytest.mark.parametrize("impl", IMPLS)
def test_one_pass_captured_in_a_graph_keeps_its_hint_across_replays(monkeypatch, impl):
    """EF21's step captured on a shift it has never seen (its hint is first asked for inside the capture, where a
    captured fill would make every replay start cold), replayed on a drifting gradient: each replay equals the
    reference step from the same state and leaves a hint. Triton: each replay predicts from the hint it finds (one
    set between the replays; the step's scalars are read through ``_select.TRACE``), not from a reset one."""
    from torchkit.ops import _select

    monkeypatch.setattr(_select, "GPU_ONE_PASS", True)
    d, k = 1 << 22, 1 << 12
    g, h = _rand(d, 9), torch.zeros(d, device="cuda")
    warm = torch.zeros(d, device="cuda")  # compile and load on another buffer, outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.ef21_step_(g, warm, k, impl=impl)
    torch.cuda.current_stream().wait_stream(s)
    monkeypatch.setattr(_select, "TRACE", [])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v, i = ops.ef21_step_(g, h, k, impl=impl)
    hint = _select.hint_of(_select.EF21, g, None, h, k)
    assert hint.item() == -1  # a fresh slot of the pool the warm-up made
    for step in range(4):
        g.add_(_rand(d, 20 + step), alpha=0.05)
        h_ref = h.clone()
        rv, ri = _reference.ef21_step_(g, h_ref, k)
        if step > 0:  # a prediction of our own, off the 1/8-octave grid the sample's predictions sit on
            hint.fill_(int(hint.item()) - _select.MARGIN // 3)
        set_before = int(hint.item())
        graph.replay()
        torch.cuda.synchronize()
        order, rorder = i.long().argsort(), ri.long().argsort()
        assert torch.equal(i.long()[order], ri.long()[rorder]) and torch.equal(v[order], rv[rorder].float())
        assert torch.equal(h, h_ref)
        assert int(hint.item()) >= 0  # the replay left its threshold for the next one
        if impl == "triton" and step > 0:
            assert int(_select.TRACE[0][_select.S_LO]) == max(set_before - _select.MARGIN, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_runs_are_bit_identical(impl):
    """Ties at the k-th magnitude (bf16) in both modes: five runs, one answer (values, indices, order, state)."""
    d, k = 3_000_017, 30_000
    g = _rand(d, 6, torch.bfloat16)
    for approx in (False, True):
        runs = []
        for _ in range(5):
            e = torch.zeros(d, device="cuda")
            runs.append((*ops.ef14_step_(g, e, k, approx=approx, impl=impl), e))
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("impl", IMPLS)
def test_triton_and_cuda_agree(impl):
    d, k = 1_000_003, 10_000
    g, h = _rand(d, 7, torch.bfloat16), _rand(d, 8)
    h1, h2 = h.clone(), h.clone()
    a = ops.ef21_step_(g, h1, k, approx=True, impl=impl)
    b = ops.ef21_step_(g, h2, k, approx=True, impl="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(h1, h2)


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("mode", ["topk", "ef14", "ef21", "econtrol"])
def test_the_c_driver_launches_what_the_python_driver_does(monkeypatch, mode, approx, one_pass):
    """``tk_step`` (the whole step sequenced in C++, one host call, a workspace kept per stream) against the
    Python driver over the same kernels: the same entries in the same order, the same state, on random, tied
    (g - h = 0, all equal, mostly zero) and bf16 input, at sizes of one block, many blocks and a padded tail;
    twice in a row, so that the second call runs on the kept workspace (and the one pass on its hint). Both
    sequences (EControl: two passes whatever the flag)."""
    from torchkit.ops import _cuda, _select

    monkeypatch.setattr(_select, "GPU_ONE_PASS", one_pass)

    m = {"topk": _select.TOPK, "ef14": _select.EF14, "ef21": _select.EF21, "econtrol": _select.ECONTROL}[mode]
    for d, k in ((1000, 10), (1_000_003, 10_000), ((1 << 21) + 5, 20_000)):
        mostly_zero = torch.zeros(d, device="cuda")
        mostly_zero[::200] = _rand(d, 4)[::200]
        inputs = {
            "random": _rand(d, 1),
            "zero": torch.zeros(d, device="cuda"),
            "equal": torch.full((d,), 0.75, device="cuda"),
            "mostly zero": mostly_zero,
            "bf16": _rand(d, 5, torch.bfloat16),
        }
        for name, g in inputs.items():
            tied = name not in ("random", "bf16")  # state zero: v is g itself, ties and all
            e, h = (torch.zeros(d, device="cuda"),) * 2 if tied else (_rand(d, 2), _rand(d, 3))
            states = [(e.clone(), h.clone()) for _ in range(2)]
            for _ in range(2):
                outs = []
                for run, (e1, h1) in zip((_cuda._run, _cuda._run_python), states):
                    ee = None if m in (_select.TOPK, _select.EF21) else e1
                    hh = None if m in (_select.TOPK, _select.EF14) else h1
                    outs.append(run(m, g, ee, hh, k, 0.3, approx))
                (v1, i1), (v2, i2) = outs
                assert torch.equal(i1, i2) and torch.equal(v1, v2), (d, name)
                assert all(torch.equal(a, b) for a, b in zip(*states)), (d, name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
def test_many_small_segments_in_one_launch_equal_one_step_each(monkeypatch, impl, method):
    """``segments_step_`` with the small segments in one launch (``GPU_SEGMENTS``; the Triton kernel for both
    kernel sets) against one step per segment, on random and tied input, exact and approximate, one pass on and
    off: the same values, indices in the same order, and state; 200 segments of a GPT-2-like mix of sizes."""
    from torchkit.ops import _select

    sizes = [768, 2304 * 768 // 64, 3072, 1, 50_000, 70_000] * 33 + [100, 7]
    ks = [max(1, n // 100) for n in sizes]
    d = sum(sizes)
    n_state = {"ef14": 1, "ef21": 1, "econtrol": 2}[method]
    for one_pass in (False, True):
        monkeypatch.setattr(_select, "GPU_ONE_PASS", one_pass)
        for tied in (False, True):
            for approx in (False, True):
                g = torch.full((d,), 0.5, device="cuda") if tied else _rand(d, 1)
                state = [torch.zeros(d, device="cuda") if tied else _rand(d, 2 + j) for j in range(n_state)]
                twin = [t.clone() for t in state]
                monkeypatch.setattr(_select, "GPU_SEGMENTS", True)
                v, i = ops.segments_step_(method, g, state, sizes, ks, 0.3, approx, impl=impl)
                monkeypatch.setattr(_select, "GPU_SEGMENTS", False)
                rv, ri = ops.segments_step_(method, g, twin, sizes, ks, 0.3, approx, impl=impl)
                assert torch.equal(i, ri) and torch.equal(v, rv), (one_pass, tied, approx)
                assert all(torch.equal(a, b) for a, b in zip(state, twin)), (one_pass, tied, approx)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("bad", [None, 0.0, float("nan")])
def test_the_c_decode_launches_what_prepare_and_scatter_do(zero, bad):
    """``tk_accumulate`` (a decode in one host call) against ``tk_prepare`` and one ``tk_scatter_add`` per row
    from Python, bit for bit: 3 rows apart in memory (gathered wire rows), scales per row, float64 checks of a
    stride of 2, the output kept or zeroed, and NaN everywhere when a check is not finite."""
    from torchkit.ops import _cuda

    d, k, n = 100_003, 1000, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.stack([torch.randperm(d, generator=g, device="cuda")[:k] for _ in range(n)]).int()
    wide = torch.randn(n, k + 5, generator=g, device="cuda")
    values, indices = wide[:, :k], torch.cat([idx, idx[:, :5]], dim=1)[:, :k]  # rows apart, each one run
    checks = None if bad is None else torch.tensor([0.0, 1.0, bad, 2.0, 0.0, 3.0], device="cuda", dtype=torch.float64)
    checks = None if checks is None else checks[::2]
    base = _rand(d, 7)
    ours, theirs = base.clone(), base.clone()
    _cuda._accumulate(ours, values, indices, [1.0, 0.5, -2.0], zero, checks)
    if zero or checks is not None:
        _cuda._prepare(theirs, zero, checks)
    _cuda._scatter(theirs, values, indices, [1.0, 0.5, -2.0])
    assert torch.equal(ours.isnan(), theirs.isnan()) and bool(ours.isnan().all()) == (bad is not None and bad != 0)
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


@pytest.mark.parametrize("impl", IMPLS)
def test_the_tiled_decode_equals_the_per_row_decode_on_cuda(monkeypatch, impl):
    """``accumulate_`` with ``GPU_TILED_DECODE`` (two launches: the runs table, then tiles of out in L2) against the
    per-row decode, bit for bit, both kernel sets: 8 rows that are the kernel's own exact messages (random and tied
    gradients, 1 %), index-sorted rows, random-order rows (scanned whole), the start kept or zeroed, the NaN
    poison, one scale or one per row."""
    from torchkit.ops import _select

    d, k, n = 1_000_003, 10_000, 8
    rows = []
    for w in range(n):
        grad = torch.full((d,), 0.5, device="cuda") if w % 2 else _rand(d, 40 + w)
        rows.append(ops.ef14_step_(grad, torch.zeros(d, device="cuda"), k, impl=impl))
    own = torch.stack([v for v, _ in rows]), torch.stack([i for _, i in rows]).int()
    g = torch.Generator(device="cuda").manual_seed(5)
    idx = torch.stack([torch.randperm(d, generator=g, device="cuda")[:k] for _ in range(n)]).int()
    vals = _rand(n * k, 9).reshape(n, k)
    cases = {"own": own, "sorted": (vals, idx.sort(dim=1).values), "random": (vals, idx)}
    for name, (values, indices) in cases.items():
        for zero, bad, scale in ((True, None, 1.0 / n), (False, float("nan"), [0.5 + w for w in range(n)])):
            checks = None if bad is None else torch.tensor([0.0] * (n - 1) + [bad], device="cuda", dtype=torch.float64)
            base = _rand(d, 7)
            ours, theirs = base.clone(), base.clone()
            monkeypatch.setattr(_select, "GPU_TILED_DECODE", True)
            ops.accumulate_(ours, values, indices, scale, zero=zero, poison=checks, impl=impl)
            monkeypatch.setattr(_select, "GPU_TILED_DECODE", False)
            ops.accumulate_(theirs, values, indices, scale, zero=zero, poison=checks, impl=impl)
            assert torch.equal(ours.isnan(), theirs.isnan()), (name, zero)
            assert torch.equal(ours.nan_to_num(), theirs.nan_to_num()), (name, zero)


def test_local_sgd_resumes_mid_period_from_a_cpu_mapped_checkpoint_on_cuda():
    """LocalSGD's mid-period parameters come back as CPU tensors (a checkpoint loaded with map_location="cpu", or
    DCP's serialised extras): the first step after the resume compares and puts them back across devices, and the
    run equals the uninterrupted one."""
    import io

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 4).cuda()
        return m, tk.LocalSGD(m.parameters(), torch.optim.SGD, lr=0.05, feedback=tk.EF14(tk.TopK(ratio=0.5)),
                              sync_every=4)  # fmt: skip

    def train(m, opt, steps):
        for step in steps:
            opt.zero_grad()
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step)).cuda()
            m(x).square().mean().backward()
            opt.step()

    straight = make()
    train(*straight, range(10))
    m, opt = make()
    train(m, opt, range(6))
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, map_location="cpu", weights_only=False)
    m, opt = make()
    m.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    train(m, opt, range(6, 10))
    assert all(torch.equal(a, b) for a, b in zip(straight[0].parameters(), m.parameters()))


# ---------------------------------------------------------------------------------------- front ends on CUDA
@pytest.fixture(scope="module")
def nccl_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).cuda()


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 64, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda()) for _ in range(n)
    ]


def _registered():
    """Every registered method (the test suite's own DecayedEF14 too), per tensor, TopK 5%, the tests' options."""
    from tests.methods import METHODS, make

    return {name: (lambda name=name: make(name, tk.TopK(ratio=0.05), granularity="tensor")) for name in METHODS}


FEEDBACKS = _registered()


@pytest.mark.parametrize("method", list(FEEDBACKS))
def test_hook_and_optimizer_on_cuda_follow_one_trajectory(nccl_group, method):
    """DDP + the hook over a one-rank NCCL group against CompressedOptimizer, both on CUDA, 6 SGD steps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = _batches(6)
    model_a = _mlp()
    ddp = DDP(model_a, device_ids=[0])
    tk.ddp.register(ddp, FEEDBACKS[method](), min_compression_rate=0)
    opt_a = torch.optim.SGD(ddp.parameters(), lr=0.1)
    model_b = _mlp()
    opt_b = tk.CompressedOptimizer(model_b.parameters(), torch.optim.SGD, feedback=FEEDBACKS[method](), lr=0.1)
    for x, y in data:
        for model, opt in ((ddp, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_optimizer_on_cuda_with_amp_trains(nccl_group):
    """bf16 autocast + AdamW inside the wrapper on CUDA: the loss falls, the feedback state stays fp32 and finite."""
    model = _mlp()
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.AdamW, feedback=tk.EF14(tk.TopK(ratio=0.05)), lr=3e-3)
    data = _batches(8)
    losses = []
    for _ in range(10):
        for x, y in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])
    state = opt.feedback_state()
    assert all(v.dtype == torch.float32 and v.is_cuda and torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_registered_ops_pass_opcheck_on_cuda(impl):
    """Issue 21 item 2 on the GPU: the CUDA and Triton kernels behind ``torch.ops.torchkit.*`` against their fake
    implementations (shapes, dtypes, devices, mutation) and the dispatcher."""
    d, k = 100_003, 1001
    g, e, h = _rand(d, 1), _rand(d, 2), _rand(d, 3)
    for name, args in (
        ("topk", (g, k)),
        ("ef14_step_", (g, e.clone(), k, False)),
        ("ef21_step_", (g, h.clone(), k, True)),
        ("econtrol_step_", (g, e.clone(), h.clone(), k, 0.3, False)),
    ):
        torch.library.opcheck(getattr(torch.ops.torchkit, name), (*args, impl))


def test_worker_step_compiles_fullgraph_with_inductor_on_cuda():
    """The worker step (fused op, wire rounding) compiled with inductor, fullgraph: the eager state and message."""
    fb = tk.EF14(tk.TopK(ratio=0.01))
    d = 1 << 22
    state_a, state_b = fb.init_state(d, device="cuda"), fb.init_state(d, device="cuda")

    def step(state, grad):
        msg = fb.round_values_(
            state, fb.worker_step(state, grad, 1, worker=0, n_workers=1, segments=(d,)), torch.bfloat16
        )
        return msg.values, msg.indices

    compiled = torch.compile(step, fullgraph=True)
    for seed in range(3):
        g = _rand(d, 10 + seed)
        va, ia = step(state_a, g.clone())
        vb, ib = compiled(state_b, g.clone())
        assert torch.equal(va, vb) and torch.equal(ia, ib)
    assert torch.equal(state_a["error"], state_b["error"])


def test_the_hooks_round_on_a_cuda_bucket_is_the_step_the_check_and_the_decode(nccl_group):
    """One 4e6-entry CUDA bucket, one rank, EF14 TopK 1%: the dispatcher sees the fused step, the check's sum and
    one decode (zero, scatter, poison), and the flag's copy to pinned host memory (empty, copy_); an Inf in the
    bucket makes the estimate NaN and the next iteration raise (tests/test_custom_ops.py counts the CPU's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from torchkit.apps.bench import OneBucket

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    state = tk.ddp.CompressionState(tk.EF14(tk.TopK(ratio=0.01)), min_compression_rate=0)
    bucket = OneBucket(torch.randn(4_000_000, device="cuda"), torch.nn.Parameter(torch.zeros(4_000_000, device="cuda")))
    for _ in range(3):
        tk.ddp.compression_hook(state, bucket).wait()
    with Count() as c:
        tk.ddp.compression_hook(state, bucket).wait()
    views = ("aten.view", "aten.detach", "aten.unsqueeze", "aten.select", "aten.slice", "aten.reshape")
    launched = {k: v for k, v in c.ops.items() if not k.startswith(views)}
    assert launched == {"torchkit.ef14_step_": 1, "aten.sum": 1, "torchkit.accumulate_": 1, "aten.empty": 1,
                        "aten.copy_": 1}, launched  # fmt: skip
    bucket.buffer()[17] = float("inf")
    assert torch.isnan(tk.ddp.compression_hook(state, bucket).wait()).all()
    with pytest.raises(tk.comm.NonFiniteGradientError):
        tk.ddp.compression_hook(state, bucket).wait()
