"""Argument checks shared by every layer, so errors read the same everywhere."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "check_int",
    "check_ratio",
    "check_unit_interval",
    "check_weights",
    "resolve_k",
    "check_dense_float",
]


def check_int(name: str, value: object, *, low: int = 1) -> int:
    """An int (NumPy's too: any ``numbers.Integral`` but bool) of at least ``low``, returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_segments(segments, d: int) -> tuple[int, ...]:
    """Segment lengths (ints >= 0) that add up to the vector length ``d``, as a tuple (a shorter list silently left
    the vector's tail out of a message)."""
    sizes = tuple(check_int("segment length", n, low=0) for n in segments)  # (an empty parameter: 0)
    if sum(sizes) != d:
        raise ValueError(f"segments {sizes} do not add up to the vector length {d}")
    return sizes


def check_ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not (0.0 < float(value) <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_momentum(name: str, value: object) -> float:
    """A momentum-like coefficient in [0, 1)."""
    _check_real(name, value)
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_positive(name: str, value: object, kind: str = "a float") -> float:
    """A positive finite real number; ``kind`` says what else was expected in the ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number >= 0 (a regulariser's weight)."""
    _check_real(name, value)
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
    return float(value)


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")


def check_unit_interval(name: str, value: object) -> float:
    _check_real(name, value)
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_overlap_mix(mix: object, overlap: bool, feedback: object) -> float:
    """LocalSGD's ``overlap_mix`` as it acts: ``None`` is 0.5 where it has an effect (``overlap`` with EF14) and 0
    elsewhere; a value given where it has none is refused (it would be ignored)."""
    acts = overlap and getattr(type(feedback), "update", None) == "ef14"
    if mix is None:
        return 0.5 if acts else 0.0
    mix = check_unit_interval("overlap_mix", mix)
    if not acts:
        raise ValueError(
            f"overlap_mix={mix} has no effect here: it moves the start of an overlapped period (overlap=True) by "
            f"what EF14's error held back, and this run has overlap={overlap} with {type(feedback).__name__}"
        )
    return mix


def check_weights(name: str, weights: Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    values = weights.tolist() if hasattr(weights, "tolist") else weights  # a tensor or a NumPy array too
    if not isinstance(values, Sequence) or any(isinstance(x, (list, str)) for x in values):
        raise TypeError(f"{name} must be a sequence of floats (one per worker), got {type(weights).__name__}")
    w = [float(x) for x in values]
    if not w:
        raise ValueError(f"{name} must not be empty")
    if any(not math.isfinite(x) or x <= 0 for x in w):
        raise ValueError(f"{name} must be positive and finite, got {w}")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got sum {sum(w)!r}")
    return tuple(w)


def resolve_k(k: int | None, ratio: float | None, d: int) -> int:
    """Number of kept entries for a vector of length ``d``: ``k`` (all ``d`` when there are fewer: a parameter group
    whose parameters did not all get a gradient this step, a small bucket) or ``ceil(ratio * d)``."""
    if k is not None:
        return min(k, d)  # a vector of at most k entries is sent whole
    assert ratio is not None
    return max(1, min(d, math.ceil(ratio * d - 1e-9)))


def check_dense_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
