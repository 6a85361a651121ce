"""Every op and implementation against the plain-torch reference (random data, never zeros)."""

import ctypes
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkit.ops as ops
from torchkit.ops import _cuda, _ext, _reference, _select

CSRC = Path(__file__).resolve().parents[1] / "csrc"


HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def _built_and_poisoned():
    assert ops.build_extension(cuda=HAS_CUDA), (_ext.error(), _cuda.error())  # CI builds the csrc kernel here
    _select.POISON = True
    yield
    _select.POISON = False


def _impls():
    return ["reference", "cpp", "triton"] + (["cuda"] if HAS_CUDA else [])  # the CUDA C++ kernels need a GPU


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _skip_unsupported(impl, device):
    if impl == "cpp" and device != "cpu":
        pytest.skip("the csrc CPU kernel runs on CPU tensors")
    if impl == "cuda" and device != "cuda":
        pytest.skip("the CUDA C++ kernels run on CUDA tensors")
    if impl == "triton" and device == "cpu" and not INTERPRETED:
        pytest.skip("on a GPU machine Triton runs on CUDA tensors (the CPU case is the interpreter's)")


def _triton_device():
    return "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def _device_of(impl):
    return {"triton": _triton_device(), "cuda": "cuda"}.get(impl, "cpu")


GPU_KERNELS = ["triton"] + (["cuda"] if HAS_CUDA else [])
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


@pytest.mark.parametrize("impl", ["cpp"] + GPU_KERNELS)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_approx_mode_keeps_the_invariant(impl, kind):
    d, k = 50_001, 500
    dev = _device_of(impl)
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
    dev = _device_of(impl)
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


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("poison", ["none", "finite", "nan", "inf", "opposite infs"])
def test_accumulate_decodes_a_round_in_one_call(impl, zero, poison):
    """A round's whole decode in one op: ``zero`` starts from zeros instead of adding onto ``out``, and float64
    non-finite checks (one per worker) that do not sum to a finite value make every entry NaN; finite checks, even
    the largest, change nothing. Against a float64 decode written here; the implementations agree bit for bit."""
    dev = _device_of(impl)
    rows, k, d = 3, 50, 4099
    g = torch.Generator().manual_seed(7)
    values = torch.randn(rows, k, generator=g)
    indices = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(rows)]).int()
    scale = [0.25, 0.5, 2.0]
    out0 = torch.randn(d, generator=g)
    hit = torch.zeros(d, dtype=torch.bool)
    hit[indices.long().reshape(-1)] = True
    out0[(~hit).nonzero()[:5, 0]] = -0.0  # the sign of a zero that nothing adds to survives
    checks = {
        "none": None,
        "finite": torch.tensor([1e300, 3.0, -1e300], dtype=torch.float64),
        "nan": torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64),
        "inf": torch.tensor([float("inf"), 0.0, 0.0], dtype=torch.float64),
        "opposite infs": torch.tensor([float("inf"), -float("inf"), 0.0], dtype=torch.float64),
    }[poison]
    expect = torch.zeros(d, dtype=torch.float64) if zero else out0.double().clone()
    for w in range(rows):
        for j in range(k):
            expect[indices[w, j]] += float(values[w, j] * scale[w])
    if poison in ("nan", "inf", "opposite infs"):
        expect.fill_(float("nan"))
    poison = None
    if checks is not None:  # as the exchanger passes them: one per gathered row, a stride apart, in place
        rows_of_bytes = torch.zeros(rows, 3, dtype=torch.float64)
        rows_of_bytes[:, 2] = checks
        poison = rows_of_bytes.to(dev)[:, 2:]
    out = out0.clone().to(dev)
    ops.accumulate_(out, values.to(dev), indices.to(dev), scale, zero=zero, poison=poison, impl=impl)
    out = out.cpu()
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6, equal_nan=True)
    ref = out0.clone()
    _reference.accumulate_(ref, values, indices, scale, zero, checks)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    untouched = ~out.isnan() & ~hit  # (a NaN's sign bit is the implementation's)
    assert torch.equal(out[untouched].signbit(), ref[untouched].signbit())


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_accumulate_refuses_indices_outside_out_before_changing_it(impl):
    """An index past ``out`` (or below 0) left ``out`` zeroed or half added, then raised a torch error (found by an
    audit); now ``ValueError`` naming the indices, and ``out`` as it was."""
    for bad in (8, -1):
        out = torch.ones(8)
        with pytest.raises(ValueError, match=rf"indices must be in \[0, 8\) \(the length of out\), got {bad}"):
            ops.accumulate_(out, torch.ones(2, 3), torch.tensor([[0, 1, 2], [3, bad, 4]]), zero=True, impl=impl)
        assert torch.equal(out, torch.ones(8))


def test_accumulate_refuses_a_poison_that_is_not_float64_checks():
    out, values, indices = torch.zeros(5), torch.ones(1, 2), torch.tensor([[0, 1]])
    with pytest.raises(TypeError, match="poison"):
        ops.accumulate_(out, values, indices, poison=torch.zeros(1, dtype=torch.bool))
    with pytest.raises(TypeError, match="poison"):
        ops.accumulate_(out, values, indices, poison=1.0)
    with pytest.raises(TypeError, match="zero"):
        ops.accumulate_(out, values, indices, zero=1)
    for call in (ops.prepare_, functools.partial(ops.accumulate_, values=values, indices=indices)):
        with pytest.raises(TypeError, match="poison"):
            call(out, poison=torch.zeros(1))  # float32: not a check
        with pytest.raises(TypeError, match="zero"):
            call(out, zero=1)
        with pytest.raises(ValueError, match="poison is on meta"):
            call(out, poison=torch.zeros(1, dtype=torch.float64, device="meta"))
    out = torch.ones(5)  # nothing to add: zero and poison still apply
    ops.accumulate_(out, values[:, :0], indices[:, :0], zero=True)
    assert torch.equal(out, torch.zeros(5))
    ops.accumulate_(out, values[:, :0], indices[:, :0], poison=torch.tensor([float("inf")], dtype=torch.float64))
    assert out.isnan().all()


@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
@pytest.mark.parametrize("rows,d,k", [(1, 40, 40), (3, 1000, 7), (9, 4096, 123)])
def test_cpp_steps_on_rows_are_each_rows_step(method, rows, d, k):
    """A [rows, d] batch (a chunked TopK's full chunks, the simulator's workers) through the C++ kernel, as "auto"
    picks it on a CPU: every row is the 1-D step of that row (its own top-k, row-local int32 indices, ties to the
    lowest index), and the state rows are updated as the test's own statement of the update rule says."""
    g = torch.stack([_data(d + r, "ties" if r % 2 else "randn", "cpu")[:d] for r in range(rows)])
    e, h = torch.randn(2, rows, d, generator=torch.Generator().manual_seed(1))
    eta, e1, h1 = 0.3, e.clone(), h.clone()
    call = {
        "ef14": lambda g, e, h, **kw: ops.ef14_step_(g, e, k, **kw),
        "ef21": lambda g, e, h, **kw: ops.ef21_step_(g, h, k, **kw),
        "econtrol": lambda g, e, h, **kw: ops.econtrol_step_(g, e, h, k, eta, **kw),
    }[method]
    vals, idx = call(g, e1, h1)  # auto: the C++ kernel, batched
    assert vals.shape == idx.shape == (rows, k) and idx.dtype == torch.int32
    for r in range(rows):
        er, hr = e[r].clone(), h[r].clone()
        v1, i1 = call(g[r], er, hr, impl="cpp")  # the row alone
        assert torch.equal(vals[r], v1) and torch.equal(idx[r], i1)
        v, e2, h2 = _expected_after(method, g[r], e[r], h[r], idx[r].long(), eta)
        _check_selection(vals[r], idx[r], v, k)
        if e2 is not None:
            assert torch.equal(e1[r], e2)
        if h2 is not None:
            assert torch.equal(h1[r], h2)


