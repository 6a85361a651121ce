"""The single definition of a round, and the exchangers the front ends plug into it.

:func:`start_round` is what the optimizer wrapper, the DDP hook and the simulator all execute: each worker runs
the feedback method on its gradient, the messages are exchanged, and the continuation of the exchange, the only
server update there is, turns the aggregate into the estimate. It returns a future (the DDP hook hands it to
DDP); :func:`run_round` waits on it. The exchanger is the only thing that differs between front ends: n workers
in one process (:class:`LocalExchanger`, messages with n rows, a future that is already complete), or one
worker per rank over ``torch.distributed`` (:class:`DistExchanger`). The wire dtype, the dense fallback when
compression does not pay, and the policy for non-finite gradients (:class:`RoundOptions`) live here too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .compress import (
    INT2,
    CyclicTopK,
    DenseMessage,
    Identity,
    Message,
    SparseMessage,
    _bytes_part,
    dense_wire_bytes,
    pack_message,
    support_exchange,
    unpack_message,
)
from .feedback import Feedback
from .process_group import destroy_at_exit
from .state import Block

__all__ = [
    "Exchanger",
    "LocalExchanger",
    "DistExchanger",
    "RoundOptions",
    "RoundResult",
    "NonFiniteGradientError",
    "start_round",
    "run_round",
    "aggregate_rows",
    "all_gather_rows",
    "nonfinite_flag",
    "agree_max",
    "settle_nonfinite",
    "root_error",
    "check_wire",
    "received_bytes",
    "plan_exchange",
]

log = logging.getLogger(__name__)

NonFinite = Literal["raise", "skip", "sanitize", "flag"]  # a front end's policy; a round reports "flag"/"sanitize"
#: what a message's values may travel as (sparse messages only for the integers: int8 with one fp32 scale per chunk
#: or segment, int2 codes with two fp32 magnitudes)
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8) + ((INT2,) if INT2 else ())


class NonFiniteGradientError(ValueError):
    """A worker's gradient held NaN or Inf; raised on every rank of the round."""


@dataclass(frozen=True)
class RoundOptions:
    """How a round treats the wire and bad input.

    Args:
        wire_dtype: dtype of the sent values (``None``: the gradient's): a float dtype, ``torch.int8`` (one fp32
            scale per chunk or segment) or ``torch.int2`` (2-bit codes: the sign and one of two fp32 magnitudes per
            chunk or segment, :func:`~torchkit.compress.quantize_2bit`); the integers for sparse messages only,
            dense rounds go in the state dtype. What rounding removes stays in the feedback state
            (:meth:`Feedback.round_values_`).
        min_compression_rate: run the method with the Identity compressor (an exact round over ``all_reduce``)
            when the dense payload is less than this many times the compressed one, ``n`` packed messages (wire
            bytes run on to a multiple of 8, and the 8-byte non-finite check; a shared support, summed by
            ``all_reduce``: ``wire bytes``).
            ``0`` always compresses.
        nonfinite: how the round itself reports a non-finite gradient on any worker, without reading anything on
            the host (the front ends agree on it before a round with :func:`agree_max` and act on it with
            :func:`settle_nonfinite`; this is for a round that must start before that is known, the DDP hook's).
            ``"flag"``: the estimate is NaN on every rank and :attr:`RoundResult.checks` hold the agreed checks,
            for the caller to check when a read costs nothing (the DDP hook: at its next iteration; the worker
            whose gradient was bad may be left with non-finite state). ``"sanitize"``: bad entries count as the
            method's neutral value (no new information, so the state stays finite and unchanged there), the estimate
            is NaN on every rank. ``None``: the caller has checked.
        track_error: also compute :meth:`Feedback.distortion_sq` after the worker step (one pass over the state).
    """

    wire_dtype: torch.dtype | None = None
    min_compression_rate: float = 0.0
    nonfinite: NonFinite | None = None
    track_error: bool = False

    def __post_init__(self):
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            raise TypeError(f"wire_dtype must be one of {[str(t) for t in WIRE_DTYPES]}, got {self.wire_dtype!r}")
        rate = self.min_compression_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"min_compression_rate must be >= 0, got {rate!r}")
        if self.nonfinite not in (None, "sanitize", "flag"):
            raise ValueError(f"a round's nonfinite must be 'flag', 'sanitize' or None, got {self.nonfinite!r}")


