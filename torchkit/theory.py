r"""Step-size theory: floats in, floats out (docs/algorithms.md §0, §2.1, §3).

EF21 constants for a contractive compressor with factor :math:`\alpha`:
:math:`\theta = 1 - \sqrt{1-\alpha}`, :math:`\beta = (1-\alpha)/(1-\sqrt{1-\alpha})`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["theta_beta", "mean_smoothness", "ef21_stepsize", "ef21_stepsize_ratio", "ef21_lr_scale", "econtrol_eta"]


def _real(name: str, value: object) -> float:
    """A real number (NumPy's, a 0-d tensor), not a bool or a string (which float() would parse)."""
    if isinstance(value, bool) or not hasattr(type(value), "__float__"):
        hint = " (a compressor's is compressor.alpha(d))" if name == "alpha" and hasattr(value, "alpha") else ""
        raise TypeError(f"{name} must be a real number{hint}, got {type(value).__name__} {value!r}")
    return float(value)


def _check_alpha(alpha: float) -> float:
    if not (0.0 < _real("alpha", alpha) <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return float(alpha)


def theta_beta(alpha: float) -> tuple[float, float]:
    """``(theta, beta)`` of EF21's analysis."""
    a = _check_alpha(alpha)
    r = math.sqrt(1.0 - a)
    # 1 - r = a / (1 + r), without the cancellation of 1 - r (at a = 1e-12 the step was 9e-5 too large, an unsafe
    # step; below 1e-16, 1 - r was 0)
    theta = a / (1.0 + r)
    return theta, (1.0 - a) * (1.0 + r) / a


def mean_smoothness(L_i: Sequence[float], *, weighted: bool) -> float:
    """Arithmetic mean ``L_AM`` (``weighted=True``) or quadratic mean ``L_QM`` of the worker constants."""
    if isinstance(L_i, (str, bytes)) or not hasattr(L_i, "__iter__"):
        raise TypeError(f"L_i must be a sequence of the workers' smoothness constants, got {type(L_i).__name__}")
    vals = [_real("L_i's entries", x) for x in L_i]
    if not vals or any(not (x >= 0 and math.isfinite(x)) for x in vals):
        raise ValueError(f"L_i must be a non-empty list of finite non-negative numbers, got {L_i!r}")
    if weighted:
        return sum(vals) / len(vals)
    return math.sqrt(sum(x * x for x in vals) / len(vals))


def ef21_stepsize(L: float, L_i: Sequence[float], alpha: float, weighted: bool = False) -> float:
    r"""Largest step size of EF21's nonconvex theorem: :math:`1/(L + M\sqrt{\beta/\theta})`.

    ``M`` is the quadratic mean of the ``L_i`` (EF21, Theorem 2) or, with ``weighted=True``, their
    arithmetic mean (EF21-W, "Error Feedback Reloaded"; the same bound holds for EF21 by its Theorem 3).
    """
    if not (_real("L", L) > 0 and math.isfinite(L)):
        raise ValueError(f"L must be positive and finite, got {L}")
    theta, beta = theta_beta(alpha)
    return 1.0 / (float(L) + mean_smoothness(L_i, weighted=weighted) * math.sqrt(beta / theta))


def ef21_stepsize_ratio(L: float, L_i: Sequence[float], alpha: float) -> float:
    """``gamma_new / gamma_old = (L + L_QM s) / (L + L_AM s)`` with ``s = sqrt(beta/theta)``."""
    return ef21_stepsize(L, L_i, alpha, weighted=True) / ef21_stepsize(L, L_i, alpha)


def ef21_lr_scale(alpha: float) -> float:
    r"""EF21's theoretical step as a fraction of gradient descent's: :math:`1/(1 + \sqrt{\beta/\theta})`.

    With equal smoothness constants (:math:`L_i = L`), :func:`ef21_stepsize` is
    :math:`1/(L(1 + \sqrt{\beta/\theta}))`, i.e. this fraction of the step :math:`1/L` of gradient descent;
    about :math:`\alpha/2` for small alpha (0.0050 at alpha = 0.01, 0.0005 at alpha = 0.001).

    It is a worst-case bound: on the networks of the convergence study, EF21 with its momentum inside
    trains best at the dense learning rate or a third of it (benchmarks/results/convergence), so use it
    as the safe end of a learning-rate search, not as the multiplier to train with.
    """
    theta, beta = theta_beta(alpha)
    return 1.0 / (1.0 + math.sqrt(beta / theta))


def econtrol_eta(alpha: float) -> float:
    """EControl's default ``eta``: the compressor's alpha (theory: alpha/400; measured: ``eta = alpha``
    converges where 0.1 stalls once alpha << 0.1; benchmarks/results/repro and convergence)."""
    return _check_alpha(alpha)
