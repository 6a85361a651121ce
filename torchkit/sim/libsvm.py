"""LIBSVM reader (dense output) for the EF21 papers' datasets.

``impl="auto"`` parses with scikit-learn's ``load_svmlight_file`` when scikit-learn is installed (compiled
parser: 0.03 s on mushrooms against 0.1 s for the Python reader and 0.4 s for the reader it replaced,
benchmarks/bench_sim.py) and with the pure-Python reader otherwise; both give identical tensors. The Python
reader is the specification: it also gives the line number of a malformed line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = ["load_libsvm", "sklearn_available"]

Impl = Literal["auto", "sklearn", "python"]
ZeroBased = bool | Literal["auto"]


def sklearn_available() -> bool:
    """Whether ``load_libsvm(impl="auto")`` will use scikit-learn's compiled parser."""
    return importlib.util.find_spec("sklearn") is not None


def load_libsvm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float64,
    zero_based: ZeroBased = "auto",
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor]:
    """Read ``label idx:value ...`` lines into a dense ``A [m, d]`` and labels ``y`` in {-1, +1}.

    The format is scikit-learn's ``load_svmlight_file``'s: ``#`` starts a comment, blank lines are
    skipped, ``qid:`` tokens are ignored, omitted features are zero.

    Args:
        path: the LIBSVM file.
        dtype: floating dtype of ``A`` and ``y`` (default float64); values are parsed as float64 first.
        zero_based: ``"auto"`` (default) reads the indices as zero-based when some index is 0 and as
            one-based otherwise (scikit-learn's rule); ``True``/``False`` force one reading.
        impl: ``"auto"`` (default): scikit-learn when installed, else Python; ``"sklearn"`` raises
            ``ImportError`` without scikit-learn; ``"python"``: the pure-Python reader.

    Returns:
        ``(A, y)``; ``d`` is the largest index (+1 when zero-based). The two distinct labels are mapped
        to -1 (the smaller) and +1 (the larger), so {0, 1}, {1, 2} and {-1, +1} files read the same.

    Raises:
        ValueError: missing file, malformed line, negative or repeated index, no examples, or a number
            of classes other than two.
    """
    path = Path(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if zero_based not in (True, False, "auto") or not isinstance(zero_based, bool | str):
        raise ValueError(f"zero_based must be True, False or 'auto', got {zero_based!r}")
    if impl not in ("auto", "sklearn", "python"):
        raise ValueError(f"impl must be 'auto', 'sklearn' or 'python', got {impl!r}")
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    if impl == "sklearn" and not sklearn_available():
        raise ImportError("impl='sklearn' needs scikit-learn: pip install 'torchkit[sklearn]'")
    if impl == "python" or not sklearn_available():
        A, labels = _read_python(path, zero_based)
    else:
        try:
            A, labels = _read_sklearn(path, zero_based)
        except ValueError:
            if impl == "sklearn":
                raise
            # scikit-learn rejects what the Python reader accepts (unsorted indices) and its messages
            # carry no line number: the Python reader either reads the file or says which line is wrong.
            A, labels = _read_python(path, zero_based)
    if A.shape[0] == 0:
        raise ValueError(f"{path} holds no examples")
    return A.to(dtype), _plus_minus_one(path, labels).to(dtype)


def _read_sklearn(path: Path, zero_based: ZeroBased) -> tuple[Tensor, Tensor]:
    import numpy as np
    from sklearn.datasets import load_svmlight_file

    X, y = load_svmlight_file(str(path), dtype=np.float64, zero_based=zero_based)
    if X.shape[0] and X.nnz and int(X.indices.min()) < 0:  # zero_based=False with an index 0
        raise ValueError(f"{path}: index 0 in a file read as one-based (zero_based=False)")
    return torch.from_numpy(X.toarray()), torch.from_numpy(np.asarray(y, dtype=np.float64))


def _read_python(path: Path, zero_based: ZeroBased) -> tuple[Tensor, Tensor]:
    labels: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            seen: set[int] = set()
            try:
                label = float(parts[0])
                for item in parts[1:]:
                    i, sep, v = item.partition(":")
                    if i == "qid":
                        continue
                    if not sep:
                        raise ValueError(f"{item!r} is not idx:value")
                    idx, val = int(i), float(v)
                    if idx < 0:
                        raise ValueError(f"negative index {idx}")
                    if idx in seen:
                        raise ValueError(f"index {idx} repeated")
                    seen.add(idx)
                    cols.append(idx)
                    vals.append(val)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a LIBSVM line ({exc})") from None
            rows.extend([len(labels)] * len(seen))
            labels.append(label)
    shift = 0 if zero_based is True or (zero_based == "auto" and 0 in cols) else 1
    if shift and 0 in cols:
        raise ValueError(f"{path}: index 0 in a file read as one-based (zero_based=False)")
    d = max(cols) + 1 - shift if cols else 1  # scikit-learn's width for a file without features
    A = torch.zeros(len(labels), d, dtype=torch.float64)
    if cols:
        A[torch.tensor(rows), torch.tensor(cols) - shift] = torch.tensor(vals, dtype=torch.float64)
    return A, torch.tensor(labels, dtype=torch.float64)


def _plus_minus_one(path: Path, labels: Tensor) -> Tensor:
    classes = sorted(set(labels.tolist()))
    if len(classes) != 2:
        raise ValueError(f"{path}: expected two classes, found {len(classes)}: {classes[:5]}")
    return torch.where(labels == classes[1], 1.0, -1.0).to(torch.float64)
