"""Error feedback inside ``DistributedDataParallel``: a communication hook and its state.

Two lines in a training script::

    state = tk.ddp.CompressionState(tk.EF21(tk.TopK(ratio=0.01)))
    ddp_model.register_comm_hook(state, tk.ddp.compression_hook)

Each bucket runs one round of the feedback method (the same :class:`torchkit.feedback.Feedback`
objects as :class:`torchkit.CompressedOptimizer` and :func:`torchkit.sim.simulate`): the worker step, one
asynchronous ``all_gather`` of the packed sparse message (values in the wire dtype, int32 indices, one
byte of "my gradient was not finite"), then decode, average and return the estimate to DDP.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import aggregate_rows, all_gather_rows
from .compress import DenseMessage, Identity, pack_message, unpack_message
from .feedback import Feedback

__all__ = ["CompressionState", "compression_hook", "register"]

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1


class CompressionState:
    r"""Per-rank state of :func:`compression_hook`.

    Args:
        feedback: the error-feedback method. ``granularity="global"`` compresses each bucket with one
            top-k; ``granularity="tensor"`` compresses each parameter on its own, so the trajectory does
            not depend on the bucketing and equals :class:`torchkit.CompressedOptimizer`'s.
        process_group: the group DDP communicates over (``None``: the default group).
        start_iter: iterations run as a plain averaged ``all_reduce`` before compression starts. The
            feedback state is keyed by parameter and remapped when DDP rebuilds its buckets after the
            first iteration, so ``0`` is correct (unlike PowerSGD's ``start_powerSGD_iter >= 2``).
        min_compression_rate: a bucket is compressed only when its dense payload is at least this
            many times the compressed one (``n_ranks * k * entry bytes`` against ``d * dense bytes``);
            other buckets run the method with the Identity compressor over ``all_reduce``, which keeps
            the feedback state consistent. ``0`` compresses every bucket.
        wire_dtype: dtype of the sent values; ``None`` uses the bucket's dtype. What rounding to it
            removes stays in the feedback state (see :meth:`Feedback.round_values_`).
        track_error: also accumulate :attr:`error_norm_sq` (one extra pass over the state per bucket).

    Counters, for the last completed iteration on this rank: :attr:`bytes_sent`, :attr:`dense_bytes`
    (what plain DDP would have reduced for the same buckets), :attr:`dense_bytes_avoided` and, with
    ``track_error``, :attr:`error_norm_sq` (``||e||^2`` for EF14/EControl, ``||g - h||^2`` for EF21).

    Non-finite gradients: entries that are NaN/Inf are replaced by the method's neutral value before
    the state is touched (no host synchronisation), every rank learns of it through the gathered
    message, and the hook returns NaN for that bucket on every rank so that ``GradScaler`` skips the
    step everywhere. The feedback state stays finite.

    .. warning:: The state holds one to two extra copies of the gradients (fp32) and is per rank:
        save ``state.state_dict()`` on every rank, not on rank 0 only.
    """

    __slots__ = (
        # configuration (the process group is never pickled)
        "feedback",
        "process_group",
        "start_iter",
        "min_compression_rate",
        "wire_dtype",
        "track_error",
        # progress: iteration counter, and the iteration that is the method's step 0
        "iter",
        "fb_origin",
        # feedback state: parameter keys, per-parameter views, per-bucket flat buffers, loaded-not-placed
        "_keys",
        "_names",
        "_params",
        "_buckets",
        "_pending",
        # counters of the last completed iteration, and the running ones
        "bytes_sent",
        "dense_bytes",
        "error_norm_sq",
        "_acc",
        "_last",
    )

    def __init__(
        self,
        feedback: Feedback,
        *,
        process_group: dist.ProcessGroup | None = None,
        start_iter: int = 0,
        min_compression_rate: float = 2.0,
        wire_dtype: torch.dtype | None = None,
        track_error: bool = False,
    ):
        if not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a torchkit feedback method (EF21, ...), got {type(feedback).__name__}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        if not (min_compression_rate >= 0 and math.isfinite(min_compression_rate)):
            raise ValueError(f"min_compression_rate must be >= 0, got {min_compression_rate!r}")
        if wire_dtype is not None and wire_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"wire_dtype must be a floating dtype, got {wire_dtype!r}")
        self.feedback = feedback
        self.process_group = process_group
        self.start_iter = start_iter
        self.min_compression_rate = float(min_compression_rate)
        self.wire_dtype = wire_dtype
        self.track_error = bool(track_error)
        self.iter = 0
        self.fb_origin = start_iter
        self._keys: dict[int, Any] = {}  # id(param) -> stable key (name if bound, else first-seen order)
        self._names: dict[int, str] = {}
        self._params: dict[Any, dict[str, Tensor]] = {}  # key -> views of this parameter's state
        self._buckets: dict[int, dict[str, Any]] = {}  # bucket index -> flat buffers of its parameters
        self._pending: dict[Any, dict[str, Tensor]] = {}  # loaded, not yet placed in a bucket
        self.bytes_sent = self.dense_bytes = 0
        self.error_norm_sq = None
        self._acc = {"sent": 0, "dense": 0, "avoided": 0, "err": None}
        self._last = dict(self._acc)

    # ------------------------------------------------------------------------------------ identity
    def bind(self, model: torch.nn.Module) -> CompressionState:
        """Key the state by parameter name (robust across processes); :func:`register` calls this."""
        module = getattr(model, "module", model)
        self._names = {id(p): n for n, p in module.named_parameters()}
        return self

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def dense_bytes_avoided(self) -> int:
        return self._last["avoided"]

    def _key(self, p: Tensor):
        k = self._keys.get(id(p))
        if k is None:
            k = self._names.get(id(p), len(self._keys))
            self._keys[id(p)] = k
        return k

    # ------------------------------------------------------------------------------- bucket state
    def bucket_state(self, bucket: dist.GradBucket) -> dict[str, Any]:
        """Flat state of this bucket's parameters, rebuilt from the per-parameter state on a rebuild."""
        params = bucket.parameters()
        keys = tuple(self._key(p) for p in params)
        entry = self._buckets.get(bucket.index())
        if entry is not None and entry["keys"] == keys:
            return entry
        sizes = [p.numel() for p in params]
        if sum(sizes) != bucket.buffer().numel():
            raise RuntimeError(
                f"bucket {bucket.index()}: parameters hold {sum(sizes)} elements, buffer {bucket.buffer().numel()}"
            )
        buf = bucket.buffer()
        dtype = self.feedback.state_dtype(buf.dtype)
        flat = self.feedback.init_state(sum(sizes), dtype=dtype, device=buf.device)
        flat["server"] = torch.zeros(sum(sizes), dtype=dtype, device=buf.device)
        off = 0
        for key, n in zip(keys, sizes):
            old = self._params.get(key)
            if old is None and key in self._pending:
                old = self._pending.pop(key)
                if any(v.numel() != n for v in old.values()):
                    raise ValueError(
                        f"loaded state of parameter {key!r} has {next(iter(old.values())).numel()} elements, "
                        f"the parameter {n}"
                    )
            for name, t in flat.items():
                if old is not None:
                    t[off : off + n].copy_(old[name])
            self._params[key] = {name: t[off : off + n] for name, t in flat.items()}
            off += n
        entry = {"keys": keys, "sizes": sizes, "flat": flat}
        self._buckets[bucket.index()] = entry
        return entry

    # ----------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        params = {key: {n: v.clone() for n, v in views.items()} for key, views in self._params.items()}
        params.update({k: v for k, v in self._pending.items() if k not in params})
        return {
            "format_version": _FORMAT_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "feedback": repr(self.feedback),
            "iter": self.iter,
            "fb_origin": self.fb_origin,
            "params": params,
        }

    def load_state_dict(self, state_dict: dict[str, Any], *, reset_on_mismatch: bool = False) -> None:
        """Load this rank's state. A different world size, rank or method raises ``ValueError``; with
        ``reset_on_mismatch=True`` the feedback state is dropped instead and the next synchronising
        iteration is a fresh step 0 of the method (the iteration counter is kept)."""
        if not isinstance(state_dict, dict) or "format_version" not in state_dict:
            raise ValueError("not a torchkit CompressionState state_dict (no format_version)")
        problems = []
        if state_dict["world_size"] != self.world_size:
            problems.append(
                f"saved with world_size={state_dict['world_size']}, this run has world_size={self.world_size}"
            )
        if state_dict["rank"] != self.rank:
            problems.append(f"saved by rank {state_dict['rank']}, loaded on rank {self.rank}")
        if state_dict["feedback"] != repr(self.feedback):
            problems.append(f"saved with feedback {state_dict['feedback']}, this state has {self.feedback!r}")
        self._params, self._buckets = {}, {}
        self.iter = int(state_dict["iter"])
        if problems:
            if not reset_on_mismatch:
                raise ValueError("cannot load CompressionState: " + "; ".join(problems))
            log.warning("CompressionState: %s; feedback state reset", "; ".join(problems))
            self._pending, self.fb_origin = {}, max(self.iter, self.start_iter)
            return
        self.fb_origin = int(state_dict["fb_origin"])
        self._pending = {k: {n: v.clone() for n, v in d.items()} for k, d in state_dict["params"].items()}

    def __getstate__(self) -> dict[str, Any]:
        out = {
            s: getattr(self, s)
            for s in self.__slots__
            if s not in ("process_group", "_keys", "_buckets", "_params", "_pending")
        }
        out["_pending"] = self.state_dict()["params"] if self._params or self._pending else {}
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        for s in self.__slots__:
            setattr(self, s, state.get(s))
        self.process_group = None
        self._keys, self._buckets, self._params = {}, {}, {}
        self._pending = state.get("_pending") or {}
        log.info("CompressionState unpickled: process_group reset to the default group")


# ------------------------------------------------------------------------------------------- the hook
def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook running ``state.feedback`` on every bucket (see :class:`CompressionState`)."""
    buf = bucket.buffer()
    group = state.process_group
    n = dist.get_world_size(group)
    if state.iter < state.start_iter:
        fut = _allreduce_mean(buf, n, group)
    else:
        fut = _compressed(state, bucket, buf, n, group)
    if bucket.is_last():
        state.iter += 1
    return fut


# DDP validates the hook's annotations as objects; this module's postponed annotations are strings
compression_hook.__annotations__ = {
    "state": CompressionState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _allreduce_mean(buf: Tensor, n: int, group) -> torch.futures.Future[Tensor]:
    buf.div_(n)
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: buf)


def _compressed(state: CompressionState, bucket, buf: Tensor, n: int, group) -> torch.futures.Future[Tensor]:
    fb = state.feedback
    rank = dist.get_rank(group)
    entry = state.bucket_state(bucket)
    flat = entry["flat"]
    fstate = {k: flat[k] for k in fb.state_names}
    server = flat["server"]
    step = state.iter - state.fb_origin
    segments = fb.segments_for(entry["sizes"])
    wire = state.wire_dtype or buf.dtype
    d = buf.numel()
    bad = (~torch.isfinite(buf).all()).to(torch.uint8).reshape(1)
    dense_cost = d * buf.element_size()
    use = fb
    if fb.sends_in_round(step) == "compressed" and state.min_compression_rate > 0:
        if dense_cost < state.min_compression_rate * n * fb.wire_bytes(segments, step, wire):
            use = fb.with_compressor(Identity())  # too small to pay off: an exact round over all_reduce
    msg = use.worker_step(fstate, buf, step, worker=rank, n_workers=n, segments=segments, sanitize=True)
    msg = use.round_values_(fstate, msg, wire)
    weights = fb.aggregation_weights(n)
    if state.track_error:
        err = fb.distortion_sq(fstate, buf, worker=rank, n_workers=n)
        state._acc["err"] = err if state._acc["err"] is None else state._acc["err"] + err

    if msg is None or isinstance(msg, DenseMessage):
        red = torch.zeros(d + 1, dtype=server.dtype, device=buf.device)
        if msg is not None:
            red[:d].copy_(msg.values[0]).mul_(weights[rank])
        red[d] = bad.to(red.dtype)[0]
        sent = red.numel() * red.element_size()

        def finish(fut) -> Tensor:
            agg = red[:d]
            return _finish(fb, server, agg, red[d] > 0, buf)

        _account(state, bucket, sent, dense_cost)
        return dist.all_reduce(red, group=group, async_op=True).get_future().then(finish)

    packed, layout = pack_message(msg)
    packed = torch.cat([packed, bad])
    out, work = all_gather_rows(packed, n, group, async_op=True)

    def finish_sparse(fut) -> Tensor:
        gathered = unpack_message(out[:, :-1], layout)
        agg = aggregate_rows(gathered, weights, torch.empty_like(server))
        return _finish(fb, server, agg, out[:, -1].bool().any(), buf)

    _account(state, bucket, packed.numel(), dense_cost)
    return work.get_future().then(finish_sparse)


def _finish(fb: Feedback, server: Tensor, agg: Tensor, any_bad: Tensor, buf: Tensor) -> Tensor:
    if fb.server_state:
        server.add_(agg)
        est = server
    else:
        est = agg
    # every rank saw the flag: NaN everywhere makes GradScaler skip the step on every rank
    buf.copy_(torch.where(any_bad, torch.full_like(est, float("nan")), est))
    return buf


def _account(state: CompressionState, bucket, sent: int, dense: int) -> None:
    acc = state._acc
    acc["sent"] += sent
    acc["dense"] += dense
    acc["avoided"] += max(dense - sent, 0)
    if bucket.is_last():
        state._last = dict(acc)
        state.bytes_sent, state.dense_bytes = acc["sent"], acc["dense"]
        state.error_norm_sq = acc["err"]
        state._acc = {"sent": 0, "dense": 0, "avoided": 0, "err": None}


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel, feedback: Feedback, **state_kwargs
) -> CompressionState:
    """Build a :class:`CompressionState` keyed by parameter name, register the hook, return the state."""
    state = CompressionState(
        feedback, process_group=state_kwargs.pop("process_group", ddp_model.process_group), **state_kwargs
    )
    state.bind(ddp_model)
    ddp_model.register_comm_hook(state, compression_hook)
    return state
