"""The library-backed LIBSVM reader and the per-worker gradient give exactly what the code they replaced gave."""

from pathlib import Path

import pytest
import torch

import torchkit as tk
from torchkit.sim import LogisticRegression, contiguous_split, libsvm, load_libsvm, simulate

# Edge cases in one file each: (text, expected A, expected y), read one-based unless an index 0 appears.
EDGE_CASES = {
    "one_based_pm1": ("+1 1:0.5 3:2\n-1 2:1\n", [[0.5, 0, 2], [0, 1, 0]], [1, -1]),
    "zero_one_labels": ("1 1:0.5\n0 3:-2.25\n1 2:1e-3\n", [[0.5, 0, 0], [0, 0, -2.25], [0, 1e-3, 0]], [1, -1, 1]),
    "one_two_labels": ("2 2:1\n1 1:1\n", [[0, 1], [1, 0]], [1, -1]),
    "zero_based": ("1 0:0.5 3:2\n-1 2:1\n", [[0.5, 0, 0, 2], [0, 0, 1, 0]], [1, -1]),
    "missing_features": ("1\n-1 4:7\n1 1:3\n", [[0, 0, 0, 0], [0, 0, 0, 7], [3, 0, 0, 0]], [1, -1, 1]),
    "comments_blank_lines": (
        "# header line\n\n1 1:1 2:2 # trailing comment\n   \n-1 2:3#no space\r\n\n",
        [[1, 2], [0, 3]],
        [1, -1],
    ),
    "qid_tabs_exponents": ("1 qid:4\t1:1E2 2:-.5\n-1 qid:4 3:+7e-1\n", [[100, -0.5, 0], [0, 0, 0.7]], [1, -1]),
    "unsorted_indices": ("1 3:1 1:2\n-1 2:4\n", [[2, 0, 1], [0, 4, 0]], [1, -1]),  # sklearn rejects; falls back
}


def _old_load_libsvm(path, dtype=torch.float64):
    """The reader torchkit shipped before scikit-learn (one-based indices, no comments), copied verbatim."""
    labels, rows, d = [], [], 0
    with Path(path).open() as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            labels.append(float(parts[0]))
            feats = []
            for item in parts[1:]:
                i, v = item.split(":", 1)
                feats.append((int(i), float(v)))
                d = max(d, int(i))
            rows.append(feats)
    A = torch.zeros(len(rows), d, dtype=dtype)
    for r, feats in enumerate(rows):
        for i, v in feats:
            A[r, i - 1] = v
    classes = sorted(set(labels))
    y = torch.tensor([1.0 if lab == classes[1] else -1.0 for lab in labels], dtype=dtype)
    return A, y


def _old_grad_fn(prob, x):
    """LogisticRegression.grad_fn before the per-worker products: an [m, d] product summed by index_add_."""
    owner = torch.empty(prob.A.shape[0], dtype=torch.long)
    for i, (a, b) in enumerate(prob.bounds):
        owner[a:b] = i
    counts = torch.tensor([b - a for a, b in prob.bounds], dtype=prob.A.dtype)
    z = prob.y * (prob.A @ x)
    s = -prob.y * torch.sigmoid(-z)
    per_example = prob.A * s[:, None]
    g = torch.zeros(prob.n_workers, prob.d, dtype=x.dtype).index_add_(0, owner, per_example)
    g /= counts[:, None]
    return g + prob.lam * 2 * x / (1 + x * x) ** 2


def _same_bits(a, b):
    ints = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def _readers():
    impls = ["python"]
    if libsvm.sklearn_available():
        impls.append("sklearn")
    return impls


