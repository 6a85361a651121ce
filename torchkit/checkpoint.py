"""Checkpointing the per-rank error-feedback state: DCP, per-rank side files, and a consistent restart.

The feedback state of every front end (:class:`torchkit.CompressedOptimizer`, :class:`torchkit.LocalSGD`, the DDP
hook's :class:`torchkit.ddp.CompressionState`) differs on every rank and cannot be re-sharded. Three ways to keep
it, each through the front-end contract (:class:`torchkit.frontend.FrontEnd`) alone:

- **Every rank saves its own** ``opt.state_dict()`` / ``state.state_dict()`` (``torch.save`` on every rank).
- **torch.distributed.checkpoint (DCP)**: put ``opt.feedback_stateful()`` / ``state.feedback_stateful()`` next to
  the model and optimizer in ``dcp.save`` / ``dcp.load``. Each rank's tensors go under a key that names the rank
  (``"<key>.rank<r>..."``), so DCP writes every rank's own values (plain tensors under one key would be
  de-duplicated to a single rank's copy) and each rank reads back its own.
- **Frameworks that save from rank 0 only** (Lightning, Accelerate): :func:`save_feedback` writes
  ``<name>.rank<r>.pt`` on every rank next to the framework's checkpoint, :func:`load_feedback` reads this rank's
  file back before the framework loads its (rank 0's) checkpoint. ``torchkit.integrations`` wires this into
  Lightning's ``DDPStrategy`` and Accelerate's ``save_state``/``load_state``.

A front end whose feedback state was just restored from its own per-rank file or DCP entry keeps it when it is then
handed a state_dict saved on another rank (or one without feedback state), as these frameworks do. Without that,
another rank's feedback state raises ``ValueError`` with these instructions: loading it on its own rank only and
restarting the others would leave the ranks with different server estimates and step counters.
:func:`without_feedback` restarts the method at its step 0 on every rank instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .frontend import FOREIGN_RANK_HINT, FeedbackStateful, FrontEnd

__all__ = [
    "FeedbackStateful",
    "save_feedback",
    "load_feedback",
    "load_dcp",
    "side_file",
    "without_feedback",
    "FOREIGN_RANK_HINT",
]

SIDE_FILE_VERSION = 1


def side_file(name: str | os.PathLike, rank: int) -> str:
    """The per-rank side file of checkpoint ``name``: ``<name>.rank<rank>.pt``."""
    return f"{os.fspath(name)}.rank{int(rank)}.pt"


def save_feedback(name: str | os.PathLike, *objects: Any) -> str:
    """Write this rank's feedback state of ``objects`` (front ends: optimizers, LocalSGD, hook states) to
    ``<name>.rank<r>.pt``.

    Call it on every rank, with the same objects in the same order as :func:`load_feedback`. The file is written
    atomically (a temporary file, then a rename). Returns its path.
    """
    owners = _owners(objects, "save_feedback")
    rank, world = _rank_world(owners)
    payload = {
        "format_version": SIDE_FILE_VERSION,
        "rank": rank,
        "world_size": world,
        "kinds": [type(o).__name__ for o in owners],
        "states": [o._with_frozen_names(o.feedback_state_dict()) for o in owners],
    }
    path = side_file(name, rank)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_feedback(name: str | os.PathLike, *objects: Any) -> str:
    """Restore this rank's feedback state of ``objects`` from ``<name>.rank<r>.pt``; returns the path.

    Everything is checked (file, rank, world size, method, parameter layout of every object) before any object
    changes. Afterwards each object keeps this state when a framework hands it a state_dict saved on another rank
    (rank 0's checkpoint) or without feedback state, until its next round.
    """
    owners = _owners(objects, "load_feedback")
    rank, world = _rank_world(owners)
    path = side_file(name, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no feedback state for rank {rank} at {path}: save_feedback({os.fspath(name)!r}, ...) writes one file per "
            "rank; a checkpoint saved with fewer ranks, or copied without its .rank<r>.pt files, cannot restore it"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch says "[Errno 22] Invalid argument" or worse
        raise ValueError(
            f"cannot read the per-rank feedback file {path}: {type(exc).__name__}: {exc} (a truncated copy, a file "
            "still being written, or not written by torchkit.checkpoint.save_feedback); nothing was loaded"
        ) from exc
    if not isinstance(payload, Mapping) or payload.get("format_version") != SIDE_FILE_VERSION:
        raise ValueError(f"{path} is not a torchkit per-rank feedback file")
    if payload.get("world_size") != world or payload.get("rank") != rank:
        raise ValueError(
            f"{path} was saved by rank {payload.get('rank')} of world_size={payload.get('world_size')}, this is rank "
            f"{rank} of world_size={world} (error-feedback state is per rank and cannot be re-sharded)"
        )
    kinds = [type(o).__name__ for o in owners]
    if payload.get("kinds") != kinds:
        raise ValueError(f"{path} holds the feedback state of {payload.get('kinds')}, load_feedback was given {kinds}")
    plans = [o.check_feedback_state_dict(sd) for o, sd in zip(owners, payload["states"])]  # everything checked first
    for plan in plans:
        plan.apply(restored=True)
    return path


def without_feedback(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A :class:`torchkit.CompressedOptimizer` (or :class:`torchkit.LocalSGD`) state_dict without its feedback
    state: loaded on every rank, the optimizer's own state is restored and the feedback method restarts at its
    step 0 on every rank. It says so (``"torchkit": None``), so the load does not warn as it does for a plain
    optimizer state_dict, where the restart may be an accident."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    return {**{k: v for k, v in state_dict.items() if k != "torchkit"}, "torchkit": None}


class _Probe:
    """A ``Stateful`` with a :class:`FeedbackStateful`'s keys (``header``: without its tensors) whose load only
    checks (see :func:`load_dcp`)."""

    def __init__(self, stateful: FeedbackStateful, *, header: bool = False):
        self.stateful, self.header = stateful, header

    def state_dict(self) -> dict[str, Any]:
        if not self.header:
            return self.stateful.state_dict()
        sd = self.stateful.header()
        sd[self.stateful.key]["format_version"] = _UNREAD  # a checkpoint that holds this rank's entry overwrites it
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self.header:
            entry = state_dict.get(self.stateful.key) if isinstance(state_dict, Mapping) else None
            if isinstance(entry, Mapping) and entry.get("format_version") == _UNREAD:
                raise ValueError(
                    f"this checkpoint holds no feedback state for {self.stateful.key}: it was saved by fewer ranks "
                    f"than this run's {self.stateful.owner.process_count}. Error-feedback state is per rank: resume on "
                    "the world size it was saved with, or start the method afresh (leave its entry out of the load)"
                )
            self.stateful.check_header(state_dict)
        else:
            self.stateful.check(state_dict)


_UNREAD = -1  # the header template's format_version: left there when the checkpoint has no entry for this rank


def load_dcp(state_dict: dict[str, Any], *, checkpoint_id=None, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load`` that checks the feedback entries first: call it on every rank where you
    would call ``dcp.load``, with the same arguments.

    ``dcp.load`` writes the model's tensors in place as it reads them and hands a ``Stateful`` its entry only
    afterwards, so a feedback entry rejected there (another method, another world size) would leave the model
    overwritten. This reads every :class:`FeedbackStateful` entry of ``state_dict`` first and checks it (its
    header, then its tensors: the feedback state is read twice), raises before anything is written if one is
    rejected, and then runs ``dcp.load`` on everything.

    It also reads the state of parameters frozen now (``requires_grad`` off) when the checkpoint holds theirs (saved
    while they were frozen, after they had trained): ``dcp.load`` alone reads only the keys of its template, and
    a fresh front end's template has no state for a frozen parameter, so that state would be left behind."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    feedback = {k: v for k, v in state_dict.items() if isinstance(v, FeedbackStateful)}
    try:
        frozen = {entry: stateful.frozen_keys(entry) for entry, stateful in feedback.items()}
        if any(frozen.values()):  # only then the metadata is read
            saved = _saved_keys(checkpoint_id, kwargs.get("storage_reader"))
            for entry, stateful in feedback.items():
                stateful.frozen_in_checkpoint = tuple(
                    name for name, keys in frozen[entry].items() if all(k in saved for k in keys)
                )
        if feedback:  # the header first: DCP refuses tensors of another size before a check could say why
            headers = {k: _Probe(v, header=True) for k, v in feedback.items()}
            partial = {**kwargs, "planner": DefaultLoadPlanner(allow_partial_load=True)}  # older: no optional keys
            group = kwargs.get("process_group")
            _on_every_rank(lambda: dcp.load(headers, checkpoint_id=checkpoint_id, **partial), group)
            probes = {k: _Probe(v) for k, v in feedback.items()}
            _on_every_rank(lambda: dcp.load(probes, checkpoint_id=checkpoint_id, **kwargs), group)
        dcp.load(state_dict, checkpoint_id=checkpoint_id, **kwargs)
    finally:
        for stateful in feedback.values():
            stateful.frozen_in_checkpoint = ()


def _on_every_rank(check, group) -> None:
    """Run ``check`` (a probe's ``dcp.load``: it raises on the ranks whose entry it rejects) and raise on every rank
    if it raised on any: a rank whose entry passed went on alone into the next load's collectives and waited there
    until the process group's timeout (a checkpoint of 2 ranks loaded on 3: rank 2 has no entry to reject)."""
    import torch.distributed as dist

    from .comm import DistExchanger, on_any_rank

    error = None
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - raised again below, on this rank and (as a flag) on every other
        error = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        if on_any_rank(DistExchanger(group), error is not None) and error is None:
            error = ValueError(
                "another rank rejected its feedback state in this checkpoint (its error says why); nothing was loaded"
            )
    if error is not None:
        raise error


def _saved_keys(checkpoint_id, reader) -> set[str]:
    """The flat keys a DCP checkpoint holds, from its metadata, read through the storage reader ``dcp.load`` would
    use (``reader``, or the one DCP makes for ``checkpoint_id``)."""
    from torch.distributed.checkpoint._storage_utils import _storage_setup

    return set(_storage_setup(reader, checkpoint_id, reader=True).read_metadata().state_dict_metadata)


def _owners(objects, what: str) -> list[FrontEnd]:
    if not objects:
        raise TypeError(
            f"{what} needs at least one torchkit front end (CompressedOptimizer, LocalSGD, CompressionState)"
        )
    out = []
    for i, o in enumerate(objects):
        inner = o
        for attr in ("optimizer", "_optimizer"):  # Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer
            if not isinstance(inner, FrontEnd) and hasattr(inner, attr):
                inner = getattr(inner, attr)
        if not isinstance(inner, FrontEnd):
            raise TypeError(
                f"{what}: argument {i} is a {type(o).__name__}, not a torchkit front end (CompressedOptimizer, "
                "LocalSGD, torchkit.ddp.CompressionState)"
            )
        out.append(inner)
    return out


def _rank_world(owners) -> tuple[int, int]:
    ranks = {(o.process_rank, o.process_count) for o in owners}
    if len(ranks) != 1:
        raise ValueError(f"the objects run on different process groups (rank, world_size): {sorted(ranks)}")
    return next(iter(ranks))
