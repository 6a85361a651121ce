"""A small LIBSVM reader (dense output), enough for the EF21 papers' datasets."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_libsvm"]


def load_libsvm(path: str | Path, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Read ``label idx:value ...`` lines into a dense ``A [m, d]`` and labels ``y`` in {-1, +1}.

    Indices are 1-based. Two distinct labels are mapped to -1 (the smaller) and +1 (the larger).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    labels: list[float] = []
    rows: list[list[tuple[int, float]]] = []
    d = 0
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                labels.append(float(parts[0]))
                feats = []
                for item in parts[1:]:
                    i, v = item.split(":", 1)
                    feats.append((int(i), float(v)))
                    d = max(d, int(i))
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a LIBSVM line ({exc})") from None
            rows.append(feats)
    if not rows:
        raise ValueError(f"{path} holds no examples")
    A = torch.zeros(len(rows), d, dtype=dtype)
    for r, feats in enumerate(rows):
        for i, v in feats:
            A[r, i - 1] = v
    classes = sorted(set(labels))
    if len(classes) != 2:
        raise ValueError(f"{path}: expected two classes, found {len(classes)}: {classes[:5]}")
    y = torch.tensor([1.0 if lab == classes[1] else -1.0 for lab in labels], dtype=dtype)
    return A, y
