import math

import numpy as np
import pytest
import torch

import torchkit as tk
from torchkit.compress import SignMessage, _pack_bits, _unpack_bits


@pytest.mark.parametrize("d,k", [(1, 1), (7, 7), (1001, 1), (1001, 37), (4096, 410)])
def test_topk_contraction_bound_and_support(d, k):
    x = torch.randn(3, d, dtype=torch.float64)
    msg = tk.TopK(k).compress(x)
    dense = msg.to_dense()
    for r in range(3):
        err = (dense[r] - x[r]).pow(2).sum()
        assert err <= (1 - k / d) * x[r].pow(2).sum() + 1e-12
        kth = x[r].abs().sort(descending=True).values[k - 1]
        assert (msg.values[r].abs() >= kth).all()
        assert msg.indices[r].unique().numel() == k
    assert msg.indices.dtype == torch.int32
    assert tk.TopK(k).alpha(d) == k / d


def test_topk_ratio_and_wire_size():
    c = tk.TopK(ratio=0.01)
    assert c.k_for(1000) == 10 and c.k_for(1001) == 11 and c.k_for(5) == 1
    assert c.wire_bytes(1000) == 10 * (4 + 4)
    assert c.wire_bytes(1000, torch.bfloat16) == 10 * (2 + 4)
    assert c.value_bits(1000) == 320
    msg = c.compress(torch.randn(1000))
    assert msg.wire_bytes() == c.wire_bytes(1000)


def test_randk_unbiased_and_second_moment():
    d, k, trials = 50, 5, 4000
    x = torch.randn(d, dtype=torch.float64)
    c = tk.RandK(k, seed=3)
    acc = torch.zeros(d, dtype=torch.float64)
    sq = 0.0
    for t in range(trials):
        dense = c.compress(x, step=t).to_dense()[0]
        acc += dense
        sq += float(dense.pow(2).sum())
    mean = acc / trials
    # E[Q(x)] = x: the empirical mean is within a few standard errors of x
    assert (mean - x).norm() < 0.15 * x.norm()
    # E||Q(x)||^2 = (d/k) ||x||^2
    assert sq / trials == pytest.approx(d / k * float(x.pow(2).sum()), rel=0.05)
    assert c.omega(d) == d / k - 1
    contractive = c.contractive()
    assert not contractive.unbiased and contractive.alpha(d) == k / d


def test_randk_is_reproducible_per_worker_and_step():
    c = tk.RandK(4, seed=1)
    x = torch.randn(100)
    a = c.compress(x, worker=2, step=5).indices
    assert torch.equal(a, c.compress(x, worker=2, step=5).indices)
    assert not torch.equal(a, c.compress(x, worker=3, step=5).indices)


def test_scaled_sign_identity_and_packing():
    for d in (1, 8, 13, 100):
        x = torch.randn(2, d, dtype=torch.float64)
        x[0, 0] = 0.0  # sign(0) := +1 keeps the identity
        msg = tk.ScaledSign().compress(x)
        dense = msg.to_dense(torch.float64)
        for r in range(2):
            lhs = (dense[r] - x[r]).pow(2).sum()
            rhs = x[r].pow(2).sum() - x[r].abs().sum() ** 2 / d
            assert float(lhs) == pytest.approx(float(rhs), rel=1e-6, abs=1e-6)
        msg32 = tk.ScaledSign().compress(x.float())
        assert msg32.wire_bytes() == math.ceil(d / 8) + 4 == tk.ScaledSign().wire_bytes(d)
    mask = torch.rand(3, 21) > 0.5
    assert torch.equal(_unpack_bits(_pack_bits(mask), 21), mask)
    assert isinstance(msg, SignMessage)


def test_identity_is_exact():
    x = torch.randn(2, 9)
    assert torch.equal(tk.Identity().compress(x).to_dense(), x)