@dataclass
class RoundResult:
    """What a round produced: the estimate (the server's, written into ``out``), the message this worker sent,
    the bytes it put on the wire and the bytes a dense round would have, and whether the round was skipped."""

    estimate: Tensor
    message: Message | None
    sent_bytes: int
    dense_bytes: int
    skipped: bool = False
    distortion_sq: Tensor | None = None
    #: float64 non-finite checks on the estimate's device (:func:`torchkit.ops.nonfinite_check`, one per worker or
    #: already summed), agreed on every rank: not all finite when some worker's input was not
    checks: Tensor | None = None

    @property
    def nonfinite(self) -> Tensor | None:
        """0-d bool: some worker's input held NaN or Inf (computed from :attr:`checks` when read)."""
        return None if self.checks is None else ~torch.isfinite(self.checks.sum())

    @property
    def dense(self) -> bool:
        """Whether this round went dense: the method's dense round, or the Identity fallback (not skipped ones)."""
        return not self.skipped and (self.message is None or isinstance(self.message, DenseMessage))


# --------------------------------------------------------------------------------------------- exchangers
class Exchanger(Protocol):
    n_workers: int
    first_worker: int

    def exchange(self, msg: Message | None, weights: Sequence[float], out: Tensor, bad: Tensor | None, add: bool):
        """Start decoding every worker's ``msg`` into ``out`` (``add``: onto it): ``(future, bytes sent)``, the
        future's value ``(out, checks)``: every worker's ``bad`` (float64 non-finite checks,
        :func:`torchkit.ops.nonfinite_check`), agreed, and without ``add`` ``out`` NaN everywhere when one is not
        finite: an exchanger poisons ``out`` itself (:func:`aggregate_rows` with ``poison``), the round does not
        do it again."""
        ...

    def any_true(self, flag: Tensor):
        """A future of the OR of every worker's 0-d ``flag``."""
        ...


def aggregate_rows(
    msg: Message, weights: Sequence[float] | Tensor, out: Tensor, *, add: bool = False, poison: Tensor | None = None
) -> Tensor:
    """``out = sum_w weights[w] * decode(msg_w)`` over the message's rows, in row order (``add``: ``out +=``), NaN
    everywhere when the ``poison`` checks are not all finite: one launch for a sparse message
    (:func:`torchkit.ops.accumulate_`)."""
    w = weights if isinstance(weights, Tensor) else [float(x) for x in weights]  # a list: no tensor to read back
    return msg.add_to_(out, w, zero=not add, poison=poison)


def all_gather_rows(t: Tensor, n: int, group=None, *, async_op: bool = False):
    """Gather a 1-D tensor from every rank into the rows of an ``[n, len]`` tensor: ``(out, work)``."""
    out = t.new_empty((n, t.numel()))
    if t.is_cuda:
        work = dist.all_gather_into_tensor(out, t.contiguous(), group=group, async_op=async_op)
    else:  # Gloo has only the list form
        work = dist.all_gather(list(out.unbind(0)), t.contiguous(), group=group, async_op=async_op)
    return out, work


def nonfinite_flag(x: Tensor, dim: int | None = None) -> Tensor:
    """True where ``x`` (or a row of it) holds NaN or Inf: one reduction pass (min and max, which NaN and Inf
    reach), no temporary; about 20x faster than ``~isfinite(x).all()`` on the CPU."""
    if x.numel() == 0:  # (aminmax has no identity): nothing to hold NaN, a group of empty parameters
        return torch.zeros((), dtype=torch.bool, device=x.device) if dim is None else x.isnan().any(dim=dim)
    lo, hi = torch.aminmax(x, dim=dim)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


