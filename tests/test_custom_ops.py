"""Issue 21, items 2-3 on the CPU: the fused ops are ``torch.library`` operators (``torch.ops.torchkit.*``) with fake
implementations; ``opcheck`` passes for each implementation this machine runs; ``torch.compile(fullgraph=True)``
traces a round's device work (worker step, wire rounding, packing, decode) as one graph that computes what eager
computes; and a dispatch counter sees every launch, a size-independent number of them per work item and bucket."""

import collections
import functools

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

import torchkit as tk
from tests.dist_utils import run_dist
from torchkit.apps.bench import OneBucket
from torchkit.comm import aggregate_rows
from torchkit.compress import pack_message, unpack_message
from torchkit.ops import _library
from torchkit.state import Block


def _impls():
    tk.ops.build_extension()
    return [i for i in tk.ops.available_impls("cpu") if i in ("reference", "cpp")]


def _args(name, rows=None, d=300, k=7, decode=False):
    g = torch.Generator().manual_seed(1)
    shape = (d,) if rows is None else (rows, d)
    x = torch.randn(shape, generator=g)
    s1, s2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if name == "topk":
        return (x, k)
    if name in ("ef14_step_", "ef21_step_"):
        return (x, s1, k, False)
    if name == "econtrol_step_":
        return (x, s1, s2, k, 0.3, False)
    idx = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(rows or 1)]).int()
    out, values, scales = torch.randn(d, generator=g), torch.randn(rows or 1, k, generator=g), [0.5] * (rows or 1)
    if not decode:  # add onto out
        return (out, values, idx, scales, False, None)
    checks = values.sum(dim=1, dtype=torch.float64)  # a round's whole decode: zero, add every row, poison
    return (out, values, idx, scales, True, checks)


