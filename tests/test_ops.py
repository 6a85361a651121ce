"""Every op and implementation against the plain-torch reference (random data, never zeros)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import torchkit.ops as ops
from torchkit.ops import _ext, _reference
from torchkit.ops._triton import ef as triton_ef

CSRC = Path(__file__).resolve().parents[1] / "csrc"


@pytest.fixture(scope="module", autouse=True)
def _built_and_poisoned():
    assert ops.build_extension(), _ext.error()  # CI builds the csrc extension here
    triton_ef.POISON = True
    yield
    triton_ef.POISON = False


def _impls():
    out = ["reference", "cpp", "triton"]
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _skip_unsupported(impl, device):
    if impl == "cpp" and device != "cpu":
        pytest.skip("the csrc CPU kernel runs on CPU tensors")
    if impl == "triton" and device == "cpu" and not INTERPRETED:
        pytest.skip("on a GPU machine Triton runs on CUDA tensors (the CPU case is the interpreter's)")


def _triton_device():
    return "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
SIZES = [(1, 1), (7, 7), (13, 1), (1001, 37), (4096, 4096), (65_537, 655)]


def _data(d, kind, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(d * 31 + len(kind))
    if kind == "ties":  # many equal magnitudes: the k-th value sits inside a tie
        x = torch.randint(-4, 5, (d,), generator=g).float()
        x[x == 0] = 0.5
    else:
        x = torch.randn(d, generator=g) * torch.exp(torch.randn(d, generator=g))
    return x.to(device=device, dtype=dtype)


def _check_selection(vals, idx, v, k):
    """Exactly k unique in-range indices; values are v there; magnitudes equal torch.topk's."""
    assert vals.shape == (k,) and idx.shape == (k,)
    assert idx.dtype == torch.int32
    i = idx.long()
    assert i.min() >= 0 and i.max() < v.numel() and i.unique().numel() == k
    assert torch.equal(vals.float(), v[i].float())
    ref = torch.topk(v.abs(), k).values
    assert torch.equal(vals.abs().float().sort().values, ref.float().sort().values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_topk(impl, d, k, kind, device):
    _skip_unsupported(impl, device)
    x = _data(d, kind, device)
    vals, idx = ops.topk(x, k, impl=impl)
    _check_selection(vals, idx, x, k)


def _expected_after(method, g, e, h, idx, eta):
    """State after the step, computed in float32 from the selected indices (the reference's update)."""
    g = g.float()
    i = idx.long()
    if method == "ef14":
        v = e + g
        e2 = v.clone()
        e2[i] = 0.0
        return v, e2, None
    if method == "ef21":
        v = g - h
        h2 = h.clone()
        h2.index_add_(0, i, v[i])
        return v, None, h2
    t = g - h
    v = e * eta + t
    e2 = e + t
    e2.index_add_(0, i, -v[i])
    h2 = h.clone()
    h2.index_add_(0, i, v[i])
    return v, e2, h2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
@pytest.mark.parametrize("d,k", SIZES)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_fused_steps_match_reference(impl, method, d, k, gdtype, device):
    _skip_unsupported(impl, device)
    g = _data(d, "randn", device, gdtype)
    e = _data(d + 1, "randn", device)[:d].contiguous()
    h = _data(d + 2, "randn", device)[:d].contiguous()
    eta = 0.3
    e1, h1 = e.clone(), h.clone()
    if method == "ef14":
        vals, idx = ops.ef14_step_(g, e1, k, impl=impl)
    elif method == "ef21":
        vals, idx = ops.ef21_step_(g, h1, k, impl=impl)
    else:
        vals, idx = ops.econtrol_step_(g, e1, h1, k, eta, impl=impl)
    v, e2, h2 = _expected_after(method, g, e, h, idx, eta)
    _check_selection(vals, idx, v, k)
    if e2 is not None:
        assert torch.equal(e1, e2)
    if h2 is not None:
        assert torch.equal(h1, h2)
    # the same call on the reference gives the same state (random data: no ties at the k-th value)
    e3, h3 = e.clone(), h.clone()
    ref = {
        "ef14": lambda: _reference.ef14_step_(g, e3, k),
        "ef21": lambda: _reference.ef21_step_(g, h3, k),
        "econtrol": lambda: _reference.econtrol_step_(g, e3, h3, k, eta),
    }[method]
    ref()
    assert torch.equal(e1, e3) and torch.equal(h1, h3)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_approx_mode_keeps_the_invariant(impl, kind):
    d, k = 50_001, 500
    dev = _triton_device() if impl == "triton" else "cpu"
    g, e = _data(d, kind, dev), _data(d + 1, "randn", dev)[:d].contiguous()
    v = e + g
    e1 = e.clone()
    vals, idx = ops.ef14_step_(g, e1, k, approx=True, impl=impl)
    i = idx.long()
    assert i.unique().numel() == k and torch.equal(vals, v[i])
    back = e1.clone()
    back[i] += vals
    assert torch.equal(back, v)  # whatever was not sent stays in the error
    kth = torch.topk(v.abs(), k).values[-1]
    must = (v.abs() > kth * 2 ** (1 / 8)).nonzero().flatten()  # more than one bin above the k-th
    assert torch.isin(must, i).all()


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("rows,k,d", [(1, 1, 1), (3, 5, 40), (8, 700, 70_001)])
def test_accumulate(impl, rows, k, d):
    dev = _triton_device() if impl == "triton" else "cpu"
    g = torch.Generator().manual_seed(rows + k)
    values = torch.randn(rows, k, generator=g)
    indices = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(rows)]).int()
    scale = torch.rand(rows, generator=g) + 0.1
    out0 = torch.randn(d, generator=g)  # a non-zero start: every touched element is read and written
    expect = out0.double().clone()
    for w in range(rows):
        for j in range(k):
            expect[indices[w, j]] += float(values[w, j].float() * scale[w].float())
    out = out0.clone().to(dev)
    ops.accumulate_(out, values.to(dev), indices.to(dev), scale, impl=impl)
    out = out.cpu()
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)
    ref = out0.clone()
    _reference.accumulate_(ref, values, indices, scale)
    assert torch.equal(out, ref)


