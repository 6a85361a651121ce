"""The round state every front end keeps, and its one checkpoint format.

A :class:`RoundState` holds, for one worker (or the simulator's n rows), the feedback method's state vectors,
the server estimate and the step, in flat :class:`Block` buffers: one per group of parameters that go through a
round together (a parameter group's tensors of one dtype, a DDP bucket, the simulator's vector). Blocks are
built from parameter names and rebuilt when the layout changes (DDP rebuilds its buckets; a parameter is
frozen), carrying each parameter's state over by name. The checkpoint is keyed by parameter name too, so it
does not depend on the blocks, and one validator checks it before anything is changed.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import ops
from .feedback import Feedback

__all__ = ["Block", "RoundState", "FORMAT_VERSION", "normalize_name", "check_envelope"]

FORMAT_VERSION = 3  # 3: rank and world_size are the process's in the default group (2: the exchange group's)
_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel / DataParallel and by torch.compile


def normalize_name(name: Any) -> Any:
    """A parameter name without the prefixes that DDP and ``torch.compile`` add (``module.``, ``_orig_mod.``)."""
    if not isinstance(name, str):
        return name
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts) if parts else name


@functools.lru_cache(maxsize=1024)
def _normalized(names: tuple) -> tuple:
    """:func:`normalize_name` of each name, remembered: the front ends name the same blocks every round."""
    return tuple(normalize_name(n) for n in names)


class Block:
    """Flat state of parameters that share one round: the method's vectors and the server estimate.

    ``rows`` (the simulator) gives every vector a leading worker dimension; the server estimate is one row.
    """

    def __init__(
        self,
        feedback: Feedback,
        names: Sequence[Any],
        sizes: Sequence[int],
        *,
        state: dict[str, Tensor],
        server: Tensor | None,
        segments: Sequence[int] | None = None,
    ):
        """A block over existing vectors (``state``: the method's, by name; ``server``: the server estimate or
        ``None``); :meth:`zeros` allocates them."""
        self.names, self.sizes = tuple(names), tuple(int(n) for n in sizes)
        self.numel = sum(self.sizes)
        self.segments = tuple(segments) if segments is not None else feedback.segments_for(self.sizes)
        self.state, self.server = state, server
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self.spans = dict(zip(self.names, zip(offs[:-1], offs[1:])))
        self.scratch: dict[torch.dtype, Tensor] = {}
        self.plans: dict[tuple, Feedback] = {}  # the round's method per wire and group size (comm), decided once

    @classmethod
    def zeros(
        cls,
        feedback: Feedback,
        names: Sequence[Any],
        sizes: Sequence[int],
        *,
        dtype: torch.dtype,
        device: torch.device | str | None,
        with_server: bool,
        rows: int | None = None,
    ) -> Block:
        """A block whose vectors are the method's zeroed state (``rows``: one row per worker, the simulator's)."""
        numel = sum(int(n) for n in sizes)
        state = feedback.init_state(numel, rows=rows, dtype=dtype, device=device)
        server = torch.zeros(numel, dtype=feedback.state_dtype(dtype), device=device) if with_server else None
        return cls(feedback, names, sizes, state=state, server=server)

    def aggregate_buffer(self, out: Tensor, dtype: torch.dtype) -> Tensor:
        """Where a round's aggregate goes: ``out`` itself when it has the state dtype, else a buffer kept
        across rounds (bf16 gradients aggregate in fp32, as the state does)."""
        if out.dtype == dtype:
            return out
        buf = self.scratch.get(dtype)
        if buf is None or buf.numel() != out.numel() or buf.device != out.device:
            buf = self.scratch[dtype] = torch.empty(out.numel(), dtype=dtype, device=out.device)
        return buf

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("scratch", "plans")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.scratch, self.plans = {}, {}
        self.state = {k: _repadded(v) for k, v in self.state.items()}  # unpickled vectors own no padding

    def vectors(self) -> dict[str, Tensor]:
        """Every flat vector, the server estimate as ``"server"``."""
        return {**self.state, **({"server": self.server} if self.server is not None else {})}

    def views(self, name: Any) -> dict[str, Tensor]:
        """This parameter's slice of every vector (views: writing them writes the block)."""
        a, b = self.spans[name]
        return {k: v[..., a:b] for k, v in self.vectors().items()}