@pytest.mark.parametrize("name", sorted(set(_library.SCHEMAS) - {"wire_round", "segments_step_"}))
def test_opcheck_passes_for_every_op_and_implementation(name):
    op = getattr(torch.ops.torchkit, name)
    for impl in _impls():
        torch.library.opcheck(op, (*_args(name), impl))
        torch.library.opcheck(op, (*_args(name, d=4096, k=41), impl))
        if name == "accumulate_":
            torch.library.opcheck(op, (*_args(name, rows=3, decode=True), impl))
    torch.library.opcheck(op, (*_args(name, rows=3), "reference"))  # the simulator's [rows, d] form


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wire_round_is_an_operator_that_keeps_what_it_rounds_away(dtype):
    """q + r = values exactly (the residual of rounding to a narrower float is representable in fp32), and a value
    beyond the wire's range is sent as its largest value with the rest kept; opcheck passes."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 1e3
    x[:2] = torch.tensor([1e6, -1e6])
    for q, r in (tk.ops.wire_round(x, dtype), torch.ops.torchkit.wire_round(x, dtype)):
        assert q.dtype == dtype and r.dtype == x.dtype
        assert torch.equal(q.float() + r, x)
        big = torch.finfo(dtype).max
        assert q[0].item() == (big if dtype == torch.float16 else torch.tensor(1e6).to(dtype).item())
    torch.library.opcheck(torch.ops.torchkit.wire_round, (x, dtype))
    torch.library.opcheck(torch.ops.torchkit.wire_round, (x.reshape(100, 10).t(), dtype))  # strided: fake = real
    torch.library.opcheck(torch.ops.torchkit.wire_round, (x, torch.float32))  # the same dtype: no aliasing


def test_inductor_keeps_what_the_wire_rounds_away():
    """EF14's worker step and bf16 wire rounding compiled with inductor equal eager, feedback state included: the
    rounding is one operator, so inductor cannot fuse the round trip through bf16 away (it did before: the error
    lost the rounding residual on CPU and on an H200; tests/test_gpu.py checks CUDA)."""
    fb = tk.EF14(tk.TopK(ratio=0.01))
    d = 1 << 14
    eager, compiled = fb.init_state(d), fb.init_state(d)

    def step(state, grad):
        msg = fb.round_values_(
            state, fb.worker_step(state, grad, 1, worker=0, n_workers=1, segments=(d,)), torch.bfloat16
        )
        return msg.values, msg.indices

    fn = torch.compile(step, fullgraph=True, backend="inductor")
    for seed in range(3):
        g = torch.randn(d, generator=torch.Generator().manual_seed(seed))
        (v1, i1), (v2, i2) = step(eager, g.clone()), fn(compiled, g.clone())
        assert torch.equal(v1, v2) and torch.equal(i1, i2)
    assert torch.equal(eager["error"], compiled["error"])


_SEGMENT_STATE = {"ef14": 1, "ef21": 1, "econtrol": 2}


def _per_segment(method, g, state, sizes, ks, eta, approx, impl):
    """The segments one op call at a time (views), indices shifted to the whole vector: what segments_step_ is."""
    vals, idxs, a = [], [], 0
    for n, k in zip(sizes, ks):
        views = [t[a : a + n] for t in state]
        if method == "ef14":
            v, i = tk.ops.ef14_step_(g[a : a + n], views[0], k, approx, impl=impl)
        elif method == "ef21":
            v, i = tk.ops.ef21_step_(g[a : a + n], views[0], k, approx, impl=impl)
        else:
            v, i = tk.ops.econtrol_step_(g[a : a + n], views[0], views[1], k, eta, approx, impl=impl)
        vals.append(v)
        idxs.append(i.long() + a)
        a += n
    return torch.cat(vals), torch.cat(idxs)


@pytest.mark.parametrize("method", sorted(_SEGMENT_STATE))
def test_segments_step_is_one_call_per_segment_in_one_call(method):
    """Every implementation here, exact and approximate, fp32 and bf16 gradients, segments of 1 entry to 30k
    (k = 1 up to a whole segment): the same values, indices (in order) and state as one op call per segment; the
    GPU kernel sets' loop too, through the Triton kernels under the interpreter (smaller segments); opcheck passes;
    bad arguments raise ValueError naming them."""
    g0 = torch.Generator().manual_seed(5)
    interpreted = "triton" in tk.ops.available_impls("cpu")
    for impl, sizes, ks in [(i, [1, 7, 992, 30_000, 19_000], [1, 7, 10, 300, 190]) for i in _impls()] + (
        [("triton", [1, 7, 992, 3000], [1, 7, 10, 30])] if interpreted else []
    ):
        d = sum(sizes)
        for approx in (False, True):
            for gdtype in (torch.float32, torch.bfloat16):
                g = torch.randn(d, generator=g0).to(gdtype)
                state = [torch.randn(d, generator=g0) for _ in range(_SEGMENT_STATE[method])]
                twin = [t.clone() for t in state]
                v, i = tk.ops.segments_step_(method, g, state, sizes, ks, 0.3, approx, impl=impl)
                rv, ri = _per_segment(method, g, twin, sizes, ks, 0.3, approx, impl)
                assert torch.equal(v, rv) and torch.equal(i.long(), ri), (impl, approx, gdtype)
                assert i.dtype == torch.int32 and all(torch.equal(a, b) for a, b in zip(state, twin))
        names = {"ef14": (1, 0), "ef21": (0, 1), "econtrol": (1, 1)}[method]
        state = [torch.randn(d, generator=g0) for _ in range(_SEGMENT_STATE[method])]
        error, shift = (state.pop(0) if has else None for has in names)
        mode = {"ef14": 1, "ef21": 2, "econtrol": 3}[method]
        for n in (sizes, [d]):
            k = ks if n is sizes else [77]
            torch.library.opcheck(torch.ops.torchkit.segments_step_, (mode, g, error, shift, n, k, 0.3, False, impl))
    bad = [
        (dict(method="ef22"), "method"),
        (dict(sizes=[*sizes[:-1], sizes[-1] - 1]), "sizes add up"),
        (dict(ks=ks[:-1]), "one length"),
        (dict(ks=[0, *ks[1:]]), "1 <= k"),
        (dict(ks=[2, *ks[1:]]), "1 <= k"),
        (dict(state=[]), "takes the state"),
    ]
    for change, words in bad:
        args = dict(method=method, grad=torch.randn(d), sizes=sizes, ks=ks)
        args["state"] = [torch.zeros(d) for _ in range(_SEGMENT_STATE[method])]
        args.update(change)
        with pytest.raises(ValueError, match=words):
            tk.ops.segments_step_(**args)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("method", sorted(_SEGMENT_STATE))
def test_many_small_segments_are_one_launch_with_the_output_of_one_step_each(monkeypatch, method, one_pass):
    """The Triton kernel set (interpreter) runs every segment of at most ``SMALL`` entries in one launch, one program
    each, and a larger one in its own step: the same values, indices in the same order, and state as one op call
    per segment, exact and approximate, fp32 and bf16, on random, tied (all equal) and mostly-zero rounded input,
    with the one pass on and off (the output order follows the sequence a single step would take: with two passes,
    a threshold bin that fits the candidate buffer puts the entries above it first)."""
    from torchkit.ops import _select
    from torchkit.ops._triton import segments

    if "triton" not in tk.ops.available_impls("cpu"):
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(_select, "ONE_PASS", one_pass)
    monkeypatch.setattr(segments, "SMALL", 8192)  # the 9000-entry segment takes its own step
    launches, steps = [], []
    kernel = segments._segments_kernel
    monkeypatch.setattr(segments, "_segments_kernel", _Launches(kernel, launches))
    run = _select.run
    monkeypatch.setattr(_select, "run", lambda *a, **kw: steps.append(1) or run(*a, **kw))
    g0 = torch.Generator().manual_seed(11)
    sizes, ks = [6000, 3, 9000, 1, 700], [10, 2, 900, 1, 700]
    d = sum(sizes)
    for kind in ("random", "tied", "mostly zero"):
        for gdtype, approx in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
            g = {
                "random": torch.randn(d, generator=g0),
                "tied": torch.full((d,), 0.5),
                "mostly zero": torch.randn(d, generator=g0).round() * (torch.rand(d, generator=g0) < 0.3),
            }[kind].to(gdtype)
            state = [torch.randn(d, generator=g0) if kind == "random" else torch.zeros(d) for _ in range(2)]
            state = state[: _SEGMENT_STATE[method]]
            twin = [t.clone() for t in state]
            launches.clear(), steps.clear()
            v, i = tk.ops.segments_step_(method, g, state, sizes, ks, 0.3, approx, impl="triton")
            assert launches == [4] and len(steps) == 1, (launches, steps)  # 4 small segments in one launch
            rv, ri = _per_segment(method, g, twin, sizes, ks, 0.3, approx, "triton")
            assert torch.equal(i.long(), ri) and torch.equal(v, rv), (kind, gdtype, approx)
            assert all(torch.equal(a, b) for a, b in zip(state, twin)), (kind, gdtype, approx)


class _Launches:
    """A Triton kernel that records the number of programs of each launch."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        self.seen.append(grid[0])
        return self.kernel[grid]