def test_rows_and_float64_use_the_reference():
    x = torch.randn(4, 33, dtype=torch.float64)
    vals, idx = ops.topk(x, 5)
    assert vals.shape == (4, 5) and vals.dtype == torch.float64
    e = torch.randn(33, dtype=torch.float64)
    ops.ef14_step_(torch.randn(33, dtype=torch.float64), e, 3, impl="cpp")  # fp64 state: reference inside
    assert ops.index_dtype(2**31 - 1) == torch.int32 and ops.index_dtype(2**31) == torch.int64


def test_dispatch_errors(monkeypatch):
    x = torch.randn(10)
    with pytest.raises(ValueError, match="k must be <= d, got k=11 for d=10"):
        ops.topk(x, 11)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        ops.ef14_step_(x, torch.zeros(10), 0)
    with pytest.raises(ValueError, match="error must have the shape of grad"):
        ops.ef14_step_(x, torch.zeros(9), 2)
    with pytest.raises(TypeError, match="feedback state.*must be float32 or float64"):
        ops.ef21_step_(x, torch.zeros(10, dtype=torch.bfloat16), 2)
    with pytest.raises(ValueError, match="eta must be in"):
        ops.econtrol_step_(x, torch.zeros(10), torch.zeros(10), 2, eta=2.0)
    with pytest.raises(TypeError, match="dense"):
        ops.topk(x.to_sparse(), 2)
    with pytest.raises(ValueError, match="contiguous"):
        ops.topk(torch.randn(10, 2).t()[0], 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.topk(x, 2, impl="fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' requested for a cpu tensor"):
        ops.topk(x, 2, impl="triton")
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_build_dir", lambda: Path("/nonexistent/torchkit"))
    with pytest.raises(RuntimeError, match="impl='cpp' requested but the csrc extension is not built"):
        ops.topk(x, 2, impl="cpp")
    assert ops.available_impls("cpu") == ["reference"]


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed on this machine")
    out = tmp_path / "topk_ef_cuda.o"
    proc = subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-O3",
            "-gencode=arch=compute_90,code=sm_90",
            "-c",
            str(CSRC / "topk_ef_cuda.cu"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
def test_triton_approx_mode_never_reads_device_values_on_the_host(method, monkeypatch):
    """Approximate mode keeps the threshold on the device (no .tolist/.item/int of a tensor)."""
    d, k = 30_001, 300
    dev = _triton_device()
    g, e, h = _data(d, "randn", dev), _data(d + 1, "randn", dev)[:d].contiguous(), _data(d + 2, "randn", dev)[:d]
    h = h.contiguous()

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in approximate mode")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, refuse)
        if method == "ef14":
            vals, idx = ops.ef14_step_(g, e, k, approx=True, impl="triton")
        elif method == "ef21":
            vals, idx = ops.ef21_step_(g, h, k, approx=True, impl="triton")
        else:
            vals, idx = ops.econtrol_step_(g, e, h, k, 0.2, approx=True, impl="triton")
    assert idx.long().unique().numel() == k and torch.isfinite(vals).all()
