"""In-process simulator of n workers, for reproducing the papers on one machine: :func:`simulate` (one round per
gradient step) and :func:`simulate_local` (H local steps per round, error feedback on the pseudo-gradient)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._validation import check_bool, check_int, check_overlap_mix, check_positive, check_segments
from ..comm import LocalExchanger, RoundOptions, run_round
from ..feedback import Feedback
from ..node import node_means, shard_index, shard_pieces
from .libsvm import load_libsvm
from .problems import LogisticRegression, contiguous_split, make_classification

__all__ = [
    "simulate",
    "simulate_local",
    "SimResult",
    "LocalSimResult",
    "load_libsvm",
    "LogisticRegression",
    "contiguous_split",
    "make_classification",
]


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    Attributes:
        x: final iterate.
        grad_norm_sq: ``||mean_i grad_i(x_t)||^2`` for t = 0..steps (steps + 1 values).
        bits: values-only bits sent per worker before iterate t (the papers' x-axis: 32 bits a value, whatever
            ``wire_dtype``; ``wire_bytes`` counts the wire), steps + 1 values, float64 (exact integers to 2**53).
        wire_bytes: real payload bytes per worker before iterate t (values + indices), steps + 1 values.
    """

    x: Tensor
    grad_norm_sq: Tensor
    bits: Tensor
    wire_bytes: Tensor


@torch.no_grad()
def _counts(values) -> Tensor:
    """Counters as float64 (float32, torch's default for Python floats, rounded them above 2**24)."""
    return torch.tensor(values, dtype=torch.float64)


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
    local_size: int = 1,
) -> SimResult:
    """Run ``steps`` rounds of ``feedback`` with plain gradient descent on the server.

    ``x_{t+1} = x_t - lr * estimate_t`` where ``estimate_t`` is the server's aggregate after round t,
    whose gradients are ``grad_fn(x_t)`` (shape ``[n_workers, d]``). ``segments`` splits x into tensors
    for ``granularity="tensor"``. ``stop_below`` ends the run once ``||grad f||^2`` falls below it (the
    result then holds fewer values). ``wire_dtype`` rounds the sent values as a front end's wire would (the
    rounding stays in the feedback state). Works in float64 and float32 (the dtype of ``x0``).

    ``local_size=L`` simulates node-aware compression (:mod:`torchkit.node`): the workers are ``n_workers / L``
    nodes of ``L`` (rows in node order), each node's gradients are averaged, and the method runs between the nodes
    on each of the ``L`` shards of x (shard l: the l-th of ``L`` pieces of every tensor of ``segments``), with its
    own state per shard; ``bits`` and ``wire_bytes`` are then per rank (the shards' mean), what each rank sends
    between nodes.
    """
    check_int("n_workers", n_workers)
    check_int("steps", steps, low=0)
    check_int("local_size", local_size)
    if n_workers % local_size:
        raise ValueError(f"local_size must divide n_workers = {n_workers}, got {local_size}")
    _check_x0(x0)
    _check_run(feedback, grad_fn, segments)
    if stop_below is not None and (isinstance(stop_below, bool) or not isinstance(stop_below, (int, float))):
        raise TypeError(f"stop_below must be a float or None, got {type(stop_below).__name__} {stop_below!r}")
    if callable(lr):
        lr_at = lambda t: _scheduled_lr(t, lr(t))  # noqa: E731
    else:
        rate = check_positive("lr", lr, kind="a positive number or a callable step -> lr")
        lr_at = lambda t: rate  # noqa: E731
    x = x0.clone()
    d = x.numel()
    if segments is not None and sum(segments) != d:
        raise ValueError(f"segments must add up to x0's {d} entries, got {sum(segments)}")
    nodes = n_workers // local_size
    shards = _Shard.split(feedback, segments if segments is not None else (d,), local_size, nodes, x)
    exchanger = LocalExchanger(nodes)
    options = RoundOptions(wire_dtype=wire_dtype)
    wire_values = wire_dtype or (torch.float32 if x.dtype == torch.float64 else x.dtype)  # fp64 runs count fp32
    norms, bits, wire = [], [0], [0]
    for t in range(steps + 1):
        grads = _grads(grad_fn, x, n_workers, d)
        norms.append(float(grads.mean(0).pow(2).sum()))
        if t == steps or (stop_below is not None and norms[-1] < stop_below):
            break
        means = grads if local_size == 1 else node_means(grads, local_size)
        estimate = torch.empty(d, dtype=shards[0].server.dtype, device=x.device) if local_size > 1 else None
        for sh in shards:
            g = means if sh.index is None else means[:, sh.index]
            est, _ = run_round(feedback, exchanger, sh.state, sh.server, g, t, segments=sh.segs, options=options)
            if sh.index is None:
                estimate = est
            else:
                estimate[sh.index] = est
        x.sub_(estimate.to(x.dtype), alpha=lr_at(t))
        bits.append(bits[-1] + sum(feedback.value_bits(sh.segs, t) for sh in shards) / local_size)
        wire.append(
            wire[-1] + sum(feedback.wire_bytes(sh.segs, t, value_dtype=wire_values) for sh in shards) / local_size
        )
    n = len(norms)
    _warn_if_diverged(norms, "simulate")
    return SimResult(x, torch.tensor(norms, dtype=torch.float64), _counts(bits[:n]), _counts(wire[:n]))


