"""The front-end contract: what every front end (:class:`~torchkit.CompressedOptimizer`, :class:`~torchkit.LocalSGD`,
the DDP hook's :class:`~torchkit.ddp.CompressionState`) declares, and what it gets for it.

A front end holds its feedback state in a :class:`~torchkit.state.RoundState` (``self.round``) and runs
:func:`torchkit.comm.start_round` over it. By subclassing :class:`FrontEnd` and declaring

- ``kind`` (its name in messages) and ``restart_hint`` (how a user restarts the method instead of loading),
- ``rank``/``world_size``, ``_feedback_layout()`` (every parameter the state covers: name -> numel, dtype, device),
- and, when it keeps more than the method's state, its extras: ``_extras()``, ``_check_extras(sd)`` (raise or return
  what to apply; changes nothing), ``_apply_extras(checked)``,

it gets the checkpoint written and validated once, here: :meth:`FrontEnd.feedback_state_dict` (the envelope: format
version, rank, world size, method, step, per-parameter state, extras), :meth:`FrontEnd.check_feedback_state_dict`
(every check, nothing changed: a :class:`FeedbackPlan`), :meth:`FrontEnd.load_feedback_state_dict` and
:meth:`FrontEnd.feedback_stateful` (DCP). :mod:`torchkit.checkpoint` (side files, ``load_dcp``) and the
framework integrations use only these. The agreement between ranks (:func:`agree`) lives here too.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .comm import DistExchanger, LocalExchanger, on_any_rank
from .state import FORMAT_VERSION, RoundState, check_envelope, normalize_name

__all__ = [
    "FrontEnd",
    "FeedbackPlan",
    "FeedbackStateful",
    "FOREIGN_RANK_HINT",
    "RESUME_HINTS",
    "agree",
    "make_exchanger",
    "live_instances",
]

FOREIGN_RANK_HINT = (
    "The feedback state is per rank and this checkpoint holds another rank's, as when a framework saves from rank 0 "
    "only (Lightning, Accelerate). To resume exactly, keep every rank's feedback state in per-rank side files: "
    "torchkit.checkpoint.save_feedback(name, *objs) on every rank when saving and "
    "torchkit.checkpoint.load_feedback(name, *objs) on every rank before this load (Lightning: "
    "torchkit.integrations.lightning.DDPStrategy; Accelerate: "
    "torchkit.integrations.accelerate.keep_feedback_per_rank), "
    "use DCP with .feedback_stateful(), or save the state_dict on every rank. To restart the method at its step 0 on "
    "every rank instead: {restart}"
)


class FrontEnd:
    """The contract of a front end over a :class:`~torchkit.state.RoundState` (see the module docstring).

    The checkpoint of a front end is its *feedback state dict*: ``format_version``, ``rank``, ``world_size``, the
    method's ``config()`` as ``method``, the round ``step``, ``params`` (per parameter name, the method's vectors
    and the server estimate) and the front end's extras (top-level keys of their own).
    """

    __slots__ = ()  # the DDP hook's state keeps __slots__

    kind: ClassVar[str] = "front end"
    restart_hint: ClassVar[str] = ""
    optional_keys: ClassVar[tuple[str, ...]] = ()  # extras only some runs write (a sharded model's mesh)
    round: RoundState
    feedback: Any
    _agreed: bool

    # ------------------------------------------------------------------------------ what a front end declares
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def world_size(self) -> int:
        raise NotImplementedError

    @property
    def process_rank(self) -> int:
        """This process's rank in the default group (its exchange rank when there is none): the identity of its
        checkpoint. It differs from :attr:`rank` when the exchange runs over a subgroup (the replicas of a sharded
        model, where several processes hold the same exchange rank and different shards)."""
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else self.rank

    @property
    def process_count(self) -> int:
        """The default group's size (the exchange's when there is none)."""
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else self.world_size

    def _feedback_layout(self) -> dict[Any, tuple[int, torch.dtype, Any]] | None:
        """Every parameter the feedback state covers: name -> (numel, dtype, device); ``None`` when not known yet
        (then names and sizes are not checked on load)."""
        raise NotImplementedError

    def _frozen_layout(self) -> dict[Any, tuple[int, torch.dtype, Any]]:
        """Parameters this front end holds that do not train now (``requires_grad`` off), as
        :meth:`_feedback_layout` gives them. Their state is kept while they are frozen (saved, and loaded when a
        checkpoint has it), but not required on load."""
        return {}

    def _extras(self) -> dict[str, Any]:
        """This front end's own per-rank state, saved beside the feedback state (top-level keys)."""
        return {}

    def _extra_problems(self, sd: Mapping[str, Any]) -> list[str]:
        """Configuration differences in a checkpoint that the envelope does not cover, in the envelope's words."""
        return []

    def _check_extras(self, sd: Mapping[str, Any]) -> Any:
        """Check the extras of ``sd`` completely (raise ``ValueError``), change nothing; the input of
        :meth:`_apply_extras`."""
        return None

    def _apply_extras(self, checked: Any) -> None:
        """Apply checked extras; the first thing a load changes (may raise only before changing anything)."""

    def _migrate(self, sd: Mapping[str, Any]) -> Mapping[str, Any]:
        """An older format's feedback state dict in the current one (``format_version`` is checked after)."""
        return sd

    def _placed(self) -> None:
        """After a load: place the loaded state into blocks now, where the front end knows them."""

    # ------------------------------------------------------------------------------ what it gets
    def _check_feedback(self) -> None:
        """Refuse a method set on the front end after it was built (``state.feedback = tk.EF14(...)``): its state
        is laid out for the method it was built with, so the next round failed with a ``KeyError`` from inside the
        backward, or, set on one rank only, aborted the others in a mismatched collective."""
        if self.feedback is not self.round.feedback:
            raise ValueError(
                f"the {self.kind}'s feedback was replaced after it was built ({self.round.feedback!r} -> "
                f"{self.feedback!r}): its state is laid out for the first. Build a new {self.kind} (and, for the DDP "
                "hook, register it on a new DDP model) to change the method or its compressor"
            )

    def _with_server(self) -> bool:
        return bool(self.feedback.server_state) and self.world_size > 1

    def feedback_state_dict(self, *, frozen: Sequence[Any] = ()) -> dict[str, Any]:
        """This rank's feedback state (the envelope above), for every parameter of the layout: a parameter without
        a round yet has what its first round starts from, so that the keys do not depend on whether a step ran
        (a fresh front end's state_dict loads back into it; DCP loads into a template of the same keys). A frozen
        parameter's state is there when it has one; ``frozen`` names frozen parameters to cover in any case (the
        template of a DCP checkpoint that holds their state: :func:`torchkit.checkpoint.load_dcp`)."""
        layout = self._feedback_layout()
        if layout is not None and frozen:
            held = self._frozen_layout()
            layout = {**{n: held[n] for n in frozen if n in held}, **layout}
        if layout is None:
            body = self.round.state_dict()
        else:
            body = self.round.state_dict_for(layout, with_server=self._with_server())
        return {**self._envelope(), "params": body["params"]}

    def _with_frozen_names(self, sd: dict[str, Any]) -> dict[str, Any]:
        """``sd`` (a feedback state dict saved with ``torch.save``) naming the parameters frozen now that hold no
        state (they never trained): a load into a run where they train then starts them fresh, as this run would,
        instead of refusing them as missing. DCP's entries leave it out (DCP loads into a template of fixed keys)."""
        frozen = sorted((n for n in map(normalize_name, self._frozen_layout()) if n not in sd["params"]), key=str)
        return {**sd, "frozen": frozen} if frozen else sd

    def _envelope(self) -> dict[str, Any]:
        """:meth:`feedback_state_dict` without the per-parameter state (nothing cloned or allocated for it)."""
        return {
            "format_version": FORMAT_VERSION,
            "rank": self.process_rank,
            "world_size": self.process_count,
            **self._extras(),
            "method": self.feedback.config(),
            "step": self.round.step,
        }

    def check_feedback_state_dict(self, state_dict: Any, *, strict: bool = True) -> FeedbackPlan:
        """Everything a load checks (envelope, method, extras, parameter names and sizes), without changing
        anything: a :class:`FeedbackPlan` whose :meth:`~FeedbackPlan.apply` loads it."""
        sd = self.check_header(state_dict)
        extras = self._check_extras(sd)
        layout = self._feedback_layout()
        sizes = None if layout is None else {n: v[0] for n, v in layout.items()}
        frozen = {n: v[0] for n, v in self._frozen_layout().items()}
        checked = self.round.check(sd, sizes=sizes, strict=strict, frozen=frozen)
        return FeedbackPlan(self, checked, extras)

    def check_header(self, state_dict: Any) -> Mapping[str, Any]:
        """The checks that need no tensor (format, rank, world size, method, the extras' configuration): raises
        ``ValueError`` saying what to do; returns the state dict in the current format."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"a {self.kind} feedback state_dict must be a mapping, got {type(state_dict).__name__}")
        sd = self._migrate(state_dict)
        rank, world = self.process_rank, self.process_count
        if isinstance(sd.get("format_version"), int) and sd["format_version"] < 3:
            rank, world = self.rank, self.world_size  # formats 1-2 recorded the exchange group's identity
        problems = check_envelope(sd, kind=self.kind, rank=rank, world_size=world, feedback=self.feedback)
        problems += self._extra_problems(sd)
        if problems:
            foreign = sd.get("world_size") == world and sd.get("rank") != rank
            restart = self.restart_hint
            hint = FOREIGN_RANK_HINT.format(restart=restart) if foreign else f"to restart the method: {restart}"
            raise ValueError(f"cannot load {self.kind} state: " + "; ".join(problems) + ". " + hint)
        return sd

    def load_feedback_state_dict(self, state_dict: Any) -> None:
        """Load this rank's own feedback state (strictly; nothing changes when a check fails). Like a state
        restored by :func:`torchkit.checkpoint.load_feedback` or DCP, it is then kept when a framework hands this
        front end a state_dict saved on another rank (or one without feedback state), until its next round."""
        self.check_feedback_state_dict(state_dict).apply(restored=True)

    def feedback_stateful(self) -> FeedbackStateful:
        """This rank's feedback state as a DCP ``Stateful`` (:class:`FeedbackStateful`)::

        dcp.save({"model": model_sd, "optim": optim_sd, "feedback": front.feedback_stateful()}, checkpoint_id=path)
        # resume, on every rank (torchkit.checkpoint.load_dcp checks the feedback entry before the model loads):
        torchkit.checkpoint.load_dcp({"model": model_sd, "optim": optim_sd, "feedback": front.feedback_stateful()},
                                     checkpoint_id=path)
        """
        return FeedbackStateful(self)


@dataclass
class FeedbackPlan:
    """A checked feedback state dict of one front end: :meth:`apply` loads it (nothing left to check)."""

    owner: FrontEnd
    checked: dict[str, Any]  # RoundState.check's: params, step, missing, unexpected
    extras: Any = None
    applied: bool = field(default=False, repr=False)

    @property
    def missing(self) -> list:
        return self.checked["missing"]

    @property
    def unexpected(self) -> list:
        return self.checked["unexpected"]

    def apply(self, *, restored: bool = False) -> None:
        """Load the state. ``restored``: it is this rank's own state from a per-rank checkpoint (side file, DCP),
        kept when another rank's state_dict is loaded next, before the next round."""
        owner = self.owner
        owner._apply_extras(self.extras)  # may refuse (an outer optimizer's own load) before anything changed
        owner.round.apply(self.checked)
        owner._placed()
        owner._agreed = False
        if restored:
            owner.round.mark_restored()
        self.applied = True


