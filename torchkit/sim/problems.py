r"""Test problems of the EF21 papers (algorithms.md §2.7).

Logistic regression with the nonconvex regulariser, split contiguously over n workers:

.. math:: f_i(x) = \frac{1}{m_i}\sum_j \log(1 + e^{-y_j a_j^\top x}) + \lambda \sum_k \frac{x_k^2}{1 + x_k^2}

with smoothness constants :math:`L_i = \lambda_{\max}(A_i^\top A_i / (4 m_i)) + 2\lambda`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LogisticRegression", "contiguous_split"]


def contiguous_split(m: int, n: int) -> list[tuple[int, int]]:
    """n equal contiguous chunks of range(m); the remainder goes to the last worker."""
    if not (1 <= n <= m):
        raise ValueError(f"n_workers must be in [1, {m}] for {m} examples, got {n}")
    size = m // n
    bounds = [(i * size, (i + 1) * size) for i in range(n)]
    bounds[-1] = (bounds[-1][0], m)
    return bounds


@dataclass
class LogisticRegression:
    """``grad_fn(x) -> [n_workers, d]`` for the EF21 logistic regression with nonconvex regulariser."""

    A: Tensor
    y: Tensor
    n_workers: int
    lam: float = 0.1
    bounds: list[tuple[int, int]] | None = None
    _owner: Tensor = field(init=False, repr=False)
    _counts: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.A.dim() != 2 or self.y.shape != (self.A.shape[0],):
            raise ValueError(f"A must be [m, d] and y [m], got {tuple(self.A.shape)} and {tuple(self.y.shape)}")
        self.bounds = self.bounds or contiguous_split(self.A.shape[0], self.n_workers)
        owner = torch.empty(self.A.shape[0], dtype=torch.long)
        for i, (a, b) in enumerate(self.bounds):
            owner[a:b] = i
        self._owner = owner
        self._counts = torch.tensor([b - a for a, b in self.bounds], dtype=self.A.dtype)

    @property
    def d(self) -> int:
        return self.A.shape[1]

    def smoothness(self) -> tuple[float, list[float]]:
        """``(L, [L_i])`` as in the EF21 code."""

        def const(A: Tensor) -> float:
            return float(torch.linalg.eigvalsh(A.T @ A / (4 * A.shape[0])).max()) + 2 * self.lam

        return const(self.A), [const(self.A[a:b]) for a, b in self.bounds]

    def loss(self, x: Tensor) -> float:
        z = -self.y * (self.A @ x)
        return float(torch.nn.functional.softplus(z).mean() + self.lam * (x * x / (1 + x * x)).sum())

    def grad_fn(self, x: Tensor) -> Tensor:
        z = self.y * (self.A @ x)
        s = -self.y * torch.sigmoid(-z)  # d/dz log(1+exp(-z)) times y
        per_example = self.A * s[:, None]
        g = torch.zeros(self.n_workers, self.d, dtype=x.dtype).index_add_(0, self._owner, per_example)
        g /= self._counts[:, None]
        return g + self.lam * 2 * x / (1 + x * x) ** 2

    def full_grad(self, x: Tensor) -> Tensor:
        """Gradient of the whole-data objective (equal to the mean of grad_fn only for equal chunks)."""
        z = self.y * (self.A @ x)
        return (self.A * (-self.y * torch.sigmoid(-z))[:, None]).mean(0) + self.lam * 2 * x / (1 + x * x) ** 2
