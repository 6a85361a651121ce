r"""Error-feedback methods as configurations.

A feedback object holds no per-worker state: the front end (optimizer, DDP hook, simulator) allocates
it with :meth:`Feedback.init_state` and passes it to :meth:`Feedback.worker_step`, so one object serves
all three front ends and they follow the same trajectory. The notation is that of
``docs/algorithms.md``; everything is in "g-space"
(the server applies ``x <- x - lr * estimate``).

A round, for worker i with gradient :math:`g_i` (see :func:`torchkit.comm.run_round`):

1. ``msg_i = worker_step(state_i, g_i, step)`` (updates the worker state in place),
2. ``agg = sum_i a_i decode(msg_i)`` with aggregation weights :math:`a_i` (``1/n``, or ``w_i`` for EF21-W),
3. ``estimate = agg`` (EF14) or ``estimate += agg`` (the EF21 family keeps the server shift
   :math:`g = \sum_i a_i g_i`).

A method is declared, not programmed: it names its state, its options (:meth:`Feedback.config` and the
repr read them), its step 0 (``init``), the vector it compresses about (:meth:`Feedback._direction`) and the
kind of update it runs on that vector (:attr:`Feedback.update`, a key of :data:`UPDATES`); the base class runs
the round and :data:`UPDATES` routes each kind to its fused kernel (:mod:`torchkit.ops`) or its plain torch form.
The worker-side optimizers that wrap a method are in :mod:`torchkit.feedback_local`, the registry of methods by
name in :mod:`torchkit.registry`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from . import ops
from ._validation import check_bool, check_segments, check_unit_interval, check_weights
from .compress import (
    INT2,
    Compressor,
    DenseMessage,
    Message,
    SignMessage,
    SparseMessage,
    TopK,
    compress_segments,
    concat_messages,
    dense_wire_bytes,
    quantize,
    quantize_2bit,
    segment_value_bits,
    segment_wire_bytes,
)

__all__ = ["Feedback", "Update", "UPDATES", "EF14", "EF21", "EF21W", "EF21SGDM", "EControl"]

Granularity = Literal["global", "tensor"]
Init = Literal["full", "compressed", "zero"]

_granularity_doc = """granularity: ``"global"`` compresses the whole vector the front end hands over (a parameter
            group, a DDP bucket, the simulator's x) with one top-k; ``"tensor"`` compresses each parameter
            tensor on its own (k_l = ceil(ratio * d_l)), which makes the result independent of how
            parameters are grouped or bucketed."""

# Option values the repr leaves out (the default behaviour), as the reprs were when checkpoint format 1 stored
# them (torchkit.state.check_envelope compares them); ``None`` is left out too. Every other option is shown.
_REPR_QUIET = {"granularity": "global", "init": "full", "momentum_init": "gradient", "nesterov": False}


# ------------------------------------------------------------------------------------------------ updates
def _compress_fn(fb: Feedback, segments, worker: int, step: int) -> Callable[[Tensor], Message]:
    return lambda v: fb._compress(v, segments, worker, step)


def _ef14_plain(x: Tensor, e: Tensor, *, compress) -> Message:
    e.add_(x.to(e.dtype))
    msg = compress(e)
    e.sub_(_dense_of(msg, e))
    return msg


def _ef21_plain(x: Tensor, h: Tensor, *, compress) -> Message:
    msg = compress(x.to(h.dtype) - h)
    h.add_(_dense_of(msg, h))
    return msg


def _econtrol_plain(x: Tensor, e: Tensor, h: Tensor, eta: float, *, compress) -> Message:
    t = x.to(e.dtype) - h
    msg = compress(e * eta + t)
    delta = _dense_of(msg, e)
    e.add_(t).sub_(delta)
    h.add_(delta)
    return msg


@dataclass(frozen=True)
class Update:
    """What a method computes in a compressed round, on the vector ``x`` it compresses about.

    Attributes:
        states: the state vectors it updates, in the order ``fused`` and ``plain`` take them.
        fused: the fused op of :mod:`torchkit.ops` (``fn(x, *states, k, *params, approx=)`` returning
            ``(values, indices)``), run when the compressor declares it (``Compressor.fused_topk``).
        plain: the same update in torch ops for any compressor: ``plain(x, *states, *params, compress=C)``.
        formula: the update in words, for the docs.
    """

    states: tuple[str, ...]
    fused: Callable | None
    plain: Callable[..., Message]
    formula: str


#: The update kinds, keyed by :attr:`Feedback.update`: the one place that picks a fused kernel.
UPDATES: dict[str, Update] = {
    "ef14": Update(("error",), ops.ef14_step_, _ef14_plain, "u = C(e + x), e <- e + x - u"),
    "ef21": Update(("shift",), ops.ef21_step_, _ef21_plain, "c = C(x - h), h <- h + c"),
    "econtrol": Update(
        ("error", "shift"), ops.econtrol_step_, _econtrol_plain, "D = C(eta e + x - h), e <- e + x - h - D, h <- h + D"
    ),
}
_SEGMENTED = {u.fused: kind for kind, u in UPDATES.items()}  # the fused ops that segments_step_ runs, by its name


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


class Feedback:
    """Base class of the error-feedback methods: a configuration, no per-worker state.

    The contract a subclass fulfils (one class, one :func:`torchkit.registry.register` call and one float64
    reference in the tests add a method to every front end):

    - ``state_names``: the per-worker state vectors, each of the vector's length (fp32, fp64 for fp64 input),
      created zero by :meth:`init_state` and checkpointed by every front end.
    - ``server_state``: whether the server keeps a running estimate (the EF21 family) or uses the fresh
      aggregate of the round (EF14).
    - ``estimate_state``: the state vector that equals the server estimate when there is one worker (so a
      single worker keeps no separate server copy), or ``None``. ``init="full"`` sets it to the method's
      direction at step 0 (the gradient; EF21-SGDM's momentum).
    - ``neutral_state``: the state vector that, used as the gradient, carries no new information (what a
      non-finite gradient entry is replaced by under ``nonfinite="sanitize"``), or ``None`` for zero.
    - ``absorb_rule``: how a value rounded away on the wire is kept: ``(state name, sign)`` pairs.
    - ``options``: the constructor's options (attributes of the same name) that :meth:`config` records and
      the repr shows, in order.
    - ``init``: step 0. ``"compressed"`` (the class default): an ordinary compressed round from zero state;
      ``"full"``: the dense direction (the gradient, or EF21-SGDM's momentum), which becomes
      :attr:`estimate_state`; ``"zero"``: nothing is sent. The
      base class runs it (:meth:`worker_step`); a method with the option sets it with :meth:`_set_init`.
    - ``momentum_inside``: whether the method applies a momentum (or an optimizer) before compression, so
      that the optimizer outside must not (:func:`torchkit.coupling.coupling_advice`).
    - what it computes: :meth:`_direction` (the vector compressed about, the gradient by default) and
      ``update``, a key of :data:`UPDATES`; or, for an update of its own, :meth:`_step`. Then
      :meth:`distortion_sq`.
    - the class docstring, in which ``{granularity}`` is replaced by the shared text of that option.
    """

    state_names: tuple[str, ...] = ()
    server_state: bool = True
    estimate_state: str | None = None
    neutral_state: str | None = None
    absorb_rule: tuple[tuple[str, float], ...] = ()
    options: tuple[str, ...] = ()
    init: Init = "compressed"
    momentum_inside: bool = False
    update: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "{granularity}" in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace("{granularity}", _granularity_doc)
        if cls.update is not None and cls.update not in UPDATES:
            raise TypeError(f"{cls.__name__}.update must be one of {sorted(UPDATES)} or None, got {cls.update!r}")

    def __init__(self, compressor: Compressor, *, granularity: Granularity = "global"):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a torchkit Compressor, got {type(compressor).__name__}")
        if granularity not in ("global", "tensor"):
            raise ValueError(f"granularity must be 'global' or 'tensor', got {granularity!r}")
        if granularity == "tensor" and getattr(compressor, "k", None) is not None:
            raise ValueError("granularity='tensor' needs a compressor given by ratio (k_l = ceil(ratio * d_l)), not k")
        self.compressor = compressor.contractive()
        self.granularity = granularity

    def _set_init(self, init: Init) -> None:
        if init not in ("full", "compressed", "zero"):
            raise ValueError(f"init must be 'full', 'compressed' or 'zero', got {init!r}")
        if init == "full" and self.estimate_state is None:
            raise ValueError(f"{type(self).__name__} has no estimate state for init='full'")
        self.init = init

    @property
    def full_first_round(self) -> bool:
        """Whether step 0 sends the full gradient (``init="full"``)."""
        return self.init == "full"

    def config(self) -> dict:
        """The method's identity as plain data: checkpoints record it and front ends compare it across ranks."""
        return {
            "method": type(self).__name__,
            "compressor": self.compressor.config(),
            "granularity": self.granularity,
            **self._config_extra(),
        }

    def _config_extra(self) -> dict:
        return {name: _plain(getattr(self, name)) for name in self.options}

    def __repr__(self) -> str:
        """``Name(<first argument>, option=value, ...)`` from :meth:`config`: the constructor's options in its
        order, without those that keep the default behaviour (``init="full"``, ``granularity="global"``, ...)."""
        cfg = self.config()
        params = list(inspect.signature(type(self).__init__).parameters.values())[1:]
        parts = [repr(getattr(self, params[0].name, self.compressor))] if params else [repr(self.compressor)]
        for p in params[1:]:
            if p.name not in cfg or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            value = cfg[p.name]
            if value is None or (p.name in _REPR_QUIET and value == _REPR_QUIET[p.name]):
                continue
            if isinstance(p.default, tuple) and isinstance(value, list):
                value = tuple(value)
            parts.append(f"{p.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ----------------------------------------------------------------------------------------- state
    @staticmethod
    def state_dtype(like: torch.dtype) -> torch.dtype:
        return torch.float64 if like == torch.float64 else torch.float32

    def init_state(self, numel: int, *, rows: int | None = None, dtype=torch.float32, device=None) -> dict[str, Tensor]:
        """The zeroed state vectors; a 1-D vector is padded to a multiple of 16 elements that the fused ops own
        (:func:`torchkit.ops.padded_zeros`: 128-bit loads in the GPU kernels)."""
        dt = self.state_dtype(dtype)
        if rows is None:
            return {name: ops.padded_zeros(numel, dtype=dt, device=device) for name in self.state_names}
        return {name: torch.zeros((rows, numel), dtype=dt, device=device) for name in self.state_names}

    def input_scale(self, worker: int, n_workers: int) -> float:
        """Factor applied to worker ``worker``'s gradient before the method sees it (EF21-W: 1/(n w_i))."""
        return 1.0

    def aggregation_weights(self, n_workers: int) -> list[float]:
        return [1.0 / n_workers] * n_workers

    def segments_for(self, sizes: Sequence[int]) -> tuple[int, ...]:
        total = sum(sizes)
        return tuple(sizes) if self.granularity == "tensor" else (total,)

    # -------------------------------------------------------------------------------------- accounting
    def sends_in_round(self, step: int) -> str:
        """'dense', 'none' or 'compressed': what one worker sends in round ``step``."""
        if step == 0 and self.init == "full":
            return "dense"
        if step == 0 and self.init == "zero":
            return "none"
        return "compressed"

    def value_bits(self, segments: Sequence[int], step: int) -> int:
        kind = self.sends_in_round(step)
        if kind == "none":
            return 0
        if kind == "dense":
            return 32 * sum(segments)
        return segment_value_bits(self.compressor.at(step), segments)

    def wire_bytes(self, segments: Sequence[int], step: int, value_dtype=torch.float32) -> int:
        kind = self.sends_in_round(step)
        if kind == "none":
            return 0
        if kind == "dense":
            return dense_wire_bytes(sum(segments), value_dtype)
        return segment_wire_bytes(self.compressor.at(step), segments, value_dtype)

    def at(self, step: int) -> Feedback:
        """The method as it runs in round ``step``: itself, or, under a :class:`~torchkit.compress.DensityWarmup`,
        with the compressor of that round's stage (one object per stage, so the round's per-block plans keep)."""
        comp = self.compressor.at(step)
        if comp is self.compressor:
            return self
        cache = self.__dict__.setdefault("_stages", {})  # keyed by the stage's compressor itself, which it keeps alive
        if comp not in cache:
            cache[comp] = self.with_compressor(comp)
        return cache[comp]

    # ------------------------------------------------------------------------------------------- step
    def worker_step(
        self,
        state: dict[str, Tensor],
        grad: Tensor,
        step: int,
        *,
        worker: int = 0,
        n_workers: int = 1,
        segments: Sequence[int] | None = None,
        sanitize: bool = False,
    ) -> Message | None:
        """One worker's round: returns the message (rows = state rows) and updates ``state`` in place.

        ``grad`` has the state's layout (``[d]`` or ``[rows, d]``, rows = consecutive workers starting at
        ``worker``). With ``sanitize=True`` non-finite gradient entries are replaced by the value that
        carries no new information (the method's "neutral" gradient), so the state stays finite.
        """
        first = next(iter(state.values())) if state else None
        d = grad.shape[-1]
        segments = check_segments(segments, d) if segments is not None else (d,)
        g = self._scaled_input(grad, worker, n_workers, first.dtype if first is not None else torch.float32)
        if sanitize:
            g = torch.where(torch.isfinite(g), g, self._neutral(state, step, g))
        return self._round(state, g, step, worker, segments)

    def _round(self, state, g, step, worker, segments) -> Message | None:
        """The round on the method's input ``g``: :meth:`_direction` (every round, step 0 included), then step 0
        as ``init`` says, else the compressed update :meth:`_step` on the direction."""
        x = self._direction(state, g, step)
        if step == 0 and self.init == "full":
            h = state[self.estimate_state]  # type: ignore[index]
            h.copy_(x)  # the direction (EF21-SGDM's momentum, eta g with momentum_init="zero"): what h tracks
            return DenseMessage(_rows(h).clone())
        if step == 0 and self.init == "zero":
            return None
        return self._step(state, x, step, worker, segments)

    def _direction(self, state, g: Tensor, step: int) -> Tensor:
        """The vector the method compresses about (updating any state that forms it): the gradient itself."""
        return g

    def _update_params(self, segments) -> tuple:
        """The scalar parameters the :attr:`update` kind takes after the state vectors (EControl: ``eta``)."""
        return ()

    def _step(self, state, x, step, worker, segments) -> Message | None:
        """The compressed round on ``x``: the declared :attr:`update`, fused where the compressor allows."""
        if self.update is None:
            raise NotImplementedError(f"{type(self).__name__} declares no update kind and does not define _step")
        upd = UPDATES[self.update]
        tensors = [state[name] for name in upd.states]
        params = self._update_params(segments)
        if upd.fused is not None and self._fused(tensors[0], segments):
            return self._fused_segments(upd.fused, [x, *tensors], segments, extra=params)
        return upd.plain(x, *tensors, *params, compress=_compress_fn(self, segments, worker, step))

    def round_values_(self, state: dict[str, Tensor], msg: Message | None, dtype: torch.dtype) -> Message | None:
        """Round the message's values to the wire ``dtype``; what the rounding removed stays in the state.

        EF14 and EControl add it back to their error, the EF21 family subtracts it from the shift, so the
        server's estimate stays equal to the weighted mean of the workers' shifts.
        """
        if msg is None or isinstance(msg, SignMessage) or msg.values.dtype == dtype:
            return msg
        if dtype == torch.int8 or (dtype == INT2 and INT2 is not None):
            if not isinstance(msg, SparseMessage):
                return msg  # dense rounds (first round, Identity fallback) are all-reduced in the state dtype
            q, steps, values = (quantize if dtype == torch.int8 else quantize_2bit)(msg.values, msg.groups)
            self._absorb_(state, msg, msg.values - values.to(msg.values.dtype))
            return replace(msg, values=values.to(msg.values.dtype), q=q, scales=steps)
        q, r = ops.wire_round(msg.values, dtype)
        self._absorb_(state, msg, r)
        return replace(msg, values=q)

    def _absorb_(self, state: dict[str, Tensor], msg: Message, r: Tensor) -> None:
        """Keep what the wire rounded away (``r``, the message's layout) in the state, by :attr:`absorb_rule`."""
        for name, sign in self.absorb_rule:
            t = state[name]
            if isinstance(msg, SparseMessage):
                idx = msg.indices.long()
                if t.dim() == 1:
                    t.index_add_(0, idx[0], r[0], alpha=sign)
                else:
                    t.scatter_add_(1, idx, r * sign)
            else:
                t.add_(r.reshape(t.shape), alpha=sign)

    def _scaled_input(self, grad: Tensor, worker: int, n: int, dtype: torch.dtype) -> Tensor:
        rows = grad.shape[0] if grad.dim() == 2 else 1
        scales = [self.input_scale(worker + r, n) for r in range(rows)]
        if all(s == 1.0 for s in scales):
            return grad
        s = torch.tensor(scales, dtype=dtype, device=grad.device)
        return grad.to(dtype) * (s if grad.dim() == 1 else s[:, None])

    def _neutral(self, state, step, g) -> Tensor:
        if step > 0 and self.neutral_state is not None:
            return state[self.neutral_state].to(g.dtype)
        return torch.zeros((), dtype=g.dtype, device=g.device)

    # helpers shared by the subclasses ----------------------------------------------------------------
    def _fused(self, state_vec: Tensor, segments) -> bool:
        """The fused ops serve compressors that declare it (TopK): 1-D state (per segment, per chunk), or a
        ``[rows, d]`` batch with one segment and no chunks."""
        comp = self.compressor
        if not comp.fused_topk:
            return False
        return state_vec.dim() == 1 or (len(segments) == 1 and getattr(comp, "chunk", None) is None)

    def _fused_segments(self, fn, tensors: list[Tensor], segments, extra=()) -> SparseMessage:
        """Run a fused op on every segment (views of 1-D contiguous buffers) and join the messages: many segments
        of a 1-D vector in one :func:`torchkit.ops.segments_step_` call."""
        comp: TopK = self.compressor  # type: ignore[assignment]
        if comp.chunk is None and len(segments) == 1:
            v, i = fn(*tensors, comp.k_for(segments[0]), *extra, approx=comp.approx)
            return _as_rows(v, i, tensors[0].shape[-1])
        method = _SEGMENTED.get(fn)
        if comp.chunk is None and method is not None and tensors[0].dim() == 1:
            ks = [comp.k_for(n) for n in segments]
            v, i = ops.segments_step_(method, tensors[0], tensors[1:], segments, ks, *extra, approx=comp.approx)
            groups = tuple(zip(itertools.accumulate(segments[:-1], initial=0), ks))  # (segment start, count)
            return SparseMessage(_rows(v), _rows(i), tensors[0].shape[-1], groups)
        msgs, off = [], 0
        for n in segments:
            views = [t[off : off + n] for t in tensors]
            if comp.chunk is None:
                v, i = fn(*views, comp.k_for(n), *extra, approx=comp.approx)
                msgs.append(_as_rows(v, i, n))
            else:
                msgs.append(self._fused_chunks(fn, views, n, extra))
            off += n
        return msgs[0] if len(msgs) == 1 else concat_messages(msgs, segments)  # type: ignore[return-value]

    def _fused_chunks(self, fn, views: list[Tensor], n: int, extra) -> SparseMessage:
        """A chunked TopK on one segment: the full chunks as one ``[chunks, chunk]`` batch, then the tail."""
        comp: TopK = self.compressor  # type: ignore[assignment]
        c = comp.chunk
        full = n // c
        vals, idxs, groups = [], [], []
        if full:
            k = comp.chunks(c)[0][2]
            v, i = fn(*[t[: full * c].view(full, c) for t in views], k, *extra, approx=comp.approx)
            base = torch.arange(full, dtype=torch.int32, device=i.device)[:, None] * c
            vals.append(v.reshape(1, -1))
            idxs.append((i.to(torch.int32) + base).reshape(1, -1))
            groups += [(j * c, k) for j in range(full)]
        if n > full * c:
            ((a, m, k),) = comp.chunks(n)[full:]
            v, i = fn(*[t[a:] for t in views], k, *extra, approx=comp.approx)
            vals.append(v.reshape(1, -1))
            idxs.append(i.to(torch.int32).reshape(1, -1) + a)
            groups.append((a, k))
        return SparseMessage(
            torch.cat(vals, 1), torch.cat(idxs, 1), n, tuple(groups), True, offset_bits=comp.offset_bits
        )

    def _compress(self, x: Tensor, segments, worker: int, step: int) -> Message:
        return compress_segments(self.compressor, x, segments, worker=worker, step=step)

    def with_compressor(self, compressor: Compressor) -> Feedback:
        """The same method and options with another compressor (the DDP hook's dense rounds use Identity)."""
        other = self._copy()
        other.compressor = compressor.contractive()
        return other

    def _copy(self) -> Feedback:
        """A shallow copy to change an option of, without the per-stage copies :meth:`at` keeps (they belong to
        this object's options)."""
        import copy

        other = copy.copy(self)
        other.__dict__.pop("_stages", None)
        return other

    def distortion_sq(
        self, state: dict[str, Tensor], grad: Tensor | None = None, *, worker: int = 0, n_workers: int = 1
    ) -> Tensor:
        """Squared norm of what the server does not know yet, summed over rows: ``||e||^2`` for the methods
        with an error (EF14, EControl), ``||g - h||^2`` for the EF21 family (``g`` the method's input)."""
        raise NotImplementedError

    def _shift_distortion_sq(self, state, src: Tensor) -> Tensor:
        return (src.to(state["shift"].dtype) - state["shift"]).pow(2).sum()


def _rows(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.unsqueeze(0)


def mask_sent_(buffer: Tensor, msg: Message | None) -> None:
    """Momentum factor masking: zero ``buffer`` (``[d]`` or ``[rows, d]``) where the sparse ``msg`` sent an entry;
    a dense message (step 0, a dense fallback) or none leaves it."""
    if isinstance(msg, SparseMessage):
        idx = msg.indices.long()
        buffer.index_fill_(0, idx[0], 0.0) if buffer.dim() == 1 else buffer.scatter_(1, idx, 0.0)


def _as_rows(values: Tensor, indices: Tensor, numel: int) -> SparseMessage:
    return SparseMessage(_rows(values), _rows(indices), numel)


def _dense_of(msg: Message, like: Tensor) -> Tensor:
    dense = msg.to_dense(like.dtype)
    return dense if like.dim() == 2 else dense[0]


class EF14(Feedback):
    r"""Classic error feedback (Seide et al. 2014; Stich et al. 2018), g-space form.

    .. math::
        u_i = C(e_i + g_i), \qquad e_i \leftarrow e_i + g_i - u_i, \qquad \text{estimate} = \textstyle\sum_i a_i u_i

    ``e_i`` starts at zero and step 0 is an ordinary compressed round. With a constant step size this
    is the x-space EF of the papers with ``e`` rescaled by the step size, and the virtual iterate
    ``x - lr * mean_i e_i`` follows plain gradient descent exactly.

    Args:
        compressor: a contractive compressor (an unbiased one is used as ``Q/(omega+1)``).
        {granularity}
    """

    state_names = ("error",)
    absorb_rule = (("error", 1.0),)
    server_state = False
    update = "ef14"

    def distortion_sq(self, state, grad=None, *, worker=0, n_workers=1):
        return state["error"].pow(2).sum()


class EF21(Feedback):
    r"""EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021; arXiv:2106.05203).

    .. math::
        c_i = C(g_i - h_i), \qquad h_i \leftarrow h_i + c_i, \qquad h \leftarrow h + \textstyle\sum_i a_i c_i

    and the server steps along :math:`h = \sum_i a_i h_i`.

    Args:
        compressor: a contractive compressor (an unbiased one is used as ``Q/(omega+1)``).
        init: the shift at step 0. ``"full"`` (default, as the authors' code): :math:`h_i^0 = g_i^0`, step 0
            sends the dense gradient. ``"compressed"`` (the poster): :math:`h_i^0 = C(g_i^0)`, an ordinary
            compressed round from zero. ``"zero"`` (FL_PyTorch): :math:`h_i^0 = 0`, so step 0 sends
            nothing and the estimate is zero (the first update does not move). On neural networks use
            ``"compressed"``: with ``"full"`` the first gradient, usually the largest of the run, stays in
            every coordinate of the shift until TopK refreshes it, about ``1/density`` steps later
            (character language model, TopK 1%, 4 workers, EF21 on the worker's momentum, lr 0.1, one
            seed: final training loss 2.94 with ``"full"``, 2.59 with ``"compressed"``; dense 2.36). For training
            with momentum or Adam see :mod:`torchkit.coupling`.
        {granularity}
    """

    state_names = ("shift",)
    absorb_rule = (("shift", -1.0),)
    estimate_state = "shift"
    neutral_state = "shift"
    options = ("init",)
    update = "ef21"

    def distortion_sq(self, state, grad=None, *, worker=0, n_workers=1):
        return self._shift_distortion_sq(state, self._scaled_input(grad, worker, n_workers, state["shift"].dtype))

    def __init__(self, compressor: Compressor, init: Init = "full", *, granularity: Granularity = "global"):
        super().__init__(compressor, granularity=granularity)
        self._set_init(init)


class EF21W(EF21):
    r"""EF21-W, weighted EF21 ("Error Feedback Reloaded", ICLR 2024; arXiv:2402.10774).

    .. math::
        c_i = C\big(g_i/(n w_i) - h_i\big), \qquad h_i \leftarrow h_i + c_i,
        \qquad h \leftarrow h + \textstyle\sum_i w_i c_i

    With a positively homogeneous compressor (TopK, scaled sign) :math:`n w_i h_i` follows EF21 exactly,
    so the two methods coincide; the paper's gain is the larger step size
    (:func:`torchkit.theory.ef21_stepsize` with ``weighted=True``). Use :meth:`from_smoothness` for the
    paper's weights :math:`w_i = L_i / \sum_j L_j`.

    .. note:: The algorithm box is reconstructed from the paper's abstract and reviews (docs/algorithms.md §3).

    Args:
        compressor: a contractive compressor.
        weights: one positive weight per worker, summing to 1.
        init: as for :class:`EF21`.
        {granularity}
    """

    options = ("init", "weights")

    def __init__(self, compressor, weights, init: Init = "full", *, granularity: Granularity = "global"):
        super().__init__(compressor, init, granularity=granularity)
        self.weights = check_weights("weights", weights)

    @classmethod
    def from_smoothness(cls, compressor, smoothness: Sequence[float], **kw) -> EF21W:
        """The paper's weights ``w_i = L_i / sum_j L_j`` from the workers' smoothness constants (all > 0)."""
        consts = [float(L) for L in smoothness]
        if not consts or any(not math.isfinite(L) or L <= 0 for L in consts):
            raise ValueError(f"smoothness constants must be positive and finite, got {consts}")
        total = sum(consts)
        return cls(compressor, [L / total for L in consts], **kw)

    def _check_n(self, n: int) -> None:
        if n != len(self.weights):
            raise ValueError(f"EF21W has {len(self.weights)} weights but the run has {n} workers")

    def input_scale(self, worker: int, n_workers: int) -> float:
        self._check_n(n_workers)
        return 1.0 / (n_workers * self.weights[worker])

    def aggregation_weights(self, n_workers: int) -> list[float]:
        self._check_n(n_workers)
        return list(self.weights)


class _WithEta(Feedback):
    """A method with one extra weight ``eta`` in [0, 1] and EF21's choice of step 0 (``init``)."""

    estimate_state = "shift"
    options = ("eta", "init")

    def __init__(
        self, compressor: Compressor, eta: float = 0.1, *, init: Init = "full", granularity: Granularity = "global"
    ):
        super().__init__(compressor, granularity=granularity)
        self.eta = check_unit_interval("eta", eta)
        self._set_init(init)


class EF21SGDM(_WithEta):
    r"""EF21-SGDM (Fatkhullin, Tyurin, Richtárik, NeurIPS 2023; arXiv:2305.15155): momentum before compression.

    .. math::
        v_i \leftarrow (1-\eta) v_i + \eta g_i, \qquad c_i = C(v_i - h_i), \qquad h_i \leftarrow h_i + c_i

    Step 0 sets :math:`v_i = g_i^0` (``momentum_init="zero"``: :math:`\eta g_i^0`); with ``init="full"``
    (default, as the authors' code) also :math:`h_i = v_i`, sent dense. ``eta=1`` is EF21 (with the same
    ``init``).

    Args:
        compressor: a contractive compressor.
        eta: momentum weight of the fresh gradient, in [0, 1].
        init: the shift at step 0, as for :class:`EF21` (``"compressed"``: an ordinary round from
            :math:`h_i = 0`).
        momentum_init: ``"gradient"`` (default, the authors' code): :math:`v_i^0 = g_i^0`. ``"zero"``: the
            average starts from zero, :math:`v_i^0 = \eta g_i^0`, so :math:`v_i = \eta b_i` with
            :math:`b_i` torch's SGD momentum buffer (momentum ``1 - eta``): the same iterates as
            ``LocalMomentum(EF21(C), 1 - eta)`` with the step size times ``eta``. With ``"gradient"`` the
            first gradient keeps weight :math:`(1-\eta)^t` in :math:`v_i` and in the shift that holds it;
            on the character language model (TopK 1%, 4 workers, SGD, eta 0.1, ``init="compressed"``)
            ``"gradient"`` ended at training loss 3.01-3.03 for every step size from 0.1 to 1 (the unigram
            plateau), ``"zero"`` at 2.60 (runs of the convergence study before it switched to ``"zero"``).
        mask: momentum factor masking (DGC): where a sparse message sent an entry, the momentum restarts from
            zero, as :class:`~torchkit.LocalMomentum`'s ``mask=True``. With ``init="compressed"`` and
            ``momentum_init="zero"``: the same iterates as ``LocalMomentum(EF21(C, init="compressed"), 1 - eta,
            mask=True)``, the step size times ``eta``.
        {granularity}
    """

    state_names = ("momentum", "shift")
    absorb_rule = (("shift", -1.0),)
    neutral_state = "momentum"
    options = ("eta", "init", "momentum_init")
    momentum_inside = True
    update = "ef21"

    def distortion_sq(self, state, grad=None, *, worker=0, n_workers=1):
        return self._shift_distortion_sq(state, state["momentum"])

    def __init__(
        self,
        compressor: Compressor,
        eta: float = 0.1,
        *,
        init: Init = "full",
        momentum_init: Literal["gradient", "zero"] = "gradient",
        mask: bool = False,
        granularity: Granularity = "global",
    ):
        super().__init__(compressor, eta, init=init, granularity=granularity)
        if self.eta == 0:  # the average would never take a gradient in
            raise ValueError(
                "eta must be in (0, 1] for EF21SGDM, got 0: its momentum v <- (1 - eta) v + eta g would keep the first "
                "gradient forever (or zero); eta=1 is EF21"
            )
        if momentum_init not in ("gradient", "zero"):
            raise ValueError(f"momentum_init must be 'gradient' or 'zero', got {momentum_init!r}")
        check_bool("mask", mask)
        self.momentum_init = momentum_init
        self.mask = mask

    def _config_extra(self) -> dict:
        extra = super()._config_extra()  # mask only when set: older checkpoints compare equal
        if self.mask:
            extra["mask"] = True
        return extra

    def _round(self, state, g, step, worker, segments):
        msg = super()._round(state, g, step, worker, segments)
        if self.mask:
            mask_sent_(state["momentum"], msg)
        return msg

    def _direction(self, state, g, step):
        v = state["momentum"]
        if step == 0:
            v.copy_(g)
            if self.momentum_init == "zero":
                v.mul_(self.eta)
        else:
            v.mul_(1.0 - self.eta).add_(g.to(v.dtype), alpha=self.eta)
        return v


class EControl(_WithEta):
    r"""EControl (Gao, Islamov, Stich, ICLR 2024; arXiv:2311.05645).

    .. math::
        \Delta_i = C(\eta e_i + g_i - h_i), \quad e_i \leftarrow e_i + g_i - h_i - \Delta_i, \quad
        h_i \leftarrow h_i + \Delta_i, \quad h \leftarrow h + \textstyle\sum_i a_i \Delta_i

    With ``init="full"`` (default) step 0 sets :math:`h_i = g_i^0` (sent dense) and :math:`e_i = 0`;
    ``"compressed"`` runs step 0 as an ordinary round from :math:`e_i = h_i = 0`; ``"zero"`` sends
    nothing at step 0. ``eta=0`` is EF21 (with the same ``init``) exactly.

    Args:
        compressor: a contractive compressor.
        eta: strength of the error feedback, in [0, 1]. ``None`` (default) uses the compressor's ratio
            (``TopK(ratio=r)``: ``r``, whatever the vector; with DDP's buckets too), or for a compressor without
            one its alpha (``k/d`` for ``TopK(k)``, per vector, the smallest over the tensors with
            ``granularity="tensor"``, so then the hook's value depends on its buckets: give ``eta``).
            Theory asks for alpha/400; the papers tune 0.1 with TopK 10%. Keep it small: measured on
            mushrooms with Top-2 (alpha = 0.018), eta = 0.1 does not converge at any step size tried, eta =
            alpha does (benchmarks/results/repro); on the character language model with TopK 1%, eta = 0.5 and
            1 diverge, eta = 0.1 trains worse than eta = alpha (benchmarks/results/convergence), and on the
            worker's momentum eta = 0.1 diverges at 1% and 0.1% alike. Below 1% alpha is too small: at TopK
            0.1% on the worker's momentum eta = 0.01 keeps 82% of dense training's loss reduction where alpha
            keeps 73% (benchmarks/results/stale_shift; 0.0095 against alpha in the horizon study: 82% and
            74%), which :func:`torchkit.recommended` uses.
        init: ``"full"``, ``"compressed"`` or ``"zero"``, as for :class:`EF21`.
        {granularity}
    """

    state_names = ("error", "shift")
    absorb_rule = (("error", 1.0), ("shift", -1.0))
    neutral_state = "shift"
    update = "econtrol"

    def distortion_sq(self, state, grad=None, *, worker=0, n_workers=1):
        return state["error"].pow(2).sum()

    def __init__(
        self,
        compressor: Compressor,
        eta: float | None = None,
        *,
        init: Init = "full",
        granularity: Granularity = "global",
    ):
        super().__init__(compressor, 0.0 if eta is None else eta, init=init, granularity=granularity)
        self.eta = None if eta is None else self.eta
        self._alpha_of = self.compressor  # eta=None follows this compressor's alpha (kept by with_compressor)

    def eta_for(self, segments: Sequence[int]) -> float:
        """The ``eta`` used for a vector split into ``segments``: the given one; when ``eta=None``, the compressor's
        ratio where it has one (``TopK(ratio=r)``, ``RandK(ratio=r)``, under a density warm-up its final one), the
        same for any vector, so that the DDP hook's buckets do not change it; else its smallest ``alpha`` over the
        segments (``k/d`` for ``TopK(k)``: then it depends on how the parameters are split into blocks)."""
        if self.eta is not None:
            return self.eta
        ratio = getattr(getattr(self._alpha_of, "compressor", self._alpha_of), "ratio", None)
        if ratio is not None:
            return float(ratio)
        return min(self._alpha_of.alpha(n) for n in segments)

    def _update_params(self, segments) -> tuple:
        return (self.eta_for(segments),)
