r"""Test problems of the EF21 papers (docs/algorithms.md §2.7).

Logistic regression with the nonconvex regulariser, split contiguously over n workers:

.. math:: f_i(x) = \frac{1}{m_i}\sum_j \log(1 + e^{-y_j a_j^\top x}) + \lambda \sum_k \frac{x_k^2}{1 + x_k^2}

with smoothness constants :math:`L_i = \lambda_{\max}(A_i^\top A_i / (4 m_i)) + 2\lambda`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._validation import check_int, check_nonnegative

__all__ = ["LogisticRegression", "contiguous_split", "make_classification"]


def contiguous_split(m: int, n: int) -> list[tuple[int, int]]:
    """n equal contiguous chunks of range(m); the remainder goes to the last worker."""
    if not (1 <= n <= m):
        raise ValueError(f"n_workers must be in [1, {m}] for {m} examples, got {n}")
    size = m // n
    bounds = [(i * size, (i + 1) * size) for i in range(n)]
    bounds[-1] = (bounds[-1][0], m)
    return bounds


def make_classification(m: int, d: int, *, density: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A generated binary problem shaped like the papers' LIBSVM sets (mushrooms: 8124 x 112, 0/1 features):
    ``A`` ``[m, d]`` float64 with entries 1 at the given density and 0 elsewhere, labels ``y`` in {-1, +1} from a
    random hyperplane with 10% of the labels flipped. For examples and tests without a LIBSVM file."""
    for name, v in (("m", m), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(m, d, generator=g, dtype=torch.float64) < density).to(torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    margin = A @ w - (A @ w).median()
    y = torch.where(margin >= 0, 1.0, -1.0).to(torch.float64)
    flip = torch.rand(m, generator=g) < 0.1
    return A, torch.where(flip, -y, y)


@dataclass
class LogisticRegression:
    """``grad_fn(x) -> [n_workers, d]`` for the EF21 logistic regression with nonconvex regulariser."""

    A: Tensor
    y: Tensor
    n_workers: int
    lam: float = 0.1
    bounds: list[tuple[int, int]] | None = None
    _counts: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        check_int("n_workers", self.n_workers)
        if self.A.dim() != 2 or self.y.shape != (self.A.shape[0],):
            raise ValueError(f"A must be [m, d] and y [m], got {tuple(self.A.shape)} and {tuple(self.y.shape)}")
        check_nonnegative("lam", self.lam)
        m = self.A.shape[0]
        self.bounds = self.bounds or contiguous_split(m, self.n_workers)
        if len(self.bounds) != self.n_workers:
            raise ValueError(
                f"bounds must hold n_workers = {self.n_workers} (start, end) pairs, got {len(self.bounds)}"
            )
        self.bounds = [(check_int("bounds start", a, low=0), check_int("bounds end", b, low=0)) for a, b in self.bounds]
        # each worker's rows a slice of the data (a bound past m cut the slice short while the mean still divided by
        # b - a: a gradient 19x too small, silently); workers may share rows
        for i, (a, b) in enumerate(self.bounds):
            if not a < b <= m:
                raise ValueError(f"bounds[{i}] = ({a}, {b}) must be a non-empty slice of the {m} data rows")
        self._counts = torch.tensor([b - a for a, b in self.bounds], dtype=self.A.dtype)

    @property
    def d(self) -> int:
        return self.A.shape[1]

    def smoothness(self) -> tuple[float, list[float]]:
        """``(L, [L_i])`` as in the EF21 code."""

        def const(A: Tensor) -> float:
            return float(torch.linalg.eigvalsh(A.T @ A / (4 * A.shape[0])).max()) + 2 * self.lam

        return const(self.A), [const(self.A[a:b]) for a, b in self.bounds]

    def _check_x(self, x) -> None:
        """``x`` (simulate's ``x0``) as this problem's data: d entries in its dtype."""
        if not isinstance(x, Tensor) or x.shape != (self.d,) or x.dtype != self.A.dtype:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x (simulate's x0) must be a vector of d = {self.d} entries in the data's dtype {self.A.dtype}, got "
                f"{got}; for a float32 run, build the problem from A.float() and y.float()"
            )

    def loss(self, x: Tensor) -> float:
        self._check_x(x)
        z = -self.y * (self.A @ x)
        return float(torch.nn.functional.softplus(z).mean() + self.lam * (x * x / (1 + x * x)).sum())

    def grad_fn(self, x: Tensor) -> Tensor:
        """Local gradients ``[n_workers, d]``: row i is ``A_i^T s_i / m_i + 2 lam x / (1 + x^2)^2``.

        One matrix-vector product per worker, as the EF21 authors' code computes a worker's gradient, instead
        of an ``[m, d]`` per-example product summed by ``index_add_``: no ``m x d`` temporary; 1.2x on mushrooms,
        more on larger data (2.7x to 6.8x on w8a's shape, benchmarks/bench_sim.py); bit-identical with torch's
        CPU build (MKL), tested in tests/test_sim_speedups.py.
        ``z`` and ``s`` stay whole-vector operations: their elementwise kernels round the scalar tail of a
        vector differently from its SIMD body, so computing them per block would change the last bits.
        """
        self._check_x(x)
        z = self.y * (self.A @ x)
        s = -self.y * torch.sigmoid(-z)  # d/dz log(1+exp(-z)) times y
        g = torch.stack([self.A[a:b].T @ s[a:b] for a, b in self.bounds])
        g /= self._counts[:, None]
        return g + self.lam * 2 * x / (1 + x * x) ** 2

    def full_grad(self, x: Tensor) -> Tensor:
        """Gradient of the whole-data objective (equal to the mean of grad_fn only for equal chunks)."""
        self._check_x(x)
        z = self.y * (self.A @ x)
        return (self.A * (-self.y * torch.sigmoid(-z))[:, None]).mean(0) + self.lam * 2 * x / (1 + x * x) ** 2