@pytest.mark.parametrize(
    "make",
    [
        lambda: tk.EF14(tk.TopK(ratio=0.02), granularity="tensor"),
        lambda: tk.EF21(tk.TopK(ratio=0.02), granularity="tensor"),
        lambda: tk.EControl(tk.TopK(ratio=0.02), eta=0.3, granularity="tensor"),
    ],
)
def test_a_bucket_of_many_tensors_compressed_tensor_by_tensor_is_one_launch(make, monkeypatch):
    """granularity="tensor" over 40 tensors: one segments_step_ per round (was one fused op per tensor), and the
    messages (values, indices, groups) and state equal to the per-tensor path's, round after round."""
    from torchkit import feedback as F

    sizes = [300] * 37 + [1, 5, 5000]
    d = sum(sizes)
    fa, fb = make(), make()
    sa, sb = fa.init_state(d), fb.init_state(d)
    segments = fa.segments_for(sizes)
    assert len(segments) == len(sizes)
    for step in range(1, 4):
        g = torch.randn(d)
        seen = _count(functools.partial(fa.worker_step, sa, g.clone(), step, worker=0, n_workers=1, segments=segments))
        assert seen["torchkit.segments_step_"] == 1 and not any(
            k in seen for k in ("torchkit.ef14_step_", "torchkit.ef21_step_", "torchkit.econtrol_step_")
        ), seen
        ma = fa.worker_step(sa, g.clone(), step + 10, worker=0, n_workers=1, segments=segments)
        with monkeypatch.context() as m:
            m.setattr(F, "_SEGMENTED", {})  # the per-tensor path: one fused op per segment
            fb.worker_step(sb, g.clone(), step, worker=0, n_workers=1, segments=segments)
            mb = fb.worker_step(sb, g.clone(), step + 10, worker=0, n_workers=1, segments=segments)
        assert torch.equal(ma.values, mb.values) and torch.equal(ma.indices, mb.indices)
        assert ma.groups == mb.groups and ma.numel == mb.numel == d
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_public_ops_go_through_the_registered_operators():
    seen = _count(lambda: tk.ops.ef14_step_(torch.randn(100), torch.zeros(100), 5))
    assert seen["torchkit.ef14_step_"] == 1
    out = torch.zeros(10)
    seen = _count(lambda: tk.ops.accumulate_(out, torch.ones(2, 3), torch.tensor([[0, 1, 2], [1, 2, 3]]), [1.0, 2.0]))
    assert seen["torchkit.accumulate_"] == 1
    torch.testing.assert_close(out, torch.tensor([1.0, 3, 3, 2, 0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
def test_a_rounds_device_work_compiles_fullgraph_and_equals_eager(method, wire):
    """The worker step, the wire rounding, packing and the decode of one round, compiled with fullgraph=True (any
    graph break raises) through functionalization and fake tensors (aot_eager): state and estimate equal eager's."""
    fb = {
        "ef14": tk.EF14(tk.TopK(ratio=0.1)),
        "ef21": tk.EF21(tk.TopK(ratio=0.1)),
        "econtrol": tk.EControl(tk.TopK(ratio=0.1), eta=0.3),
    }[method]
    d = 1000

    def round_(blk, g, step: int):
        msg = fb.worker_step(blk.state, g, step, worker=0, n_workers=1, segments=blk.segments)
        msg = fb.round_values_(blk.state, msg, wire)
        packed, layout = pack_message(msg)
        out = torch.zeros(d)
        aggregate_rows(unpack_message(packed.reshape(1, -1), layout), [1.0], out)
        return packed, out

    eager, compiled = (Block.zeros(fb, ["x"], [d], dtype=torch.float32, device="cpu", with_server=False) for _ in "ab")
    fn = torch.compile(round_, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    for step in range(1, 4):  # step 0 of the EF21 family is a dense round over all_reduce: not packed
        g = torch.randn(d)
        p1, o1 = round_(eager, g.clone(), step)
        p2, o2 = fn(compiled, g.clone(), step)
        assert torch.equal(p1, p2) and torch.equal(o1, o2)
    for k in eager.state:
        assert torch.equal(eager.state[k], compiled.state[k])


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count(fn):
    with _Count() as c:
        fn()
    return c.ops


def _wrapper_step_ops(sizes, fb):
    ps = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = tk.CompressedOptimizer(ps, torch.optim.SGD, lr=0.1, foreach=True, feedback=fb)
    for _ in range(2):  # past the first step (agreement, buffers, EF21's dense round)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    return _count(opt.step)


@pytest.mark.parametrize(
    "make, fused",
    [
        # EF14: the worker step and the decode of the message into the estimate
        (lambda: tk.EF14(tk.TopK(ratio=0.01)), {"torchkit.ef14_step_": 1, "torchkit.accumulate_": 1}),
        # EF21 alone: its shift is the estimate, nothing to decode
        (lambda: tk.EF21(tk.TopK(ratio=0.01)), {"torchkit.ef21_step_": 1}),
    ],
)
def test_the_wrapper_launches_a_size_independent_number_of_ops_per_work_item(make, fused):
    """The fused launches per parameter group, and the same ops whatever the sizes and however many parameters
    share the group (their gradients are copied with one multi-tensor op)."""
    counts = [_wrapper_step_ops(sizes, make()) for sizes in ([1000], [100_000], [10] * 5, [20_000] * 5)]
    assert all(c == counts[0] for c in counts), [sum(c.values()) for c in counts]
    assert {k: v for k, v in counts[0].items() if k.startswith("torchkit.")} == fused
    assert counts[0]["aten._foreach_copy_"] == 1


_HOOK_KERNELS = {  # every op of the hook's path that launches device work (views, reads of host flags aside)
    "torchkit.ef14_step_", "torchkit.ef21_step_", "torchkit.econtrol_step_", "torchkit.accumulate_", "aten.sum",
    "aten.mul", "aten.ne", "aten.eq", "aten.abs", "aten.all", "aten.any", "aten.bitwise_not", "aten.zero_",
    "aten.masked_fill_", "aten.empty", "aten.cat", "aten._to_copy", "aten.copy_", "aten.clone", "aten.isnan",
    "aten.where", "aten.sub", "aten.fill_", "aten.add_", "aten.index_add_", "aten.scatter_add_",
    "aten._local_scalar_dense",
}  # fmt: skip


def test_the_hook_launches_one_worker_step_and_one_decode_per_bucket(tmp_path):
    """The ops of the hook itself, counted inside it over an iteration under DDP on one rank (its buckets' rounds
    finish at the last one): one fused worker step and one decode per bucket, and the same ops at 16x the width."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = {}
        for width in (16, 256):
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
            model = DDP(net, bucket_cap_mb=width * 4 * 4 / 2**20)  # about one bucket per layer
            state = tk.ddp.CompressionState(tk.EF14(tk.TopK(ratio=0.05)), min_compression_rate=0).bind(model)
            iteration = [collections.Counter()]

            def counting(state, bucket, iteration=iteration):
                with _Count() as c:
                    fut = tk.ddp.compression_hook(state, bucket)
                iteration[-1].update(c.ops)
                if bucket.is_last():
                    assert fut.done()  # every bucket's round finished at the last one, in this thread
                    iteration.append(collections.Counter())
                return fut

            model.register_comm_hook(state, counting)
            x = torch.randn(4, 8)
            for _ in range(3):
                model(x).sum().backward()
            out[width] = (len(state.round.blocks), iteration[-2])
        assert out[16][0] == out[256][0] >= 2
        for width, (buckets, ops) in out.items():
            assert ops["torchkit.ef14_step_"] == buckets and ops["torchkit.accumulate_"] == buckets, (width, ops)
        assert out[16] == out[256]  # the same launches at 16x the size
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("d", [4096, 65536])
def test_the_hooks_round_on_a_bucket_is_three_device_launches(tmp_path, d):
    """Every launch of one bucket's round on one rank (the future completes inside the call), whatever the size:
    the fused step, the message's non-finite check (one float64 sum) and the decode (zero, scatter-add and the NaN
    poison in one ``accumulate_``). It was 11, then 7 (a three-launch flag, a zero_ before the scatter-add and a
    masked_fill_ after it), and the host read of the last iteration's flag ran a composite isfinite."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        state = tk.ddp.CompressionState(tk.EF14(tk.TopK(ratio=0.01)))  # default min_compression_rate: the probe
        bucket = OneBucket(torch.randn(d), torch.nn.Parameter(torch.zeros(d)))
        for _ in range(2):
            tk.ddp.compression_hook(state, bucket).wait()
        seen = _count(lambda: tk.ddp.compression_hook(state, bucket).wait())
        kernels = {k: v for k, v in seen.items() if k in _HOOK_KERNELS}
        assert kernels == {"torchkit.ef14_step_": 1, "aten.sum": 1, "torchkit.accumulate_": 1}, seen
    finally:
        dist.destroy_process_group()


def _counted_round(rank, world_size, method):
    """The launches of one bucket's round on this rank, past the first rounds, and the estimate and flag of a
    round where rank 1's gradient holds an Inf."""
    tk.ops.build_extension()
    fb = {"ef14": tk.EF14, "ef21": tk.EF21, "econtrol": lambda c: tk.EControl(c, eta=0.2)}[method](tk.TopK(ratio=0.01))
    state = tk.ddp.CompressionState(fb, min_compression_rate=0)
    bucket = OneBucket(torch.randn(4096), torch.nn.Parameter(torch.zeros(4096)))
    for _ in range(3):
        tk.ddp.compression_hook(state, bucket).wait()
    seen = _count(lambda: tk.ddp.compression_hook(state, bucket).wait())
    if rank == 1:
        bucket.buffer()[123] = float("inf")
    est = tk.ddp.compression_hook(state, bucket).wait()
    kept = [host for host, _ in state._flags]  # values, not views that would keep the gathered rows alive
    assert kept and not any(isinstance(h, torch.Tensor) for h in kept)
    return {k: v for k, v in seen.items() if k in _HOOK_KERNELS}, bool(est.isnan().all()), len(state._flags)


@pytest.mark.dist
@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
def test_the_hooks_round_on_two_ranks_is_four_device_launches(method):
    """On two ranks, around the all-gather: the fused step, the non-finite check, one packing copy (values, indices
    and the check in one row of bytes, the check at a multiple of 8) and one decode, which reads the gathered rows
    in place (aligned fp32 values, int32 indices and float64 checks: no unpacking copies) and zeroes, adds and
    poisons in one call. The EF21 family decodes onto its server estimate and then copies it into the bucket and
    poisons it there (two more). It was 14: a three-launch flag and its uint8 copy, three unpacking copies, the
    flag's any(), a zero_ and a masked_fill_. A round that meets an Inf on one rank leaves NaN on both."""
    for kernels, poisoned, flags in run_dist(_counted_round, 2, method):
        want = {f"torchkit.{method}_step_": 1, "aten.sum": 1, "aten.cat": 1, "torchkit.accumulate_": 1}
        if method != "ef14":
            want.update({"torchkit.accumulate_": 2, "aten.copy_": 1})
        assert kernels == want, kernels
        assert poisoned and flags > 0


@pytest.mark.parametrize("wire", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_round_that_flags_a_nonfinite_gradient_on_one_worker(n, bad, wire):
    """``nonfinite="flag"`` on one worker and on the simulator's three: the flag is set and the estimate is NaN
    everywhere when one worker's gradient holds a NaN or an Inf, and neither when all are finite (the 0-d flag of
    one worker and the rows' flags go through the same path; a bf16/fp16 wire clamps an Inf to a finite value, so
    the flag is taken before the rounding)."""
    from torchkit.comm import LocalExchanger, RoundOptions, start_round

    fb = tk.EF14(tk.TopK(ratio=0.1))
    d = 50
    for poison in (False, True):
        blk = Block.zeros(fb, ["x"], [d], dtype=torch.float32, device="cpu", with_server=False,
                          rows=None if n == 1 else n)  # fmt: skip
        g = torch.randn(d) if n == 1 else torch.randn(n, d)
        if poison:
            g.view(-1)[17] = bad
        out = torch.empty(d)
        options = RoundOptions(wire_dtype=wire, nonfinite="flag")
        res = start_round(fb, LocalExchanger(n), blk, g, 1, options, out=out).wait()
        assert bool(res.nonfinite) == poison
        assert bool(torch.isnan(res.estimate).all()) == poison
        assert bool(torch.isfinite(res.estimate).all()) != poison


def _compiled_against_eager(build) -> None:
    """``build() -> (net, model, opt)``; four training steps of ``model``, eagerly and under ``torch.compile``
    (aot_eager) around forward, backward and ``opt.step()``: the same parameters, bit for bit."""
    out = {}
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            net, model, opt = build()

            def step(x, y, model=model, opt=opt):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()

            fn = torch.compile(step, backend="aot_eager") if compiled else step
            g = torch.Generator().manual_seed(1)
            for _ in range(4):
                fn(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g))
            out[compiled] = [p.detach().clone() for p in net.parameters()]
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_a_compiled_training_step_runs_the_hook_eagerly(tmp_path):
    """``torch.compile`` around a whole DDP step (forward, backward, a plain optimizer's step) with the hook
    registered: the backward calls the hook from inside the compiled function's frame, and Dynamo traced its
    bookkeeping (the first compiled step failed: "Guard failed on the same frame it was created", a guard on a
    module's weak references). It runs eagerly now, and the compiled run equals the eager one."""

    def build():
        net = _mlp()
        model = DDP(net)
        tk.ddp.register(model, tk.EF14(tk.TopK(ratio=0.2)), min_compression_rate=0)
        return net, model, torch.optim.SGD(model.parameters(), lr=0.1)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _compiled_against_eager(build)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("front", ["wrapper", "local_sgd"])
def test_a_compiled_training_step_runs_the_front_ends_step_eagerly(front):
    """``torch.compile`` around forward, backward and ``opt.step()``: the step runs eagerly (Dynamo failed on the
    first compiled step: "Guard failed on the same frame it was created"), and the compiled run equals the eager
    one bit for bit."""

    def build():
        net, fb = _mlp(), tk.EF14(tk.TopK(ratio=0.2))
        if front == "wrapper":
            return net, net, tk.CompressedOptimizer(net.parameters(), torch.optim.SGD, feedback=fb, lr=0.1)
        return net, net, tk.LocalSGD(net.parameters(), torch.optim.SGD, feedback=fb, sync_every=2, lr=0.1)

    _compiled_against_eager(build)