class RoundState:
    """Per-worker state of a feedback method over named parameters, shared by every front end.

    Attributes:
        feedback: the method.
        step: rounds run so far (the method's step counter).
        blocks: the flat buffers, by a key the front end chooses.
    """

    def __init__(self, feedback: Feedback):
        if not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a torchkit feedback method (EF21, ...), got {type(feedback).__name__}")
        self.feedback = feedback
        self.step = 0
        self.blocks: dict[Any, Block] = {}
        self._owner: dict[Any, Any] = {}  # parameter name -> key of the block that holds it now
        self._pending: dict[Any, dict[str, Tensor]] = {}  # loaded, not yet placed in a block
        self.restored_at: int | None = None  # step at which the state was restored from a per-rank file or DCP

    # ------------------------------------------------------------------------------------------- blocks
    def block(self, key, names, sizes, *, dtype, device, with_server: bool, rows: int | None = None) -> Block:
        """The block ``key`` over ``names``; built (or rebuilt) carrying each parameter's state by name."""
        names = _normalized(tuple(names))
        blk = self.blocks.get(key)
        if (
            blk is not None
            and (blk.names, blk.sizes) == (names, tuple(sizes))
            and (blk.server is not None) == with_server
            and next(iter(blk.vectors().values())).dtype == self.feedback.state_dtype(dtype)
        ):
            return blk
        new = Block.zeros(self.feedback, names, sizes, dtype=dtype, device=device, with_server=with_server, rows=rows)
        for name in names:
            old = self.param_views(name)
            if old is None:
                old = self._pending.pop(name, None)
            if old is None:
                continue
            for k, t in new.views(name).items():
                if k not in old:
                    continue
                if old[k].shape[-1] != t.shape[-1]:
                    raise ValueError(
                        f"loaded state {k!r} of parameter {name!r} has {old[k].shape[-1]} elements, "
                        f"the parameter {t.shape[-1]}"
                    )
                t.copy_(old[k].reshape(t.shape))
        if blk is not None:  # parameters leaving the replaced block keep their state until placed again
            for name in blk.names:
                if name not in new.spans and self._owner.get(name) == key:
                    self._pending[name] = {k: v.clone() for k, v in blk.views(name).items()}
                    del self._owner[name]
        self.blocks[key] = new
        for name in names:
            self._owner[name] = key
        # a block every parameter of which moved to another (a model converted to another dtype) is stale; one with
        # no parameters (a node-aware rank's empty shard) is not
        for other, b in list(self.blocks.items()):
            if other != key and b.names and all(self._owner.get(n) != other for n in b.names):
                del self.blocks[other]
        return new

    def param_views(self, name) -> dict[str, Tensor] | None:
        key = self._owner.get(name)
        return None if key is None else self.blocks[key].views(name)

    def params(self) -> dict[Any, dict[str, Tensor]]:
        """Every placed parameter's views, by name."""
        return {name: self.blocks[key].views(name) for name, key in self._owner.items()}

    def reset(self) -> None:
        self.step, self.blocks, self._owner, self._pending = 0, {}, {}, {}
        self.restored_at = None

    def mark_restored(self) -> None:
        """Record that this rank's state was just restored from its own per-rank checkpoint (a side file, DCP)."""
        self.restored_at = self.step

    def restored(self) -> bool:
        """Whether the state was restored from a per-rank checkpoint and no round has run since: a front end then
        keeps it when a framework hands it a state_dict saved on another rank (or one without feedback state)."""
        at = getattr(self, "restored_at", None)  # absent in states pickled before it existed
        return at is not None and at == self.step

    def shared(self) -> dict[str, Any]:
        """What every worker of a round holds alike: the step and a fingerprint of the server estimate (float64 sum
        and sum of squares over every parameter's, placed or pending). Ranks that resumed from different states
        (one restored its feedback state, another restarted the method) differ here."""
        total = squares = 0.0
        for views in [*self.params().values(), *self._pending.values()]:
            server = views.get("server")
            if server is not None:
                x = server.detach().to(torch.float64)
                total, squares = total + float(x.sum()), squares + float(x.square().sum())
        return {"step": self.step, "server estimate": [total, squares]}

    # --------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        params = {name: {k: v.clone() for k, v in views.items()} for name, views in self.params().items()}
        params.update({k: {n: t.clone() for n, t in v.items()} for k, v in self._pending.items() if k not in params})
        return {"method": self.feedback.config(), "step": self.step, "params": params}

    def state_dict_for(
        self, layout: Mapping[Any, tuple[int, torch.dtype, Any]], *, with_server: bool
    ) -> dict[str, Any]:
        """:meth:`state_dict` covering every parameter of ``layout`` (name -> numel, parameter dtype, device): a
        parameter without state yet gets what a fresh block would give it, so that the checkpoint's keys do not
        depend on whether a round has run (DCP loads into a template of the same keys)."""
        sd = self.state_dict()
        for name, (numel, dtype, device) in layout.items():
            name = normalize_name(name)
            if name not in sd["params"]:
                vecs = self.feedback.init_state(numel, dtype=dtype, device=device)
                if with_server:
                    vecs["server"] = torch.zeros(numel, dtype=self.feedback.state_dtype(dtype), device=device)
                sd["params"][name] = vecs
        return sd

    def load_state_dict(
        self, sd: Mapping[str, Any], *, sizes: Mapping[Any, int] | None = None, strict: bool = True
    ) -> tuple[list, list]:
        """Validate ``sd`` completely, then load it; ``(missing, unexpected)`` parameter names.

        ``sizes`` (name -> numel), when the front end knows its parameters, checks every loaded tensor's
        length and, with ``strict``, that the names match exactly. Nothing changes when a check fails.
        """
        prepared = self.check(sd, sizes=sizes, strict=strict)
        self.apply(prepared)
        return prepared["missing"], prepared["unexpected"]

    def check(
        self,
        sd: Mapping[str, Any],
        *,
        sizes: Mapping[Any, int] | None = None,
        strict: bool = True,
        frozen: Mapping[Any, int] | None = None,
    ) -> dict:
        """Everything :meth:`load_state_dict` checks, without changing anything; the input of :meth:`apply`.
        ``frozen`` (name -> numel): parameters the front end holds that do not train now; a checkpoint may carry
        their state (saved while they were frozen, or before) or not, and what it carries is kept for when they
        train again."""
        params = {normalize_name(k): v for k, v in _checked_params(sd, self.feedback).items()}
        step = sd.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
        missing, unexpected = [], []
        if sizes is not None:
            sizes = {normalize_name(k): int(v) for k, v in sizes.items()}
            optional = {normalize_name(k): int(v) for k, v in (frozen or {}).items() if normalize_name(k) not in sizes}
            unsaved = sd.get("frozen") or ()  # frozen without state when saved: they start fresh
            if not isinstance(unsaved, (list, tuple)) or not all(isinstance(k, (str, int)) for k in unsaved):
                raise ValueError(f"checkpoint 'frozen' must be a list of parameter names, got {unsaved!r}")
            unsaved = {normalize_name(k) for k in unsaved}
            missing = sorted((k for k in sizes if k not in params and k not in unsaved), key=str)
            unexpected = sorted((k for k in params if k not in sizes and k not in optional), key=str)
            sizes = {**optional, **sizes}
            if strict and (missing or unexpected):
                raise ValueError(
                    f"checkpoint parameter names do not match: missing {_few(missing)}, unexpected {_few(unexpected)} "
                    "(strict=False loads the matching ones and returns both lists)"
                )
            for name, vecs in params.items():
                n = sizes.get(name)
                for k, t in vecs.items():
                    if t.dim() != 1:  # the front ends keep one vector per parameter ([rows, d]: the simulator's)
                        raise ValueError(
                            f"checkpoint state {k!r} of parameter {name!r} has shape {tuple(t.shape)}, not one vector"
                        )
                    if n is not None and t.shape[-1] != n:
                        raise ValueError(
                            f"checkpoint state {k!r} of parameter {name!r} has {t.shape[-1]} elements, "
                            f"the parameter {n}"
                        )
        keep = {k: v for k, v in params.items() if k not in unexpected}
        return {"params": keep, "step": step, "missing": missing, "unexpected": unexpected}

    def apply(self, prepared: dict) -> None:
        """Replace the state by a checked checkpoint (see :meth:`check`); it is placed into blocks as they are built."""
        self.blocks, self._owner = {}, {}
        self._pending = {k: {n: t.clone() for n, t in v.items()} for k, v in prepared["params"].items()}
        self.step = prepared["step"]
        self.restored_at = None

    # ------------------------------------------------------------------------------------ partial rounds
    def sub_block(self, blk: Block, names: Sequence[Any]) -> Block:
        """A standalone block holding copies of some parameters' state (a round over a subset of them)."""
        sizes = [blk.spans[n][1] - blk.spans[n][0] for n in names]
        some = next(iter(blk.vectors().values()))
        sub = Block.zeros(
            self.feedback,
            names,
            sizes,
            dtype=some.dtype,
            device=some.device,
            with_server=blk.server is not None,
            rows=some.shape[0] if some.dim() == 2 else None,
        )
        for n in names:
            for k, t in sub.views(n).items():
                t.copy_(blk.views(n)[k])
        return sub

    def write_sub_block(self, blk: Block, sub: Block) -> None:
        for n in sub.names:
            for k, t in blk.views(n).items():
                t.copy_(sub.views(n)[k])


