"""The DDP hook on 3 Gloo ranks: equal to CompressedOptimizer and simulate(), fallbacks, AMP dtypes,
accumulation, checkpoints. One spawn runs every scenario (process start-up dominates)."""

import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkit as tk
from tests.dist_utils import run_dist, run_dist_faults
from tests.methods import factories
from torchkit.sim import simulate

WORLD, STEPS, LR = 3, 4, 0.1

FEEDBACKS = factories(lambda: tk.TopK(ratio=0.3), n_workers=WORLD, granularity="tensor")
# EControl's default eta: the ratio, whatever DDP's buckets (it was the smallest k/d in each bucket, so the hook's
# trajectory depended on its bucketing, and on DDP's rebuilt buckets after the first iteration)
FEEDBACKS["econtrol_default_eta"] = lambda: tk.EControl(tk.TopK(ratio=0.3), granularity="tensor")


class Net(torch.nn.Module):
    """Layers registered in the reverse of their use, so DDP's rebuilt buckets differ from the first."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(7, 3)
        self.mid = torch.nn.Linear(9, 7)
        self.body = torch.nn.Linear(5, 9)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(x)))))


def _net(dtype=torch.float64):
    torch.manual_seed(3)
    return Net().to(dtype)


def _data(rank, step, dtype=torch.float64, micro=0):
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return torch.randn(6, 5, generator=g).to(dtype), torch.randn(6, 3, generator=g).to(dtype)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp(model, **kw):
    return DDP(model, bucket_cap_mb=0.00025, **kw)  # ~250 bytes: several buckets, one or two params each


def _hook_run(rank, name, steps=STEPS, dtype=torch.float64, **state_kw):
    model = _ddp(_net(dtype))
    state = tk.ddp.register(model, FEEDBACKS[name](), min_compression_rate=0, **state_kw)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    seen = []
    for t in range(steps):
        opt.zero_grad()
        _loss(model, *_data(rank, t, dtype)).backward()
        opt.step()
        seen.append(sorted(e["keys"] for e in state._buckets.values()))
    return _flat(model.module), seen, state


def _opt_run(rank, name, steps=STEPS, dtype=torch.float64):
    model = _net(dtype)
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=LR, feedback=FEEDBACKS[name]())
    for t in range(steps):
        opt.zero_grad()
        _loss(model, *_data(rank, t, dtype)).backward()
        opt.step()
    return _flat(model)


def _worker(rank, world):
    out = {}
    for name in FEEDBACKS:
        flat, seen, state = _hook_run(rank, name)
        out[name] = {"hook": flat, "opt": _opt_run(rank, name), "buckets": seen}
    # bf16 buckets, fp32 feedback state and fp32 wire: the optimizer front end's trajectory
    flat, _, state = _hook_run(rank, "ef21", dtype=torch.bfloat16, wire_dtype=torch.float32)
    out["bf16"] = {
        "hook": flat,
        "opt": _opt_run(rank, "ef21", dtype=torch.bfloat16),
        "state_dtype": next(iter(state._params.values()))["shift"].dtype,
    }
    flat, _, _ = _hook_run(rank, "ef21", dtype=torch.float16, wire_dtype=torch.float32)
    out["fp16"] = {"hook": flat, "opt": _opt_run(rank, "ef21", dtype=torch.float16)}
    # bf16 on the wire: rounding stays in the shift, so the server estimate is still mean_i h_i
    _, _, state = _hook_run(rank, "ef21", dtype=torch.bfloat16, wire_dtype=torch.bfloat16)
    shifts = torch.cat([state._params[k]["shift"] for k in sorted(state._params)])
    server = torch.cat([state._params[k]["server"] for k in sorted(state._params)])
    mean_shift = shifts.clone()
    dist.all_reduce(mean_shift)
    out["bf16_wire"] = {"server": server, "mean_shift": mean_shift / world, "sent": state.bytes_sent}
    out["counters"] = _counters(rank)
    out["fallbacks"] = _fallbacks(rank)
    out["no_sync"] = _no_sync(rank)
    out["resume"] = _resume(rank)
    out["static_view"] = _static_and_view(rank)
    out["nonfinite"] = _nonfinite(rank)
    return out


def _counters(rank):
    res = {}
    for name in ("ef14", "ef21w"):
        _, _, state = _hook_run(rank, name, track_error=True)
        # EF14: after the step the distortion is the error memory itself
        expect = sum(float(v["error"].pow(2).sum()) for v in state._params.values()) if name == "ef14" else None
        res[name] = (float(state.error_norm_sq), expect, state.bytes_sent, state.dense_bytes, state.dense_bytes_avoided)
    return res


def _fallbacks(rank):
    res = {}
    # start_iter: plain averaged all_reduce first; every bucket tiny: Identity rounds (exact averaging)
    for label, kw in {"start": dict(start_iter=2), "tiny": dict(min_compression_rate=1e9)}.items():
        model = _ddp(_net())
        state = tk.ddp.register(model, tk.EF21(tk.TopK(1)), **kw)
        plain = _ddp(_net())
        opt, opt_plain = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(plain.parameters(), lr=LR)
        for t in range(2):
            for m, o in ((model, opt), (plain, opt_plain)):
                o.zero_grad()
                _loss(m, *_data(rank, t)).backward()
                o.step()
        res[label] = (_flat(model.module), _flat(plain.module), state.bytes_sent, state.dense_bytes)
    return res


def _no_sync(rank):
    """Two micro-batches under no_sync, one synchronising: the hook compresses the accumulated gradient."""
    model = _ddp(_net())
    tk.ddp.register(model, FEEDBACKS["econtrol"](), min_compression_rate=0)
    ref = _net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = tk.CompressedOptimizer(ref.parameters(), torch.optim.SGD, lr=LR, feedback=FEEDBACKS["econtrol"]())
    for t in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        with model.no_sync():
            _loss(model, *_data(rank, t, micro=1)).backward()
        _loss(model, *_data(rank, t, micro=2)).backward()
        for micro in (1, 2):
            _loss(ref, *_data(rank, t, micro=micro)).backward()
        opt.step()
        ref_opt.step()
    return _flat(model.module), _flat(ref)


def _resume(rank):
    straight, _, _ = _hook_run(rank, "ef21sgdm", steps=6)
    model = _ddp(_net())
    state = tk.ddp.register(model, FEEDBACKS["ef21sgdm"](), min_compression_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for t in range(3):
        opt.zero_grad()
        _loss(model, *_data(rank, t)).backward()
        opt.step()
    blob = io.BytesIO()
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    net = _net()
    net.load_state_dict(saved["model"])
    model2 = _ddp(net)
    state2 = tk.ddp.register(model2, FEEDBACKS["ef21sgdm"](), min_compression_rate=0)
    state2.load_state_dict(saved["hook"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=LR)
    opt2.load_state_dict(saved["opt"])
    for t in range(3, 6):
        opt2.zero_grad()
        _loss(model2, *_data(rank, t)).backward()
        opt2.step()
    errors = {}
    wrong_world = dict(saved["hook"], world_size=2)
    try:
        tk.ddp.CompressionState(FEEDBACKS["ef21sgdm"]()).load_state_dict(wrong_world)
    except ValueError as exc:
        errors["world"] = str(exc)
    reset = tk.ddp.CompressionState(FEEDBACKS["ef21sgdm"]())
    reset.load_state_dict(wrong_world, reset_on_mismatch=True)
    errors["reset_origin"] = reset.fb_origin
    pickled = pickle.loads(pickle.dumps(state))
    errors["pickled"] = (pickled.process_group is None, sorted(pickled._pending) == sorted(state._params))
    return straight, _flat(model2.module), errors


def _static_and_view(rank):
    out = []
    for kw in (dict(static_graph=True), dict(gradient_as_bucket_view=True)):
        model = _ddp(_net(), **kw)
        tk.ddp.register(model, FEEDBACKS["ef14"](), min_compression_rate=0)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for t in range(STEPS):
            opt.zero_grad()
            _loss(model, *_data(rank, t)).backward()
            opt.step()
        out.append(_flat(model.module))
    return out


def _nonfinite(rank):
    model = _ddp(_net())
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # sanitize needs the scaler that skips the NaN step
    state = tk.ddp.register(
        model, FEEDBACKS["ef21"](), min_compression_rate=0, nonfinite="sanitize", grad_scaler=scaler
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for t in range(3):
        opt.zero_grad()
        loss = _loss(model, *_data(rank, t))
        if t == 2 and rank == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        scaler.step(opt)
        scaler.update()
    finite_state = all(torch.isfinite(v).all() for views in state._params.values() for v in views.values())
    finite_params = all(torch.isfinite(p).all() for p in model.parameters())
    return grads, finite_state and finite_params


@pytest.fixture(scope="module")
def results():
    return run_dist(_worker, WORLD)


def _grad_fn(dtype=torch.float64):
    """Per-rank gradients at x, for simulate(); the data depend on the step, so count calls."""
    model = _net(dtype)
    sizes = [p.numel() for p in model.parameters()]
    calls = {"t": 0}

    @torch.enable_grad()  # simulate() runs under no_grad
    def grad_fn(x):
        t = calls["t"]
        calls["t"] += 1
        torch.nn.utils.vector_to_parameters(x.to(dtype), model.parameters())
        rows = []
        for r in range(WORLD):
            model.zero_grad()
            _loss(model, *_data(r, min(t, STEPS - 1), dtype)).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
        return torch.stack(rows)

    return grad_fn, sizes, _flat(model).double()


@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(FEEDBACKS))
def test_hook_equals_optimizer_and_simulate(results, name):
    grad_fn, sizes, x0 = _grad_fn()
    sim = simulate(FEEDBACKS[name](), grad_fn, x0, n_workers=WORLD, steps=STEPS, lr=LR, segments=sizes)
    for r in results:
        torch.testing.assert_close(r[name]["hook"], r[name]["opt"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r[name]["hook"], sim.x, rtol=1e-10, atol=1e-12)
    assert torch.equal(results[0][name]["hook"], results[2][name]["hook"])
    first, later = results[0][name]["buckets"][0], results[0][name]["buckets"][-1]
    assert first != later, "DDP's bucket rebuild was not exercised"


@pytest.mark.dist
def test_bf16_and_fp16_buckets_fp32_state(results):
    for r in results:
        assert r["bf16"]["state_dtype"] == torch.float32
        torch.testing.assert_close(r["bf16"]["hook"], r["bf16"]["opt"], rtol=0, atol=0)
        torch.testing.assert_close(r["fp16"]["hook"], r["fp16"]["opt"], rtol=0, atol=0)
        torch.testing.assert_close(r["bf16_wire"]["server"], r["bf16_wire"]["mean_shift"], rtol=1e-6, atol=1e-7)


@pytest.mark.dist
def test_counters(results):
    for r in results:
        err, expect, sent, dense, avoided = r["counters"]["ef14"]
        assert err == pytest.approx(expect, rel=1e-12) and err > 0
        n_params = sum(p.numel() for p in _net().parameters())
        assert dense == 8 * n_params  # fp64 buckets
        assert 0 < sent < dense and avoided == dense - sent
        err_w, _, _, _, _ = r["counters"]["ef21w"]
        assert 0 < err_w < float("inf")


@pytest.mark.dist
def test_fallbacks_equal_plain_allreduce(results):
    for r in results:
        for label in ("start", "tiny"):
            hooked, plain, sent, dense = r["fallbacks"][label]
            torch.testing.assert_close(hooked, plain, rtol=1e-12, atol=1e-14)
        _, _, sent, dense = r["fallbacks"]["tiny"]
        assert sent > dense  # fp64 model: dense rounds carry (d + 1) fp64 values per bucket


@pytest.mark.dist
def test_no_sync_accumulation(results):
    for r in results:
        torch.testing.assert_close(*r["no_sync"], rtol=1e-10, atol=1e-12)


@pytest.mark.dist
def test_checkpoint_resume_bit_exact_and_errors(results):
    for r in results:
        straight, resumed, errors = r["resume"]
        assert torch.equal(straight, resumed)
        assert "saved with world_size=2, this run has world_size=3" in errors["world"]
        assert errors["reset_origin"] == 3
        assert errors["pickled"] == (True, True)


@pytest.mark.dist
def test_static_graph_and_bucket_view(results):
    grad_fn, sizes, x0 = _grad_fn()
    sim = simulate(FEEDBACKS["ef14"](), grad_fn, x0, n_workers=WORLD, steps=STEPS, lr=LR, segments=sizes)
    for r in results:
        for flat in r["static_view"]:
            torch.testing.assert_close(flat, sim.x, rtol=1e-10, atol=1e-12)


@pytest.mark.dist
def test_nonfinite_bucket_returns_nan_everywhere_and_state_stays_finite(results):
    for r in results:
        grads, finite_state = r["nonfinite"]
        assert torch.isfinite(grads[1]).all() and torch.isnan(grads[2]).any()
        assert finite_state


def test_state_bad_input():
    with pytest.raises(TypeError, match="feedback must be"):
        tk.ddp.CompressionState(tk.TopK(1))
    with pytest.raises(ValueError, match="start_iter must be an int >= 0"):
        tk.ddp.CompressionState(tk.EF21(tk.TopK(1)), start_iter=-1)
    with pytest.raises(ValueError, match="min_compression_rate must be >= 0"):
        tk.ddp.CompressionState(tk.EF21(tk.TopK(1)), min_compression_rate=-2)


def _compiled(rank, world):
    out = []
    for compiled in (False, True):
        model = DDP(_net(torch.float32))  # default bucket sizes: DDPOptimizer asserts the first is the smallest
        tk.ddp.register(model, FEEDBACKS["ef21"](), min_compression_rate=0)
        run = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for t in range(3):
            opt.zero_grad()
            _loss(run, *_data(rank, t, torch.float32)).backward()
            opt.step()
        out.append(_flat(model.module))
    return out


@pytest.mark.dist
def test_torch_compile_model_with_the_hook():
    for eager, compiled in run_dist(_compiled, 2):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        assert not torch.equal(eager, _flat(_net(torch.float32)))  # it trained


def test_the_hook_state_does_not_keep_the_model_alive(tmp_path):
    """DDP's C++ reducer holds the hook state; were the state to hold the model strongly, the model, its
    gradients and its process group would live until the interpreter exits (where Gloo's threads can abort it)."""
    import gc
    import weakref

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DDP(_net(torch.float32))
        state = tk.ddp.register(model, FEEDBACKS["ef14"](), min_compression_rate=0)
        for t in range(2):
            _loss(model, *_data(0, t, torch.float32)).backward()
        alive = weakref.ref(model)
        del model
        gc.collect()
        assert alive() is None
        assert state.state_dict()["iter"] == 2  # the state outlives its model and still saves
    finally:
        dist.destroy_process_group()


class _Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(5, 3).double(), torch.nn.Linear(5, 3).double()

    def forward(self, x, use_b: bool):
        return self.a(x) + (self.b(x) if use_b else 0)


USE_B = [(True, True), (False, False), (False, True), (True, True), (False, False), (True, True)]  # rank 0, 1


def _unused(rank, world, name, nonfinite):
    """Branch b used by both ranks, by neither, by rank 1 only: the hook with find_unused_parameters and the
    wrapper (which leaves out a parameter no rank has a gradient for, and counts a missing one as zero). ``late``:
    b frozen when the hook was registered (no mark hook), trained afterwards with every branch used: as ``all``."""
    out = {}
    every = [(True, True)] * 3
    for front, schedule in (("hook", USE_B), ("view", USE_B), ("opt", USE_B), ("late", every), ("all", every)):
        model = _Branches()
        fb = FEEDBACKS[name]()
        if front == "opt":
            opt, run = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=LR, feedback=fb), model
        else:  # "view": gradients as views of the buckets, kept (zeroed) between steps
            ddp = DDP(model, find_unused_parameters=True, gradient_as_bucket_view=front == "view")
            model.b.requires_grad_(front != "late")
            state = tk.ddp.register(ddp, fb, min_compression_rate=0, nonfinite=nonfinite)
            model.b.requires_grad_(True)
            opt, run = torch.optim.SGD(model.parameters(), lr=LR), ddp
        for t, uses in enumerate(schedule):
            x, y = _data(rank, t)
            opt.zero_grad(set_to_none=front != "view")
            torch.nn.functional.mse_loss(run(x[:, :5], uses[rank]), y).backward()
            opt.step()
        out[front] = _flat(model)
    # registered while b is frozen, on a resumed state that holds b's: b's state stays as loaded while it is frozen
    ddp = DDP(_Branches(), find_unused_parameters=True)
    ddp.module.b.requires_grad_(False)
    resumed = tk.ddp.register(ddp, FEEDBACKS[name](), min_compression_rate=0)
    resumed.load_state_dict(state.state_dict())
    held = {k: v.clone() for k, v in state._params["b.weight"].items()}
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for t in range(2):
        x, y = _data(rank, t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[:, :5], False), y).backward()
        opt.step()
    out["frozen kept"] = all(torch.equal(held[k], resumed._params["b.weight"][k]) for k in held)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("name, nonfinite", [("ef14", "raise"), ("ef21", "raise"), ("econtrol", None)])