ERROR_CASES = [
    (lambda: tk.TopK(0), ValueError, "k must be >= 1, got 0"),
    (lambda: tk.TopK(-3), ValueError, "k must be >= 1"),
    (lambda: tk.TopK(2.5), TypeError, "k must be an int"),
    (lambda: tk.TopK(ratio=1.5), ValueError, r"ratio must be in \(0, 1\], got 1.5"),
    (lambda: tk.TopK(ratio=0.0), ValueError, "ratio must be in"),
    (lambda: tk.TopK(ratio=float("nan")), ValueError, "ratio must be in"),
    (lambda: tk.TopK(), ValueError, "exactly one of k and ratio"),
    (lambda: tk.TopK(3, ratio=0.1), ValueError, "exactly one of k and ratio"),
    (lambda: tk.TopK(np.float64(2.0)), TypeError, "k must be an int"),
    (lambda: tk.TopK(ratio="0.1"), TypeError, "ratio must be a float"),
    (lambda: tk.RandK(ratio=2.0), ValueError, "ratio must be in"),
    (lambda: tk.RandK(2, seed=-1), ValueError, "seed must be >= 0"),
    (lambda: tk.EF21("topk"), TypeError, "compressor must be a torchkit Compressor"),
    (lambda: tk.EF21(tk.TopK(1), init="warm"), ValueError, "init must be"),
    (lambda: tk.EControl(tk.TopK(1), eta=1.5), ValueError, r"eta must be in \[0, 1\], got 1.5"),
    (lambda: tk.EF21SGDM(tk.TopK(1), eta=-0.1), ValueError, "eta must be in"),
    (lambda: tk.EF21SGDM(tk.TopK(1), eta=0), ValueError, r"eta must be in \(0, 1\] for EF21SGDM"),
    (lambda: tk.LocalMomentum(tk.EF14(tk.TopK(1)), momentum=-0.1), ValueError, r"momentum must be in \[0, 1\), got"),
    (lambda: tk.EF21W(tk.TopK(1), [0.5, 0.6]), ValueError, "weights must sum to 1"),
    (lambda: tk.EF21W(tk.TopK(1), [1.5, -0.5]), ValueError, "weights must be positive"),
    (lambda: tk.EF14(tk.TopK(3), granularity="tensor"), ValueError, "granularity='tensor' needs"),
    (lambda: tk.EF14(tk.TopK(3), granularity="layer"), ValueError, "granularity must be"),
]


@pytest.mark.parametrize("make,exc,match", ERROR_CASES)
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_a_fixed_k_sends_a_shorter_vector_whole_and_numpy_numbers_are_numbers():
    """TopK(k) on fewer than k entries sends all of them (alpha 1), as the wrapper's group does on a step where a
    parameter got no gradient (it raised there, mid-training, where torch's optimizer skips the parameter); k and
    ratio may be NumPy numbers."""
    x = torch.randn(10, dtype=torch.float64)
    msg = tk.TopK(11).compress(x)
    assert sorted(msg.indices[0].tolist()) == list(range(10)) and tk.TopK(11).alpha(10) == 1.0
    assert tk.TopK(11).wire_bytes(10) == tk.TopK(10).wire_bytes(10)
    assert tk.TopK(np.int64(3)).k == 3 and type(tk.TopK(np.int64(3)).k) is int
    assert tk.TopK(ratio=np.float32(0.25)).k_for(8) == 2 and tk.RandK(np.int32(2)).k_for(5) == 2
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(3, 3)})  # 6 and 12 entries
    opt = tk.CompressedOptimizer(net.parameters(), torch.optim.SGD, feedback=tk.EF14(tk.TopK(k=10)), lr=0.1)
    for step in range(4):
        opt.zero_grad()
        loss = net["a"](torch.randn(4, 2)).square().sum()
        if step % 2 == 0:
            loss = loss + net["b"](torch.randn(4, 3)).square().sum()
        loss.backward()
        before = [p.detach().clone() for p in net["a"].parameters()]
        opt.step()  # steps 1 and 3: 6 entries with a gradient, fewer than k: all sent
        if step % 2:
            assert all(not torch.equal(a, p) for a, p in zip(before, net["a"].parameters()))


