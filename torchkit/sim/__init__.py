"""In-process simulator of n workers, for reproducing the papers on one machine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validation import check_int
from ..comm import LocalExchanger, RoundOptions, run_round
from ..feedback import Feedback
from .libsvm import load_libsvm
from .problems import LogisticRegression, contiguous_split

__all__ = ["simulate", "SimResult", "load_libsvm", "LogisticRegression", "contiguous_split"]


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    Attributes:
        x: final iterate.
        grad_norm_sq: ``||mean_i grad_i(x_t)||^2`` for t = 0..steps (steps + 1 values).
        bits: values-only bits sent per worker before iterate t (the papers' x-axis), steps + 1 values.
        wire_bytes: real payload bytes per worker before iterate t (values + indices), steps + 1 values.
    """

    x: Tensor
    grad_norm_sq: Tensor
    bits: Tensor
    wire_bytes: Tensor


@torch.no_grad()
def simulate(
    feedback: Feedback,
    grad_fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    n_workers: int,
    steps: int,
    lr: float | Callable[[int], float],
    segments: Sequence[int] | None = None,
    stop_below: float | None = None,
    wire_dtype: torch.dtype | None = None,
) -> SimResult:
    """Run ``steps`` rounds of ``feedback`` with plain gradient descent on the server.

    ``x_{t+1} = x_t - lr * estimate_t`` where ``estimate_t`` is the server's aggregate after round t,
    whose gradients are ``grad_fn(x_t)`` (shape ``[n_workers, d]``). ``segments`` splits x into tensors
    for ``granularity="tensor"``. ``stop_below`` ends the run once ``||grad f||^2`` falls below it (the
    result then holds fewer values). ``wire_dtype`` rounds the sent values as a front end's wire would (the
    rounding stays in the feedback state). Works in float64 and float32 (the dtype of ``x0``).
    """
    check_int("n_workers", n_workers)
    check_int("steps", steps, low=0)
    if x0.dim() != 1:
        raise ValueError(f"x0 must be a 1-D vector, got shape {tuple(x0.shape)}")
    lr_at = lr if callable(lr) else (lambda t, _lr=float(lr): _lr)
    x = x0.clone()
    d = x.numel()
    segs = feedback.segments_for(segments if segments is not None else (d,))
    state = feedback.init_state(d, rows=n_workers, dtype=x.dtype, device=x.device)
    server = torch.zeros(d, dtype=feedback.state_dtype(x.dtype), device=x.device)
    exchanger = LocalExchanger(n_workers)
    options = RoundOptions(wire_dtype=wire_dtype)
    wire_values = wire_dtype or (torch.float32 if x.dtype == torch.float64 else x.dtype)  # fp64 runs count fp32
    norms, bits, wire = [], [0], [0]
    for t in range(steps + 1):
        grads = grad_fn(x)
        if grads.shape != (n_workers, d):
            raise ValueError(f"grad_fn must return [n_workers, d] = [{n_workers}, {d}], got {tuple(grads.shape)}")
        norms.append(float(grads.mean(0).pow(2).sum()))
        if t == steps or (stop_below is not None and norms[-1] < stop_below):
            break
        estimate, _ = run_round(feedback, exchanger, state, server, grads, t, segments=segs, options=options)
        x.sub_(estimate.to(x.dtype), alpha=lr_at(t))
        bits.append(bits[-1] + feedback.value_bits(segs, t))
        wire.append(wire[-1] + feedback.wire_bytes(segs, t, value_dtype=wire_values))
    n = len(norms)
    return SimResult(x, torch.tensor(norms, dtype=torch.float64), torch.tensor(bits[:n]), torch.tensor(wire[:n]))