@dataclass
class _Shard:
    """One shard of x with its own feedback state between the nodes (the whole of x without nodes)."""

    index: Tensor | None  # its entries' positions in x (None: all of x)
    segs: tuple
    state: dict
    server: Tensor

    @classmethod
    def split(cls, feedback: Feedback, sizes: Sequence[int], local_size: int, rows: int, x: Tensor) -> list[_Shard]:
        out = []
        for r in range(local_size):
            _, pieces = shard_pieces(range(len(sizes)), sizes, local_size, r)
            if not pieces:
                continue
            m = sum(pieces)
            state = feedback.init_state(m, rows=rows, dtype=x.dtype, device=x.device)
            server = torch.zeros(m, dtype=feedback.state_dtype(x.dtype), device=x.device)
            index = shard_index(sizes, local_size, r).to(x.device) if local_size > 1 else None
            out.append(cls(index, feedback.segments_for(pieces), state, server))
        return out


def _scheduled_lr(t: int, value: object) -> float:
    """A schedule's value at round ``t``: a finite number >= 0 (a warm-up may start at 0; a negative one ran
    gradient ascent, a NaN ran on to NaN, silently)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"lr({t}) must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"lr({t}) must be finite and >= 0, got {value}")
    return float(value)


def _check_run(feedback, grad_fn, segments) -> None:
    """The arguments :func:`simulate` and :func:`simulate_local` share, each error naming its argument."""
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback must be a torchkit feedback method (tk.EF21(...)), got {type(feedback).__name__}")
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be a callable x -> [n_workers, d] gradients, got {type(grad_fn).__name__}")
    if segments is not None:
        for n in segments:
            check_int("segments' sizes", n)


def _grads(grad_fn, x: Tensor, n_workers: int, d: int) -> Tensor:
    grads = grad_fn(x)
    if not isinstance(grads, Tensor) or grads.shape != (n_workers, d):
        got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"grad_fn must return [n_workers, d] = [{n_workers}, {d}], got {got}")
    return grads


def _check_x0(x0) -> None:
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor (float64 for research runs), got {x0.dtype}")
    if x0.dim() != 1:
        raise ValueError(f"x0 must be a 1-D vector, got shape {tuple(x0.shape)}")


def _warn_if_diverged(norms: Sequence[float], where: str) -> None:
    """A run whose ||grad f||^2 became NaN or Inf diverged: say so, with the first round it happened at."""
    bad = next((t for t, v in enumerate(norms) if not math.isfinite(v)), None)
    if bad is not None:
        warnings.warn(
            f"{where}: ||grad f||^2 is not finite from round {bad} on: the run diverged (a smaller lr, or the "
            "theoretical step size of torchkit.theory, trains)",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclass
class LocalSimResult(SimResult):
    """Outcome of :func:`simulate_local`; values are at the anchors (the synchronised points), round 0..rounds.

    Attributes:
        x: final anchor.
        grad_norm_sq: ``||mean_i grad_i(anchor_r)||^2`` (the first local step's gradients of round r, which all
            start at the anchor; one extra ``grad_fn`` call at the final anchor).
        bits: values-only bits sent per worker before anchor r (32 bits a value, whatever ``wire_dtype``).
        wire_bytes: payload bytes per worker before anchor r (values in ``wire_dtype`` + indices).
        evals: ``eval_fn(anchor_r)`` when given, else ``None``.
    """

    evals: Tensor | None = None


Factory = Callable[[list[Tensor]], torch.optim.Optimizer]


@torch.no_grad()
def simulate_local(
    feedback: Feedback,
    grad_fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    n_workers: int,
    rounds: int,
    sync_every: int,
    inner_optimizer: float | Factory,
    outer_optimizer: Factory | None = None,
    inner_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    outer_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    segments: Sequence[int] | None = None,
    wire_dtype: torch.dtype | None = None,
    eval_fn: Callable[[Tensor], float] | None = None,
    overlap: bool = False,
    overlap_mix: float | None = None,
) -> LocalSimResult:
    r"""Compressed local SGD on n simulated workers: the trajectory of :class:`torchkit.LocalSGD`.

    Every round, each worker takes ``sync_every`` steps of its own inner optimizer from the anchor on
    ``grad_fn(X)`` (``X``: the ``[n_workers, d]`` local iterates, one row per worker; returns ``[n_workers, d]``
    gradients, row i at row i of X), then one round of ``feedback`` runs on the pseudo-gradients
    ``anchor - X`` (:func:`torchkit.comm.run_round`), the outer optimizer steps the anchor on the estimate and
    every worker restarts from the new anchor.

    Args:
        inner_optimizer: a learning rate (plain SGD) or a factory ``params -> Optimizer``, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``; each worker gets its own, over views of
            its row (one per segment), so any optimizer behaves as on a rank of :class:`~torchkit.LocalSGD` whose
            parameters have the ``segments`` sizes.
        outer_optimizer: a factory ``params -> Optimizer`` over the anchor's views; ``None`` is plain averaging
            (SGD with lr 1); DiLoCo: ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)``.
        inner_scheduler, outer_scheduler: ``optimizer -> LR scheduler``, stepped after every inner step of each
            worker and after every outer step.
        segments: the parameter sizes (summing to d): the views the optimizers see and, with
            ``granularity="tensor"``, what is compressed on its own. Default: one vector.
        wire_dtype: dtype of the values sent; the rounding stays in the feedback state, as on the wire.
        eval_fn: called with the anchor at every round (e.g. the full training loss), into ``.evals``.
        overlap: :class:`~torchkit.LocalSGD`'s ``overlap``: round r's estimate steps the anchor at synchronisation
            r + 1, and each worker goes on from the anchor minus its own last pseudo-gradient; the last round is
            applied after the last period (``LocalSGD.flush``), so ``x`` is the final anchor either way.
        overlap_mix: :class:`~torchkit.LocalSGD`'s ``overlap_mix`` (EF14 with ``overlap``; ``None``: 0.5): each
            worker's start moves by this share of what its round held back (``e_new - e_old``).

    ``x0``'s dtype is the computation's (float64 for research runs; the wire is then counted in fp32 values).
    """
    check_int("n_workers", n_workers)
    check_int("rounds", rounds, low=0)
    check_int("sync_every", sync_every)
    check_bool("overlap", overlap)
    _check_run(feedback, grad_fn, segments)
    mix = check_overlap_mix(overlap_mix, overlap, feedback)
    _check_x0(x0)
    d = x0.numel()
    sizes = check_segments(segments, d) if segments is not None else (d,)
    inner = inner_optimizer
    if isinstance(inner, numbers.Real) and not isinstance(inner, bool):
        lr = check_positive("inner_optimizer (a learning rate)", inner)  # as simulate's lr: NaN, inf and 0 refused
        inner = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    elif not callable(inner):
        raise TypeError(f"inner_optimizer must be a learning rate or a factory params -> Optimizer, got {inner!r}")
    if outer_optimizer is not None and not callable(outer_optimizer):
        raise TypeError(f"outer_optimizer must be a factory params -> Optimizer, got {outer_optimizer!r}")
    options = RoundOptions(wire_dtype=wire_dtype)
    segs = feedback.segments_for(sizes)
    spans = [(a, a + n) for a, n in zip([0, *_cumsum(sizes)[:-1]], sizes)]

    anchor = x0.clone()
    X = x0.expand(n_workers, d).clone()
    anchor_views = [anchor[a:b] for a, b in spans]
    worker_views = [[X[i, a:b] for a, b in spans] for i in range(n_workers)]
    inners = [inner(views) for views in worker_views]
    outer = torch.optim.SGD(anchor_views, lr=1.0) if outer_optimizer is None else outer_optimizer(anchor_views)
    for opt, label in [(o, "inner_optimizer") for o in inners] + [(outer, "outer_optimizer")]:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{label} must return a torch.optim.Optimizer, got {type(opt).__name__}")
    inner_scheds = [inner_scheduler(o) for o in inners] if inner_scheduler is not None else []
    outer_sched = outer_scheduler(outer) if outer_scheduler is not None else None

    sdt = feedback.state_dtype(x0.dtype)
    state = feedback.init_state(d, rows=n_workers, dtype=x0.dtype, device=x0.device)
    server = torch.zeros(d, dtype=sdt, device=x0.device)
    exchanger = LocalExchanger(n_workers)
    wire_values = wire_dtype or (torch.float32 if x0.dtype == torch.float64 else x0.dtype)
    norms, bits, wire, evals = [], [0], [0], []
    delta = torch.empty(n_workers, d, dtype=sdt, device=x0.device)
    start, pending = X.clone(), None  # overlap: each worker's period start; the estimate not applied yet

    def outer_step(estimate: Tensor) -> None:
        for v, (a, b) in zip(anchor_views, spans):
            v.grad = estimate[a:b].to(anchor.dtype)
        outer.step()
        if outer_sched is not None:
            outer_sched.step()

    for r in range(rounds + 1):
        if eval_fn is not None:
            evals.append(float(eval_fn(anchor)))
        for s in range(sync_every if r < rounds else 1):
            grads = _grads(grad_fn, X, n_workers, d)
            if s == 0:
                norms.append(float(grads.mean(0).pow(2).sum()))
                if r == rounds:
                    break
            for i in range(n_workers):
                for v, (a, b) in zip(worker_views[i], spans):
                    v.grad = grads[i, a:b]
                inners[i].step()
            for sched in inner_scheds:
                sched.step()
        if r == rounds:
            break
        delta.copy_(start if overlap else anchor.expand(n_workers, d)).sub_(X)
        if overlap:
            if pending is not None:
                outer_step(pending)
            X.copy_(anchor.expand(n_workers, d) - delta.to(X.dtype))
            start.copy_(X)
        kept = state["error"].clone() if mix else None
        estimate, _ = run_round(feedback, exchanger, state, server, delta, r, segments=segs, options=options)
        if overlap:
            pending = estimate.clone()
            if kept is not None:  # each worker and its start moved by mix * what its round held back
                X.add_(torch.sub(state["error"], kept).mul_(mix).to(X.dtype))
                start.copy_(X)
        else:
            outer_step(estimate)
            X.copy_(anchor.expand(n_workers, d))
        bits.append(bits[-1] + feedback.value_bits(segs, r))
        wire.append(wire[-1] + feedback.wire_bytes(segs, r, value_dtype=wire_values))
    if pending is not None:  # LocalSGD.flush: the last round in flight, applied
        outer_step(pending)
    _warn_if_diverged(norms, "simulate_local")
    return LocalSimResult(
        anchor,
        torch.tensor(norms, dtype=torch.float64),
        _counts(bits),
        _counts(wire),
        torch.tensor(evals, dtype=torch.float64) if eval_fn is not None else None,
    )


def _cumsum(sizes):
    out, acc = [], 0
    for n in sizes:
        acc += n
        out.append(acc)
    return out
