"""Float64 references of the five methods and the test-only decayed EF14, written for the tests from
docs/algorithms.md (numpy, loops).

They share nothing with torchkit's implementation: top-k by argsort, one worker at a time.
"""

from __future__ import annotations

import numpy as np


def topk_np(v: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(v)
    idx = np.argsort(-np.abs(v), kind="stable")[:k]
    out[idx] = v[idx]
    return out


def run_reference(
    method: str, grad_fn, x0, *, n, steps, lr, k, eta=0.1, weights=None, init="full", comp=None, beta=1.0, k_at=None
):
    """Returns the list of iterates x_0..x_steps (float64 numpy). ``k_at(t)``: round t's k (a density warm-up)."""
    x = np.array(x0, dtype=np.float64)
    d = x.size
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    e = np.zeros((n, d))
    h = np.zeros((n, d))
    v = np.zeros((n, d))
    server = np.zeros(d)
    xs = [x.copy()]
    for t in range(steps):
        kt = k_at(t) if k_at else k
        C = comp or (lambda v, kt=kt: topk_np(v, kt))
        G = np.asarray(grad_fn(x), dtype=np.float64)
        if method in ("ef14", "decayed_ef14"):
            u = np.stack([C(e[i] + G[i]) for i in range(n)])
            e = (e + G - u) * (beta if method == "decayed_ef14" else 1.0)
            est = (w[:, None] * u).sum(0)
        elif method in ("ef21", "ef21w"):
            scale = (1.0 / (n * w)) if method == "ef21w" else np.ones(n)
            Gs = G * scale[:, None]
            if t == 0 and init == "full":
                h = Gs.copy()
            elif t == 0 and init == "zero":
                h = np.zeros((n, d))
            else:
                h = h + np.stack([C(Gs[i] - h[i]) for i in range(n)])
            est = (w[:, None] * h).sum(0)
        elif method == "ef21sgdm":
            if t == 0:
                v = G.copy()
                h = G.copy()
            else:
                v = (1 - eta) * v + eta * G
                h = h + np.stack([C(v[i] - h[i]) for i in range(n)])
            est = h.mean(0)
        elif method == "econtrol":
            if t == 0:
                h = G.copy()
            else:
                delta = np.stack([C(eta * e[i] + G[i] - h[i]) for i in range(n)])
                e = e + G - h - delta
                h = h + delta
            est = h.mean(0)
        else:
            raise ValueError(method)
        server = est
        x = x - lr * server
        xs.append(x.copy())
    return xs


def logreg_problem(m=120, d=17, n=4, seed=0, lam=0.1):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(m, d)) * rng.uniform(0.2, 3.0, size=(m, 1))
    y = np.where(rng.uniform(size=m) < 0.5, -1.0, 1.0)
    size = m // n
    bounds = [(i * size, (i + 1) * size) for i in range(n)]
    bounds[-1] = (bounds[-1][0], m)

    def grad_fn(x):
        out = []
        for a, b in bounds:
            Ai, yi = A[a:b], y[a:b]
            z = yi * (Ai @ x)
            s = -yi / (1 + np.exp(z))
            out.append(Ai.T @ s / (b - a) + lam * 2 * x / (1 + x * x) ** 2)
        return np.stack(out)

    return A, y, grad_fn