@pytest.mark.parametrize("name", ["mushrooms", "phishing"])
def test_readers_identical_on_shared_data(name, shared_data):
    pytest.importorskip("sklearn")
    path = shared_data / f"{name}.txt"
    for dtype in (torch.float64, torch.float32):
        A_sk, y_sk = load_libsvm(path, dtype=dtype, impl="sklearn")
        A_py, y_py = load_libsvm(path, dtype=dtype, impl="python")
        assert _same_bits(A_sk, A_py) and _same_bits(y_sk, y_py)
    A_old, y_old = _old_load_libsvm(path)  # one-based and comment-free: the old reader read it right
    assert all(_same_bits(a, b) for a, b in zip((A_old, y_old), load_libsvm(path)))
    assert set(y_py.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("impl", ["auto", "python", "auto-without-sklearn"])
def test_readers_on_edge_cases(case, impl, tmp_path, monkeypatch):
    text, A_expected, y_expected = EDGE_CASES[case]
    path = tmp_path / f"{case}.txt"
    path.write_bytes(text.encode())
    if impl == "auto-without-sklearn":
        monkeypatch.setattr(libsvm, "sklearn_available", lambda: False)
        impl = "auto"
    A, y = load_libsvm(path, impl=impl)
    assert A.dtype == y.dtype == torch.float64
    assert A.tolist() == [[float(v) for v in row] for row in A_expected]
    assert y.tolist() == [float(v) for v in y_expected]
    for other in _readers():
        if case == "unsorted_indices" and other == "sklearn":
            with pytest.raises(ValueError, match="sorted and unique"):
                load_libsvm(path, impl=other)
            continue
        A2, y2 = load_libsvm(path, impl=other)
        assert _same_bits(A, A2) and _same_bits(y, y2)
    if "#" not in text and "qid" not in text and "0:" not in text:  # what the old reader could read
        A_old, y_old = _old_load_libsvm(path)
        assert _same_bits(A_old, A) and _same_bits(y_old, y)


@pytest.mark.parametrize("impl", ["auto", "python"])
def test_reader_errors_name_the_line(impl, tmp_path):
    cases = {
        "bad.txt": ("1 3:0.5\nfoo bar\n", "bad.txt:2: not a LIBSVM line"),
        "dup.txt": ("1 3:0.5 3:1\n", r"dup.txt:1: not a LIBSVM line \(index 3 repeated\)"),
        "neg.txt": ("1 -2:0.5\n-1 1:1\n", "neg.txt:1: not a LIBSVM line \\(negative index -2\\)"),
        "novalue.txt": ("1 3\n-1 1:1\n", "novalue.txt:1: not a LIBSVM line \\('3' is not idx:value\\)"),
        "three.txt": ("1 1:1\n2 1:1\n3 1:1\n", "expected two classes, found 3"),
        "empty.txt": ("# only a comment\n\n", "holds no examples"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load_libsvm(tmp_path / name, impl=impl)
    (tmp_path / "zero.txt").write_text("1 0:1 1:1\n-1 2:1\n")
    with pytest.raises(ValueError, match="index 0 in a file read as one-based"):
        load_libsvm(tmp_path / "zero.txt", impl=impl, zero_based=False)
    assert load_libsvm(tmp_path / "zero.txt", impl=impl, zero_based=True)[0].shape == (2, 3)


def test_reader_argument_errors(tmp_path, monkeypatch):
    path = tmp_path / "ok.txt"
    path.write_text("1 1:1\n-1 2:1\n")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype, got torch.int64"):
        load_libsvm(path, dtype=torch.int64)
    with pytest.raises(ValueError, match="impl must be 'auto', 'sklearn' or 'python', got 'numpy'"):
        load_libsvm(path, impl="numpy")
    with pytest.raises(ValueError, match="zero_based must be True, False or 'auto', got 1"):
        load_libsvm(path, zero_based=1)
    with pytest.raises(ValueError, match="data file not found"):
        load_libsvm(tmp_path / "missing.txt")
    monkeypatch.setattr(libsvm, "sklearn_available", lambda: False)
    with pytest.raises(ImportError, match="impl='sklearn' needs scikit-learn"):
        load_libsvm(path, impl="sklearn")


def _problems(shared_data):
    gen = torch.Generator().manual_seed(3)
    m, d = 1003, 37
    dense = torch.randn(m, d, generator=gen, dtype=torch.float64)
    sparse = (torch.rand(m, d, generator=gen) < 0.1).double() * torch.rand(m, d, generator=gen, dtype=torch.float64)
    y = torch.where(torch.rand(m, generator=gen) < 0.5, -1.0, 1.0).double()
    yield "gaussian, 7 workers", LogisticRegression(dense, y, 7)
    yield "sparse, uneven bounds", LogisticRegression(sparse, y, 3, bounds=[(0, 10), (10, 900), (900, m)])
    for name in ("mushrooms", "phishing"):
        A, y = load_libsvm(shared_data / f"{name}.txt")
        yield name, LogisticRegression(A, y, 20)


def test_per_worker_gradient_is_bit_identical_to_index_add(shared_data):
    gen = torch.Generator().manual_seed(0)
    for label, prob in _problems(shared_data):
        for dtype in (torch.float64, torch.float32):
            p = LogisticRegression(prob.A.to(dtype), prob.y.to(dtype), prob.n_workers, bounds=prob.bounds)
            xs = [torch.randn(p.d, generator=gen, dtype=torch.float64) * s for s in (1.0, 10.0)]
            for x in [*xs, torch.zeros(p.d, dtype=torch.float64)]:
                new, old = p.grad_fn(x.to(dtype)), _old_grad_fn(p, x.to(dtype))
                assert _same_bits(new, old), (label, dtype, float((new - old).abs().max()))


def test_simulate_trajectory_unchanged_by_the_per_worker_gradient(shared_data):
    A, y = load_libsvm(shared_data / "mushrooms.txt")
    prob = LogisticRegression(A, y, 20)
    x0 = torch.randn(prob.d, dtype=torch.float64)
    runs = [
        simulate(tk.EF21(tk.TopK(2)), fn, x0, n_workers=20, steps=40, lr=1.0)
        for fn in (prob.grad_fn, lambda x: _old_grad_fn(prob, x))
    ]
    assert _same_bits(runs[0].x, runs[1].x) and _same_bits(runs[0].grad_norm_sq, runs[1].grad_norm_sq)


def test_bounds_must_match_workers():
    with pytest.raises(ValueError, match="bounds must hold n_workers = 3"):
        LogisticRegression(torch.zeros(6, 2), torch.ones(6), 3, bounds=contiguous_split(6, 2))
