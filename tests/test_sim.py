"""simulate() against the float64 references of tests/refs.py, and the identities of the papers."""

import re

import numpy as np
import pytest
import torch

import torchkit as tk
from tests.methods import METHODS as REGISTRY
from tests.methods import factories, reference_kwargs
from tests.refs import logreg_problem, run_reference
from torchkit.sim import LogisticRegression, load_libsvm, simulate

N, STEPS, LR, K = 4, 25, 0.5, 3


def _sim_problem():
    A, y, grad_np = logreg_problem(n=N)
    prob = LogisticRegression(torch.tensor(A), torch.tensor(y), N)
    return prob, grad_np


METHODS = factories(lambda: tk.TopK(K), n_workers=N)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_simulate_matches_float64_reference_step_by_step(method):
    prob, grad_np = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    ref = REGISTRY[method].reference
    xs = run_reference(ref, grad_np, x0.numpy(), n=N, steps=STEPS, lr=LR, k=K, **reference_kwargs(method, N))
    for t in (1, 2, 7, STEPS):
        res = simulate(METHODS[method](), prob.grad_fn, x0, n_workers=N, steps=t, lr=LR)
        np.testing.assert_allclose(res.x.numpy(), xs[t], rtol=1e-10, atol=1e-12)
    ref_norms = [float((grad_np(x).mean(0) ** 2).sum()) for x in xs]
    np.testing.assert_allclose(res.grad_norm_sq.numpy(), ref_norms, rtol=1e-9)
    assert res.grad_norm_sq.numel() == STEPS + 1


def test_logreg_gradient_matches_autograd():
    prob, grad_np = _sim_problem()
    x = torch.randn(prob.d, dtype=torch.float64)
    np.testing.assert_allclose(prob.grad_fn(x).numpy(), grad_np(x.numpy()), rtol=1e-12)
    xr = x.clone().requires_grad_(True)
    a, b = prob.bounds[0]
    f0 = LogisticRegression(prob.A[a:b], prob.y[a:b], 1).loss
    z = -prob.y[a:b] * (prob.A[a:b] @ xr)
    val = torch.nn.functional.softplus(z).mean() + 0.1 * (xr * xr / (1 + xr * xr)).sum()
    (g,) = torch.autograd.grad(val, xr)
    assert f0(x) == pytest.approx(float(val.detach()))
    torch.testing.assert_close(prob.grad_fn(x)[0], g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [tk.EF14, tk.EF21, lambda c: tk.EF21SGDM(c, eta=1.0), lambda c: tk.EControl(c, 0.5)])