def _repadded(t: Tensor) -> Tensor:
    """A 1-D vector copied into a :func:`torchkit.ops.padded_zeros` buffer (a row batch as it is)."""
    if t.dim() != 1 or ops.owns_padding(t):
        return t
    return ops.padded_zeros(t.numel(), dtype=t.dtype, device=t.device).copy_(t)


def _checked_params(sd: Mapping[str, Any], feedback: Feedback) -> dict[Any, dict[str, Tensor]]:
    params = sd.get("params")
    if not isinstance(params, Mapping):
        raise ValueError("checkpoint has no 'params' mapping of per-parameter feedback state")
    want = set(feedback.state_names)
    out = {}
    for name, vecs in params.items():
        if not isinstance(vecs, Mapping) or not want <= set(vecs):
            have = sorted(vecs) if isinstance(vecs, Mapping) else type(vecs).__name__
            raise ValueError(f"checkpoint state of parameter {name!r} lacks {sorted(want)} (has {have})")
        for k, t in vecs.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"checkpoint state {k!r} of parameter {name!r} is not a floating-point tensor")
            if t.dim() not in (1, 2):
                raise ValueError(
                    f"checkpoint state {k!r} of parameter {name!r} has shape {tuple(t.shape)}, not a vector"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"checkpoint state {k!r} of parameter {name!r} holds non-finite values")
        lengths = {k: t.shape[-1] for k, t in vecs.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"checkpoint state of parameter {name!r} holds vectors of different lengths {lengths}")
        out[name] = dict(vecs)
    return out


