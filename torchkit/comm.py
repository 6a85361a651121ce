"""The single definition of a round, and the exchangers the front ends plug into it.

``run_round`` is what the optimizer wrapper, the DDP hook and the simulator all execute: each worker
runs the feedback method on its gradient, the messages are exchanged, the server aggregates. The
exchanger is the only thing that differs: n workers in one process (:class:`LocalExchanger`, messages
with n rows), or one worker per rank over ``torch.distributed`` (:class:`DistExchanger`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from .compress import DenseMessage, Message, SignMessage, SparseMessage, pack_message, unpack_message
from .feedback import Feedback

__all__ = ["Exchanger", "LocalExchanger", "DistExchanger", "run_round", "aggregate_rows", "all_gather_rows"]


class Exchanger(Protocol):
    n_workers: int
    first_worker: int

    def aggregate(self, msg: Message | None, weights: Sequence[float], out: Tensor) -> Tensor:
        """Write ``sum_i weights[i] * decode(msg_i)`` over all n workers into ``out`` and return it."""
        ...


def aggregate_rows(msg: Message, weights: Sequence[float] | Tensor, out: Tensor) -> Tensor:
    """``out = sum_w weights[w] * decode(msg_w)`` over the message's rows, in row order."""
    out.zero_()
    w = torch.as_tensor(weights, dtype=torch.float64)
    return msg.add_to_(out, w)


def all_gather_rows(t: Tensor, n: int, group=None, *, async_op: bool = False):
    """Gather a 1-D tensor from every rank into the rows of an ``[n, len]`` tensor: ``(out, work)``."""
    out = t.new_empty((n, t.numel()))
    if t.is_cuda:
        work = dist.all_gather_into_tensor(out, t.contiguous(), group=group, async_op=async_op)
    else:  # Gloo has only the list form
        work = dist.all_gather(list(out.unbind(0)), t.contiguous(), group=group, async_op=async_op)
    return out, work


class LocalExchanger:
    """All n workers live in this process; their messages come as one n-row message."""

    first_worker = 0

    def __init__(self, n_workers: int):
        self.n_workers = n_workers

    def aggregate(self, msg: Message | None, weights: Sequence[float], out: Tensor) -> Tensor:
        if msg is None:
            return out.zero_()
        if msg.rows != self.n_workers:
            raise ValueError(f"expected a message with {self.n_workers} rows, got {msg.rows}")
        return aggregate_rows(msg, weights, out)


class DistExchanger:
    """One worker per rank: sparse and sign messages are all-gathered (fixed sizes), dense ones all-reduced.

    Gathered messages are decoded in rank order on every rank, so every rank computes the same
    aggregate, equal bit for bit to :class:`LocalExchanger`'s. Dense rounds use ``all_reduce`` (whose
    summation order is the backend's), so they agree to rounding.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.n_workers = dist.get_world_size(group)
        self.first_worker = dist.get_rank(group)

    def gather_message(self, msg: SparseMessage | SignMessage) -> Message:
        buf, layout = pack_message(msg)
        gathered, _ = all_gather_rows(buf, self.n_workers, self.group)
        return unpack_message(gathered, layout)

    def aggregate(self, msg: Message | None, weights: Sequence[float], out: Tensor) -> Tensor:
        if msg is None:
            return out.zero_()
        if isinstance(msg, DenseMessage):
            out.copy_(msg.values[0].to(out.dtype)).mul_(weights[self.first_worker])
            dist.all_reduce(out, group=self.group)
            return out
        return aggregate_rows(self.gather_message(msg), weights, out)


def run_round(
    feedback: Feedback,
    exchanger: Exchanger,
    state: dict[str, Tensor],
    server: Tensor,
    grad: Tensor,
    step: int,
    *,
    segments: Sequence[int] | None = None,
    sanitize: bool = False,
) -> tuple[Tensor, Message | None]:
    """One round. Returns ``(estimate, message)``; ``estimate`` is ``server`` updated in place."""
    msg = feedback.worker_step(
        state,
        grad,
        step,
        worker=exchanger.first_worker,
        n_workers=exchanger.n_workers,
        segments=segments,
        sanitize=sanitize,
    )
    weights = feedback.aggregation_weights(exchanger.n_workers)
    if feedback.server_state:
        agg = exchanger.aggregate(msg, weights, torch.empty_like(server))
        server.add_(agg)
    else:
        exchanger.aggregate(msg, weights, server)
    return server, msg