class FeedbackStateful:
    """A front end's feedback state as a ``torch.distributed.checkpoint.stateful.Stateful``.

    ``state_dict()`` is ``{"rank<r>": <the feedback state dict>}``, with the method's identity as one JSON string and
    every extra that is itself a mapping (LocalSGD's anchors and outer optimizer) as one serialised blob, so that the
    keys depend only on the rank, the parameters and the method's state vectors. ``dcp.save`` then writes every
    rank's own tensors and ``dcp.load`` reads back this rank's; ``load_state_dict`` checks rank, world size, method,
    extras and layout before anything changes. A checkpoint from fewer ranks fails in ``dcp.load`` with DCP's
    ``Missing key in checkpoint state_dict: <key>.rank<r>...`` (:func:`torchkit.checkpoint.load_dcp`: a
    ``ValueError`` on every rank); one from more ranks raises ``ValueError: ... saved with world_size=...``.
    """

    def __init__(self, owner: FrontEnd):
        if not isinstance(owner, FrontEnd):
            raise TypeError(
                f"FeedbackStateful needs a torchkit front end (CompressedOptimizer, LocalSGD, CompressionState), "
                f"got {type(owner).__name__}"
            )
        self.owner = owner

    #: frozen parameters whose state the checkpoint being loaded holds (set by torchkit.checkpoint.load_dcp, so
    #: that DCP, which reads only the keys of its template, reads theirs too)
    frozen_in_checkpoint: tuple = ()

    @property
    def key(self) -> str:
        return f"rank{self.owner.process_rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self._encoded(self.owner.feedback_state_dict(frozen=self.frozen_in_checkpoint))}

    def frozen_keys(self, entry: str) -> dict[Any, list[str]]:
        """The flat DCP keys a checkpoint entry ``entry`` would hold for each frozen parameter's state."""
        names = list(self.owner.feedback.state_names)
        if self.owner._with_server():
            names.append("server")
        return {n: [f"{entry}.{self.key}.params.{n}.{k}" for k in names] for n in self.owner._frozen_layout()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.check(state_dict).apply(restored=True)

    def check(self, state_dict: Mapping[str, Any]) -> FeedbackPlan:
        """Everything :meth:`load_state_dict` checks (rank, world size, method, extras, layout), changing nothing."""
        return self.owner.check_feedback_state_dict(self._decoded(state_dict))

    def header(self) -> dict[str, Any]:
        """:meth:`state_dict` without the per-parameter tensors: what :meth:`check_header` needs, the front end's
        optional keys set to ``None`` (what a checkpoint without them means): a checkpoint that has them fills them,
        one that has not leaves ``None`` to compare with this run's."""
        sd = self._encoded(self.owner._envelope())
        return {self.key: {**sd, **{k: None for k in self.owner.optional_keys}}}  # None unless the checkpoint has it

    def check_header(self, state_dict: Mapping[str, Any]) -> None:
        """The checks that need no tensor (:meth:`FrontEnd.check_header`): DCP checks tensor sizes before anything
        else, so a checkpoint of another mesh or world size would fail there without saying why."""
        self.owner.check_header(self._decoded(state_dict))

    @staticmethod
    def _encoded(sd: dict[str, Any]) -> dict[str, Any]:
        """The method as one JSON string, every other mapping but ``params`` as one serialised blob: DCP keeps a
        non-tensor leaf as it is, but would split a nested optimizer state into entries of its own."""
        sd["method"] = json.dumps(sd["method"], sort_keys=True)
        for k, v in sd.items():
            if k != "params" and isinstance(v, Mapping):
                buf = io.BytesIO()
                torch.save(v, buf)
                sd[k] = buf.getvalue()
        return sd

    def _decoded(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(state_dict, Mapping) or self.key not in state_dict:
            have = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"no feedback state for {self.key} in this checkpoint entry (has {have})")
        sd = dict(state_dict[self.key])
        method = sd.get("method")
        if isinstance(method, str):
            mine = self.owner.feedback.config()
            sd["method"] = mine if json.dumps(mine, sort_keys=True) == method else json.loads(method)
        for k, v in sd.items():
            if isinstance(v, bytes):
                sd[k] = torch.load(io.BytesIO(v), map_location="cpu", weights_only=True)
        return sd


def mesh_problems(saved: Mapping[str, int] | None, mine: Mapping[str, int] | None) -> list[str]:
    """A checkpoint's sharded layout (``{"replicas": 2, "shards": 2}``, ``{"nodes": 2, "ranks per node": 2}``)
    against this run's, in the envelope's words: sharded feedback state cannot be re-sharded."""
    where = ("replica", "shard")  # this rank's place in the mesh, recorded since 2026-12
    shape = lambda m: {k: v for k, v in m.items() if k not in where} if m else m  # noqa: E731
    describe = lambda m: " x ".join(f"{v} {k}" for k, v in m.items()) if m else "unsharded"  # noqa: E731
    if shape(saved) != shape(mine):
        return [f"saved {describe(shape(saved))}, this run is {describe(shape(mine))} (sharded feedback state cannot "
                "be re-sharded)"]  # fmt: skip
    place = lambda m: tuple(m.get(k) for k in where) if m else ()  # noqa: E731
    if saved and mine and all(k in saved for k in where) and place(saved) != place(mine):
        return [f"saved at replica {saved['replica']} and shard {saved['shard']}, this rank is at replica "
                f"{mine.get('replica')} and shard {mine.get('shard')} of a mesh of the same shape that maps the ranks "
                "otherwise (sharded feedback state cannot be re-sharded)"]  # fmt: skip
    return []


def live_instances(cls: type):
    """The live objects of type ``cls``, found among the garbage collector's (a dead weak proxy is skipped: testing
    its type raises ``ReferenceError``; so is the deprecation warning some torch objects give when asked)."""
    import gc
    import warnings

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, cls):
                    found.append(obj)
            except ReferenceError:
                continue
    return found


