"""Deep Gradient Compression's techniques (issue 24). Density warm-up: a schedule every sparsifier and every front
end takes; messages change size between stages, the exchange, the byte counters and a resumed run follow, and every
method equals its float64 reference with k changing by the schedule. Local gradient clipping and momentum factor
masking in LocalMomentum: equal to a float64 reference of DGC's worker, and the same on every front end."""

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkit as tk
from tests.dist_utils import run_dist
from tests.methods import factories, reference_kwargs
from tests.refs import logreg_problem, run_reference
from torchkit.registry import METHODS as REGISTRY
from torchkit.sim import LogisticRegression, simulate

N, STEPS, LR = 3, 12, 0.5


def _warm(inner=None, steps=8):
    return tk.DensityWarmup(inner or tk.TopK(ratio=0.1), start=0.5, steps=steps, stages=4)


def test_the_density_falls_by_stages_to_the_ratio():
    w = tk.DensityWarmup(tk.TopK(ratio=0.01), start=0.25, steps=100)
    got = [w.ratio_at(t) for t in (0, 24, 25, 50, 75, 99, 100, 10**6)]
    want = [0.25, 0.25, 0.25 * 0.04**0.25, 0.25 * 0.04**0.5, 0.25 * 0.04**0.75, 0.25 * 0.04**0.75, 0.01, 0.01]
    assert got == pytest.approx(want, rel=1e-12)
    assert w.at(0).k_for(1000) == 250 and w.at(100).k_for(1000) == 10
    assert w.at(3) is w.at(20) and w.at(100) is w.compressor  # one compressor per stage
    assert w.alpha(1000) == pytest.approx(0.01) and w.wire_bytes(1000) == tk.TopK(ratio=0.01).wire_bytes(1000)
    fb = tk.EF14(w)
    assert [fb.wire_bytes((1000,), t) for t in (0, 30, 60, 99, 100)] == [2000, 896, 400, 184, 80]
    assert fb.at(0) is fb.at(10) and fb.at(0).compressor.ratio == 0.25 and fb.at(200).compressor is w.compressor
    assert w.config() == {"type": "DensityWarmup", "compressor": tk.TopK(ratio=0.01).config(), "start": 0.25,
                          "steps": 100, "stages": 4}  # fmt: skip
    assert repr(fb) == "EF14(DensityWarmup(TopK(ratio=0.01), start=0.25, steps=100, stages=4))"


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: tk.DensityWarmup(tk.TopK(5), steps=10), ValueError, "given by ratio"),
        (lambda: tk.DensityWarmup(tk.ScaledSign(), steps=10), TypeError, "compressor must be"),
        (lambda: tk.DensityWarmup(tk.TopK(ratio=0.3), start=0.2, steps=10), ValueError, "start must be above"),
        (lambda: tk.DensityWarmup(tk.TopK(ratio=0.01), steps=0), ValueError, "steps"),
        (lambda: tk.DensityWarmup(tk.TopK(ratio=0.01), steps=5, stages=0), ValueError, "stages"),
    ],
)
def test_bad_schedules_are_refused(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("method", sorted(factories(_warm, n_workers=N)))
def test_every_method_equals_its_float64_reference_with_k_by_the_schedule(method):
    A, y, grad_np = logreg_problem(n=N)
    prob = LogisticRegression(torch.tensor(A), torch.tensor(y), N)
    x0 = torch.randn(prob.d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = _warm()
    k_at = lambda t: tk.TopK(ratio=w.ratio_at(t)).k_for(prob.d)  # noqa: E731
    assert len({k_at(t) for t in range(STEPS)}) == 5  # the run crosses every stage into the ratio
    xs = run_reference(REGISTRY[method].reference, grad_np, x0.numpy(), n=N, steps=STEPS, lr=LR, k=None, k_at=k_at,
                       **reference_kwargs(method, N))  # fmt: skip
    res = simulate(factories(_warm, n_workers=N)[method](), prob.grad_fn, x0, n_workers=N, steps=STEPS, lr=LR)
    np.testing.assert_allclose(res.x.numpy(), xs[-1], rtol=1e-10, atol=1e-12)


def _dgc_reference(grads, x0, *, lr, mu, clip, sizes, k_at, steps):
    """DGC's worker in float64 numpy, written from the paper: per tensor, clip the gradient to ``clip``; momentum
    b = mu b + g (b = g at step 0); EF14 on b: u = TopK(e + b) per tensor, e = e + b - u; where u sent an entry, b
    restarts from zero; x -= lr * mean_i u_i."""
    x = np.array(x0, dtype=np.float64)
    n = grads(x).shape[0]
    b, e = np.zeros((n, x.size)), np.zeros((n, x.size))
    offs = np.cumsum([0, *sizes])
    for t in range(steps):
        G = np.asarray(grads(x), dtype=np.float64)
        for a, z in zip(offs[:-1], offs[1:]):
            norm = np.linalg.norm(G[:, a:z], axis=1, keepdims=True)
            G[:, a:z] *= np.minimum(1.0, clip / norm)
        b = G.copy() if t == 0 else mu * b + G
        u = np.zeros_like(b)
        for i in range(n):
            for a, z in zip(offs[:-1], offs[1:]):
                v = e[i, a:z] + b[i, a:z]
                keep = np.argsort(-np.abs(v), kind="stable")[: tk.TopK(ratio=k_at(t)).k_for(z - a)]
                u[i, a + keep] = v[keep]
        e = e + b - u
        b[u != 0] = 0.0
        x = x - lr * u.mean(0)
    return x


def test_local_clipping_and_momentum_masking_equal_dgc_written_from_the_paper():
    A, y, grad_np = logreg_problem(n=N, d=17)
    prob = LogisticRegression(torch.tensor(A), torch.tensor(y), N)
    x0 = torch.randn(prob.d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sizes = (7, 10)
    w = _warm(tk.TopK(ratio=0.2))
    fb = tk.LocalMomentum(tk.EF14(w, granularity="tensor"), 0.9, clip=0.05, mask=True)
    res = simulate(fb, prob.grad_fn, x0, n_workers=N, steps=STEPS, lr=LR, segments=sizes)
    want = _dgc_reference(grad_np, x0.numpy(), lr=LR, mu=0.9, clip=0.05, sizes=sizes, k_at=w.ratio_at, steps=STEPS)
    np.testing.assert_allclose(res.x.numpy(), want, rtol=1e-10, atol=1e-12)
    plain = simulate(tk.LocalMomentum(tk.EF14(w, granularity="tensor"), 0.9), prob.grad_fn, x0, n_workers=N,
                     steps=STEPS, lr=LR, segments=sizes).x  # fmt: skip
    assert not torch.allclose(plain, res.x)  # the options change the trajectory
    assert repr(fb).endswith("momentum=0.9, clip=0.05, mask=True)")
    assert "clip" not in tk.LocalMomentum(tk.EF14(tk.TopK(1))).config()  # older checkpoints compare equal
    for bad, error in (({"clip": 0.0}, ValueError), ({"clip": float("inf")}, ValueError), ({"mask": 1}, TypeError)):
        with pytest.raises(error, match=next(iter(bad))):
            tk.LocalMomentum(tk.EF14(tk.TopK(1)), 0.9, **bad)


def _masked_shift_reference(grads, x0, *, lr, mu, k, eta, steps):
    """Momentum factor masking in front of EF21 (``eta`` None) or EControl (``eta``), in float64 numpy, written for
    the test: b = mu b + g (b = g at step 0); EF21: u = TopK(b - h); EControl: u = TopK(eta e + b - h) and
    e = e + b - h - u; then h = h + u, and where u sent an entry b restarts from zero; x -= lr * mean_i h_i.
    ``init="compressed"``: step 0 is an ordinary round from h = e = 0, masked like any other."""
    x = np.array(x0, dtype=np.float64)
    n = grads(x).shape[0]
    b, h, e = (np.zeros((n, x.size)) for _ in range(3))
    for t in range(steps):
        G = np.asarray(grads(x), dtype=np.float64)
        b = G.copy() if t == 0 else mu * b + G
        v = b - h if eta is None else eta * e + b - h
        u = np.zeros_like(b)
        keep = [np.argsort(-np.abs(v[i]), kind="stable")[:k] for i in range(n)]
        for i in range(n):
            u[i, keep[i]] = v[i, keep[i]]
        if eta is not None:
            e = e + b - h - u
        h = h + u
        for i in range(n):
            b[i, keep[i]] = 0.0
        x = x - lr * h.mean(0)
    return x


def test_momentum_masking_in_front_of_the_ef21_family_equals_its_float64_reference():
    """Masking is not EF14's alone: EF21 and EControl on the masked worker momentum follow a float64 reference of
    the recursion, and EF21-SGDM's own ``mask=True`` gives LocalMomentum(EF21(C), 1 - eta, mask=True)'s iterates
    with the step size times eta (the identity its docstring states)."""
    A, y, grad_np = logreg_problem(n=N, d=17)
    prob = LogisticRegression(torch.tensor(A), torch.tensor(y), N)
    x0 = torch.randn(prob.d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    comp, k, mu = tk.TopK(3), 3, 0.8
    econtrol = tk.EControl(comp, eta=0.3, init="compressed")
    for method, eta in ((tk.EF21(comp, init="compressed"), None), (econtrol, 0.3)):
        fb = tk.LocalMomentum(method, mu, mask=True)
        res = simulate(fb, prob.grad_fn, x0, n_workers=N, steps=STEPS, lr=LR)
        want = _masked_shift_reference(grad_np, x0.numpy(), lr=LR, mu=mu, k=k, eta=eta, steps=STEPS)
        np.testing.assert_allclose(res.x.numpy(), want, rtol=1e-10, atol=1e-12, err_msg=repr(fb))
        plain = simulate(tk.LocalMomentum(method, mu), prob.grad_fn, x0, n_workers=N, steps=STEPS, lr=LR).x
        assert not torch.allclose(plain, res.x)  # masking changes the trajectory
    eta = 1 - mu
    sgdm = tk.EF21SGDM(comp, eta=eta, init="compressed", momentum_init="zero", mask=True)
    res = simulate(sgdm, prob.grad_fn, x0, n_workers=N, steps=STEPS, lr=LR / eta)
    want = _masked_shift_reference(grad_np, x0.numpy(), lr=LR, mu=mu, k=k, eta=None, steps=STEPS)
    np.testing.assert_allclose(res.x.numpy(), want, rtol=1e-10, atol=1e-12)
    assert repr(sgdm).endswith("mask=True)") and "mask" not in tk.EF21SGDM(comp).config()  # old checkpoints load
    with pytest.raises(TypeError, match="mask"):
        tk.EF21SGDM(comp, mask=1)


# ---------------------------------------------------------------------------------- front ends, resume
D, H = 40, 2
COMPRESSORS = {"topk": lambda: tk.TopK(ratio=0.05), "cyclic": lambda: tk.CyclicTopK(ratio=0.05)}


def _problem(n):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, D, generator=g, dtype=torch.float64) + 0.2, torch.randn(n, D, generator=g).double()


def _drive(opt, p, a, b, steps):
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (a * (p - b) ** 2).sum()).backward()
        opt.step()


def _dgc(inner):
    return tk.LocalMomentum(tk.EF14(_warm(inner, steps=6)), 0.9, clip=0.5, mask=True)


def _worker(rank, world, path):
    a, b = _problem(world)
    out = {}
    for c, inner in COMPRESSORS.items():
        make = factories(lambda inner=inner: _warm(inner(), steps=6), n_workers=world)
        for name, fb in make.items():
            p = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
            opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.2, feedback=fb())
            _drive(opt, p, a[rank], b[rank], 10)
            out["opt", c, name] = (p.detach().clone(), opt.metrics.bytes_sent)
        p = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
        opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.2, feedback=_dgc(inner()))
        _drive(opt, p, a[rank], b[rank], 10)
        out["dgc", c] = p.detach().clone()
        p = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
        opt = tk.LocalSGD([p], torch.optim.SGD, lr=0.05, feedback=make["ef14"](), sync_every=H)
        _drive(opt, p, a[rank], b[rank], 10)
        out["local", c] = p.detach().clone()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(D, 1).double())
    tk.ddp.register(model, tk.EF21(_warm(tk.TopK(ratio=0.05), steps=6)), min_compression_rate=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(8):
        sgd.zero_grad()
        model(a[rank : rank + 1] * (t + 1)).sum().backward()
        sgd.step()
    out["hook"] = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    # resume in the middle of the warm-up: 4 + 6 == 10 steps, the stage taken from the restored step
    fb = lambda: tk.EF21(_warm(tk.TopK(ratio=0.05), steps=8))  # noqa: E731
    p = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.2, feedback=fb())
    _drive(opt, p, a[rank], b[rank], 10)
    want = p.detach().clone()
    p = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.2, feedback=fb())
    _drive(opt, p, a[rank], b[rank], 4)
    torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, f"{path}/{rank}.pt")
    saved = torch.load(f"{path}/{rank}.pt", weights_only=False)
    p = torch.nn.Parameter(saved["p"])
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.2, feedback=fb())
    opt.load_state_dict(saved["opt"])
    _drive(opt, p, a[rank], b[rank], 6)
    out["resume"] = torch.equal(p.detach(), want)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_dist(_worker, 2, str(tmp_path_factory.mktemp("warm")))