def check_envelope(
    sd: Any, *, kind: str, rank: int, world_size: int, feedback: Feedback, exchange: tuple[int, int] | None = None
) -> list[str]:
    """The per-rank checks every front end makes before loading: returns the problems, in one wording. ``rank`` and
    ``world_size`` are the process's (format 3); ``exchange`` (rank, size in the exchange group) is what formats 1-2
    recorded, which differs for a front end exchanging over a subgroup."""
    if not isinstance(sd, Mapping) or "format_version" not in sd:
        raise ValueError(f"not a torchkit {kind} state_dict (no format_version)")
    version = sd["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{kind} state_dict format_version {version!r} is newer than this torchkit ({FORMAT_VERSION})")
    if version < 3 and exchange is not None:
        rank, world_size = exchange
    problems = []
    if sd.get("world_size") != world_size:
        problems.append(
            f"saved with world_size={sd.get('world_size')}, this run has world_size={world_size} "
            "(error-feedback state is per rank and cannot be re-sharded)"
        )
    if sd.get("rank") != rank:
        problems.append(f"saved by rank {sd.get('rank')}, loaded on rank {rank}")
    method = sd.get("method") if version >= 2 else sd.get("feedback")
    mine = feedback.config() if version >= 2 else repr(feedback)
    if method != mine:
        problems.append(f"saved with feedback {_describe(method)}, this run has {_describe(mine)}")
    return problems


def checkpoint_count(name: str, value: Any) -> int:
    """A counter a checkpoint carries (steps skipped, bytes sent): an int >= 0, or absent (``None``: 0, as before it
    was kept); checked before a load changes anything."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"checkpoint {name} must be an int >= 0, got {value!r}")
    return int(value)


def _few(names: list) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def _describe(method: Any) -> str:
    if isinstance(method, Mapping):
        extras = ", ".join(f"{k}={v}" for k, v in method.items() if k not in ("method",))
        return f"{method.get('method')}({extras})"
    return str(method)


def split_flat(flat: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """The per-parameter pieces of a flat vector (old checkpoints stored whole groups)."""
    if sum(sizes) != flat.shape[-1]:
        raise ValueError(
            f"flat state of {flat.shape[-1]} elements does not match parameter sizes summing to {sum(sizes)}"
        )
    out, off = [], 0
    for n in sizes:
        out.append(flat[..., off : off + n])
        off += n
    return out