_CALLBACK_PREFIX = "Got the following error when running the callback: "


def root_error(exc: BaseException) -> BaseException:
    """The first error of a chain of future callbacks: each ``then`` that re-raises wraps the message once more
    ("Got the following error when running the callback: ..." and a traceback), so a dead peer used to reach the
    user three levels deep. Returns an exception of the first error's type where it is a known one (a
    ``torch.distributed`` error, :class:`NonFiniteGradientError`, a builtin), else a ``RuntimeError`` naming it."""
    text = str(exc)
    if _CALLBACK_PREFIX not in text:
        return exc
    root = text.rsplit(_CALLBACK_PREFIX, 1)[1].split("\n\nAt:\n", 1)[0].strip()
    name, sep, message = root.partition(": ")
    if not sep or not name.replace(".", "").replace("_", "").isalnum():
        return RuntimeError(root)
    known = {
        "NonFiniteGradientError": NonFiniteGradientError,
        "DistBackendError": getattr(dist, "DistBackendError", RuntimeError),
        "DistNetworkError": getattr(dist, "DistNetworkError", RuntimeError),
        "DistError": getattr(dist, "DistError", RuntimeError),
        "RuntimeError": RuntimeError,
        "ValueError": ValueError,
        "TypeError": TypeError,
    }
    kind = known.get(name.rsplit(".", 1)[-1])
    return kind(message) if kind is not None else RuntimeError(root)


class _InCaller:
    """What :meth:`DistExchanger.exchange` returns: the subset of ``torch.futures.Future``
    that :func:`start_round` and the front ends use (``wait``, ``value``, ``then``), run in the thread that waits,
    once. A chained ``then`` runs when the chain is waited for, in order; an error is raised by every later wait, as
    a torch future's."""

    def __init__(self, run: Callable[[], Any]):
        self._run: Callable[[], Any] | None = run
        self._outcome: tuple[bool, Any] | None = None

    def wait(self) -> Any:
        if self._outcome is None:
            run, self._run = self._run, None
            try:
                self._outcome = (True, run())
            except BaseException as exc:
                self._outcome = (False, exc)
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    value = wait

    def then(self, callback: Callable[[_InCaller], Any]) -> _InCaller:
        return _InCaller(lambda: callback(self))


def _done(value) -> _InCaller:
    """A completed future of ``value`` (an :class:`_InCaller`: its ``then`` chain costs a closure, not a
    ``torch.futures.Future`` per link)."""
    return _InCaller(lambda: value)


CHECK_BYTES = 8  # a sparse message's trailer on the wire: its sender's float64 non-finite check


def _as_checks(flag: Tensor) -> Tensor:
    """Bool flags as float64 checks: NaN where set, 0 elsewhere."""
    return torch.zeros(flag.shape, dtype=torch.float64, device=flag.device).masked_fill_(flag, float("nan"))


def _zero_check(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)


class LocalExchanger:
    """All n workers live in this process; their messages come as one n-row message."""

    first_worker = 0
    device = torch.device("cpu")

    def __init__(self, n_workers: int):
        self.n_workers = n_workers

    def exchange(self, msg, weights, out, bad, add=False):
        poison = None if add else bad
        if msg is None:
            ops.prepare_(out, zero=not add, poison=poison)
        else:
            if msg.rows != self.n_workers:
                raise ValueError(f"expected a message with {self.n_workers} rows, got {msg.rows}")
            aggregate_rows(msg, weights, out, add=add, poison=poison)
        return _done((out, bad)), 0

    def any_true(self, flag):
        return _done(flag.reshape(-1).any())

    def share_support(self, indices, leader, k, dtype, device):
        if indices is None:  # every worker is a row of this process's batch, so the leader's row is here too
            raise ValueError(f"worker {leader} holds no support in a batch of {self.n_workers} workers")
        return indices


