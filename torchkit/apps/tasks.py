"""Small real training tasks with per-worker data splits, for convergence studies and benchmarks.

Three tasks of different kinds that run on a few CPU cores in minutes:

- :func:`char_lm`: a character-level transformer language model trained on the Python standard
  library's own source files (``os.path.dirname(os.__file__)``), which exist on every machine that
  runs Python. The non-iid split gives each worker a contiguous block of files in name order, so
  each worker sees different modules (text-skewed).
- :func:`digits_cnn`: a small CNN on scikit-learn's 8x8 digits (1,797 images) when scikit-learn is
  installed (``pip install torchkit[bench]``), else on generated 8x8 images of ten noisy class
  templates. The non-iid split sorts by label, so each worker holds two or three classes.
- :func:`libsvm_mlp`: a two-layer MLP classifying the rows of any binary LIBSVM file by path (tabular
  data; the repository's ``shared/data`` has mushrooms and phishing). The non-iid split sorts by label.

A :class:`Task` gives the model factory, the workers' batches (a pure function of the step, so every
method sees the same data), the loss, and the held-out evaluation::

    task = char_lm(n_workers=4, split="noniid")
    model = task.model(seed=0)
    xs, ys = task.batches(step=0)          # [n_workers, batch, ...] inputs and targets
    loss = task.loss(model(xs[0]), ys[0])  # worker 0's training loss
    print(task.evaluate(model))            # {"loss": ..., "accuracy": ...} on the test set
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Task", "char_lm", "digits_cnn", "libsvm_mlp", "CharTransformer", "DigitsCNN", "stdlib_corpus"]

Split = Literal["iid", "noniid"]


@dataclass
class Task:
    """A training task split over ``n_workers``.

    Attributes:
        name: ``"char_lm"``, ``"digits_cnn"`` or ``"libsvm_mlp"``.
        split: ``"iid"`` or ``"noniid"``.
        n_workers: number of workers the training data is split over.
        model: ``model(seed) -> nn.Module``, the same initial weights for the same seed.
        batches: ``batches(step) -> (xs, ys)``, each with a leading ``n_workers`` dimension; a pure
            function of ``step`` (and the task's seed), so every method sees the same data.
        loss: ``loss(outputs, targets) -> scalar`` (mean cross-entropy).
        test: held-out ``(x, y)`` used by :meth:`evaluate`.
        info: sizes and provenance of the data (for result files).
    """

    name: str
    split: str
    n_workers: int
    model: Callable[[int], nn.Module]
    batches: Callable[[int], tuple[Tensor, Tensor]]
    test: tuple[Tensor, Tensor]
    info: dict = field(default_factory=dict)

    @staticmethod
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, chunk: int = 256) -> dict[str, float]:
        """Mean test loss and accuracy (next-character accuracy for the language model)."""
        x, y = self.test
        total, correct, count = 0.0, 0, 0
        for i in range(0, x.shape[0], chunk):
            out = model(x[i : i + chunk])
            t = y[i : i + chunk]
            total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1), reduction="sum"))
            correct += int((out.argmax(-1) == t).sum())
            count += t.numel()
        return {"loss": total / count, "accuracy": correct / count}


def _check(split: str, n_workers: int) -> None:
    if split not in ("iid", "noniid"):
        raise ValueError(f"split must be 'iid' or 'noniid', got {split!r}")
    if not (isinstance(n_workers, int) and n_workers >= 1):
        raise ValueError(f"n_workers must be a positive int, got {n_workers!r}")


def _gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)


# ------------------------------------------------------------------------------------------ language model
def stdlib_corpus(max_files: int = 120, max_bytes: int = 60_000) -> list[tuple[str, bytes]]:
    """``(name, text)`` of the standard library's top-level ``*.py`` files in name order (each cut at
    ``max_bytes``), bytes >= 128 mapped to 0. Spread evenly over the alphabet when there are more
    than ``max_files``."""
    root = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise RuntimeError(f"no Python sources found in {root}")
    if len(files) > max_files:
        step = len(files) / max_files
        files = [files[int(i * step)] for i in range(max_files)]
    out = []
    for p in files:
        data = p.read_bytes()[:max_bytes]
        out.append((p.name, bytes(b if b < 128 else 0 for b in data)))
    return out


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(w // self.heads)  # explicit attention: vmap-friendly
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, w))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A pre-norm decoder-only transformer over 128 byte values (GPT-style, learned positions)."""

    def __init__(self, vocab: int = 128, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[-1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def char_lm(
    n_workers: int = 4,
    split: Split = "iid",
    *,
    batch: int = 8,
    context: int = 64,
    width: int = 64,
    layers: int = 2,
    seed: int = 0,
    test_windows: int = 96,
) -> Task:
    """Character-level language modelling on the standard library's sources.

    Every 8th file is held out for the test set. ``"iid"``: every worker samples windows from all
    training files. ``"noniid"``: worker i samples only from the i-th contiguous block of training
    files in name order (different modules, different vocabulary and style per worker).
    """
    _check(split, n_workers)
    corpus = stdlib_corpus()
    train_files = [t for i, (_, t) in enumerate(corpus) if i % 8 != 7]
    test_text = b"".join(t for i, (_, t) in enumerate(corpus) if i % 8 == 7)
    if len(train_files) < n_workers:
        raise ValueError(f"{len(train_files)} training files cannot be split over {n_workers} workers")
    if split == "iid":
        shards = [torch.frombuffer(bytearray(b"".join(train_files)), dtype=torch.uint8).long()] * n_workers
    else:
        per = len(train_files) / n_workers
        shards = [
            torch.frombuffer(
                bytearray(b"".join(train_files[int(i * per) : int((i + 1) * per)])), dtype=torch.uint8
            ).long()
            for i in range(n_workers)
        ]
    test = torch.frombuffer(bytearray(test_text), dtype=torch.uint8).long()
    g = _gen(seed + 7919, 0)
    starts = torch.randint(0, test.numel() - context - 1, (test_windows,), generator=g)
    win = torch.arange(context + 1)
    test_xy = test[starts[:, None] + win]

    def batches(step: int) -> tuple[Tensor, Tensor]:
        gen = _gen(seed, step)
        rows = []
        for s in shards:
            st = torch.randint(0, s.numel() - context - 1, (batch,), generator=gen)
            rows.append(s[st[:, None] + win])
        xy = torch.stack(rows)
        return xy[..., :-1], xy[..., 1:]

    def model(model_seed: int) -> nn.Module:
        torch.manual_seed(model_seed)
        return CharTransformer(context=context, width=width, layers=layers)

    info = {
        "corpus": str(Path(os.path.dirname(os.__file__))),
        "files": len(corpus),
        "train_bytes": sum(len(t) for t in train_files),
        "test_bytes": len(test_text),
        "shard_bytes": [int(s.numel()) for s in shards],
        "batch_per_worker": batch,
        "context": context,
    }
    return Task("char_lm", split, n_workers, model, batches, (test_xy[:, :-1], test_xy[:, 1:]), info)


# ------------------------------------------------------------------------------------------------- digits
def _labelled_shards(x: Tensor, y: Tensor, train_idx: Tensor, n_workers: int, split: str, batch: int, seed: int):
    """The workers' shards of labelled rows (``"noniid"``: sorted by label, then cut into equal contiguous parts)
    and ``batches(step)``, each worker's ``batch`` rows drawn with replacement from its shard."""
    if split == "noniid":
        train_idx = train_idx[torch.argsort(y[train_idx], stable=True)]
    parts = train_idx.tensor_split(n_workers)
    xs, ys = [x[p] for p in parts], [y[p] for p in parts]

    def batches(step: int) -> tuple[Tensor, Tensor]:
        gen = _gen(seed, step)
        picks = [torch.randint(0, xi.shape[0], (batch,), generator=gen) for xi in xs]
        return torch.stack([xi[p] for xi, p in zip(xs, picks)]), torch.stack([yi[p] for yi, p in zip(ys, picks)])

    return xs, ys, batches


class DigitsCNN(nn.Module):
    """conv 3x3 (16) - conv 3x3 (32) - max-pool - linear 64 - linear 10, on 1x8x8 images."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.f1 = nn.Linear(32 * 16, 64)
        self.f2 = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.f2(F.relu(self.f1(x.flatten(-3))))


def _digits_data(seed: int) -> tuple[Tensor, Tensor, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = _gen(seed + 104729, 0)
        templates = (torch.rand(10, 8, 8, generator=g) > 0.6).float()
        y = torch.arange(1800) % 10
        x = templates[y] + 0.45 * torch.randn(1800, 8, 8, generator=g)
        return x.unsqueeze(1), y, "generated (scikit-learn not installed)"
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(d.target, dtype=torch.long), "sklearn.datasets.load_digits"


def digits_cnn(n_workers: int = 4, split: Split = "iid", *, batch: int = 16, seed: int = 0) -> Task:
    """Digit classification (8x8 images, 10 classes) with :class:`DigitsCNN`.

    A fixed 300 images are held out. ``"iid"``: a random equal partition of the rest.
    ``"noniid"``: sorted by label, then cut into equal contiguous parts (label skew: 2-3 classes per
    worker at 4 workers).
    """
    _check(split, n_workers)
    x, y, source = _digits_data(seed)
    perm = torch.randperm(x.shape[0], generator=_gen(seed + 15485863, 0))
    test_idx, train_idx = perm[:300], perm[300:]
    xs, ys, batches = _labelled_shards(x, y, train_idx, n_workers, split, batch, seed)

    def model(model_seed: int) -> nn.Module:
        torch.manual_seed(model_seed)
        return DigitsCNN()

    info = {
        "source": source,
        "train": int(train_idx.numel()),
        "test": 300,
        "classes_per_worker": [sorted(set(yi.tolist())) for yi in ys],
        "batch_per_worker": batch,
    }
    return Task("digits_cnn", split, n_workers, model, batches, (x[test_idx], y[test_idx]), info)


# -------------------------------------------------------------------------------------------- tabular data
def libsvm_mlp(
    path: str | os.PathLike,
    n_workers: int = 4,
    split: Split = "iid",
    *,
    batch: int = 32,
    hidden: int = 64,
    seed: int = 0,
) -> Task:
    """Binary classification of a LIBSVM file's rows (read by :func:`torchkit.sim.load_libsvm`) with a
    ``linear(hidden) - ReLU - linear(hidden) - ReLU - linear(2)`` MLP, features scaled to zero mean and unit
    variance over the training rows.

    Every 8th row (after a seeded shuffle) is held out. ``"iid"``: a random equal partition of the rest.
    ``"noniid"``: sorted by label, then cut into equal contiguous parts (label skew).
    """
    from torchkit.sim.libsvm import load_libsvm

    _check(split, n_workers)
    if not (isinstance(batch, int) and batch >= 1) or not (isinstance(hidden, int) and hidden >= 1):
        raise ValueError(f"batch and hidden must be positive ints, got {batch!r} and {hidden!r}")
    a, y_pm = load_libsvm(path, dtype=torch.float32)
    y = (y_pm > 0).long()
    perm = torch.randperm(a.shape[0], generator=_gen(seed + 32452843, 0))
    test_idx, train_idx = perm[::8], perm[torch.arange(perm.numel()) % 8 != 0]
    if train_idx.numel() < n_workers * batch:
        raise ValueError(f"{train_idx.numel()} training rows cannot give {n_workers} workers batches of {batch}")
    mean, std = a[train_idx].mean(0), a[train_idx].std(0).clamp_min(1e-6)
    x = (a - mean) / std
    xs, ys, batches = _labelled_shards(x, y, train_idx, n_workers, split, batch, seed)

    def model(model_seed: int) -> nn.Module:
        torch.manual_seed(model_seed)
        layers = (nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        return nn.Sequential(*layers)

    info = {
        "source": str(path),
        "features": int(x.shape[1]),
        "train": int(train_idx.numel()),
        "test": int(test_idx.numel()),
        "positive_share_per_worker": [round(float(yi.float().mean()), 3) for yi in ys],
        "batch_per_worker": batch,
    }
    return Task("libsvm_mlp", split, n_workers, model, batches, (x[test_idx], y[test_idx]), info)