def test_float64_uses_the_reference():
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
    with pytest.raises(RuntimeError, match="impl='cuda' runs on CUDA tensors only"):
        ops.topk(x, 2, impl="cuda")
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


def _cuobjdump():
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or (str(bundled) if bundled.exists() else None)


def _sass(binary: Path) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (neither on PATH nor in Triton's package)")
    proc = subprocess.run([tool, "-sass", str(binary)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def sm90_build(tmp_path_factory):
    """csrc/topk_ef_cuda.cu built for an H100/H200 with the exact nvcc command the loader runs: (library, ptxas log)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed on this machine")
    out = tmp_path_factory.mktemp("sm90") / "libtorchkit_cuda.so"
    proc = subprocess.run(_cuda.nvcc_command(out, "sm_90") + ["-Xptxas", "-v"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def test_cuda_sources_compile_for_sm90_without_fma_contraction(sm90_build):
    """No spills; EControl, scatter-add and the step's state update keep two roundings (no FFMA)."""
    out, log = sm90_build
    assert "spill stores" in log and " 0 bytes spill stores" in log
    assert "bytes spill stores" not in log.replace(" 0 bytes spill stores", "")
    sass = _sass(out)
    functions = sass.split("Function : ")[1:]
    names = [f.splitlines()[0] for f in functions]
    assert any("tk_select" in n for n in names) and any("tk_scatter_add" in n for n in names)
    assert any("tk_prepare" in n for n in names) and any("tk_post" in n for n in names)
    assert any("tk_predict" in n for n in names)  # the one pass's prediction
    assert any("tk_runs_kernel" in n for n in names) and any("tk_tiled_kernel" in n for n in names)  # tiled decode
    for f in functions:
        assert "FFMA" not in f, f"FFMA in {f.splitlines()[0]}"


@pytest.mark.parametrize(
    "d, k", [(1, 1), (1000, 10), (4096, 4096), (100_003, 1000), (10**8, 10**6), ((1 << 30) - 1, 7)]
)
def test_the_c_driver_takes_the_python_drivers_workspace_and_rejects_bad_arguments(sm90_build, d, k):
    """Host code of the sm_90 build, run here without a GPU: ``tk_step``'s workspace is the Python driver's zeroed
    words (three histograms, the scalars, the look-back words of each select pass: ``_select.run``, one pass or two)
    followed by room for ``capacity(d, k)`` candidate values and indices, each 16-byte aligned; the one pass's
    prediction asks the sample for the rank the Python driver does; a mode, gradient dtype or k out of range, a
    missing vector the mode needs, or EControl in one pass, is refused before any launch (cudaErrorInvalidValue, 1)."""
    lib = _cuda.open_library(sm90_build[0])
    block = lib.tk_block_elems()
    slots = lambda n: max(1, -(-n // block))  # noqa: E731
    head = (3 * _select.NBINS + _select.N_SCALARS) // 2
    for approx, one_pass in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cap = 0 if approx and not one_pass else _select.capacity(d, k)
        n_vec = 3 if one_pass else 1 if approx else 2
        zeroed = head + n_vec * slots(d) + (slots(cap) if cap else 0)
        room = 2 * (-(-cap // 4) * 2)  # int64 words for cap fp32 values and cap int32 indices, 16-byte aligned each
        words = lib.tk_step_words(d, k, approx, one_pass)
        assert zeroed + room <= words <= zeroed + room + 1
    for kk in {1, k, max(1, k // 100), d}:
        assert lib.tk_sample_need(d, kk) == _select.sample_need(d, kk, _select.SAMPLE), (d, kk)
    for mode, kk in ((_select.CAND, k), (-1, k), (_select.EF14, 0), (_select.EF14, d + 1)):
        assert lib.tk_step(mode, 0, None, None, None, 0.0, d, kk, 0, 0, None, None, None, None, 1, None) == 1
    p = 256  # a pointer value that is never dereferenced: each call is refused before any launch
    for mode, gdtype, e, h, one in ((_select.EF14, 0, None, p, 0), (_select.EF21, 0, p, None, 0),
                                    (_select.ECONTROL, 0, p, None, 0), (_select.TOPK, 3, None, None, 0),
                                    (_select.TOPK, 0, None, None, 0), (_select.ECONTROL, 0, p, p, 1)):  # fmt: skip
        g = None if (mode, gdtype) == (_select.TOPK, 0) else p
        assert lib.tk_step(mode, gdtype, g, e, h, 0.0, d, k, 0, one, None, None, None, None, 1, None) == 1


def test_the_c_decode_rejects_bad_arguments_before_any_launch(sm90_build):
    """Host code of the sm_90 build, run here without a GPU: ``tk_accumulate`` (a decode in one host call) refuses a
    negative count or stride and a missing pointer that a launch would read (cudaErrorInvalidValue, 1), before any
    CUDA call (there is no device here to launch on)."""
    lib = _cuda.open_library(sm90_build[0])
    p = 256  # never dereferenced
    scales = (ctypes.c_float * 2)(1.0, 1.0)
    good = dict(out=p, val=p, vs=10, idx=p, is_=10, scales=scales, n=2, k=10, checks=None, nc=0, cs=1, d=100, zero=0)
    bad = [dict(n=-1), dict(k=-1), dict(nc=-1), dict(d=-1), dict(vs=-1), dict(is_=-1), dict(cs=-1), dict(out=None),
           dict(nc=2), dict(val=None), dict(idx=None), dict(scales=None)]  # fmt: skip
    for change in bad:
        a = {**good, **change}
        rc = lib.tk_accumulate(a["out"], a["val"], a["vs"], a["idx"], a["is_"], a["scales"], a["n"], a["k"],
                               a["checks"], a["nc"], a["cs"], a["d"], a["zero"], None)  # fmt: skip
        assert rc == 1, change


def test_the_tiled_c_decode_rejects_bad_arguments_before_any_launch(sm90_build):
    """Host code of the sm_90 build, run here without a GPU: ``tk_accumulate_tiled`` (the decode in two launches)
    refuses what ``tk_accumulate`` refuses, and more than ``tk_tiled_rows()`` rows (64: the scales travel by value),
    no rows or entries, a missing table, spans that do not cover a row, no blocks (cudaErrorInvalidValue, 1)."""
    lib = _cuda.open_library(sm90_build[0])
    assert lib.tk_tiled_rows() == 64
    p = 256  # never dereferenced
    scales = (ctypes.c_float * 2)(1.0, 1.0)
    good = dict(out=p, val=p, vs=10, idx=p, is_=10, scales=scales, n=2, k=10, checks=None, nc=0, cs=1, d=100, zero=0,
                table=p, span=1024, spans=1, blocks=4)  # fmt: skip
    bad = [dict(n=0), dict(n=65), dict(k=0), dict(nc=-1), dict(d=0), dict(vs=-1), dict(is_=-1), dict(cs=-1),
           dict(out=None), dict(nc=2), dict(val=None), dict(idx=None), dict(scales=None), dict(table=None),
           dict(span=0), dict(spans=0), dict(k=3000, span=1024, spans=2), dict(blocks=0)]  # fmt: skip
    for change in bad:
        a = {**good, **change}
        rc = lib.tk_accumulate_tiled(a["out"], a["val"], a["vs"], a["idx"], a["is_"], a["scales"], a["n"], a["k"],
                                     a["checks"], a["nc"], a["cs"], a["d"], a["zero"], a["table"], a["span"],
                                     a["spans"], a["blocks"], None)  # fmt: skip
        assert rc == 1, change


@pytest.mark.timeout(300)
def test_triton_kernels_compile_for_sm90_without_fma_contraction():
    """Compile every kernel for an H100/H200 ahead of time (Triton's own ptxas, no GPU needed), with the options
    the launches pass, and read the SASS: no FFMA anywhere (the reference rounds each multiply and add), no spills.
    Runs in a subprocess: the interpreter this suite uses on CPU cannot compile."""
    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found (neither on PATH nor in Triton's package)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    # hist (EF14 twice) and select for 5 modes, each unpadded, with padded state, with padded g and state (top-k:
    # g only; candidates: none), the one pass's select for top-k, EF14 and EF21 with the same paddings, level 1's
    # ladder pass with the same paddings, its prediction for the 4 methods and the one pass's for 3 (exact and
    # approximate), the window check, the threshold step at its 5 levels, scatter-add, and the decode's first pass
    # (zeros, or out kept) with its checks, many small segments in one launch for 3 methods (exact with two
    # passes or one, approximate), and the tiled decode's two kernels (the runs table; the tiles, in 2 configurations)
    assert len(report) == 77
    for name, r in report.items():
        assert r["ffma"] == 0, f"FFMA in {name}"
        assert r["local_memory"] == 0, f"{name} spills to local memory"
        _check_vector_width(name, r)
        plain, _, pad = name.partition(" pad=")
        if pad:  # each padded operand's 8 scalar loads per thread became 2 of 128 bits, and nothing else changed
            assert report[plain]["ld"] - r["ld"] == 3 * r["ld128"], name


# what each pass over the method's vector reads: (g, number of state vectors); EF14's passes after the first and
# its select read v back from e
_READS = {
    "hist[0,False]": (1, 0),
    "select[0]": (1, 0),
    "hist[1,False]": (1, 1),
    "hist[1,True]": (0, 1),
    "select[1]": (0, 1),
    "hist[2,False]": (1, 1),
    "select[2]": (1, 1),
    "hist[3,False]": (1, 2),
    "select[3]": (1, 2),
    "one_pass[0]": (1, 0),
    "one_pass[1]": (1, 1),
    "one_pass[2]": (1, 1),
    **{f"ladder[{m}]": (1, n) for m, n in enumerate((0, 1, 1, 2))},
}


def _check_vector_width(name, r):
    """Issue 11 item 6: where the flat vectors own padding to a multiple of 16 elements, every operand the pass
    reads is loaded 128 bits at a time (8 entries per thread: two loads each) and EF14's and EControl's writes of e
    are 128-bit; without padding, no access is. The ladder's blocks hold 4 entries per thread: one load each."""
    kernel, _, pad = name.partition(" pad=")
    if kernel.startswith("threshold"):  # one program reading the 2048-bin histogram, 128 bits at a time
        return
    reads_g, n_state = _READS.get(kernel, (0, 0))
    per_thread = 1 if kernel.startswith("ladder") else 2
    want_ld = per_thread * (reads_g * ("g" in pad) + n_state * ("s" in pad))
    writes_e = kernel in ("hist[1,False]", "ladder[1]", "select[3]", "one_pass[1]")
    assert r["ld128"] == want_ld, f"{name}: {r['ld128']} 128-bit loads, expected {want_ld}"
    assert r["st128"] == (per_thread if writes_e and "s" in pad else 0), f"{name}: {r['st128']} 128-bit stores"


def _step(method, g, e, h, k, approx, impl):
    """One call of an op, ready to run."""
    if method == "topk":
        return functools.partial(ops.topk, g, k, impl=impl)
    if method == "ef14":
        return functools.partial(ops.ef14_step_, g, e, k, approx=approx, impl=impl)
    if method == "ef21":
        return functools.partial(ops.ef21_step_, g, h, k, approx=approx, impl=impl)
    return functools.partial(ops.econtrol_step_, g, e, h, k, 0.2, approx=approx, impl=impl)


def _count_host_reads(fn) -> list[str]:
    """Run fn and list every op that reads a device value on the host (item/tolist/int(), copies to the CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = str(func.overloadpacket)
            if name in ("aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero"):
                seen.append(name)
            devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.device.type == "cpu" and "cuda" in devs:
                seen.append(f"{name} to cpu")
            return out

    with Watch():
        fn()
    return seen


@pytest.mark.parametrize("impl", GPU_KERNELS)
@pytest.mark.parametrize(
    "method,approx", [("topk", False)] + [(m, a) for m in ("ef14", "ef21", "econtrol") for a in (False, True)]
)
def test_gpu_kernels_never_read_device_values_on_the_host(impl, approx, method):
    """Both modes, both the candidate and the re-read path: no item()/tolist()/copy to the host, ever."""
    dev = _device_of(impl)
    for kind in ("randn", "ties"):  # ties overflow the candidate buffer: the re-read path
        d, k = 30_001, 300
        g, e, h = _data(d, kind, dev), _data(d + 1, "randn", dev)[:d].contiguous(), _data(d + 2, "randn", dev)[:d]
        h = h.contiguous()
        assert _count_host_reads(_step(method, g, e, h, k, approx, impl)) == []


def _lowest_index_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """The selection rule, written out: largest |v| first, ties to the lower index (float64 keys, stable sort)."""
    order = torch.sort(-v.double().abs().cpu(), stable=True).indices
    return order[:k].sort().values


@pytest.mark.parametrize("impl", ["cpp"] + GPU_KERNELS)
@pytest.mark.parametrize("kind,d,k", [("randn", 70_001, 700), ("ties", 70_001, 700), ("ties", 5000, 4321)])
def test_exact_selection_is_largest_then_lowest_index(impl, kind, d, k):
    x = _data(d, kind, _device_of(impl))
    if kind == "ties":  # the k-th magnitude is tied and its bin overflows the candidate buffer
        kth = torch.topk(x.abs(), k).values[-1]
        assert int((x.abs() == kth).sum()) > 1
    _, idx = ops.topk(x, k, impl=impl)
    assert torch.equal(idx.long().sort().values.cpu(), _lowest_index_topk(x, k))


@pytest.mark.parametrize("impl", ["cpp"] + GPU_KERNELS)
def test_approx_mode_fills_the_threshold_bin_by_lowest_index(impl):
    d, k = 40_000, 1000
    dev = _device_of(impl)
    g, e = _data(d, "randn", dev), torch.zeros(d, device=dev)
    _, idx = ops.ef14_step_(g, e, k, approx=True, impl=impl)
    key = (g.float().cpu().view(torch.int32) & 0x7FFFFFFF) >> 20  # the level-1 bin of every entry
    thr = int(key[idx.long().cpu()].min())
    above = (key > thr).nonzero().flatten()
    in_bin = (key == thr).nonzero().flatten()[: k - above.numel()]
    assert torch.equal(idx.long().sort().values.cpu(), torch.cat([above, in_bin]).sort().values)


def _shuffled_program_order(monkeypatch, seed):
    """Make the interpreter run each grid's programs in a random order (as a GPU may schedule them)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx
    rng = torch.Generator().manual_seed(seed)
    perm = {}

    def set_grid_idx(x, y, z):
        n = builder.grid_dim[0]
        if n not in perm or x == 0:
            perm[n] = torch.randperm(n, generator=rng).tolist()
        real(perm[n][x], y, z)

    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)


@pytest.mark.parametrize("method", ["econtrol", "ef14"])  # two passes; one pass
@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_triton_result_does_not_depend_on_program_order(monkeypatch, approx, kind, method):
    """Five program orders (shuffled in the interpreter; on a GPU, five runs): the same values, indices, order
    and state, bit for bit."""
    dev = _triton_device()
    d, k = 200_003, 2000
    g = _data(d, kind, dev, torch.bfloat16)  # bf16: many ties at the k-th magnitude
    e0 = _data(d + 1, "randn", dev)[:d].contiguous()
    runs = []
    for seed in range(5):
        with monkeypatch.context() as m:
            if INTERPRETED:
                _shuffled_program_order(m, seed)
            e, h = e0.clone(), e0.clone() * 0.5
            if method == "econtrol":
                vals, idx = ops.econtrol_step_(g, e, h, k, 0.3, approx=approx, impl="triton")
            else:
                vals, idx = ops.ef14_step_(g, e, k, approx=approx, impl="triton")
            runs.append((vals.cpu(), idx.cpu(), e.cpu(), h.cpu()))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def _ladder_case(case, d, dev):
    """Gradients for the level-1 ladder: where the Triton prediction samples (every d/SAMPLE-th entry) and what the
    rest holds decide whether the k-th magnitude falls inside the predicted window."""
    from torchkit.ops._triton import ef

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(d, generator=gen)
    sampled = torch.arange(ef.SAMPLE, dtype=torch.int64) * d // ef.SAMPLE
    if case == "zeros":
        x.zero_()
    elif case == "window_low":  # the sample sees magnitudes near 1, the top-k sit ten octaves higher
        x = x * 0.01 + 1000.0
        x[sampled] = 1.0
    elif case == "window_high":  # the sample sees only huge entries, fewer of them than k
        x = x * 1e-3
        x[sampled] = 1000.0
    elif case == "nan":
        x[5] = float("nan")
    elif case == "many_nan":  # more NaNs than k: the window at its highest base, the NaN bin (2044) inside it
        x[::10] = float("nan")
    return x.to(dev)


@pytest.mark.parametrize("method", ["topk", "ef14"])
@pytest.mark.parametrize("case", ["randn", "zeros", "window_low", "window_high", "nan", "many_nan"])
def test_triton_level1_ladder_answers_as_the_full_histogram(method, case):
    """Issue 21 item 6: Triton's level 1 counts a ladder of 14 bins around a threshold predicted from a sample, plus
    one lump below and one above, instead of a 2048-bin tl.histogram; when the k-th key falls outside the window
    the full histogram runs (a device flag). The threshold step must then find the same bin, the same count above it
    and in it as from every key's bin counted in torch, the miss flag must be the one the sample predicts, and EF14's
    e must hold e + g once (the fallback reads it back, it does not add g again)."""
    from torchkit.ops._triton import ef

    d = 70_001
    k = 5000 if case == "window_high" else 700  # more than the sample's 4096 entries: the window sits too high
    dev = _triton_device()
    g = _ladder_case(case, d, dev)
    e0 = (torch.randn(d, generator=torch.Generator().manual_seed(3)) * 1e-6).to(dev)
    e = e0.clone()
    mode = _select.EF14 if method == "ef14" else _select.TOPK
    v = (e0 + g) if method == "ef14" else g
    ws = torch.zeros(3 * _select.NBINS + _select.N_SCALARS, dtype=torch.int32, device=dev)
    hist, scal = ws[: _select.NBINS], ws[3 * _select.NBINS :]
    cap = _select.capacity(d, k)
    level1 = _select.level1(hist, mode, d)
    ef._Launcher(g, e, e, k, 0.0).hist(scal, level1)
    ef._Launcher(g, e, e, k, 0.0).threshold(hist, scal, k, cap, 1)

    bins = (v.cpu().view(torch.int32) & 0x7FFFFFFF).long() >> 20
    counts = torch.bincount(bins, minlength=_select.NBINS)
    b = int(bins.sort(descending=True).values[k - 1])
    sample = bins[torch.arange(ef.SAMPLE, dtype=torch.int64) * d // ef.SAMPLE]
    need = -(-k * ef.SAMPLE // d)
    predicted = int(sample.sort(descending=True).values[need - 1])
    base = min(max(predicted - (ef.LADDER - 2) // 3, 0), 2049 - ef.LADDER)
    miss = not base <= b < base + ef.LADDER - 2
    assert miss == (case in ("window_low", "window_high"))  # both paths are exercised
    got = scal.cpu()
    assert int(got[_select.S_BASE]) == base and int(got[_select.S_MISS]) == int(miss)
    assert int(got[_select.S_B1]) == b
    assert int(got[_select.S_ABOVE1]) == int(counts[b + 1 :].sum())
    assert int(got[_select.S_N1]) == int(counts[b])
    if miss:  # the window was cleared before the full pass: every bin as counted in torch
        assert torch.equal(hist.cpu().long(), counts)
    else:  # the window's bins exact, everything below and above it in one bin each
        lumped = counts.clone()
        top = base + ef.LADDER - 2
        lumped[top] = counts[top:].sum()
        lumped[top + 1 :] = 0
        if base > 0:
            lumped[base - 1] = counts[:base].sum()
            lumped[: base - 1] = 0
        assert torch.equal(hist.cpu().long(), lumped)
    if method == "ef14":
        assert torch.equal(e.view(torch.int32), (e0 + g).view(torch.int32))  # bit for bit, the NaN too
    # and the whole op on this input selects what the CPU kernel selects (the GPU kernels order it their own way)
    runs = ((g, "triton"), (g.cpu(), "cpp"))
    (vals, idx), (rvals, ridx) = (_step(method, x, e0.to(x.device, copy=True), None, k, False, i)() for x, i in runs)
    order, rorder = idx.cpu().argsort(), ridx.argsort()
    assert torch.equal(idx.cpu()[order], ridx[rorder])
    assert torch.equal(vals.cpu()[order].view(torch.int32), rvals[rorder].view(torch.int32))


@pytest.mark.skipif(not INTERPRETED, reason="sets the interpreter's grid (one program)")
@pytest.mark.parametrize("kind", ["zeros", "randn"])
def test_triton_ladder_counters_do_not_overflow_over_many_blocks(monkeypatch, kind):
    """The ladder's byte-wide counters are unpacked every 255 blocks a program reads. One program over 300 blocks
    of 1024 entries: zeros put every entry of every block on one rung, so each byte reaches exactly 255 before the
    flush (one block more per flush would wrap it to 0); the counts must equal torch's."""
    from torchkit.ops._triton import ef

    monkeypatch.setattr(ef, "_programs", lambda nblk, dev: 1)
    monkeypatch.setattr(ef, "_block", lambda n, dev: 1024)
    d, k = 300 * 1024, 3000
    g = torch.zeros(d) if kind == "zeros" else torch.randn(d, generator=torch.Generator().manual_seed(1))
    ws = torch.zeros(3 * _select.NBINS + _select.N_SCALARS, dtype=torch.int32)
    hist, scal = ws[: _select.NBINS], ws[3 * _select.NBINS :]
    level1 = _select.level1(hist, _select.TOPK, d)
    ef._Launcher(g, g, g, k, 0.0).hist(scal, level1)
    assert int(scal[_select.S_MISS]) == 0
    counts = torch.bincount((g.view(torch.int32) & 0x7FFFFFFF).long() >> 20, minlength=_select.NBINS)
    base, top = int(scal[_select.S_BASE]), int(scal[_select.S_BASE]) + ef.LADDER - 2
    assert int(hist[top]) == int(counts[top:].sum()) and torch.equal(hist[base:top].long(), counts[base:top])
    assert int(hist.sum()) == d


@pytest.mark.skipif(not INTERPRETED, reason="launches one program in the interpreter")
def test_triton_ladder_counts_the_top_byte_of_each_word():
    """Rungs 7 and 15 sit in the top byte of their 64-bit word, where the sign bit is: one program over 300
    blocks, every even entry on rung 7 and every odd one on rung 15, so each of those bytes reaches 255 before
    the flush."""
    from torchkit.ops._triton import ef

    d, base = 300 * 1024, 100
    keys = torch.where(torch.arange(d) % 2 == 0, (base + 6) << 20, (base + 20) << 20).to(torch.int32)
    x = keys.view(torch.float32)
    hist = torch.zeros(_select.NBINS, dtype=torch.int32)
    scal = torch.zeros(_select.N_SCALARS, dtype=torch.int32)
    scal[_select.S_BASE] = base
    ef._ladder_kernel[(1,)](x, x, x, hist, scal, d, 0.0, MODE=_select.TOPK, BLOCK=1024, LADDER=ef.LADDER)
    want = torch.zeros(_select.NBINS, dtype=torch.int32)
    want[base + 6] = want[base + 14] = d // 2  # rung 7: bin base + 6; rung 15: the lump above, bin base + 14
    assert torch.equal(hist, want)


def _kth_key(v: torch.Tensor, k: int) -> int:
    """The key (the bits of |v|) of the k-th largest |v|, counted in torch."""
    keys = (v.float().cpu().view(torch.int32) & 0x7FFFFFFF).long()
    return int(keys.sort(descending=True).values[k - 1])


def _hint_after(v: torch.Tensor, k: int, approx: bool) -> int:
    """What a step leaves for the next one pass: the k-th key (exact), its level-1 bin's lowest key (approximate)."""
    t = _kth_key(v, k)
    return t >> 20 << 20 if approx else t


# the one pass's cases: the hint (what the last step found) as the test sets it, and the input
ONE_PASS_CASES = {
    "cold start": (None, "randn"),  # no hint: the bin is predicted from a sample
    "warm": ("true", "randn"),  # the last step found this step's threshold: a margin below it holds the answer
    "hint too high": (0x7F000000, "randn"),  # fewer than k candidates: the vector is read again, the buffer refilled
    "hint too low": (1 << 23, "randn"),  # every entry a candidate, more than the buffer holds: read again, refilled
    "ties": (None, "ties"),  # the k-th magnitude's bin holds more than the buffer: the re-read path to the end
}


@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("method", ["topk", "ef14", "ef21"])
@pytest.mark.parametrize("case", list(ONE_PASS_CASES))
def test_triton_one_pass_takes_each_path_and_selects_what_the_cpu_kernel_does(monkeypatch, case, method, approx):
    """Issue 21 item 5 (design A of docs/kernels.md): top-k, EF14 and EF21 predict the level-1 bin and compact every
    entry from it up in one streaming pass. Whichever path the device flags then take (a hit: the rest on the
    candidates only; a rescan that refills the buffer; a rescan whose bin overflows it), the step must select the
    CPU kernel's entries with its values, leave its state, and keep the true level-1 bin as the next step's hint."""
    hint_set, kind = ONE_PASS_CASES[case]
    monkeypatch.setattr(_select, "GPU_ONE_PASS", True)  # (on CUDA tensors it is off by default)
    dev = _triton_device()
    d, k = 70_001, 700
    g = _data(d, kind, dev)
    e0, h0 = _data(d + 1, "randn", dev)[:d] * 0.1, _data(d + 2, "randn", dev)[:d] * 0.1
    mode = {"topk": _select.TOPK, "ef14": _select.EF14, "ef21": _select.EF21}[method]
    v = {"topk": g, "ef14": e0 + g, "ef21": g - h0}[method]
    approx = approx and method != "topk"  # top-k has no approximate mode
    after = _hint_after(v, k, approx)
    runs = []
    for x, impl in ((g, "triton"), (g.cpu().clone(), "cpp")):  # (top-k's hint is g's: not shared under the interpreter)
        e, h = e0.to(x.device, copy=True), h0.to(x.device, copy=True)
        trace = []
        if impl == "triton":
            hint = _select.hint_of(mode, x, e, h, k, approx=approx)
            hint.fill_(-1 if hint_set is None else after if hint_set == "true" else hint_set)
            monkeypatch.setattr(_select, "TRACE", trace)
        vals, idx = _step(method, x, e, h, k, approx, impl)()
        monkeypatch.setattr(_select, "TRACE", None)
        runs.append((vals.cpu(), idx.cpu(), e.cpu(), h.cpu(), trace))
    (vals, idx, e, h, trace), (rvals, ridx, re, rh, _) = runs
    order, rorder = idx.argsort(), ridx.argsort()
    assert torch.equal(idx[order], ridx[rorder])
    assert torch.equal(vals[order].view(torch.int32), rvals[rorder].view(torch.int32))
    assert torch.equal(e, re) and torch.equal(h, rh)
    # the one pass's output order on every path: exact, the entries above the k-th key, then its ties; approximate,
    # the entries above its bin, then the bin's; each in index order
    keys = (v.float().cpu().view(torch.int32) & 0x7FFFFFFF).long()[idx.long()]
    t = _kth_key(v, k)
    first = keys >> 20 > t >> 20 if approx else keys > t
    assert torch.equal(idx, torch.cat([idx[first].sort().values, idx[~first].sort().values]))
    scal = trace[0].cpu()
    hit, rescan, redo, over = (int(scal[s]) for s in (_select.S_HIT, _select.S_RESCAN, _select.S_REDO, _select.S_OVER))
    assert (hit, rescan) == ((1, 0) if case in ("cold start", "warm") else (0, 1))
    assert redo == int(case.startswith("hint")) and over == int(case == "ties")
    if case == "warm":  # a margin below the k-th key, or the threshold bin's lowest key
        assert int(scal[_select.S_LO]) == (after if approx else after - _select.MARGIN)
    assert int(hint.cpu()) == after


@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("method", ["topk", "ef14", "ef21"])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_triton_two_passes_still_select_what_the_cpu_kernel_does(monkeypatch, method, approx, kind):
    """The sequence the one pass replaced for top-k, EF14 and EF21 (still EControl's, and what the kernel benchmark
    times against it with ``--passes``) with the driver's flag off: the CPU kernel's entries, values and state."""
    monkeypatch.setattr(_select, "ONE_PASS", False)
    dev = _triton_device()
    d, k = 70_001, 700
    g = _data(d, kind, dev)
    e0, h0 = _data(d + 1, "randn", dev)[:d] * 0.1, _data(d + 2, "randn", dev)[:d] * 0.1
    trace = []
    monkeypatch.setattr(_select, "TRACE", trace)
    runs = []
    for x, impl in ((g, "triton"), (g.cpu(), "cpp")):
        e, h = e0.to(x.device, copy=True), h0.to(x.device, copy=True)
        vals, idx = _step(method, x, e, h, k, approx, impl)()
        runs.append((vals.cpu(), idx.cpu(), e.cpu(), h.cpu()))
    (vals, idx, e, h), (rvals, ridx, re, rh) = runs
    order, rorder = idx.argsort(), ridx.argsort()
    assert torch.equal(idx[order], ridx[rorder]) and torch.equal(vals[order], rvals[rorder])
    assert torch.equal(e, re) and torch.equal(h, rh)
    assert int(trace[0].cpu()[_select.S_CAPC]) == 0  # the one pass's prediction never ran


def test_the_kernel_benchmark_turns_the_sequence_flag_for_the_timed_call_only():
    """``bench_kernels.py --passes`` times the GPU kernels' one pass and the C++ kernel's two passes by turning each
    flag around the call; the flag is restored after it, also when the call raises."""
    from torchkit.apps import bench

    seen = []
    bench._toggled("triton", lambda: seen.append(_select.GPU_ONE_PASS))()
    bench._toggled("cpp", lambda: seen.append(_ext.ONE_PASS))()
    assert seen == [not _select.GPU_ONE_PASS, not _ext.ONE_PASS]

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench._toggled("cpp", fail)()
    assert _ext.ONE_PASS is True


def test_triton_one_pass_reads_the_vector_once_on_consecutive_steps(monkeypatch):
    """EF21 over 5 steps of a drifting gradient with the state it keeps: from the second step on the hint predicts
    the bin and every step is a hit (the one pass is the only pass over g and h); each step's selection is the CPU
    kernel's."""
    monkeypatch.setattr(_select, "GPU_ONE_PASS", True)  # (on CUDA tensors it is off by default)
    dev = _triton_device()
    d, k = 100_003, 1000
    h, rh = torch.zeros(d, device=dev), torch.zeros(d)
    _select.hint_of(_select.EF21, h, None, h, k).fill_(-1)  # not one left by an earlier buffer at this address
    trace = []
    _select.TRACE = trace
    try:
        for step in range(5):
            g = _data(d + step, "randn", dev)[:d] * (1.0 + 0.05 * step)
            vals, idx = ops.ef21_step_(g, h, k, impl="triton")
            rvals, ridx = ops.ef21_step_(g.cpu(), rh, k, impl="cpp")
            assert torch.equal(idx.cpu().sort().values, ridx.sort().values) and torch.equal(h.cpu(), rh)
    finally:
        _select.TRACE = None
    assert [int(s[_select.S_HIT]) for s in trace] == [1] * 5
    assert all(int(s[_select.S_LO]) == int(prev[_select.S_T]) - _select.MARGIN for prev, s in zip(trace, trace[1:]))


@pytest.mark.parametrize("impl", ["triton"] + (["cuda"] if HAS_CUDA else []))
def test_float64_goes_to_the_reference(impl):
    dev = _device_of(impl)
    x = _data(1001, "randn", dev).double()
    e, e_ref = torch.randn(1001, dtype=torch.float64, device=dev), None
    e_ref = e.clone()
    vals, idx = ops.topk(x, 10, impl=impl)
    assert vals.dtype == torch.float64 and torch.equal(vals, x[idx.long()])
    for _ in range(2):  # the second step used to fail on fp64 state
        v1, i1 = ops.ef14_step_(x, e, 10, impl=impl)
        v2, i2 = _reference.ef14_step_(x, e_ref, 10)
        assert torch.equal(e, e_ref) and v1.dtype == torch.float64


# ------------------------------------------------------------------------------- padded flat vectors (item 6)
def _padded_copy(t, tail):
    """``t`` in a :func:`ops.padded_zeros` buffer whose padding holds ``tail`` (garbage the kernels must ignore)."""
    p = ops.padded_zeros(t.numel(), dtype=t.dtype, device=t.device).copy_(t)
    p._base[t.numel() :] = tail
    assert ops.owns_padding(p) and p._base.numel() % ops.PAD == 0
    return p


@pytest.mark.parametrize("impl", GPU_KERNELS)
@pytest.mark.parametrize("pad", ["s", "gs"])
@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("method", ["topk", "ef14", "ef21", "econtrol"])
@pytest.mark.parametrize("kind", ["randn", "zeros"])
def test_padded_vectors_select_and_update_as_plain_ones(impl, pad, approx, method, kind):
    """Launches over the padded length (the kernels read and overwrite the tail) select the same entries and leave
    the same state as plain vectors, bit for bit, even with NaN and huge values in the padding (NaN ranks above
    every number) and with an all-zero vector and k = d, where every entry ties with the zero padding."""
    if method == "topk" and pad == "s":
        pytest.skip("top-k has no state to pad")
    dev = _device_of(impl)
    d = 1003  # 13 entries of padding
    g = _data(d, "randn", dev) if kind == "randn" else torch.zeros(d, device=dev)
    e0, h0 = (torch.zeros(d, device=dev) if kind == "zeros" else _data(d + 1, "randn", dev)[:d] * s for s in (1, 0.5))
    k = 50 if kind == "randn" else d
    runs = []
    for padded in (False, True):
        gg = _padded_copy(g, float("nan")) if padded and "g" in pad else g.clone()
        e, h = (_padded_copy(t, torch.tensor([1e30, float("nan")]).repeat(8)[: 16 - d % 16]) for t in (e0, h0))
        if not (padded and "s" in pad):
            e, h = e.clone(), h.clone()
        vals, idx = _step(method, gg, e, h, k, approx, impl)()
        assert int(idx.max()) < d
        runs.append((vals.cpu(), idx.cpu(), e.cpu(), h.cpu()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    if kind == "zeros":
        assert torch.equal(runs[1][1].long().sort().values, torch.arange(d))


@pytest.mark.parametrize("impl", GPU_KERNELS)
def test_only_the_padded_vector_itself_owns_its_padding(impl):
    """A shorter view at the same address, a clone, a deep copy or an unpickled copy is an ordinary tensor: the
    kernels never write past its end (here the EF14 pass that stores v = e + g over the launch length)."""
    import copy
    import gc
    import pickle

    dev = _device_of(impl)
    n = 100
    e = ops.padded_zeros(n, device=dev)
    e._base[n - 1 :] = 7.0  # the last entry and the padding
    shorter = e[: n - 1]
    assert ops.owns_padding(e) and not ops.owns_padding(shorter)
    assert not any(ops.owns_padding(c) for c in (e.clone(), copy.deepcopy(e), pickle.loads(pickle.dumps(e))))
    g = _data(n - 1, "randn", dev)
    ops.ef14_step_(g, shorter, 5, impl=impl)
    assert torch.equal(e._base[n - 1 :].cpu(), torch.full((ops.PAD - n % ops.PAD + 1,), 7.0))
    ptr = e.data_ptr()
    assert ptr in ops._padding._owned
    del e, shorter
    gc.collect()
    assert ptr not in ops._padding._owned  # the registry forgets a freed buffer (other entries may go at this
    # collection too: buffers of earlier tests that were waiting for it, so the count is not compared)


def _tied_inputs(d):
    g = torch.Generator().manual_seed(5)
    r = torch.randn(d, generator=g)
    some = torch.zeros(d)
    some[torch.randperm(d, generator=g)[: d // 200]] = torch.randn(d // 200, generator=g)
    return {
        "zeros": torch.zeros(d),  # g - h = 0 everywhere, a bucket of zeros
        "all equal": torch.full((d,), -0.75),
        "mostly zero": some,  # fewer nonzeros than k: the rest are ties at 0
        "bf16-rounded": r.bfloat16().float(),  # few distinct values: heavy ties inside one bin
        "small integers": torch.randint(-3, 4, (d,), generator=g).float(),
        # one 11-bit sub-bin, keys apart in their low 9 bits: the second refining level
        "one sub-bin": 1.0 + torch.randint(0, 512, (d,), generator=g).float() * 2.0**-23,
    }


@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("method", ["topk", "ef14", "ef21"])
@pytest.mark.parametrize("case", list(ONE_PASS_CASES))
def test_cpp_one_pass_selects_what_the_two_passes_do(monkeypatch, case, method, approx):
    """The C++ CPU kernel's one pass (a hint kept per state buffer: what the last step found): whichever path the
    hint leads to (none: the two passes; the last step's threshold: the one pass; too high or too low: a one pass
    that finds too few or too many candidates, then the two passes over e as the pass left it), the step's values,
    indices in order and state are bit for bit those of the two passes alone, and the hint ends on what this step
    found (the k-th key, or when approximate its bin's lowest key)."""
    hint_set, kind = ONE_PASS_CASES[case]
    d, k = 70_001, 700
    g = _data(d, kind, "cpu")
    e0, h0 = _data(d + 1, "randn", "cpu")[:d] * 0.1, _data(d + 2, "randn", "cpu")[:d] * 0.1
    mode = {"topk": _select.TOPK, "ef14": _select.EF14, "ef21": _select.EF21}[method]
    v = {"topk": g, "ef14": e0 + g, "ef21": g - h0}[method]
    approx = approx and method != "topk"  # top-k has no approximate mode
    after = _hint_after(v, k, approx)
    runs = []
    for one_pass in (False, True):
        monkeypatch.setattr(_ext, "ONE_PASS", one_pass)
        e, h = e0.clone(), h0.clone()
        hint = _select.hint_of(mode, g, e, h, k, approx=approx)
        hint.fill_(-1 if hint_set is None else after if hint_set == "true" else hint_set)
        before = _ext._module.one_pass_counts()
        vals, idx = _step(method, g, e, h, k, approx, "cpp")()
        hits, misses = (a - b for a, b in zip(_ext._module.one_pass_counts(), before))
        runs.append((vals, idx, e, h))
        if one_pass:  # after too few, the next step starts two margins lower; too many from a stale hint: no back-off
            assert int(hint) == (after - 2 * _select.MARGIN if case == "hint too high" else after)
            want = (0, 0) if hint_set is None else (1, 0) if hint_set == "true" else (0, 1)
            assert (hits, misses) == want, case
        else:
            assert (hits, misses) == (0, 0)
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a, b.view(torch.int32)
                           if b.is_floating_point() else b)  # fmt: skip


def test_cpp_one_pass_hits_on_consecutive_steps_of_a_training_state():
    """Five EF14 steps of a drifting gradient on one error buffer: the first runs the two passes and leaves the hint,
    the next four take the one pass; each step's result is the reference's."""
    d, k = 200_003, 2000
    e, re = torch.zeros(d), torch.zeros(d)
    _select.hint_of(_select.EF14, e, e, None, k).fill_(-1)  # not one left by an earlier buffer at this address
    before = _ext._module.one_pass_counts()
    for step in range(5):
        g = _data(d + step, "randn", "cpu")[:d] * (1.0 + 0.05 * step)
        vals, idx = ops.ef14_step_(g, e, k, impl="cpp")
        rvals, ridx = _reference.ef14_step_(g, re, k)
        assert torch.equal(idx.sort().values, ridx.int().sort().values) and torch.equal(e, re)
    hits, misses = (a - b for a, b in zip(_ext._module.one_pass_counts(), before))
    assert (hits, misses) == (4, 0)


def test_a_hint_first_asked_for_in_a_graph_capture_is_not_written(monkeypatch):
    """A fill of a new hint inside a CUDA graph's capture would be captured and rerun at every replay (every replay
    would start cold). With a capture in progress (simulated): a new slot of the pool is handed out without any
    operation that writes memory, a reused slot keeps what it held (a hint is only a prediction), and without a pool
    the capture gets a hint for that call only instead of making the pool in the graph's memory. Outside a capture
    a slot starts at -1."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for name in ("_POOLS", "_NEXT", "_HINTS"):
        monkeypatch.setattr(_select, name, {})
    a, b, c, d = (torch.randn(1000) for _ in range(4))
    capturing = [True]
    monkeypatch.setattr(_select, "_capturing", lambda dev: capturing[0])
    assert _select.hint_of(_select.TOPK, a, None, None, 10).tolist() == [-1]
    assert not _select._POOLS and not _select._HINTS  # for that call only: no pool made in the graph's memory

    capturing[0] = False
    _select.hint_of(_select.TOPK, a, None, None, 10).fill_(1234)  # the pool, slot 0: what a step left
    capturing[0] = True
    with Seen() as seen:
        fresh = _select.hint_of(_select.TOPK, b, None, None, 10)
    assert fresh.tolist() == [-1] and not {"full", "fill_", "fill", "copy_", "zero_"} & set(seen.names), seen.names
    _select._NEXT[a.device] = _select.POOL  # used up: the next hint reuses slot 0
    assert _select.hint_of(_select.TOPK, c, None, None, 10).tolist() == [1234]
    capturing[0] = False
    _select._NEXT[a.device] = _select.POOL
    assert _select.hint_of(_select.TOPK, d, None, None, 10).tolist() == [-1]


def test_cpp_one_pass_is_not_tried_where_it_cannot_pay():
    """A hint whose lowest key would be 0 (more than d - k zeros) runs the two passes without trying the one pass; a
    threshold bin of heavy ties, which overflows the candidates, makes the next 16 steps take the two passes, then a
    cold step leaves a hint and the one pass is tried again. Every step selects what the two passes alone do."""
    d, k = 70_001, 700
    sparse = torch.zeros(d)
    sparse[:100] = torch.arange(1.0, 101.0)  # the k-th magnitude is 0
    hint = _select.hint_of(_select.TOPK, sparse, None, None, k)
    hint.fill_(0)
    before = _ext._module.one_pass_counts()
    ops.topk(sparse, k, impl="cpp")
    assert _ext._module.one_pass_counts() == before and int(hint) == 0  # not tried; the hint stays the k-th key
    ties = _data(d, "ties", "cpu")
    hint = _select.hint_of(_select.TOPK, ties, None, None, k)
    hint.fill_(_kth_key(ties, k))
    want = ops.topk(ties, k, impl="reference")[0].abs().sort().values
    attempts = []
    for _ in range(19):
        before = _ext._module.one_pass_counts()
        vals, _ = ops.topk(ties, k, impl="cpp")
        assert torch.equal(vals.abs().sort().values, want)
        attempts.append(sum(_ext._module.one_pass_counts()) - sum(before))
    assert attempts == [1] + [0] * 17 + [1]


@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("method", ["ef14", "ef21"])
def test_cpp_segments_keep_a_hint_per_segment(monkeypatch, method, approx):
    """A bucket compressed tensor by tensor (``segments_step_``, the DDP hook's per-tensor path) keeps one hint per
    segment: three steps of three segments run the two passes, then try the one pass in every segment, and select
    bit for bit what the two passes alone do."""
    sizes, ks = [40_000, 7, 90_001], [400, 3, 900]
    d = sum(sizes)
    mode = {"ef14": _select.EF14, "ef21": _select.EF21}[method]
    runs = []
    for one_pass in (False, True):
        monkeypatch.setattr(_ext, "ONE_PASS", one_pass)
        state = torch.zeros(d)
        error, shift = (state, None) if method == "ef14" else (None, state)
        if one_pass:
            _select.hint_of(mode, state, error, shift, sum(ks), len(sizes), approx).fill_(-1)
        before = _ext._module.one_pass_counts()
        outs = []
        for step in range(3):
            g = _data(d + step, "randn", "cpu")[:d]
            outs.append(ops.segments_step_(method, g, [state], sizes, ks, approx=approx, impl="cpp"))
        hits, misses = (a - b for a, b in zip(_ext._module.one_pass_counts(), before))
        if one_pass:  # steps 2 and 3 try it in the two large segments, and hit (the 7-entry one takes the small
            assert (hits, misses) == (4, 0)  # vectors' path, which keeps no hint)
        else:
            assert (hits, misses) == (0, 0)
        runs.append([*[t for o in outs for t in o], state])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("method", ["topk", "ef14", "ef21", "econtrol"])
def test_cpp_small_vectors_select_what_the_two_passes_do(method):
    """Small vectors with few entries to select take a path of their own in the C++ kernel (one pass and a heap of
    the k largest keys, no histograms to clear): the same values, indices in the same order and state as the two
    passes, bit for bit, exact and approximate, on random, tied, mostly-zero and bf16 input and a NaN, over three
    steps from the state each left; turned off through ``set_small_limit(0)``."""
    m = _ext._module
    g0 = torch.Generator().manual_seed(5)
    for d, k in [(1, 1), (7, 3), (7, 7), (100, 1), (1000, 10), (300, 40)]:
        for kind in ("random", "tied", "mostly zero", "bf16", "nan"):
            for approx in (False, True) if method != "topk" else (False,):
                x = torch.randn(d, generator=g0)
                x = {"tied": torch.full((d,), 0.5), "mostly zero": x.round() * (x.abs() > 1), "bf16": x.bfloat16()}.get(
                    kind, x
                )
                if kind == "nan":
                    x[d // 2] = float("nan")
                state = [torch.randn(d, generator=g0) if kind == "random" else torch.zeros(d) for _ in range(2)]
                runs = []
                for limit in (4096, 0):
                    was = m.set_small_limit(limit)
                    e, h = (t.clone() for t in state)
                    outs = []
                    for step in range(3):
                        g = x if step == 0 else x.roll(step)
                        outs += _cpp_step(m, method, g, e, h, k, approx)
                    m.set_small_limit(was)
                    runs.append([*outs, e, h])
                for a, b in zip(*runs):
                    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (
                        d, k, kind, approx,
                    )  # fmt: skip


@pytest.mark.parametrize("d", [16, 5000])  # the small path and the two passes
def test_cpp_selection_with_nans_of_different_payloads_stays_in_bounds(d):
    """The passes that recompute v may order an add's operands differently, and x86 keeps the first NaN operand's
    payload: a payload-dependent key moved a NaN to another bin between the counting pass and the writing pass, and
    EControl's two passes wrote past their output (heap corruption; found by a review). Every NaN is one key now:
    the lowest-indexed NaNs are taken, on both paths alike."""
    nan1 = torch.tensor([0x7FFF0000], dtype=torch.int32).view(torch.float32)
    e = nan1.repeat(d)
    e[::2] = float("nan")
    g = torch.empty(d, dtype=torch.bfloat16)
    g.view(torch.int16).fill_(0x7FC0)
    for k in (1, 3):
        v, i = ops.econtrol_step_(g, e.clone(), torch.zeros(d), k, eta=0.3, impl="cpp")
        assert i.tolist() == list(range(k)) and bool(v.isnan().all())
        v, i = ops.ef14_step_(g.float(), e.clone(), k, impl="cpp")
        assert i.tolist() == list(range(k)) and bool(v.isnan().all())


def _cpp_step(m, method, g, e, h, k, approx):
    """One call of the C++ module's step for ``method`` (no hint)."""
    if method == "topk":
        return m.topk(g, k, None)
    if method == "ef14":
        return m.ef14_step(g, e, k, approx, None)
    if method == "ef21":
        return m.ef21_step(g, h, k, approx, None)
    return m.econtrol_step(g, e, h, k, 0.3, approx)


@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("method", ["topk", "ef14", "ef21", "econtrol"])
def test_cpp_selection_on_heavy_ties_is_exact_lowest_index_first(method, approx):
    """Issue 21 item 1: a threshold bin of heavy ties is resolved without copying it (refining passes, per-chunk
    quotas); exact mode picks the k largest with ties to the lower index, approximate mode keeps its invariant."""
    d, k = 1 << 19, (1 << 19) // 100  # large enough for several chunks and the refining path
    for name, x in _tied_inputs(d).items():
        h = torch.zeros(d)
        if method == "topk":
            vals, idx = ops.topk(x, k, impl="cpp")
            v = x
        elif method == "ef14":
            e = torch.zeros(d)
            vals, idx = ops.ef14_step_(x, e, k, approx=approx, impl="cpp")
            v = x
        elif method == "ef21":
            h = torch.zeros(d)
            vals, idx = ops.ef21_step_(x, h, k, approx=approx, impl="cpp")
            v = x
        else:
            e = torch.zeros(d)
            vals, idx = ops.econtrol_step_(x, e, h, k, 0.5, approx=approx, impl="cpp")
            v = x  # e = 0: v = g - h = x
        i = idx.long()
        assert i.unique().numel() == k and torch.equal(vals, v[i]), name
        if approx and method != "topk":
            kth = torch.topk(v.abs(), k).values[-1]
            assert (v[i].abs() >= kth / 2 ** (1 / 8)).all(), name  # from the k-th value's bin or above
        else:
            assert torch.equal(i.sort().values, _lowest_index_topk(v, k)), name