def test_a_parameter_no_rank_used_keeps_its_state_under_the_hook(name, nonfinite):
    """DDP leaves the gradient of a parameter no rank used as it is: the hook puts its state back after the round
    (agreed per bucket), as the wrapper leaves it out, so the two trajectories agree; one used on one rank only
    counts as zero on the other, in both. The same with gradients as bucket views kept between steps (the
    estimate of an unused one is zero), and a parameter frozen when the hook was registered keeps its state."""
    for r in run_dist(_unused, 2, name, nonfinite):
        torch.testing.assert_close(r["hook"], r["opt"], rtol=1e-10, atol=1e-12)
        assert torch.equal(r["view"], r["hook"]) and torch.equal(r["late"], r["all"]) and r["frozen kept"]


def _joined(rank, world, case):
    """DDP's ``join()`` with uneven inputs, where rank 1 has no input at all in the first joined epoch after
    ``register`` or after a load: the replicas after it (and rank 0's parameters against a run in which rank 1 sends
    zero gradients)."""
    results = {}
    for mode in ("join", "zeros"):
        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)))
        state = tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.1)), min_compression_rate=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(100 + rank)
        xs = [torch.randn(8, 16, generator=g) for _ in range(5)]

        def step(x, zero=False, model=model, opt=opt):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            (loss * 0 if zero else loss).backward()
            opt.step()

        if case == "after a load":
            with model.join():
                for x in xs[:2]:
                    step(x)
            state.load_state_dict(state.state_dict())
        mine = xs[2:] if rank == 0 else []
        if mode == "join":
            with model.join():
                for x in mine:
                    step(x)
        else:  # rank 1 takes part with zero gradients instead: what DDP's join shadows
            for x in xs[2:]:
                step(x, zero=rank == 1)
        results[mode] = [p.detach().clone() for p in model.parameters()]
    return results


@pytest.mark.dist
@pytest.mark.parametrize("case", ["after register", "after a load"])
def test_join_with_a_rank_that_has_no_input_finishes_with_the_replicas_equal(case):
    """It hung: the ranks' agreement ran in the forward pre-hook, and a rank out of inputs runs no forward (DDP's
    join shadows only the backward's rounds). Bounded by a 20 s process-group timeout."""
    out = run_dist_faults(_joined, 2, case, report={0, 1}, pg_timeout=20.0, wait=90.0)
    assert set(out) == {0, 1}, out
    for mode in ("join", "zeros"):
        assert all(torch.equal(a, b) for a, b in zip(out[0][mode], out[1][mode])), mode
    assert all(torch.equal(a, b) for a, b in zip(out[0]["join"], out[0]["zeros"]))