@pytest.mark.dist
def test_every_front_end_equals_the_simulator_through_the_warmup(results):
    a, b = _problem(2)
    x0 = torch.zeros(D, dtype=torch.float64)
    for c, inner in COMPRESSORS.items():
        make = factories(lambda inner=inner: _warm(inner(), steps=6), n_workers=2)
        for name, fb in make.items():
            sim = simulate(fb(), lambda x: a * (x - b), x0, n_workers=2, steps=10, lr=0.2)
            for r in results:
                torch.testing.assert_close(r["opt", c, name][0], sim.x, rtol=1e-12, atol=1e-13, msg=f"{c} {name}")
        sim = simulate(_dgc(inner()), lambda x: a * (x - b), x0, n_workers=2, steps=10, lr=0.2)
        for r in results:
            torch.testing.assert_close(r["dgc", c], sim.x, rtol=1e-12, atol=1e-13, msg=c)
        want = tk.sim.simulate_local(make["ef14"](), lambda X: a * (X - b), x0, n_workers=2, rounds=10 // H,
                                     sync_every=H, inner_optimizer=0.05).x  # fmt: skip
        for r in results:
            torch.testing.assert_close(r["local", c], want, rtol=1e-12, atol=1e-13, msg=c)
    assert torch.equal(results[0]["hook"], results[1]["hook"])


@pytest.mark.dist
def test_bytes_follow_the_stages_and_a_resume_continues_in_its_stage(results):
    fb = factories(lambda: _warm(tk.TopK(ratio=0.05), steps=6), n_workers=2)["ef14"]()
    # fp64 values (the parameters' dtype); every round's message runs on to 8 bytes and its float64 non-finite check;
    # every step's agreement: float64 flags (non-finite, a gradient per parameter: one here, the options' digest as
    # d and -d)
    agreement = 8 * (1 + 1 + 2)
    want = sum(-(-fb.wire_bytes((D,), t, torch.float64) // 8) * 8 + 8 + agreement for t in range(10))
    assert [fb.wire_bytes((D,), t) for t in (0, 2, 4, 6)] == [8 * 20, 8 * 12, 8 * 7, 8 * 2]
    for r in results:
        assert r["opt", "topk", "ef14"][1] == want
        assert r["resume"]
