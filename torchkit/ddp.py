"""Error feedback inside ``DistributedDataParallel``: a communication hook and its state.

Two lines in a training script::

    state = tk.ddp.register(ddp_model, tk.EF14(tk.TopK(ratio=0.01)))

Each bucket runs one round of the feedback method: :func:`torchkit.comm.start_round`, the same round as
:class:`torchkit.CompressedOptimizer` and :func:`torchkit.sim.simulate` (the worker step, one asynchronous
``all_gather`` of the packed message, then decode and aggregate); the hook hands DDP the round's future with the
estimate written into the bucket.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import (
    DistExchanger,
    NonFinite,
    NonFiniteGradientError,
    RoundOptions,
    RoundResult,
    _InCaller,
    check_wire,
    nonfinite_flag,
    on_any_rank,
    root_error,
    start_round,
)
from .feedback import Feedback
from .frontend import RESUME_HINTS, FrontEnd, agree, check_group, live_instances, mesh_problems
from .metrics import CommMetrics
from .node import agree_on_nodes, node_shards
from .process_group import destroy_at_exit
from .state import RoundState, check_envelope, normalize_name

__all__ = ["CompressionState", "compression_hook", "register"]

log = logging.getLogger(__name__)


class CompressionState(FrontEnd):
    r"""Per-rank state of :func:`compression_hook`.

    Args:
        feedback: the error-feedback method. ``granularity="global"`` compresses each bucket with one
            top-k; ``granularity="tensor"`` compresses each parameter on its own, so the trajectory does
            not depend on the bucketing and equals :class:`torchkit.CompressedOptimizer`'s (with
            ``min_compression_rate=0``: by default a bucket that compressing would not pay for is sent dense,
            which the wrapper, whose block is a whole parameter group, does not do).
        process_group: the group DDP communicates over (``None``: the default group).
        start_iter: iterations run as a plain averaged ``all_reduce`` before compression starts. The
            feedback state is keyed by parameter and carried over when DDP rebuilds its buckets after the
            first iteration, so ``0`` is correct (unlike PowerSGD's ``start_powerSGD_iter >= 2``).
        min_compression_rate: a bucket is compressed only when its dense payload is at least this many times
            the compressed one, ``rate * n_ranks * packed bytes`` (values and indices, run on to a multiple of 8
            bytes, and the 8-byte non-finite check; ``rate * wire bytes`` for a shared support, whose values are
            summed by ``all_reduce``); other buckets run the method
            with the Identity compressor over ``all_reduce``, which keeps the feedback state consistent. ``0``
            compresses every bucket.
        wire_dtype: dtype of the sent values; ``None`` uses the bucket's dtype. What rounding to it
            removes stays in the feedback state (see :meth:`Feedback.round_values_`).
        grad_scaler: your ``torch.amp.GradScaler``, if the model trains under one. The hook then works on the
            unscaled gradient (so the feedback state does not depend on the loss scale), hands DDP the estimate
            scaled back (GradScaler unscales it as usual) and skips rounds exactly: when any rank's bucket is not
            finite, no rank's feedback state changes and the estimate is NaN, so GradScaler skips the step.
        nonfinite: what a non-finite gradient does (:class:`torchkit.comm.RoundOptions`). ``"raise"`` (default
            without a scaler): the estimate is NaN on every rank at once, and :class:`~torchkit.comm.
            NonFiniteGradientError` is raised on every rank at the next forward of the model (before DDP prepares
            its backward, so the model stays usable: catch it, restore a checkpoint of model, optimizer and hook
            state, go on), or by :meth:`state_dict` if the last iteration was the bad one; the flag is read on the
            host only then, when reading it costs no wait. The parameters the optimizer stepped are NaN, and so may
            be the feedback state, on every rank: restore a checkpoint. ``"skip"`` (default with a scaler): the
            buckets wait for the last one, one flag is agreed, and a bad step changes no state anywhere.
            ``"sanitize"``: bad entries count as the method's neutral value (the state stays finite), the estimate is
            NaN everywhere. ``"skip"`` and ``"sanitize"`` need an enabled ``grad_scaler``: only GradScaler stops the
            optimizer from applying the NaN estimate.
        track_error: also accumulate :attr:`error_norm_sq` (one extra pass over the state per bucket).
        node_group: node-aware compression (:mod:`torchkit.node`): the group of this rank's node, with
            ``process_group`` its peers on the other nodes (:func:`torchkit.node.node_groups` builds both under
            ``torchrun``; the DDP model itself spans every rank). Each bucket is reduce-scattered inside the node,
            each rank runs the round on its ``1/L`` shard between nodes, and the node all-gathers the estimate.

    Counters, for the last completed iteration on this rank: :attr:`bytes_sent`, :attr:`dense_bytes`
    (what plain DDP would have reduced for the same buckets), :attr:`dense_bytes_avoided` and, with
    ``track_error``, :attr:`error_norm_sq` (``||e||^2`` for EF14/EControl, ``||g - h||^2`` for EF21).

    .. warning:: The state holds one to two extra copies of the gradients (fp32) and is per rank:
        save ``state.state_dict()`` on every rank, not on rank 0 only, or use DCP (:meth:`feedback_stateful`) or
        per-rank side files (:mod:`torchkit.checkpoint`).
    """

    __slots__ = (
        # configuration (the process group and the scaler are never pickled)
        "feedback", "process_group", "start_iter", "min_compression_rate", "wire_dtype", "grad_scaler", "nonfinite",
        "track_error",
        # progress: iteration counter, and the iteration that is the method's step 0
        "iter", "fb_origin",
        # feedback state (flat blocks per bucket, keyed by parameter name), the bound model, the exchanger
        "round", "_keys", "_names", "_model", "_exchanger", "_agreed", "_queue", "_flags", "_node", "_world", "_used",
        # counters of the last completed iteration, and the running ones
        "bytes_sent", "dense_bytes", "error_norm_sq", "_acc", "_last", "_lock", "metrics", "_warm", "_options",
    )  # fmt: skip
    _TRANSIENT = ("process_group", "grad_scaler", "round", "_keys", "_model", "_exchanger", "_agreed", "_lock", "_acc",
                  "_queue", "_flags", "metrics", "_warm", "_options", "_node", "_world", "_used")  # fmt: skip

    def __init__(
        self,
        feedback: Feedback,
        *,
        process_group: dist.ProcessGroup | None = None,
        start_iter: int = 0,
        min_compression_rate: float = 2.0,
        wire_dtype: torch.dtype | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        nonfinite: NonFinite | None = None,
        track_error: bool = False,
        node_group: dist.ProcessGroup | None = None,
    ):
        nonfinite = _checked_options(feedback, start_iter, min_compression_rate, wire_dtype, grad_scaler, nonfinite)
        check_group(process_group)
        check_group(node_group, "node_group")
        self._node = node_shards(node_group, process_group, feedback)
        self._world = None
        # find_unused_parameters: (keys of the parameters used since the last round, keys of those with a mark hook)
        self._used: tuple[set, set] | None = None
        self.feedback = feedback
        self.process_group = process_group
        self.start_iter = start_iter
        self.min_compression_rate = float(min_compression_rate)
        self.wire_dtype = wire_dtype
        self.grad_scaler = grad_scaler
        self.nonfinite = nonfinite
        self.track_error = bool(track_error)
        self.iter = 0
        self.fb_origin = start_iter
        self.round = RoundState(feedback)
        self._keys: dict[int, Any] = {}  # id(param) -> stable key (name if bound, else first-seen order)
        self._names: dict[int, str] = {}
        self._model = None  # a weak reference: DDP's reducer holds this state, so a strong one would be a cycle
        self._exchanger = None
        self._agreed = False
        self._queue: list = []  # this iteration's buckets, finished at the last one
        self._flags: list = []  # nonfinite="raise": the last iteration's non-finite flags, read at the next one
        self.bytes_sent = self.dense_bytes = 0
        self.error_norm_sq = None
        self._acc = _new_counters()
        self._last = _new_counters()
        self._lock = threading.Lock()  # the flags: the hook writes them on autograd's device thread on a GPU
        self.metrics = CommMetrics()  # cumulative and last-iteration counters, the names every front end uses
        self._warm = 0  # bytes of this warm-up iteration's all-reduces so far
        self._options: dict[tuple, RoundOptions] = {}  # the rounds' options by bucket dtype and policy, made once

    # ------------------------------------------------------------------------------------ identity
    def bind(self, model: torch.nn.Module) -> CompressionState:
        """Key the state by parameter name (robust across processes and wrappers); :func:`register` calls this."""
        module = getattr(model, "module", model)
        bound = self._bound()
        if bound is not None and bound is not module:
            raise ValueError("this CompressionState is already registered on another model; make one per model")
        _check_module(module)
        self._names = {id(p): normalize_name(n) for n, p in module.named_parameters()}
        self._model = weakref.ref(module)
        destroy_at_exit()  # a script that leaves its group alive must not abort at exit (see torchkit.process_group)
        return self

    def _bound(self) -> torch.nn.Module | None:
        """The module (inside DDP) this state is bound to; None when unbound or once the module is gone.

        Held weakly: DDP's C++ reducer keeps this state alive and is invisible to Python's garbage collector,
        so a strong reference back into the model would keep the model, its gradients and its process group
        alive until the interpreter exits (where Gloo's threads can abort the process)."""
        return self._model() if self._model is not None else None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def dense_bytes_avoided(self) -> int:
        return self._last["avoided"]

    @property
    def _params(self) -> dict[Any, dict[str, Tensor]]:
        """Every placed parameter's state views, by key (the server estimate as ``"server"``)."""
        return self.round.params()

    @property
    def _pending(self) -> dict[Any, dict[str, Tensor]]:
        return self.round._pending

    @property
    def _buckets(self) -> dict[int, dict[str, Any]]:
        return {i: {"keys": b.names, "sizes": b.sizes} for i, b in self.round.blocks.items()}

    def _key(self, p: Tensor):
        k = self._keys.get(id(p))
        if k is None:
            k = self._names.get(id(p), len(self._keys))
            self._keys[id(p)] = k
        return k

    def _exchange(self) -> DistExchanger:
        if self._exchanger is None:
            self._exchanger = DistExchanger(self.process_group)
        return self._exchanger

    def _everyone(self) -> DistExchanger:
        """Every rank that holds the model: the exchange group, or node-aware the whole world (a flag or a warm-up
        all-reduce must reach every node's every rank)."""
        if self._node is None:
            return self._exchange()
        if self._world is None:
            self._world = DistExchanger(None)
        return self._world

    # ----------------------------------------------------------------------------------- checkpoint
    # the envelope, its checks and the load are the front-end contract's (torchkit.frontend); this front end adds
    # its iteration counter and the iteration that is the method's step 0
    kind = "CompressionState"
    restart_hint = "state.load_state_dict(state_dict, reset_on_mismatch=True) on every rank"

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (all of it is feedback state: :meth:`feedback_state_dict`)."""
        return self._with_frozen_names(self.feedback_state_dict())

    def feedback_state_dict(self, *, frozen=()) -> dict[str, Any]:
        """This rank's state, for every parameter of the bound model. Raises
        :class:`~torchkit.comm.NonFiniteGradientError` if the last iteration's gradient was not finite on some rank
        (``nonfinite="raise"``): that state is not worth saving."""
        _raise_if_flagged(self, consume=False)
        return super().feedback_state_dict(frozen=frozen)

    def load_state_dict(
        self, state_dict: dict[str, Any], *, reset_on_mismatch: bool = False, strict: bool = True
    ) -> tuple[list, list]:
        """Load this rank's state; ``(missing, unexpected)`` parameter names.

        A different world size, rank or method raises ``ValueError``; with ``reset_on_mismatch=True`` the feedback
        state is dropped instead and the next synchronising iteration is a fresh step 0 of the method (the
        iteration counter is kept). The ranks agree on that (one small ``all_reduce``: call it on every rank): when
        any rank resets, every rank does, so that no rank keeps a server estimate or step the others lost. When the
        state is bound to a model, the saved parameter names must match its names (``module.`` and ``_orig_mod.``
        prefixes aside), or ``strict=False`` loads the matching ones. Everything is checked before anything
        changes. When this rank's state was just restored from its own side file or DCP entry
        (:mod:`torchkit.checkpoint`) and no iteration has run since, it is kept and ``state_dict`` is not loaded
        (a framework handing every rank rank 0's checkpoint).
        """
        problems = check_envelope(
            state_dict, kind=self.kind, rank=self.process_rank, world_size=self.process_count, feedback=self.feedback,
            exchange=(self.rank, self.world_size),
        )  # fmt: skip
        if self.round.restored():
            log.info("CompressionState: kept the state restored from this rank's per-rank checkpoint")
            return [], []
        it = _checked_iter(state_dict)
        if reset_on_mismatch and _on_any_rank(self, bool(problems)):
            why = "; ".join(problems) if problems else "another rank's checkpoint state did not match"
            log.warning("CompressionState: %s; feedback state reset on every rank", why)
            self.round.reset()
            self.iter, self.fb_origin = it, max(it, self.start_iter)
            return [], []
        plan = self.check_feedback_state_dict(state_dict, strict=strict)
        plan.apply()
        return plan.missing, plan.unexpected

    def _feedback_layout(self) -> dict[Any, tuple[int, torch.dtype, Any]] | None:
        return self._layout_of(True)

    def _frozen_layout(self) -> dict[Any, tuple[int, torch.dtype, Any]]:
        return self._layout_of(False) or {}  # frozen after DDP was built, they stay in its buckets

    def _layout_of(self, trains: bool) -> dict[Any, tuple[int, torch.dtype, Any]] | None:
        module = self._bound()
        if module is None:
            return None  # registered by hand: the names are known once the buckets run
        length = (lambda n: n) if self._node is None else self._node.piece_length  # node-aware: this rank's piece
        layout = {
            normalize_name(n): (length(p.numel()), self.feedback.state_dtype(p.dtype), p.device)
            for n, p in module.named_parameters()
            if p.requires_grad == trains
        }
        return {n: v for n, v in layout.items() if v[0] or self._node is None}  # an empty piece holds no state

    def _mesh(self) -> dict[str, int] | None:
        return None if self._node is None else self._node.mesh(self.world_size)

    def _extras(self) -> dict[str, Any]:
        mesh = self._mesh()
        return {"iter": self.iter, "fb_origin": self.fb_origin, **({"mesh": mesh} if mesh else {})}

    def _extra_problems(self, sd) -> list[str]:
        return mesh_problems(sd.get("mesh"), self._mesh())

    def _migrate(self, sd):
        if sd.get("format_version") == 1:  # format 1 had no step: the iterations since the method's step 0
            sd = {**sd, "step": max(0, _checked_iter(sd) - int(sd.get("fb_origin", 0)))}
        return sd

    def _check_extras(self, sd) -> tuple[int, int]:
        it = _checked_iter(sd)
        origin = sd.get("fb_origin")
        if isinstance(origin, bool) or not isinstance(origin, int) or origin < 0:
            raise ValueError(f"CompressionState state_dict fb_origin must be an int >= 0, got {origin!r}")
        return it, origin

    def _apply_extras(self, checked: tuple[int, int]) -> None:
        self.iter, self.fb_origin = checked

    def __getstate__(self) -> dict[str, Any]:
        if self._node is not None:
            raise TypeError(
                "a node-aware CompressionState (node_group=...) cannot be pickled: its process groups do not pickle; "
                "checkpoint it with state_dict() or DCP"
            )
        out = {s: getattr(self, s) for s in self.__slots__ if s not in self._TRANSIENT}
        out["round_state"] = self.round.state_dict()
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        for s in self.__slots__:
            setattr(self, s, state.get(s))
        self.process_group, self.grad_scaler, self._model, self._exchanger, self._agreed = None, None, None, None, False
        self._node = self._world = self._used = None
        self._keys, self._acc, self._lock, self._queue, self._flags = {}, _new_counters(), threading.Lock(), [], []
        self.metrics, self._warm, self._options = CommMetrics(), 0, {}
        self.round = RoundState(self.feedback)
        saved = state.get("round_state")
        if saved:
            self.round.apply(self.round.check(saved))
        log.info("CompressionState unpickled: process group reset to the default group, grad_scaler and model unset")


def _checked_options(feedback, start_iter, min_compression_rate, wire_dtype, grad_scaler, nonfinite) -> NonFinite:
    """:class:`CompressionState`'s checks, each error naming its argument; the non-finite policy (its default)."""
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback must be a torchkit feedback method (EF21, ...), got {type(feedback).__name__}")
    if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
        raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    scaled = grad_scaler is not None and grad_scaler.is_enabled()  # GradScaler(enabled=use_amp): off acts as none
    nonfinite = nonfinite or ("skip" if scaled else "raise")
    if nonfinite not in ("raise", "skip", "sanitize"):
        raise ValueError(f"nonfinite must be 'raise', 'skip' or 'sanitize', got {nonfinite!r}")
    RoundOptions(wire_dtype, min_compression_rate)  # the round's own checks, in its words
    check_wire(feedback, wire_dtype)
    if nonfinite in ("skip", "sanitize") and (grad_scaler is None or not grad_scaler.is_enabled()):
        raise ValueError(
            f"nonfinite={nonfinite!r} needs an enabled GradScaler as grad_scaler=: the hook cannot stop your "
            "optimizer's step, so the NaN estimate of a bad step would reach the parameters on every rank; only "
            "GradScaler skips it. Pass your torch.amp.GradScaler, or keep nonfinite='raise' (the default "
            "without one): NonFiniteGradientError on every rank at the next forward"
        )
    return nonfinite


def _agree(state: CompressionState, keys=None, sizes=None, dtypes=None) -> None:
    """Before the first iteration's collectives (and the first after a load): every rank runs the same method
    with the same settings over the same model from the same shared state, or all raise. The settings include
    everything that decides which collective a bucket runs (``start_iter``, ``min_compression_rate``,
    ``nonfinite``, the wire), so a difference raises instead of hanging. :func:`register` checks at the forward,
    over every parameter's name and size; a state registered by hand checks at the first bucket, over its
    parameters."""
    module = state._bound()
    if keys is None and module is not None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        keys, sizes = [normalize_name(n) for n, _ in named], [p.numel() for _, p in named]
        dtypes = [str(p.dtype) for _, p in named]
    mine = {
        "method": state.feedback.config(),
        "wire": str(state.wire_dtype),
        "start_iter": state.start_iter,
        "min_compression_rate": state.min_compression_rate,
        "nonfinite": state.nonfinite,
        "grad_scaler": state.grad_scaler is not None and state.grad_scaler.is_enabled(),  # disabled: as none
        "parameters": [list(map(str, keys)), list(sizes), list(dtypes or ())],  # (dtypes: else Gloo aborts)
        "iteration": {"iter": state.iter, "fb_origin": state.fb_origin},  # decides the buckets' collectives
    }
    shared = {"feedback": state.round.shared()}
    what = "model and CompressionState"
    hints = {**RESUME_HINTS, "iteration": RESUME_HINTS["feedback"]}
    if state._node is not None:
        agree_on_nodes(mine, shared, between=state.process_group, node=state._node, what=what, hints=hints)
    else:
        agree({**mine, **shared}, group=state.process_group, world_size=state.world_size, rank=state.rank, what=what,
              hints=hints)  # fmt: skip
    state._agreed = True


def _on_any_rank(state: CompressionState, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank of the state's process group (itself when there is no group)."""
    if not (dist.is_available() and dist.is_initialized()) or state.world_size == 1:
        return flag
    return on_any_rank(state._exchange(), flag)


def _check_module(module: torch.nn.Module) -> None:
    """What the hook does not support, refused when it is registered."""
    for name, p in module.named_parameters():
        if p.is_complex():
            raise TypeError(f"complex parameters are not supported by the DDP hook ({name}); use CompressedOptimizer")
    for name, m in module.named_modules():
        if getattr(m, "sparse", False) is True:
            raise TypeError(f"sparse gradients are not supported by the DDP hook ({name} has sparse=True)")


def _checked_iter(state_dict) -> int:
    it = state_dict.get("iter")
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        raise ValueError(f"CompressionState state_dict iter must be an int >= 0, got {it!r}")
    return it


# ------------------------------------------------------------------------------------------- the hook
def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook running ``state.feedback`` on every bucket (see :class:`CompressionState`).

    A bucket's collective starts when DDP hands the bucket over, overlapping the rest of the backward; its round is
    finished at the iteration's last bucket, in this thread, where every bucket's future is completed in bucket
    order (DDP waits for them only after the last bucket). No round is finished in a callback on the backend's
    thread: :class:`~torchkit.comm.DistExchanger` says why (a Gloo process aborted at exit now and then).

    Under ``torch.compile`` of a whole training step the hook runs eagerly: the backward calls it from inside
    the compiled function's frame, and Dynamo traced its bookkeeping and collectives (a guard on a module's
    weak references failed on the first step, a process group could not be traced)."""
    return _hook(state, bucket)


@torch.compiler.disable
def _hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    buf = bucket.buffer()
    state.round.restored_at = None  # an iteration runs: a restored state is no longer kept against a later load
    if bucket.index() == 0:  # DDP hands the buckets over in index order
        state._queue = []  # an iteration whose backward raised before its last bucket is not finished
        state._check_feedback()  # a state registered by hand has no forward check
        if state._flags:  # a state registered by hand, or inside join(): its joined ranks run no forward
            _raise_if_flagged(state)
    if not state._agreed and dist.get_world_size(state.process_group) > 1:
        params = bucket.parameters()
        _agree(state, tuple(state._key(p) for p in params), [p.numel() for p in params], [str(p.dtype) for p in params])
    last = bucket.is_last()
    if state.iter < state.start_iter:
        job = _Job(buf)
        mean = _allreduce_mean(state._everyone(), buf)
        job.run = mean.wait if state.nonfinite != "raise" else functools.partial(_flagged_mean, state, mean)
        state._queue.append(job)
        _account_warm_up(state, buf.numel() * buf.element_size(), last)
    else:
        job = _compressed(state, bucket, buf, last)
    fut = job.pending.then(_estimate)  # run in this thread too: the pending future is completed here
    if last:
        state.iter += 1
        if state._used is not None:
            state._used[0].clear()  # the next iteration's (and its no_sync micro-steps') uses
        _finish_iteration(state)
    return fut


# DDP validates the hook's annotations as objects; this module's postponed annotations are strings
compression_hook.__annotations__ = {
    "state": CompressionState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _allreduce_mean(exchanger: DistExchanger, buf: Tensor):
    """Start the dense all-reduce of a warm-up bucket: a future (waited for in this thread) of the mean, in ``buf``."""
    buf.div_(exchanger.n_workers)
    return exchanger.sum_(buf)


def _flagged_mean(state: CompressionState, mean) -> Tensor:
    """A warm-up bucket's mean, its non-finite flag kept as a compressed round's is (``nonfinite="raise"``): NaN on
    every rank alike, so the next forward raises on every rank (the warm-up went on with NaN parameters for the rest
    of its iterations, and the checkpoints taken then were saved without a word)."""
    out = mean.wait()
    _keep_flag(state, torch.where(nonfinite_flag(out), float("nan"), 0.0).to(torch.float64).reshape(1))
    return out


def _compressed(state: CompressionState, bucket, buf: Tensor, last: bool) -> _Job:
    fb = state.feedback
    params = bucket.parameters()
    keys = tuple(state._key(p) for p in params)
    sizes = [p.numel() for p in params]
    if sum(sizes) != buf.numel():
        raise RuntimeError(f"bucket {bucket.index()}: parameters hold {sum(sizes)} elements, buffer {buf.numel()}")
    n = state._exchange().n_workers
    names, lengths = (keys, sizes) if state._node is None else state._node.pieces(keys, sizes)  # this rank's pieces
    blk = None
    if names:  # (a node-aware rank's shard of a bucket of tensors smaller than its node is empty)
        blk = state.round.block(
            bucket.index(), names, lengths, dtype=fb.state_dtype(buf.dtype), device=buf.device,
            with_server=fb.server_state and n > 1,
        )  # fmt: skip
    scale = _scale_of(state.grad_scaler)
    if scale is not None:  # the method sees the unscaled gradient; exact for GradScaler's powers of two
        buf.mul_(scale.double().reciprocal().float().to(buf.device))
    acc = state._acc  # this iteration's counters; published when its last bucket's round has completed
    acc["calls"] += 1
    if last:
        acc["closed"] = True
        state._acc = _new_counters()
    job = _Job(buf, blk, scale, acc)
    if state._used is not None and blk is not None and state._node is None:
        job.unused = _Unused.of(state, blk, params, keys, sizes, n)
    if state._node is not None:  # the node's mean on this rank's shard, dense inside the node
        job.sizes = sizes
        job.shard = state._node.scatter_mean(buf, sizes)
        acc["node"] += state._node.sent_bytes(sizes, buf.element_size()) // 2  # the reduce-scatter's half
    state._queue.append(job)
    if state.nonfinite != "skip":
        job.run = _start(state, job, "flag" if state.nonfinite == "raise" else state.nonfinite).wait
        if last:
            state.round.step += 1
        return job
    # skip: hold every bucket until the last one, agree on one flag for the whole iteration, then run the rounds
    # (or none): a step GradScaler skips leaves every bucket's state as it was
    job.bad = nonfinite_flag(buf)
    if last:
        queue = state._queue
        skipped = bool(state._everyone().any_true(torch.stack([j.bad for j in queue]).any()).wait())
        for j in queue:
            j.run = functools.partial(_skipped, state, j) if skipped else _start(state, j, None).wait
        if not skipped:
            state.round.step += 1
    return job


class _Job:
    """One bucket of an iteration: its buffer, block, loss scale and counters, the future DDP waits for
    (``pending``), what finishes the bucket's round and returns its estimate (``run``), and a held bucket's flag."""

    __slots__ = ("buf", "blk", "scale", "acc", "pending", "run", "bad", "shard", "sizes", "unused")

    def __init__(self, buf, blk=None, scale=None, acc=None):
        self.buf, self.blk, self.scale, self.acc = buf, blk, scale, acc
        self.pending = torch.futures.Future(devices=[buf.device] if buf.is_cuda else None)
        self.run = self.bad = None
        self.shard = buf  # what the round runs on: the bucket, or node-aware this rank's shard of the node's mean
        self.sizes = None  # node-aware: the bucket's tensors' sizes
        self.unused = None  # find_unused_parameters: the state of the parameters this rank did not use (_Unused)


def _finish_iteration(state: CompressionState) -> None:
    """At the iteration's last bucket: finish every bucket's round in bucket order and complete its future with the
    estimate, or with the round's error (a dead peer's), which DDP raises from the backward as it would its own."""
    queue, state._queue = state._queue, []
    for job in queue:
        try:
            job.pending.set_result(job.run())
        except Exception as exc:
            job.pending.set_exception(root_error(exc))


def _estimate(fut: torch.futures.Future) -> Tensor:
    """The future DDP waits for: the bucket's estimate, or its round's error raised, which fails the future as a
    failed collective fails plain DDP's (an error set as the value would reach DDP's reducer as an object)."""
    return fut.value()


class _Unused:
    """``find_unused_parameters``: DDP leaves the gradient of a parameter no rank used in an iteration as it is, so
    what the round sends for it would not be applied (or, with ``gradient_as_bucket_view`` and gradients kept, would
    be) and an error-carrying method's error sent for it would be lost. The parameters this rank did not use run in
    the round as zeros (a missing gradient counts as zero, as in the wrapper); their state before it is kept, and
    once the round has finished it is put back wherever no rank used them, and their estimate set to zero (plain
    DDP's mean of zeros), agreed with one asynchronous ``all_reduce`` (MAX) of a flag per parameter that every rank
    starts at the hook (no host synchronisation: the restore is a ``torch.where`` on the agreed flag). A parameter
    frozen when :func:`register` ran has no mark hook: it gets one once it trains, and until then counts as used
    when it trains and as unused when frozen."""

    __slots__ = ("flags", "done", "kept")

    @staticmethod
    def of(state: CompressionState, blk, params, keys, sizes, n: int) -> _Unused | None:
        used, hooked = state._used
        mine = [k in used or (k not in hooked and p.requires_grad) for k, p in zip(keys, params)]
        for k, p in zip(keys, params):
            if k not in hooked and p.requires_grad:  # unfrozen since register: marked from the next backward on
                _track_use(state, k, p)
        if n == 1 and all(mine):
            return None
        self = _Unused()
        vecs = blk.vectors()
        at = itertools.accumulate(sizes, initial=0)
        self.kept = [(i, off, size, {k: v[..., off : off + size].clone() for k, v in vecs.items()})
                     for i, (off, size, u) in enumerate(zip(at, sizes, mine)) if not u]  # fmt: skip
        flags = torch.tensor(mine, dtype=torch.float32)
        device = next(iter(vecs.values())).device
        self.flags = flags.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flags
        # the exchanger's own future: its work is waited for and freed in this thread, never by a Gloo thread
        self.done = state._exchange().max_(self.flags) if n > 1 else None
        return self

    def restore(self, blk, estimate: Tensor) -> None:
        """After the round: the state of the parameters no rank used, as it was before it, and their estimate 0."""
        flags = self.flags if self.done is None else self.done.wait()
        for i, off, size, old in self.kept:
            nobody = flags[i] == 0
            for k, v in blk.vectors().items():
                part = v[..., off : off + size]
                part.copy_(torch.where(nobody, old[k], part))
            part = estimate[off : off + size]
            part.masked_fill_(nobody, 0)


def _skipped(state: CompressionState, job: _Job) -> Tensor:
    """A bucket of an iteration some rank's non-finite gradient skips: NaN, so that GradScaler skips the step."""
    if job.unused is not None:
        job.unused.restore(job.blk, job.buf)  # waits for its flags here (no round ran: nothing changes)
    _account(state, job.acc, None)
    return job.buf.fill_(float("nan"))


def _start(state: CompressionState, job: _Job, nonfinite):
    buf = job.buf
    key = (buf.dtype, nonfinite, state.wire_dtype, state.min_compression_rate, state.track_error)
    options = state._options.get(key)
    if options is None:
        options = RoundOptions(state.wire_dtype or buf.dtype, state.min_compression_rate, nonfinite, state.track_error)
        state._options[key] = options

    def done(fut):
        res = fut.value()
        flag = res.checks
        if state._node is not None:  # the node gathers its shards' estimates, and their checks with them
            flag = state._node.gather_into(job.shard, buf, job.sizes, _flag_of(res) if nonfinite else None)
            with state._lock:
                job.acc["node"] += state._node.sent_bytes(job.sizes, buf.element_size()) // 2  # the all-gather's
        if job.unused is not None:
            job.unused.restore(job.blk, buf)
        if job.scale is not None:
            buf.mul_(job.scale.to(buf.device))  # GradScaler unscales the estimate as it would the gradient
        if nonfinite == "flag" and flag is not None:
            _keep_flag(state, flag)
        _account(state, job.acc, res)
        return buf

    if job.blk is None:  # an empty shard: nothing to send between nodes, the node's gather still runs
        fut = _InCaller(lambda: RoundResult(job.shard, None, 0, 0, skipped=True))
    else:
        fut = start_round(state.feedback, state._exchange(), job.blk, job.shard, state.round.step, options)
    if state._node is not None:  # every rank of the node gathers at the finish, bucket by bucket (one order)
        fut = _InCaller(fut.wait)
    return fut.then(done)


def _flag_of(res) -> Tensor | bool:
    return res.checks if res.checks is not None else False


def _keep_flag(state: CompressionState, flag: Tensor) -> None:
    """Keep a round's float64 non-finite checks for the host, copied without waiting (pinned memory, an event to
    know when they landed): a copy on a GPU; on the CPU their values, read now (the tensor may view a round's
    gathered bytes, which it would keep alive until the next iteration)."""
    if flag.is_cuda:
        host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = flag.reshape(-1).tolist(), None
    with state._lock:
        state._flags.append((host, event))


def _raise_if_flagged(state: CompressionState, *, consume: bool = True) -> None:
    """Raise on every rank if an iteration since the last check saw a non-finite gradient (the flags are agreed,
    so every rank raises alike). Called by the model's forward pre-hook (:func:`register`), at an iteration's
    first bucket for a state registered by hand, and by :meth:`CompressionState.state_dict` (``consume=False``:
    the next forward raises too)."""
    with state._lock:
        flags = list(state._flags)
        if consume:
            state._flags = []
    bad = False
    for host, event in flags:
        if event is not None:
            event.synchronize()  # recorded an iteration ago: done already in practice
        values = host if isinstance(host, list) else host.reshape(-1).tolist()  # a host read, no kernel
        bad = bad or not all(map(math.isfinite, values))
    if bad:
        raise NonFiniteGradientError(
            "non-finite gradient (NaN or Inf) on at least one rank in the previous iteration: its estimate was NaN on "
            "every rank, so the parameters the optimizer stepped are NaN, and the feedback state may be. Restore a "
            "checkpoint of the model, the optimizer and the hook state on every rank, then go on. Training under "
            "torch.amp.GradScaler? Pass it: tk.ddp.register(model, feedback, grad_scaler=scaler), and steps that "
            "overflow are skipped exactly instead"
        )


def _scale_of(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if scale is not None else torch.tensor(scaler.get_scale())


def _new_counters() -> dict[str, Any]:
    return {"sent": 0, "dense": 0, "avoided": 0, "err": None, "calls": 0, "done": 0, "closed": False, "results": [],
            "node": 0}  # fmt: skip


def _account_warm_up(state: CompressionState, nbytes: int, last: bool) -> None:
    """A warm-up bucket (``start_iter``): a dense all-reduce, counted as such in :attr:`metrics`."""
    with state._lock:
        m = state.metrics
        m.dense_rounds += 1
        m.bytes_sent += nbytes
        m.dense_bytes += nbytes
        state._warm += nbytes
        if last:
            m.steps += 1
            m.rounds += 1
            m.last_bytes_sent = m.last_dense_bytes = state._warm
            state._warm = 0


def _account(state: CompressionState, acc: dict[str, Any], res) -> None:
    """Add one bucket's round (``None``: skipped) to its iteration's counters; publish the complete iteration."""
    with state._lock:
        if res is not None:
            acc["sent"] += res.sent_bytes
            acc["dense"] += res.dense_bytes
            acc["avoided"] += max(res.dense_bytes - res.sent_bytes, 0)
        if res is not None and res.distortion_sq is not None:
            acc["err"] = res.distortion_sq if acc["err"] is None else acc["err"] + res.distortion_sq
        acc["done"] += 1
        if res is not None:
            acc["results"].append(res)
        if acc["closed"] and acc["done"] == acc["calls"]:
            state._last = acc
            state.bytes_sent, state.dense_bytes, state.error_norm_sq = acc["sent"], acc["dense"], acc["err"]
            state.metrics.steps += 1
            if acc["node"]:  # node-aware: the reduce-scatters ran, whether the rounds did or not
                state.metrics.record_node(acc["node"])
            if acc["results"]:
                state.metrics.record_round(acc["results"])
            else:  # nonfinite="skip": no bucket's round ran, on any rank
                state.metrics.skipped_steps += 1
                state.metrics.skipped_rounds += 1
            acc["results"] = []  # the rounds' messages are not kept alive


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel, feedback: Feedback, **state_kwargs
) -> CompressionState:
    """Build a :class:`CompressionState` keyed by parameter name, register the hook, return the state."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"tk.ddp.register needs a DistributedDataParallel model, got {type(ddp_model).__name__} "
            "(for a plain model use tk.CompressedOptimizer)"
        )
    state = CompressionState(
        feedback, process_group=state_kwargs.pop("process_group", ddp_model.process_group), **state_kwargs
    )
    state.bind(ddp_model)
    if getattr(ddp_model, "find_unused_parameters", False):  # which parameters each iteration used: see _Unused
        if state._node is not None:
            warnings.warn(
                "find_unused_parameters=True with node_group: DDP leaves the gradient of a parameter no rank used in "
                "an iteration as it is, and the node-aware round does not keep such a parameter's state out of it, "
                "so EF14's or EControl's error sent for it is lost (tk.CompressedOptimizer keeps it)",
                stacklevel=2,
            )
        else:
            state._used = (set(), set())
            for p in ddp_model.parameters():
                if p.requires_grad:
                    _track_use(state, state._key(p), p)
    ddp_model.register_comm_hook(state, compression_hook)
    # a bad gradient is reported at the next forward, before DDP prepares its backward: raising inside the backward
    # would leave DDP's reducer half-way through an iteration and unusable in this process
    ddp_model.register_forward_pre_hook(_ForwardCheck(state))
    return state


def _track_use(state: CompressionState, key, p: Tensor) -> None:
    """Mark parameter ``p`` as used (``state._used``) whenever a backward gives it a gradient."""
    used, hooked = state._used
    hooked.add(key)
    p.register_hook(functools.partial(_mark_used, used, key))


def _mark_used(used: set, key, grad: Tensor) -> None:
    """A parameter's gradient hook: it got a gradient in this backward (it runs before DDP's own hook sees it)."""
    used.add(key)


class _ForwardCheck:
    """The forward pre-hook :func:`register` installs: raises the previous iteration's non-finite flag, and makes
    the ranks agree before the first training forward (and the first after a load). Raising here, not in the
    backward, leaves DDP's reducer usable; inside DDP's ``join()`` the hook agrees at the first bucket instead (a
    rank that ran out of inputs runs no forward, and the collective here would wait for it forever). At the first
    forward it also warns, as the optimizer wrapper does at construction, when the optimizer stepping the model is
    one the feedback method is known not to train with."""

    def __init__(self, state: CompressionState):
        self.state = state
        self.checked_optimizer = False

    @torch.compiler.disable  # host-side bookkeeping and a collective: torch.compile runs it eagerly, unbroken
    def __call__(self, module, args) -> None:
        state = self.state
        state._check_feedback()  # before DDP prepares its backward
        if not self.checked_optimizer:
            self.checked_optimizer = True
            _warn_about_the_optimizer(state.feedback, module)
        joining = getattr(getattr(module, "_join_config", None), "enable", False)
        if state._flags and not joining:  # inside join(), at the first bucket (a joined rank runs no forward)
            _raise_if_flagged(state)
        if not state._agreed and module.training and torch.is_grad_enabled() and state.world_size > 1 and not joining:
            _agree(state)  # a difference raises here, before DDP prepares its backward
        # inside ``model.join()`` a rank out of inputs runs no forward, only DDP's shadow of each bucket's round,
        # hook included: the ranks agree at the first bucket instead (as for a state registered by hand)


def _warn_about_the_optimizer(feedback: Feedback, module: torch.nn.Module) -> None:
    """:func:`torchkit.coupling.warn_coupling` for the optimizers that hold ``module``'s parameters (found once,
    among the garbage collector's objects: the hook is not told which optimizer steps the model)."""
    from .coupling import warn_coupling

    mine = {id(p) for p in module.parameters()}
    for obj in live_instances(torch.optim.Optimizer):
        if not isinstance(obj, FrontEnd):  # a torchkit front end warns for itself
            if any(id(p) in mine for g in obj.param_groups for p in g["params"]):
                warn_coupling(feedback, type(obj), obj.defaults, stacklevel=2)