def test_the_nonfinite_check_is_exact_at_the_edges_of_the_range():
    """The non-finite check of a message (one float64 sum; fp64 values: 0 or NaN): NaN and Inf of either sign
    anywhere, alone or together, make it non-finite; the largest finite values, many of them, of one sign, do not
    (their float64 sum cannot overflow), and checks of several workers add up the same way."""
    from torchkit.ops import nonfinite_check, poison_of

    def bad(t):
        return not math.isfinite(float(nonfinite_check(t)))

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        big = torch.finfo(dtype).max
        x = torch.full((100_000,), big, dtype=dtype)
        assert not bad(x) and not bad(-x) and not bad(torch.zeros(7, dtype=dtype))
        assert float(poison_of(torch.stack([nonfinite_check(x)] * 4))) == 0.0  # four workers' checks: finite
        for value in (float("nan"), float("inf"), -float("inf")):
            y = torch.randn(1000).to(dtype)
            y[123] = value
            assert bad(y), (dtype, value)
            assert math.isnan(float(poison_of(torch.stack([nonfinite_check(x), nonfinite_check(y)]))))
        z = torch.randn(10).to(dtype)
        z[0], z[1] = float("inf"), -float("inf")  # their sum is NaN
        assert bad(z)
        assert bad(torch.randn(3, 5).to(dtype).fill_(float("nan")))


def test_randk_draws_from_int_steps_and_workers_only():
    """A tensor ``step`` hashed by identity (another draw each call, and other supports on each worker of a shared
    support), a float by value; both are refused, and NumPy ints draw what Python ints do."""
    import numpy as np

    comp = tk.RandK(3, seed=1)
    x = torch.arange(20.0)
    same = comp.compress(x, worker=1, step=5).indices
    assert torch.equal(comp.compress(x, worker=np.int64(1), step=np.int64(5)).indices, same)
    for bad in (torch.tensor(5), 5.0, True):
        with pytest.raises(TypeError, match="step must be an int"):
            comp.compress(x, step=bad)
    with pytest.raises(ValueError, match="worker must be >= 0"):
        comp.compress(x, worker=-1)


@pytest.mark.parametrize("make", [lambda: tk.TopK(2), lambda: tk.RandK(2), tk.ScaledSign, tk.Identity,
                                  lambda: tk.CyclicTopK(2)])  # fmt: skip
def test_compress_segments_refuses_segments_that_leave_the_tail_out(make):
    """Segments that add up to less than the vector silently left its tail out of the message (the two largest
    entries of this one, found by an audit); ``Feedback.worker_step`` refused them already."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 9.0, 8.0])
    with pytest.raises(ValueError, match=r"segments \(3, 3\) do not add up to the vector length 8"):
        make().compress_segments(x, (3, 3))
    with pytest.raises(TypeError, match="segment length must be an int"):
        make().compress_segments(x, (4.0, 4))


@pytest.mark.parametrize("make", [lambda: tk.TopK(2), lambda: tk.RandK(ratio=0.5), tk.ScaledSign, tk.Identity])
def test_the_accounting_refuses_a_length_that_is_not_a_positive_int(make):
    """``wire_bytes(d)`` and ``value_bits(d)`` returned -8 bytes for d = -100, 10.0 for 2.5 and '3333' for '3'
    (found by an audit), where ``alpha(d)`` refused them."""
    comp = make()
    for d, error in ((-100, ValueError), (0, ValueError), (2.5, TypeError), ("3", TypeError), (True, TypeError)):
        for fn in (comp.wire_bytes, comp.value_bits, comp.alpha):
            with pytest.raises(error, match="d must be"):
                fn(d)
    assert comp.wire_bytes(8) > 0 and comp.value_bits(8) > 0