class DistExchanger:
    """One worker per rank: sparse and sign messages are all-gathered (fixed sizes), dense ones all-reduced, and
    a shared support's values (:attr:`~torchkit.compress.SparseMessage.shared`) all-reduced at their common indices.

    Gathered messages are decoded in rank order on every rank, so every rank computes the same aggregate, equal
    bit for bit to :class:`LocalExchanger`'s. Dense rounds use ``all_reduce`` (whose summation order is the
    backend's), so they agree to rounding. Each worker's ``bad`` flag travels with its message. A collective that
    fails (a peer died, the group timed out) raises from the future, as in plain DDP.

    Every front end waits for its rounds itself, and the round is finished in the thread that waits
    (:class:`_InCaller`), never in a callback on the backend's thread: the DDP hook too, which completes its
    buckets' futures at the iteration's last bucket (:mod:`torchkit.ddp`). A Python callback on a Gloo thread (a
    ``torch.futures.Future.then``), its result, and the Python tensors a collective holds are released by that
    thread after the waiting thread has already been woken, and each release takes the GIL; when that was a
    script's last round, the thread could still need the GIL once the interpreter was finalising, and Python ends
    such a thread inside a C++ destructor: ``terminate called without an active exception`` (exit status -6) after
    the script's work was done (restarted LocalSGD jobs on 2 CPU ranks: 4 of 49 runs with callbacks, 0 of 57
    without; the README's Accelerate example with the hook: 2 of 30 and 1 of 37 runs with callbacks; backtraces:
    ``~ConcretePyObjectHolder`` of a ``then``'s result, ``~AsyncAllgatherWork`` -> ``THPVariable_clear``, each ->
    ``take_gil`` -> ``pthread_exit``). So the collectives' work objects waited for in a batch of rounds (the rounds
    a step starts, then waits for) are kept, and freed by the waiting thread when the next batch starts: the Gloo
    thread never drops the last reference to anything of Python's. The process group does not protect it:
    ``destroy_process_group`` leaves the Gloo threads running whenever torch modules imported after
    ``init_process_group`` hold the default group (``torch.optim``'s first use imports some that do).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.n_workers = dist.get_world_size(group)
        self.first_worker = dist.get_rank(group)
        self._waited: list = []  # this batch's works, waited for: freed by this thread, not by Gloo's
        self._batch_waited = False  # a wait came since the last collective started: the next one starts a batch
        destroy_at_exit()  # a script that leaves its group alive must not abort at exit (see torchkit.process_group)

    def exchange(self, msg, weights, out, bad, add=False):
        check = _zero_check(out.device) if bad is None else bad if bad.dim() == 0 else bad.sum()
        if msg is None or isinstance(msg, DenseMessage):
            d = out.numel()
            red, work = self._sum_with_flag(None if msg is None else msg.values[0], weights, d, check, out)

            def finish_dense():
                checks = red[d:].to(torch.float64)
                out.add_(red[:d]) if add else ops.prepare_(out.copy_(red[:d]), poison=checks)
                return out, checks

            return self._finished(work, finish_dense), red.numel() * red.element_size()
        if isinstance(msg, SparseMessage) and msg.shared:
            return self._sum_shared(msg, weights, out, check, add)
        # the check travels in the same bytes, its 8 bytes last
        packed, layout = pack_message(msg, trailer=check.reshape(1).view(torch.uint8))
        gathered, work = all_gather_rows(packed, self.n_workers, self.group, async_op=True)

        def finish_sparse():
            checks = _bytes_part(gathered, -CHECK_BYTES, None, torch.float64)  # [n, 1], in place
            rows = unpack_message(gathered[:, :-CHECK_BYTES], layout)  # fp32 values, int32 indices: in place too
            aggregate_rows(rows, weights, out, add=add, poison=None if add else checks)
            return out, checks

        return self._finished(work, finish_sparse), packed.numel()

    def _finished(self, work, finish):
        """A future of ``finish()`` once ``work`` has completed, run by the thread that waits for it; a failed
        collective raises from it, on every rank."""
        if self._batch_waited:  # a new batch: free the last one's works here (this thread waits again soon)
            self._waited, self._batch_waited = [], False

        def in_caller():
            self._batch_waited = True
            work.wait()
            self._waited.append(work)
            return finish()

        return _InCaller(in_caller)

    def _sum_shared(self, msg: SparseMessage, weights, out: Tensor, check: Tensor, add: bool):
        """Every worker's values sit at the same indices: sum them with one ``all_reduce`` of k values (and the
        check) in the aggregate's dtype (:func:`check_wire`), and add the sum at the shared indices."""
        k = msg.values.shape[1]
        red, work = self._sum_with_flag(msg.values[0], weights, k, check, out)
        idx = msg.indices[:1]

        def finish_shared():
            checks = red[k:].to(torch.float64)
            ops.accumulate_(out, red[:k].to(out.dtype).unsqueeze(0), idx, zero=not add, poison=None if add else checks)
            return out, checks

        sent = red.numel() * red.element_size()
        if msg.leader == self.first_worker:
            sent += idx.numel() * idx.element_size()  # the support this rank broadcast in the worker step
        return self._finished(work, finish_shared), sent

    def sum_(self, buf: Tensor):
        """Start summing ``buf`` over the workers, in place (``all_reduce``): a future of ``buf``."""
        return self._finished(dist.all_reduce(buf, group=self.group, async_op=True), lambda: buf)

    def _sum_with_flag(self, values: Tensor | None, weights, n: int, check: Tensor, out: Tensor):
        """Start one ``all_reduce`` of this worker's weighted ``n`` values (zeros for ``None``) and its check as 0
        or NaN, in ``out``'s dtype (the state's): ``(buffer, work)``, the checks' sum last (0 or NaN)."""
        red = torch.zeros(n + 1, dtype=out.dtype, device=out.device)
        if values is not None:
            red[:n].copy_(values).mul_(weights[self.first_worker])
        red[n] = ops.poison_of(check).to(red.dtype)
        return red, dist.all_reduce(red, group=self.group, async_op=True)

    def share_support(self, indices, leader, k, dtype, device):
        """The leader's indices, broadcast from it (one collective of k indices) onto every rank's ``device``."""
        buf = indices if indices is not None else torch.empty(k, dtype=dtype, device=device)
        src = leader if self.group is None else dist.get_global_rank(self.group, leader)  # torch < 2.6: no group_src
        dist.broadcast(buf, src=src, group=self.group)
        return buf

    @property
    def device(self) -> torch.device:
        """Where a small tensor of this group's collectives lives (NCCL: this rank's GPU)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def max_(self, t: Tensor):
        """Start the element-wise maximum of ``t`` over the workers, in place (``all_reduce``, MAX): a future of
        ``t``, waited for in the thread that waits."""
        return self._finished(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), lambda: t)

    def any_true(self, flag):
        return self.max_(flag.reshape(1).to(torch.float32)).then(lambda fut: fut.wait()[0] > 0)


def received_bytes(collective: Literal["all_reduce", "all_gather", "broadcast"], n: int, nbytes: int) -> float:
    """Bytes one rank receives in a collective of ``nbytes`` per rank among ``n``, with the bandwidth-optimal
    algorithms (ring all-reduce: a reduce-scatter and an all-gather of ``nbytes / n`` pieces; ring all-gather;
    a broadcast's ``nbytes`` reach the ``n - 1`` others, ``(n - 1) / n`` of it per rank on average). Checked
    against Gloo on a loopback's counters by ``benchmarks/bench_exchange.py``."""
    if collective == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if collective == "all_gather":
        return (n - 1) * nbytes
    if collective == "broadcast":
        return (n - 1) / n * nbytes
    raise ValueError(f"collective must be 'all_reduce', 'all_gather' or 'broadcast', got {collective!r}")


# ------------------------------------------------------------------------------------ non-finite input
# One protocol for every front end: each worker flags its own input (nonfinite_flag), the workers agree on the flag
# before any state changes (agree_max, in one small collective with whatever else they agree on), and every worker
# then settles it alike (settle_nonfinite: skip, or NonFiniteGradientError on every rank). The DDP hook, whose rounds
# must start before the flag is known, lets the round carry it instead (RoundOptions.nonfinite="flag"/"sanitize").


def agree_max(exchanger: Exchanger, flags: Tensor) -> Tensor:
    """The elementwise MAX of a small vector over every worker, on the host: one collective (none alone)."""
    if isinstance(exchanger, DistExchanger):
        t = flags.to(exchanger.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=exchanger.group)
        return t.cpu()
    return flags.cpu()


def on_any_rank(exchanger: Exchanger, flag: bool) -> bool:
    """Whether ``flag`` holds on any worker (:func:`agree_max` of one flag): an error on one rank that every rank
    must raise, so that none goes on alone into a collective the others left."""
    return bool(agree_max(exchanger, torch.tensor([float(flag)]))[0] > 0)


def agreement_bytes(exchanger: Exchanger, flags: Tensor) -> int:
    """The bytes this rank puts on the wire to :func:`agree_max` ``flags`` (none alone): a front end counts them."""
    alone = not isinstance(exchanger, DistExchanger) or exchanger.n_workers == 1
    return 0 if alone else flags.numel() * flags.element_size()


def settle_nonfinite(policy: NonFinite, *, scaled: bool, what: str, unchanged: str, unit: str = "steps") -> None:
    """Some worker's ``what`` was not finite, agreed on every worker: raise :class:`NonFiniteGradientError` on every
    rank (``policy="raise"`` without a GradScaler), else return and let the caller skip (and count) it."""
    if policy == "raise" and not scaled:
        raise NonFiniteGradientError(
            f"non-finite {what} (NaN or Inf) on at least one rank: {unchanged} (pass nonfinite='skip' to skip such "
            f"{unit} instead)"
        )
    log.warning("non-finite %s: %s, skipped", what, unchanged)


def check_wire(feedback: Feedback, wire_dtype: torch.dtype | None) -> None:
    """A front end's check of its wire against its method. Values summed by ``all_reduce`` (a shared support) travel
    and are summed in the aggregate's dtype (a sum in bf16 would round the aggregate after each worker kept its own
    rounding, so the EF21 family's server estimate would drift from the workers' mean shift): a float wire dtype is
    not used for them, and int8 and int2, whose scales are each worker's own, are refused."""
    if wire_dtype is not None and not wire_dtype.is_floating_point and feedback.compressor.shared_support:
        raise ValueError(
            f"wire_dtype={wire_dtype} cannot carry {feedback.compressor!r}, whose values are summed by all_reduce "
            f"(each worker's {wire_dtype} values have their own scale); leave wire_dtype=None"
        )


# ------------------------------------------------------------------------------------------------ the round
def start_round(
    feedback: Feedback,
    exchanger: Exchanger,
    block: Block,
    grad: Tensor,
    step: int,
    options: RoundOptions = RoundOptions(),
    *,
    out: Tensor | None = None,
) -> torch.futures.Future:
    """Start one round; a future of its :class:`RoundResult`.

    ``grad`` has the block's layout (``[d]``, or ``[rows, d]`` for the simulator's workers). The estimate is
    written into ``out`` (default: ``grad`` itself, which the worker step has consumed by then). Without a
    server estimate in the block (one worker) the EF21 family's estimate is its own shift, equal to it.
    """
    if out is None:
        if grad.dim() != 1:
            raise ValueError("a [rows, d] gradient needs an out= vector for the estimate")
        out = grad
    n = exchanger.n_workers
    d = grad.shape[-1]
    dense_bytes = d * grad.element_size()
    check_wire(feedback, options.wire_dtype)
    use = _method_for_round(feedback.at(step), block, step, n, grad, options)
    bad = None
    if options.nonfinite is not None and (options.nonfinite == "sanitize" or not use.compressor.reveals_nonfinite):
        bad = _as_checks(nonfinite_flag(grad.reshape(-1, d), dim=1))
    return _exchange(feedback, use, exchanger, block, grad, step, options, out, bad, dense_bytes)


def run_round(
    feedback: Feedback,
    exchanger: Exchanger,
    state: dict[str, Tensor] | Block,
    server: Tensor | None,
    grad: Tensor,
    step: int,
    *,
    segments: Sequence[int] | None = None,
    options: RoundOptions = RoundOptions(),
) -> tuple[Tensor, Message | None]:
    """One round, waited for: ``(estimate, message)``. ``estimate`` is ``server``, updated in place.

    Takes a :class:`~torchkit.state.Block`, or the state vectors and the server estimate directly (the form the
    simulator and the tests use).
    """
    if isinstance(state, Block):
        block = state
    else:
        block = _loose_block(feedback, state, server, grad.shape[-1], segments)
    out = server if server is not None else torch.empty(grad.shape[-1], dtype=grad.dtype, device=grad.device)
    if block.server is not None and block.server is out:  # the estimate lands in the server vector itself
        out = torch.empty_like(out)
        res = start_round(feedback, exchanger, block, grad, step, options, out=out).wait()
        return block.server, res.message
    res = start_round(feedback, exchanger, block, grad, step, options, out=out).wait()
    return res.estimate, res.message


def _loose_block(feedback, state, server, d, segments) -> Block:
    server = server if feedback.server_state else None
    return Block(feedback, ("x",), (d,), state=state, server=server, segments=segments or (d,))


def _method_for_round(feedback, block, step, n, grad, options) -> Feedback:
    """The feedback method as this round runs it (:func:`plan_exchange`), decided once per block, wire and group
    size (the byte counts depend on nothing else)."""
    auto = getattr(feedback.compressor, "exchange", "gather") == "auto" and n > 1
    if feedback.sends_in_round(step) != "compressed" or (options.min_compression_rate <= 0 and not auto):
        return feedback
    wire = options.wire_dtype or grad.dtype
    key = (id(feedback), wire, grad.dtype, n, options.min_compression_rate)
    use = block.plans.get(key)
    if use is None:
        use = block.plans[key] = plan_exchange(
            feedback, block.segments, step, n, wire, grad.dtype, options.min_compression_rate, where=block.names
        )
    return use


def plan_exchange(
    feedback: Feedback,
    segments: Sequence[int],
    step: int,
    n: int,
    wire: torch.dtype,
    dtype: torch.dtype,
    rate: float,
    *,
    where: Sequence = (),
) -> Feedback:
    """Which exchange a block's round uses among ``n`` workers: the byte model of what each rank handles, the dense
    all-reduce's ``d`` values against the compressed round's ``n`` messages (all-gathered) or one message (a shared
    support, summed by ``all_reduce``). A compressed exchange is used while the dense payload is at least ``rate``
    times its own (``min_compression_rate``; its decode work grows with its bytes, n messages against one); the
    method runs with the Identity compressor (an exact all-reduce) otherwise.

    With ``TopK(exchange="auto")`` (``rate`` at least 1) a block whose all-gather does not pay takes the same k on a
    shared support (:class:`~torchkit.compress.CyclicTopK`) if that pays, which it does up to a density of about
    ``1 / (1 + index bytes / value bytes)`` whatever ``n``; float wires only (integer values carry each worker's own
    scale). The choice is logged at INFO once per block, group size and wire."""
    comp = feedback.compressor
    auto = getattr(comp, "exchange", "gather") == "auto" and n > 1
    rate = max(rate, 1.0) if auto else rate
    dense = dense_wire_bytes(sum(segments), dtype)  # the fallback's all_reduce, in the state's dtype (fp32 at least)
    message = feedback.wire_bytes(segments, step, wire)
    if comp.shared_support:  # all_reduce of k values, like the dense one
        cost = {"shared support": message}
    else:  # n packed rows, each run on to 8 bytes and its sender's non-finite check (DistExchanger)
        cost = {"all-gather": n * (-(-message // 8) * 8 + CHECK_BYTES)}
    use = feedback if dense >= rate * next(iter(cost.values())) else None
    if use is None and auto and wire.is_floating_point:
        shared = feedback.with_compressor(CyclicTopK(comp.k, ratio=comp.ratio))
        cost["shared support"] = shared.wire_bytes(segments, step, wire)
        use = shared if dense >= rate * cost["shared support"] else None
    use = use or feedback.with_compressor(Identity())
    if auto or use.compressor is not comp:
        kind = use.compressor
        chosen = "dense" if isinstance(kind, Identity) else "shared support" if kind.shared_support else "all-gather"
        log.info(
            "round plan for %s (%d entries, %d ranks, %s wire): %s; bytes per rank: dense %d, %s", _where(where),
            sum(segments), n, wire, chosen, dense, ", ".join(f"{k} {v}" for k, v in cost.items()),
        )  # fmt: skip
    return use


def _where(names: Sequence) -> str:
    names = list(names)
    return ", ".join(map(str, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _exchange(feedback, use, exchanger, block, grad, step, options, out, bad, dense_bytes):
    n = exchanger.n_workers
    sanitize = options.nonfinite == "sanitize"
    with support_exchange(exchanger):  # a compressor that agrees on its support across workers does it here
        msg = use.worker_step(
            block.state, grad, step, worker=exchanger.first_worker, n_workers=n, segments=block.segments,
            sanitize=sanitize,
        )  # fmt: skip
    if options.nonfinite is not None and bad is None and msg is not None:
        bad = msg.nonfinite()  # its check: the compressor keeps every non-finite entry; before the wire clamps an Inf
    if options.wire_dtype is not None and not use.compressor.shared_support:  # summed in the aggregate's dtype
        msg = use.round_values_(block.state, msg, options.wire_dtype)
    err = (
        feedback.distortion_sq(block.state, grad, worker=exchanger.first_worker, n_workers=n)
        if options.track_error
        else None
    )
    into_server = feedback.server_state and block.server is not None  # the aggregate is added to it directly
    agg = block.server if into_server else block.aggregate_buffer(out, feedback.state_dtype(grad.dtype))
    if feedback.server_state and block.server is None and n == 1:  # one worker: its shift is the estimate
        fut, sent = _done((agg, bad)), 0
    elif n == 1:  # a one-rank group: nothing to exchange, decode the message in place
        fut, sent = LocalExchanger(1).exchange(msg, feedback.aggregation_weights(1), agg, bad, into_server)
    else:
        fut, sent = exchanger.exchange(msg, feedback.aggregation_weights(n), agg, bad, into_server)

    def finish(f):
        agg, checks = f.value()
        est = agg
        if feedback.server_state and block.server is None:
            est = _row(block.state[feedback.estimate_state])
        if est is not out:
            out.copy_(est)
        if options.nonfinite is not None and checks is not None and (est is not agg or into_server):
            ops.prepare_(out, poison=checks)  # NaN on every rank: GradScaler then skips the step everywhere
        # (otherwise the decode has done it: a decode without add poisons its own output)
        return RoundResult(out, msg, sent, dense_bytes, distortion_sq=err, checks=checks)

    return fut.then(finish)


def _row(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t[0]