def make_exchanger(group):
    """The exchanger of an optimizer front end: the group's, or one worker's where there is no group of several."""
    check_group(group)
    if group is not None or (dist.is_available() and dist.is_initialized()):
        if dist.get_world_size(group) > 1:
            return DistExchanger(group)
    return LocalExchanger(1)


def check_group(group, name: str = "process_group") -> None:
    """``TypeError`` unless ``group`` is ``None`` or a ``torch.distributed.ProcessGroup``."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")


def agree(
    mine: dict[str, Any],
    *,
    group,
    world_size: int,
    rank: int,
    what: str,
    hints: dict[str, str] | None = None,
    everyone=None,
):
    """Every rank has the same configuration ``mine``, or every rank raises ``ValueError`` naming the first
    difference. ``what`` names what each rank must build alike; ``hints`` add advice for some keys. ``everyone``
    (an exchanger over more ranks than ``group``: a sharded model's, whose replicate groups compare their own
    shards) hears of a difference in any group, so that no rank goes on to a collective the others left."""
    theirs = [None] * world_size
    dist.all_gather_object(theirs, mine, group=group)
    error = None
    for r, other in enumerate(theirs):
        diff = [k for k in mine if other.get(k) != mine[k]]
        if diff:
            key = diff[0]
            where, a, b = _first_difference(key, other.get(key), mine[key])
            hint = (hints or {}).get(key)
            error = ValueError(
                f"ranks are configured differently: rank {r} has {where} {a!r}, rank {rank} has {b!r}; every rank must "
                f"build the same {what}" + (f". {hint}" if hint else "")
            )
            break
    if everyone is not None and on_any_rank(everyone, error is not None):
        error = error or ValueError(
            f"ranks are configured differently: the ranks of another group of replicas differ (their error names "
            f"the difference); every rank must build the same {what}"
        )
    if error is not None:
        raise error


#: advice for the differences that a resume (not the model) causes, shared by the front ends
RESUME_HINTS = {
    "feedback": (
        "The ranks resumed from different error-feedback states (one restored its own, another restarted the method "
        "or loaded another checkpoint): restore every rank's own state (each rank's state_dict, "
        "torchkit.checkpoint.load_feedback, or DCP with feedback_stateful()), or restart the method on every rank "
        "(torchkit.checkpoint.without_feedback on every rank)"
    ),
    "parameters": (
        "Replicas must start identical: build the model the same way on every rank (the same seed, the same "
        "parameter order) and load the same checkpoint on every rank, or broadcast rank 0's parameters before the "
        "first step"
    ),
    "options": "Set the same hyper-parameters on every rank (and step the same LR scheduler on every rank)",
}


def _first_difference(where: str, a: Any, b: Any) -> tuple[str, Any, Any]:
    """The innermost place where two configurations differ, as ``key[i][j]`` (short values in messages)."""
    while isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        where, a, b = f"{where}[{i}]", a[i], b[i]
    while isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        k = next(k for k in a if a[k] != b[k])
        where, a, b = f"{where}[{k!r}]", a[k], b[k]
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            return _first_difference(where, a, b)
    return where, a, b