def test_identity_compressor_is_gradient_descent(make, dtype):
    prob, grad_np = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    res = simulate(
        make(tk.Identity()),
        prob.grad_fn if dtype == torch.float64 else _f32(prob),
        x0.to(dtype),
        n_workers=N,
        steps=10,
        lr=LR,
    )
    x = x0.numpy()
    for _ in range(10):
        x = x - LR * grad_np(x).mean(0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(res.x.double().numpy(), x, rtol=tol, atol=tol)


def _f32(prob):
    return lambda x: prob.grad_fn(x.double()).float()


@pytest.mark.parametrize("comp", [tk.TopK(2), tk.RandK(2, seed=4), tk.ScaledSign()])
def test_econtrol_eta0_is_ef21(comp):
    prob, _ = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    a = simulate(tk.EControl(comp, eta=0.0), prob.grad_fn, x0, n_workers=N, steps=20, lr=LR)
    b = simulate(tk.EF21(comp), prob.grad_fn, x0, n_workers=N, steps=20, lr=LR)
    assert torch.equal(a.x, b.x) and torch.equal(a.grad_norm_sq, b.grad_norm_sq)


def test_ef21sgdm_eta1_is_ef21():
    prob, _ = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    a = simulate(tk.EF21SGDM(tk.TopK(2), eta=1.0), prob.grad_fn, x0, n_workers=N, steps=20, lr=LR)
    b = simulate(tk.EF21(tk.TopK(2)), prob.grad_fn, x0, n_workers=N, steps=20, lr=LR)
    torch.testing.assert_close(a.x, b.x, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("init", ["full", "compressed", "zero"])
def test_ef21sgdm_with_momentum_from_zero_is_ef21_on_the_workers_momentum(init):
    """EF21-SGDM with momentum_init="zero" is LocalMomentum(EF21(C), 1 - eta) at eta times the step size, for every
    init: with "full", step 0 sets the shift to the momentum eta g^0 (it tracks it), not to g^0."""
    prob, _ = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    eta = 0.3
    a = simulate(tk.EF21SGDM(tk.TopK(2), eta=eta, init=init, momentum_init="zero"), prob.grad_fn, x0, n_workers=N,
                 steps=20, lr=LR)  # fmt: skip
    b = simulate(tk.LocalMomentum(tk.EF21(tk.TopK(2), init=init), 1 - eta), prob.grad_fn, x0, n_workers=N, steps=20,
                 lr=LR * eta)  # fmt: skip
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("comp", [tk.TopK(2), tk.ScaledSign()])
def test_ef21w_equals_ef21_for_positively_homogeneous_compressors(comp):
    prob, _ = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    w = tk.EF21W.from_smoothness(comp, prob.smoothness()[1])
    a = simulate(w, prob.grad_fn, x0, n_workers=N, steps=30, lr=LR)
    b = simulate(tk.EF21(comp), prob.grad_fn, x0, n_workers=N, steps=30, lr=LR)
    torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-12)
    assert not torch.equal(torch.tensor(w.weights), torch.full((N,), 1 / N))


def test_ef14_virtual_iterate_follows_gradient_descent():
    """x~_t = x_t - lr * mean_i e_i satisfies x~_{t+1} = x~_t - lr * mean_i g_i(x_t) exactly."""
    prob, _ = _sim_problem()
    fb = tk.EF14(tk.TopK(2))
    x = torch.randn(prob.d, dtype=torch.float64)
    state = fb.init_state(prob.d, rows=N, dtype=torch.float64)
    server = torch.zeros(prob.d, dtype=torch.float64)
    ex = tk.comm.LocalExchanger(N)
    virtual = x.clone()
    for t in range(30):
        g = prob.grad_fn(x)
        est, _ = tk.comm.run_round(fb, ex, state, server, g, t)
        x = x - LR * est
        virtual = virtual - LR * g.mean(0)
        torch.testing.assert_close(x - LR * state["error"].mean(0), virtual, rtol=1e-12, atol=1e-12)


def test_ef21_server_invariant():
    prob, _ = _sim_problem()
    fb = tk.EF21(tk.TopK(2))
    state = fb.init_state(prob.d, rows=N, dtype=torch.float64)
    server = torch.zeros(prob.d, dtype=torch.float64)
    x = torch.randn(prob.d, dtype=torch.float64)
    for t in range(15):
        est, _ = tk.comm.run_round(fb, tk.comm.LocalExchanger(N), state, server, prob.grad_fn(x), t)
        torch.testing.assert_close(est, state["shift"].mean(0), rtol=1e-12, atol=1e-14)
        x = x - LR * est


def test_ef21_init_variants_and_bits():
    prob, grad_np = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    for init in ("full", "zero"):
        xs = run_reference("ef21", grad_np, x0.numpy(), n=N, steps=6, lr=LR, k=K, init=init)
        res = simulate(tk.EF21(tk.TopK(K), init=init), prob.grad_fn, x0, n_workers=N, steps=6, lr=LR)
        np.testing.assert_allclose(res.x.numpy(), xs[-1], rtol=1e-10)
    zero = simulate(tk.EF21(tk.TopK(K), init="zero"), prob.grad_fn, x0, n_workers=N, steps=3, lr=LR)
    assert zero.bits.tolist() == [0, 0, 32 * K, 64 * K]
    full = simulate(tk.EF21(tk.TopK(K), init="full"), prob.grad_fn, x0, n_workers=N, steps=3, lr=LR)
    assert full.bits.tolist() == [0, 32 * prob.d, 32 * prob.d + 32 * K, 32 * prob.d + 64 * K]
    assert full.wire_bytes.tolist() == [0, 4 * prob.d, 4 * prob.d + 8 * K, 4 * prob.d + 16 * K]
    comp = simulate(tk.EF21(tk.TopK(K), init="compressed"), prob.grad_fn, x0, n_workers=N, steps=3, lr=LR)
    assert comp.bits.tolist() == [0, 32 * K, 64 * K, 96 * K]
    ef14 = simulate(tk.EF14(tk.ScaledSign()), prob.grad_fn, x0, n_workers=N, steps=2, lr=LR)
    assert ef14.bits.tolist() == [0, prob.d + 32, 2 * (prob.d + 32)]


def test_per_tensor_granularity_compresses_each_segment():
    prob, grad_np = _sim_problem()
    x0 = torch.randn(prob.d, dtype=torch.float64)
    segs = (5, 12)
    fb = tk.EF14(tk.TopK(ratio=0.2), granularity="tensor")
    res = simulate(fb, prob.grad_fn, x0, n_workers=N, steps=8, lr=LR, segments=segs)

    def comp(v):
        from tests.refs import topk_np

        return np.concatenate([topk_np(v[:5], 1), topk_np(v[5:], 3)])

    xs = run_reference("ef14", grad_np, x0.numpy(), n=N, steps=8, lr=LR, k=None, comp=comp)
    np.testing.assert_allclose(res.x.numpy(), xs[-1], rtol=1e-10)
    assert res.bits[1] == 32 * (1 + 3)


def test_libsvm_reader_and_mushrooms_smoothness(shared_data):
    A, y = load_libsvm(shared_data / "mushrooms.txt")
    assert A.shape == (8124, 112) and set(y.tolist()) == {-1.0, 1.0}
    prob = LogisticRegression(A, y, 20)
    L, L_i = prob.smoothness()
    assert len(L_i) == 20 and all(Li > 0.2 for Li in L_i) and L <= max(L_i) + 1e-9
    assert prob.bounds[-1] == (19 * 406, 8124)


def test_libsvm_errors(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        load_libsvm(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 3:0.5\nfoo bar\n")
    with pytest.raises(ValueError, match="bad.txt:2: not a LIBSVM line"):
        load_libsvm(bad)


def test_theory_stepsizes():
    gamma = tk.theory.ef21_stepsize(1.0, [1.0, 1.0, 100.0, 1.0], alpha=0.01)
    theta, beta = tk.theory.theta_beta(0.01)
    lqm = np.sqrt((3 + 100**2) / 4)
    assert gamma == pytest.approx(1 / (1 + lqm * np.sqrt(beta / theta)))
    gw = tk.theory.ef21_stepsize(1.0, [1.0, 1.0, 100.0, 1.0], alpha=0.01, weighted=True)
    assert gw == pytest.approx(1 / (1 + 103 / 4 * np.sqrt(beta / theta)))
    assert gw > gamma
    s = np.sqrt(beta / theta)
    assert tk.theory.ef21_stepsize_ratio(1.0, [1.0, 1.0, 100.0, 1.0], 0.01) == pytest.approx(
        (1 + lqm * s) / (1 + 103 / 4 * s)
    )
    assert tk.theory.ef21_stepsize(2.0, [3.0], alpha=1.0) == 0.5
    with pytest.raises(ValueError, match="alpha must be in"):
        tk.theory.theta_beta(0.0)
    with pytest.raises(ValueError, match="L must be positive"):
        tk.theory.ef21_stepsize(0.0, [1.0], 0.5)


def test_simulate_bad_input():
    prob, _ = _sim_problem()
    x0 = torch.zeros(prob.d, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_fn must return"):
        simulate(tk.EF21(tk.TopK(1)), prob.grad_fn, x0, n_workers=3, steps=2, lr=0.1)
    with pytest.raises(ValueError, match="EF21W has 2 weights but the run has 4 workers"):
        simulate(tk.EF21W(tk.TopK(1), [0.5, 0.5]), prob.grad_fn, x0, n_workers=4, steps=2, lr=0.1)
    with pytest.raises(ValueError, match="n_workers must be >= 1"):
        simulate(tk.EF21(tk.TopK(1)), prob.grad_fn, x0, n_workers=0, steps=2, lr=0.1)
    fb, d = tk.EF21(tk.TopK(1)), prob.d
    for kw, err, message in (
        (dict(lr="0.1"), TypeError, "lr must be a positive number or a callable"),
        (dict(lr=float("nan")), ValueError, "lr must be positive and finite, got nan"),
        (dict(segments=(2.0, d - 2.0)), TypeError, "segments' sizes must be an int, got float"),
        (dict(segments=(-1, d + 1)), ValueError, "segments' sizes must be >= 1, got -1"),
        (dict(stop_below="a"), TypeError, "stop_below must be a float or None, got str"),
    ):
        with pytest.raises(err, match=re.escape(message)):
            simulate(fb, prob.grad_fn, x0, n_workers=N, steps=2, **{"lr": 0.1, **kw})
    with pytest.raises(TypeError, match=r"feedback must be a torchkit feedback method \(tk.EF21\(...\)\), got TopK"):
        simulate(tk.TopK(1), prob.grad_fn, x0, n_workers=N, steps=2, lr=0.1)
    with pytest.raises(ValueError, match="grad_fn must return .* got list"):
        simulate(fb, lambda x: [0.0], x0, n_workers=N, steps=2, lr=0.1)
    for bad_lr in (-0.1, float("nan")):  # a schedule's values: it ran gradient ascent, or on to NaN, silently
        with pytest.raises(ValueError, match=re.escape(f"lr(2) must be finite and >= 0, got {bad_lr}")):
            simulate(fb, prob.grad_fn, x0, n_workers=N, steps=4, lr=lambda t, b=bad_lr: 0.1 if t < 2 else b)
    for x, what in ((x0.float(), "float32"), (torch.zeros(prob.d + 1, dtype=torch.float64), f"({prob.d + 1},)")):
        with pytest.raises(ValueError, match=r"x \(simulate's x0\) must be a vector of d = .*" + re.escape(what)):
            simulate(fb, prob.grad_fn, x, n_workers=N, steps=2, lr=0.1)  # it raised torch's addmv dtype error
    for n, err in (("4", TypeError), (2.0, TypeError), (0, ValueError)):
        with pytest.raises(err, match="n_workers must be"):
            tk.sim.LogisticRegression(prob.A, prob.y, n_workers=n)


def test_the_step_size_theory_takes_numbers_only():
    """Strings were parsed (L_i='23' read as [2, 3], alpha='0.1' as 0.1) and True was alpha 1; NumPy numbers,
    arrays and tensors are numbers."""
    import numpy as np

    for args, match in (
        ((2.7, "23", 0.1), "L_i must be a sequence"),
        ((1.0, 2.0, 0.1), "L_i must be a sequence"),
        ((1.0, [1.0], "0.1"), "alpha must be a real number, got str"),
        ((1.0, [1.0], True), "alpha must be a real number, got bool"),
        ((1.0, [1.0], tk.TopK(2)), r"alpha must be a real number \(a compressor's is compressor.alpha\(d\)\)"),
        (("1", [1.0], 0.1), "L must be a real number"),
        ((1.0, ["1"], 0.1), "L_i's entries must be a real number"),
    ):
        with pytest.raises(TypeError, match=match):
            tk.theory.ef21_stepsize(*args)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        tk.theory.ef21_lr_scale("0.01")
    want = tk.theory.ef21_stepsize(1.0, [1.0, 2.0], 0.1)
    assert tk.theory.ef21_stepsize(np.float64(1.0), np.array([1.0, 2.0]), np.float32(0.1)) == pytest.approx(want)
    assert tk.theory.ef21_stepsize(1.0, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.1) == want


def test_a_diverged_run_warns_and_an_integer_x0_is_refused():
    """Issue 28: an all-NaN grad_norm_sq came back without a word; an int64 x0 gave a raw dtype error."""
    import warnings as _w

    a = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    grad_fn = lambda x: a * x  # noqa: E731  f_i = 0.5 a_i x^2: lr 10 diverges
    with pytest.warns(RuntimeWarning, match=r"simulate: \|\|grad f\|\|\^2 is not finite from round \d+ on"):
        res = tk.sim.simulate(tk.EF21(tk.TopK(1)), grad_fn, torch.ones(2, dtype=torch.float64), n_workers=2,
                              steps=400, lr=10.0)  # fmt: skip
    assert not torch.isfinite(res.grad_norm_sq[-1])
    with _w.catch_warnings():
        _w.simplefilter("error")  # a run that trains says nothing
        tk.sim.simulate(tk.EF21(tk.TopK(1)), grad_fn, torch.ones(2, dtype=torch.float64), n_workers=2, steps=20, lr=0.1)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor .* got torch.int64"):
        tk.sim.simulate(tk.EF21(tk.TopK(1)), grad_fn, torch.ones(2, dtype=torch.int64), n_workers=2, steps=2, lr=0.1)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        tk.sim.simulate_local(
            tk.EF21(tk.TopK(1)), grad_fn, torch.ones(2, dtype=torch.int64), n_workers=2, rounds=1, sync_every=2,
            inner_optimizer=0.1,
        )  # fmt: skip


def test_make_classification_is_a_mushrooms_shaped_problem_that_trains():
    from torchkit.sim import make_classification

    A, y = make_classification(500, 40, seed=3)
    assert A.shape == (500, 40) and A.dtype == torch.float64 and set(A.unique().tolist()) == {0.0, 1.0}
    assert set(y.unique().tolist()) == {-1.0, 1.0} and 0.3 < (y > 0).double().mean() < 0.7
    assert torch.equal(make_classification(500, 40, seed=3)[0], A)  # seeded
    prob = LogisticRegression(A, y, n_workers=5)
    res = simulate(tk.EF21(tk.TopK(2)), prob.grad_fn, torch.zeros(40, dtype=torch.float64), n_workers=5, steps=300,
                   lr=16 * tk.theory.ef21_stepsize(*prob.smoothness(), alpha=2 / 40))  # fmt: skip
    assert res.grad_norm_sq[-1] < 1e-3 * res.grad_norm_sq[0]
    with pytest.raises(ValueError, match="density must be in"):
        make_classification(10, 4, density=0.0)


def test_a_logistic_regression_refuses_bounds_and_weights_that_give_wrong_gradients():
    """Found by an audit: a bound past the data cut a worker's slice short while its mean still divided by the
    bound's width (a gradient 19x too small), reversed or empty bounds gave zeros or NaN, and a NaN or negative
    ``lam`` was taken (a negative smoothness constant for the step size). Workers may share rows."""
    A, y = tk.sim.make_classification(200, 8)
    for bounds, words in [
        ([(0, 100), (100, 2000)], r"bounds\[1\] = \(100, 2000\) must be a non-empty slice of the 200 data rows"),
        ([(0, 100), (150, 100)], r"bounds\[1\] = \(150, 100\)"),
        ([(0, 100), (100, 100)], "non-empty"),
    ]:
        with pytest.raises(ValueError, match=words):
            LogisticRegression(A, y, n_workers=2, bounds=bounds)
    with pytest.raises(TypeError, match="bounds start must be an int"):
        LogisticRegression(A, y, n_workers=2, bounds=[(0.5, 100), (100, 200)])
    for lam in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="lam must be >= 0 and finite"):
            LogisticRegression(A, y, n_workers=2, lam=lam)
    with pytest.raises(TypeError, match="lam must be a float"):
        LogisticRegression(A, y, n_workers=2, lam="0.1")
    ok = LogisticRegression(A, y, n_workers=2, bounds=[(100, 200), (0, 100)])  # any order
    assert ok.grad_fn(torch.zeros(8, dtype=torch.float64)).shape == (2, 8)
    shared = LogisticRegression(A, y, n_workers=2, bounds=[(0, 200), (0, 200)])  # every worker on all the data
    g = shared.grad_fn(torch.ones(8, dtype=torch.float64))
    assert torch.equal(g[0], g[1])


def test_simulate_local_refuses_a_learning_rate_that_is_not_positive_and_finite():
    problem = LogisticRegression(*tk.sim.make_classification(40, 6), n_workers=2)
    for lr in (float("nan"), 0.0, float("inf"), -0.1):
        with pytest.raises(ValueError, match=r"inner_optimizer \(a learning rate\) must be positive and finite"):
            tk.sim.simulate_local(
                tk.EF14(tk.TopK(2)), problem.grad_fn, torch.zeros(6, dtype=torch.float64), n_workers=2, rounds=1,
                sync_every=2, inner_optimizer=lr,
            )  # fmt: skip


def test_the_step_size_keeps_its_digits_for_tiny_alpha():
    """``theta = 1 - sqrt(1 - alpha)`` cancelled: at alpha = 1e-12 the step was 9e-5 too large (the unsafe side),
    at 1e-17 it divided by zero (found by an audit). Against 50-digit decimals."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    for alpha in (0.5, 1e-3, 1e-9, 1e-12, 1e-16, 1e-17, 1.0):
        theta, beta = tk.theory.theta_beta(alpha)
        a = Decimal(alpha)
        exact_theta = 1 - (1 - a).sqrt()
        assert abs(Decimal(theta) - exact_theta) <= Decimal("4e-16") * exact_theta, alpha
        if alpha < 1:
            exact_beta = (1 - a) / exact_theta
            assert abs(Decimal(beta) - exact_beta) <= Decimal("4e-16") * exact_beta, alpha


def test_the_counters_are_exact_past_two_to_the_24():
    """The bits and bytes counters were float32 (torch's default for Python floats): each round of 1,000,033 bits
    counted as 1,000,024 to 1,000,036 once the total passed 2**24 (found by an audit)."""
    d = 1_000_001
    res = simulate(tk.EF14(tk.ScaledSign()), lambda x: x.expand(2, -1).clone(), torch.ones(d, dtype=torch.float64),
                   n_workers=2, steps=20, lr=0.1)  # fmt: skip
    assert res.bits.dtype == torch.float64 and res.wire_bytes.dtype == torch.float64
    assert torch.equal(res.bits.diff()[1:], torch.full((19,), float(d + 32), dtype=torch.float64))
