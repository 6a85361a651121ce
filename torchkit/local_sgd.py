r"""``LocalSGD``: compressed local SGD, error feedback on DiLoCo-style outer steps.

Each rank steps its inner optimizer on its own gradients; every ``sync_every`` steps it forms the pseudo-gradient
:math:`\Delta_i = x_{\text{anchor}} - x_i` (the anchor is the last synchronised point), runs one round of the
feedback method on it (:func:`torchkit.comm.start_round`, the round of every front end, so the trajectory is the
simulator's, :func:`torchkit.sim.simulate_local`), applies the aggregated estimate to the anchor with the outer
optimizer (plain averaging by default, as SparseLoCo; SGD with Nesterov momentum for DiLoCo) and resets its
parameters to the new anchor. Between synchronisations the ranks do not communicate.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ._validation import check_int, check_overlap_mix
from ._wrapped import (
    FlatGrads,
    Work,
    WorkCache,
    WrappedOptimizer,
    called_from_dcp_init,
    check_common_args,
    check_groups,
    check_inner_state,
    check_options,
    check_parameter_order,
    check_sharding,
    grad_like,
    group_options,
    inner_step,
    local_of,
    needs_closure,
    options_payload,
    run_eagerly,
    shard_count,
    unique_params,
    unscaled_and_bad,
)
from .comm import RoundOptions, agree_max, agreement_bytes, check_wire, nonfinite_flag, settle_nonfinite, start_round
from .feedback import Feedback
from .frontend import RESUME_HINTS, agree, make_exchanger
from .metrics import CommMetrics
from .state import RoundState, checkpoint_count

__all__ = ["LocalSGD"]

log = logging.getLogger(__name__)

OuterFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class LocalSGD(WrappedOptimizer):
    r"""Local steps with ``optimizer_class``; every ``sync_every`` steps, one error-feedback round on the
    pseudo-gradient and an outer step on the shared anchor.

    Follows ``ZeroRedundancyOptimizer(params, optimizer_class, **defaults)`` and PyTorch's
    ``PostLocalSGDOptimizer``: the inner optimizer is built from ``params`` and ``defaults`` and shares its
    ``param_groups`` and ``state`` with this wrapper (an LR scheduler on the wrapper drives the inner rate).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        optimizer_class: the inner (local) optimizer, e.g. ``torch.optim.AdamW`` as DiLoCo. Optimizers whose step
            needs a closure (LBFGS) are refused.
        feedback: the error-feedback method applied to the pseudo-gradient (:class:`torchkit.EF21` ...;
            ``tk.EF14(tk.Identity())`` is uncompressed local SGD).
        sync_every: H, the number of :meth:`step` calls between synchronisations (every call counts, also one
            skipped for a non-finite gradient, so the ranks stay in step). ``1`` synchronises every step.
        outer_optimizer: builds the outer optimizer from a list of parameter groups (one per inner group, holding
            the anchors), e.g. ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)``
            (DiLoCo). ``None``: plain averaging, ``torch.optim.SGD(lr=1.0)`` (the anchor moves by the estimate).
            It is :attr:`outer`; schedule its rate with an LR scheduler on :attr:`outer`, stepped when
            :attr:`synced` is true.
        process_group: group to exchange over. ``None`` uses the default group when it is initialised with more
            than one rank, else runs as a single worker.
        nonfinite: a non-finite gradient is never stepped on. ``"raise"`` (default): :class:`~torchkit.comm.
            NonFiniteGradientError` (a ``ValueError``), alone at once; on several ranks every rank raises at the
            next synchronisation (ranks only talk then), back at the anchor. ``"skip"``, or under GradScaler: the
            step is left out on that rank (:attr:`skipped_steps`). A non-finite pseudo-gradient on any rank makes
            every rank skip the round or raise, the anchor and the feedback state unchanged, back at the anchor.
            With ``overlap`` the ranks learn it from the round itself (each message carries its non-finite check),
            so they raise or skip at the synchronisation that finishes that round, one period later, and the round
            is undone there (the feedback state is put back from a copy taken when it started).
        wire_dtype: dtype of the values sent (``None``: the anchor's, fp32 for bf16/fp16 parameters; ``torch.int8``
            or ``torch.int2`` with a chunked TopK: see :class:`~torchkit.CompressedOptimizer`); what the rounding
            removes stays in the feedback state.
        overlap: run each round while the next period's inner steps run (one-period-delayed outer steps, as
            overlapping DiLoCo): a synchronisation starts the round on this period's pseudo-gradient and goes on
            at once, and the next one finishes it, steps the anchor on it and puts this rank at the new anchor
            plus its own progress of the period just ended (``x = anchor - delta``, then ``overlap_mix``). The
            last round is still in flight after the last step: call :meth:`flush` to finish it and put every rank
            at the final anchor.
            A checkpoint taken with a round in flight finishes it first (no effect on the trajectory). No
            collective blocks a synchronisation but the previous round's own (the ranks may drift up to a period
            apart); the cost is one more copy of the feedback state (see ``nonfinite``) and, with ``overlap_mix``,
            one more pseudo-gradient buffer.
        overlap_mix: with ``overlap`` and EF14 (whose error accumulator holds back what the round does not send),
            the period after a synchronisation starts at ``anchor - delta + overlap_mix * (e_new - e_old)``: this
            share of what the round held back leaves the rank's start, which moves from its own whole progress
            (``0``: the plain one-period-delayed start) towards its own message (``1``: eager updates, arXiv
            2502.12996), what the anchor will take from it. ``None`` (default) is ``0.5``, mixing the two as
            Streaming DiLoCo (arXiv 2501.18512) mixes local and global parameters: on the character model (TopK
            1.56%, 2-bit values, H = 8, 4 workers, 3 seeds) its final training loss is 0.2% above the blocking
            round's (test loss 0.7%); 0, 0.25, 0.75 and 1 end 4.8%, 2.1%, -0.1% and 1.4% from it
            (``benchmarks/results/local_wire/``). Other methods (EF21, EControl, LocalMomentum) and blocking
            rounds have nothing to mix: a value given for them is refused.
        **defaults: passed to ``optimizer_class``.

    Do not wrap the model in ``DistributedDataParallel`` (it would all-reduce every step's gradients); build the
    same model on every rank and let this class communicate.

    The anchor is kept in fp32 for bf16/fp16 parameters (fp64 for fp64) and is taken at the first :meth:`step`,
    from rank 0 on every rank (as DDP broadcasts at construction), so a model loaded after building the wrapper
    is the starting point. The ranks' configurations are compared then; a difference raises ``ValueError`` on
    every rank. :meth:`state_dict` follows ``torch.optim``'s layout with this rank's state (feedback state,
    anchors, outer and inner optimizer, position in the period and, mid-period, its parameters) under
    ``"torchkit"``; it resumes bit-exactly, also in the middle of a period and from a framework's rank-0
    checkpoint with per-rank side files or DCP (:mod:`torchkit.checkpoint`).

    Example::

        >>> opt = tk.LocalSGD(model.parameters(), torch.optim.AdamW, lr=1e-3, sync_every=8,
        ...                   feedback=tk.EF21(tk.TopK(ratio=0.01)))
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf; we unscale ourselves

    def __init__(
        self,
        params,
        optimizer_class: type[torch.optim.Optimizer],
        *,
        feedback: Feedback,
        sync_every: int,
        outer_optimizer: OuterFactory | None = None,
        process_group: dist.ProcessGroup | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        wire_dtype: torch.dtype | None = None,
        overlap: bool = False,
        overlap_mix: float | None = None,
        **defaults: Any,
    ):
        check_common_args("LocalSGD", feedback, optimizer_class, nonfinite)
        check_int("sync_every", sync_every)
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {type(overlap).__name__} {overlap!r}")
        overlap_mix = check_overlap_mix(overlap_mix, overlap, feedback)
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise TypeError(
                "outer_optimizer must build an optimizer from parameter groups (a torch.optim class, or e.g. "
                f"functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)), got {outer_optimizer!r}"
            )
        # checks wire_dtype; finiteness is agreed on before a blocking round, and carried by an overlapped one
        self._options = RoundOptions(wire_dtype=wire_dtype, nonfinite="flag" if overlap else None)
        check_wire(feedback, wire_dtype)
        self._wrap(optimizer_class, params, defaults)
        shard_count([p for g in self.param_groups for p in g["params"]])  # sharded and plain mixed: refused
        self.feedback = feedback
        self.sync_every = sync_every
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.wire_dtype = wire_dtype
        self.round = RoundState(feedback)
        self._exchanger = make_exchanger(process_group)
        self.overlap = overlap
        self.overlap_mix = overlap_mix  # 0.0 where it has no effect
        self._anchor = _Anchor(self.param_groups, outer_optimizer, overlap)
        self._in_flight: list | None = None  # overlap: the round the last synchronisation started, per work item
        self._sent = FlatGrads()  # overlap: the pseudo-gradient in flight, in its own buffers
        self.local_step = 0  # step() calls since the last synchronisation
        self.synced = False  # whether the last step() ended with a synchronisation
        self.skipped_steps = self.skipped_rounds = 0
        self.metrics = CommMetrics()
        self.bytes_sent = 0  # payload this rank put on the wire, over all rounds
        self.dense_bytes = 0  # what dense rounds would have sent
        self._bad_pending = False  # a local step was left out under nonfinite="raise" on several ranks
        self._round_failed = False  # overlap: the round finished last was not finite (undone; skipped at the sync)
        self._trained: set[int] = set()  # ids of the parameters that trained in this period (see _hold_frozen)
        self._layout = WorkCache()  # the work items, built once per parameter layout (see _works)
        self._undo = _Undo()  # overlap: the feedback state before the round in flight
        self._agreed = False

    @property
    def outer(self) -> torch.optim.Optimizer:
        """The outer optimizer (its parameters are the anchors)."""
        return self._anchor.outer

    @property
    def anchors(self) -> list[Tensor]:
        """The anchors (the last synchronised parameters), in the order of the inner optimizer's parameters."""
        return self._anchor.all()

    @property
    def rounds(self) -> int:
        """Synchronisations run so far (skipped ones not counted)."""
        return self.round.step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self.__dict__.get("_ready"):
            return super().add_param_group(param_group)
        self.inner.add_param_group(unique_params(param_group, len(self.param_groups)))
        self._anchor.add_group(self.param_groups[-1]["params"])
        self._agreed = False

    def _start(self) -> None:
        """At the first step (and after a load): compare the ranks, take the anchor (from rank 0)."""
        if self.world_size > 1 and not self._agreed:
            check_sharding([p for g in self.param_groups for p in g["params"]], self.process_group)
            agree(_configuration(self), group=self.process_group, world_size=self.world_size, rank=self.rank,
                  what="model and LocalSGD", hints=RESUME_HINTS, everyone=self._everyone())  # fmt: skip
            if not self._anchor.taken:  # before the anchor is taken from rank 0's parameters, position by position
                check_parameter_order(_named(self.param_groups)[1], self.process_group, self.world_size)
            self._agreed = True
        if not self._anchor.taken:
            self._anchor.take(self.param_groups, self.process_group if self.world_size > 1 else False)

    # ------------------------------------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None):
        """One local step; every ``sync_every``-th call also synchronises (:attr:`synced` says so). Under
        ``torch.compile`` it runs eagerly, as :meth:`torchkit.CompressedOptimizer.step` does."""
        return run_eagerly(self._step, closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None):
        if closure is None and called_from_dcp_init():
            return self._init_inner_state_for_dcp()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_feedback()
        works = self._works()
        grads = [g for w in works for g in w.grads()]  # checked first: nothing changed before that
        self._trained.update(id(p) for w in works for p in w.params)
        self._check_restored_params()
        self.round.restored_at = None  # a step runs: a restored state is no longer kept against a later load
        found_inf = getattr(self, "found_inf", None)
        self._start()
        self.synced = False
        self.metrics.steps += 1
        if unscaled_and_bad(grads, getattr(self, "grad_scale", None), found_inf):
            if found_inf is None and self.nonfinite == "raise" and self.world_size > 1:
                self._bad_pending = True  # ranks talk only at the synchronisation: every rank raises there
            else:
                unchanged = "the step was not taken"
                settle_nonfinite(self.nonfinite, scaled=found_inf is not None, what="gradient", unchanged=unchanged)
                self.skipped_steps += 1
                self.metrics.skipped_steps += 1
        else:
            inner_step(self.inner)
        self.local_step += 1
        if self.local_step >= self.sync_every:
            self._sync()
        return loss

    def _check_restored_params(self) -> None:
        """The first step after a resume in the middle of a period: this rank's restored parameters must still be
        in place. A model loaded after the optimizer (rank 0's parameters from a rank-0 checkpoint) overwrote them,
        and the period went on from rank 0's parameters on every rank, silently: they are put back, with a warning
        (the gradients of this step were taken at the overwritten parameters, so the resume is not exact)."""
        restored, self._anchor.local_params = self._anchor.local_params, None
        if restored is None:
            return
        params = [local_of(p.detach()) for p in _named(self.param_groups)[1]]
        if all(torch.equal(p, t.to(p.device)) for p, t in zip(params, restored)):  # restored: mapped to the CPU
            return
        self._anchor.put_back(self.param_groups, restored)
        warnings.warn(
            "LocalSGD was restored in the middle of a period, and its parameters were overwritten before this step "
            "(a model loaded after the optimizer?): this rank's own parameters of the period are put back, but "
            "this step's gradients were taken at the overwritten ones, so the resume is not exact. Load the model "
            "first, then the optimizer (or its feedback side files)",
            stacklevel=5,  # step <- run_eagerly <- _step <- here: the caller's opt.step()
        )

    def _sync(self) -> None:
        works = self._works()
        if self.overlap:
            return self._sync_overlapped(works)
        bad = [nonfinite_flag(self._anchor.pseudo_gradient(w, self._flat)).double().cpu() for w in works]
        bad = torch.stack([*bad, torch.tensor(float(self._bad_pending), dtype=torch.float64)]).amax().reshape(1)
        # with the inner and outer groups' hyper-parameters: a scheduler stepped on one rank only drifts apart
        inner, outer = options_payload(self.param_groups), options_payload(self.outer.param_groups)
        sent = torch.cat([bad, torch.tensor(inner + outer, dtype=torch.float64)])
        flag_bytes = agreement_bytes(self._agreement, sent)  # the agreement's, on the wire
        self.metrics.bytes_sent += flag_bytes
        self.bytes_sent += flag_bytes  # the older counter agrees
        flags = agree_max(self._agreement, sent).tolist()
        unchanged = "the round was not run (the next step synchronises)"
        check_options(flags[1 : 1 + len(inner)], self.param_groups, self.round.step, unchanged=unchanged)
        check_options(flags[1 + len(inner) :], self.outer.param_groups, self.round.step, "outer parameter group",
                      unchanged)  # fmt: skip
        if flags[0] > 0:
            return self._skip_round(works)
        self._apply([(w, self._flat.get(w)[1], self._start_round(w, w.flat)) for w in works])
        self.metrics.last_bytes_sent += flag_bytes
        self._back_to_anchor(works)
        self.round.step += 1
        self.synced = True

    def _sync_overlapped(self, works: list[Work]) -> None:
        """Finish the round of the period before (the anchor takes it), start this period's, and go on at once.
        No collective waits here but the round's own: a non-finite pseudo-gradient travels inside the round (its
        check, as the DDP hook's), and the synchronisation that finishes a non-finite round undoes it."""
        self.finish_round()
        if self._round_failed:
            return self._skip_round(works)
        sent = []
        for w in works:  # this period's pseudo-gradient, in buffers of its own (kept while its round is in flight)
            sent.append((w, self._anchor.pseudo_gradient(w, self._sent), self._sent.get(w)[1]))
        self._anchor.restart(works, [views for _, _, views in sent])  # anchor - this period's progress
        bad, self._bad_pending = self._bad_pending, False
        if bad:  # a step left out on this rank: its round carries a non-finite check to every rank
            for _, buf, _ in sent:
                buf.fill_(float("nan"))
        self._undo.save([self._block(w) for w in works])
        self._in_flight = [(w, views, self._start_round(w, buf)) for w, buf, views in sent]
        self._hold_frozen()
        if self.overlap_mix and not bad:  # overlap_mix (EF14)
            held = []  # mix * what the round held back (the error's change), into this rank's start
            for w in works:
                err = self._block(w).state["error"]
                into, views = self._flat.get(w)
                torch.sub(err, self._undo.copy_of(err), out=into).mul_(self.overlap_mix)
                held.append(views)
            self._anchor.shift(works, held)
        self.local_step = 0
        self.round.step += 1
        self.synced = True

    def _skip_round(self, works: list[Work]) -> None:
        """Some rank's gradient or pseudo-gradient was not finite: every rank back at the anchor, then raise or
        skip as ``nonfinite`` says (every rank alike)."""
        self._bad_pending = self._round_failed = False
        self._back_to_anchor(works)
        self.skipped_rounds += 1
        self.metrics.skipped_rounds += 1
        unchanged = (
            "the round was not run, the anchor and the feedback state are unchanged, every rank is at the anchor"
        )
        settle_nonfinite(self.nonfinite, scaled=False, what="gradient or pseudo-gradient", unchanged=unchanged,
                         unit="rounds")  # fmt: skip

    def _start_round(self, w: Work, buf: Tensor):
        return start_round(self.feedback, self._exchanger, self._block(w), buf, self.round.step, self._options)

    def _apply(self, rounds: list) -> None:
        """Wait for each work item's round (its estimate lands in its buffer) and step the anchor on them; with
        ``overlap``, a round whose checks are not finite is undone instead (:meth:`finish_round`)."""
        results = [fut.wait() for _, _, fut in rounds]
        self.metrics.record_round(results)  # sent either way: its bytes count
        self.bytes_sent += sum(res.sent_bytes for res in results)
        self.dense_bytes += sum(res.dense_bytes for res in results)
        if self.overlap and any(bool(res.nonfinite) for res in results if res.checks is not None):
            self._undo.restore()  # the feedback state as the round found it
            self.round.step -= 1
            self._round_failed = True
            return
        self._anchor.step_on([(w, views) for w, views, _ in rounds])

    def finish_round(self) -> None:
        """``overlap``: finish the round in flight, if any, and step the anchor on it (this rank's parameters stay
        where they are). A failed collective (a peer died) raises here, on every rank. A round that some rank's
        non-finite input poisoned (its checks say so, on every rank alike) is undone: the feedback state and the
        round count are put back and the anchor is not stepped; the next synchronisation (or :meth:`flush`) then
        puts every rank at the anchor and raises or skips as ``nonfinite`` says."""
        rounds, self._in_flight = self._in_flight, None
        if rounds:
            self._apply(rounds)

    @torch.no_grad()
    def flush(self) -> None:
        """``overlap``: finish the round in flight and put this rank at the new anchor, its progress since the last
        synchronisation dropped (call it after the last step, on every rank). Without ``overlap``: nothing to do
        at a synchronisation, and mid-period it goes back to the anchor."""
        self.finish_round()
        if self._round_failed:
            return self._skip_round(self._works())
        self._back_to_anchor(self._works())

    def _back_to_anchor(self, works: list[Work]) -> None:
        self._anchor.reset(works)
        self._hold_frozen()
        self.local_step = 0

    def _hold_frozen(self) -> None:
        """Every parameter frozen in this period, after it trained in it, back at its anchor, the value the ranks
        last agreed on: it kept what its local steps did on each rank, and no round would ever bring the replicas
        together again (each rank's backbone stayed its own). A parameter frozen all along (a statistic the model
        updates itself) is left as it is."""
        self._anchor.hold(self.param_groups, self._trained)
        self._trained = set()

    def _works(self) -> list[Work]:
        """One work item per (parameter group, dtype, device) of the parameters that train; the flat buffer is
        shaped as the anchors (fp32 for bf16/fp16 parameters). Built once per parameter layout (a local step built
        them, checking each parameter, every time: 19 us a tensor), which is when the anchors are checked too."""
        return self._layout.works(self.param_groups, like_of=self._anchor.of, accept=self._check_anchors)

    def _check_anchors(self) -> None:
        """A parameter converted to another dtype since its anchor was taken (``model.double()`` after LocalSGD
        was built) is refused: every synchronisation would write the anchor's old precision into it (an fp32
        anchor rounded an fp64 model at every sync, silently)."""
        for g, pg in enumerate(self.param_groups):
            for i, (p, a) in enumerate(zip(pg["params"], self._anchor.of(g))):
                if a.dtype != _anchor_dtype(p.dtype):
                    raise ValueError(
                        f"parameter {g}.{i} is {p.dtype} but its LocalSGD anchor is {a.dtype}: the model was converted "
                        "after LocalSGD was built. Convert the model first, then build LocalSGD (or load a "
                        "checkpoint into a new one)"
                    )

    # ------------------------------------------------------------------------------------------ checkpoint
    # the envelope, its checks and the load are the front-end contract's (torchkit.frontend, torchkit._wrapped);
    # this front end adds its anchor, inner state and place in the period under "local_sgd"
    kind = "LocalSGD"
    inner_state_per_rank = True  # a framework's rank-0 checkpoint holds rank 0's inner state: keep this rank's
    plain_load_restarts = "the anchor is taken again at the next step and the feedback method starts at its step 0"

    def feedback_state_dict(self, *, frozen=()) -> dict[str, Any]:
        self.finish_round()  # a round in flight is finished first: its state and the anchor's are then final
        return super().feedback_state_dict(frozen=frozen)

    def _extras(self) -> dict[str, Any]:
        self.finish_round()
        local = {
            "sync_every": self.sync_every,
            "local_step": self.local_step,
            "bad_pending": self._bad_pending,
            "round_failed": self._round_failed,
            "skipped_rounds": self.skipped_rounds,
            "bytes_sent": self.bytes_sent,
            "dense_bytes": self.dense_bytes,
            "inner": self.inner.state_dict(),  # per rank too: each rank's inner steps are its own (no copy is saved)
            "overlap": self.overlap,
            "overlap_mix": self.overlap_mix,
            **self._anchor.state_dict(self.param_groups, mid_period=self.local_step > 0 or self.overlap),
        }
        return {"skipped_steps": self.skipped_steps, "local_sgd": local, **self._mesh_extra()}

    def _extra_problems(self, sd) -> list[str]:
        local = sd.get("local_sgd")
        if not isinstance(local, Mapping):
            raise ValueError("not a LocalSGD state_dict (no 'local_sgd' entry; a CompressedOptimizer's?)")
        problems = self._mesh_problems(sd)
        if local.get("sync_every") != self.sync_every:
            problems.append(f"saved with sync_every={local.get('sync_every')!r}, this run has {self.sync_every}")
        if bool(local.get("overlap", False)) != self.overlap:
            problems.append(f"saved with overlap={bool(local.get('overlap', False))}, this run has {self.overlap}")
        mix = local.get("overlap_mix", 0.0)  # absent in checkpoints written before it existed: the plain start
        if mix != self.overlap_mix:
            problems.append(f"saved with overlap_mix={mix!r}, this run has {self.overlap_mix}")
        return problems

    def _check_extras(self, sd) -> dict[str, Any]:
        self.finish_round()  # a round in flight is this run's, whatever the load: finished on every rank alike
        local = sd["local_sgd"]
        step = local.get("local_step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.sync_every:
            raise ValueError(f"local_step must be an int in [0, sync_every={self.sync_every}), got {step!r}")
        if local.get("inner") is not None:  # absent in checkpoints written before it was kept
            check_groups("inner", self.inner, local["inner"])
            check_inner_state(self.inner, local["inner"])
        anchor = self._anchor.check(local, self.param_groups)
        counts = {n: checkpoint_count(n, local.get(n)) for n in ("skipped_rounds", "bytes_sent", "dense_bytes")}
        return {
            **local,
            **counts,
            "anchor": anchor,
            "skipped_steps": checkpoint_count("skipped_steps", sd.get("skipped_steps")),
        }

    def _apply_extras(self, local: dict[str, Any]) -> None:
        self._anchor.apply(local["anchor"], self.param_groups)  # may refuse (the outer optimizer) before any change
        if local.get("inner") is not None:  # checked as torch's load checks it
            self.inner.load_state_dict(local["inner"])
        self.local_step = local["local_step"]
        # restored in the middle of a period: the parameters that moved from their anchors trained in it
        restored = self._anchor.local_params or ()
        self._trained = {id(p) for p, a, t in zip(_named(self.param_groups)[1], self._anchor.all(), restored)
                         if not torch.equal(t, local_of(a).to(t.device))}  # fmt: skip
        self._bad_pending = bool(local.get("bad_pending", False))
        self._round_failed = bool(local.get("round_failed", False))
        self.skipped_steps, self.skipped_rounds = local["skipped_steps"], local["skipped_rounds"]
        self.bytes_sent, self.dense_bytes = local["bytes_sent"], local["dense_bytes"]

    def _restart(self) -> None:
        rounds, self._in_flight = self._in_flight, None
        for _, _, fut in rounds or ():  # overlap: the old run's round is waited for (the collective completes,
            fut.wait()  # its work freed here) and dropped: the method restarts at step 0
        super()._restart()
        self.local_step, self._anchor.taken, self._anchor.local_params = 0, False, None
        self._round_failed = False

    def __getstate__(self) -> dict[str, Any]:
        self.finish_round()  # a round in flight holds the backend's work: finished, then pickled as state
        out = super().__getstate__()
        out["_sent"], out["_in_flight"], out["_undo"] = FlatGrads(), None, _Undo()
        out["_trained"] = set()  # ids of this process's parameters: none of the copy's
        out["_layout"] = WorkCache()  # built again from the copy's parameters
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_trained", set())  # pickles from before these existed
        self.__dict__.setdefault("_layout", WorkCache())

    def _kept_restored_state(self) -> None:
        self._anchor.put_back(self.param_groups)  # the framework loaded rank 0's model since: this rank's again


class _Undo:
    """``overlap``: a copy of the feedback state as a round found it, taken before the round starts, to put back
    if the round turns out non-finite (one more copy of the state, reused)."""

    def __init__(self):
        self._kept: list[tuple[Tensor, Tensor]] = []  # (the state vector, its copy)

    def save(self, blocks: list) -> None:
        vecs = [t for blk in blocks for t in (*blk.state.values(), blk.server) if t is not None]
        if len(vecs) != len(self._kept) or any(v is not kept for v, (kept, _) in zip(vecs, self._kept)):
            self._kept = [(v, torch.empty_like(v)) for v in vecs]  # a new layout (the first round, a load)
        for v, copy in self._kept:
            copy.copy_(v)

    def restore(self) -> None:
        for v, c in self._kept:
            v.copy_(c)

    def copy_of(self, v: Tensor) -> Tensor:
        got = next((c for kept, c in self._kept if kept is v), None)
        if got is None:
            raise RuntimeError("LocalSGD: no copy of this feedback state was taken before the round")
        return got


class _Anchor:
    """The point every rank returns to at a synchronisation (fp32 for bf16/fp16 parameters), the outer optimizer
    that steps it on the round's estimate and, restored in the middle of a period, this rank's own parameters."""

    def __init__(self, param_groups, factory: OuterFactory | None, overlap: bool = False):
        groups = [{"params": [_new_anchor(p) for p in g["params"]]} for g in param_groups]
        #: overlap: where this rank's period started (the pseudo-gradient is ``start - x``), keyed by the anchor
        #: tensor itself (hashed by identity, which pickling and deepcopy keep)
        self.starts: dict[Tensor, Tensor] | None = None
        if overlap:
            self.starts = {a: a.clone() for g in groups for a in g["params"]}
        outer = torch.optim.SGD(groups, lr=1.0) if factory is None else factory(groups)
        if not isinstance(outer, torch.optim.Optimizer):
            raise TypeError(f"outer_optimizer must return a torch.optim.Optimizer, got {type(outer).__name__}")
        same = len(outer.param_groups) == len(groups) and all(
            len(og["params"]) == len(g["params"]) and all(a is b for a, b in zip(og["params"], g["params"]))
            for og, g in zip(outer.param_groups, groups)
        )
        if not same:
            raise ValueError("outer_optimizer must keep the parameter groups it is given (one per inner group)")
        if needs_closure(type(outer)):
            raise TypeError(f"outer_optimizer {type(outer).__name__} needs a closure; use a first-order optimizer")
        self.outer = outer
        self.taken = False  # taken at the first step, from rank 0
        self.local_params: list[Tensor] | None = None  # this rank's restored parameters, mid-period

    def of(self, gi: int) -> list[Tensor]:
        return self.outer.param_groups[gi]["params"]

    def all(self) -> list[Tensor]:
        return [a for g in self.outer.param_groups for a in g["params"]]

    def add_group(self, params) -> None:
        self.outer.add_param_group({"params": [_new_anchor(p) for p in params]})
        if self.starts is not None:
            self.starts.update({a: a.clone() for a in self.outer.param_groups[-1]["params"]})

    def start_of(self, a: Tensor) -> Tensor:
        """Where this rank's period started: the anchor, or with overlap the anchor minus its last progress."""
        return a if self.starts is None else self.starts[a]

    def take(self, param_groups, group) -> None:
        """Rank 0's parameters on every rank (``group``: the process group, ``False`` alone), and the anchor at them
        (a sharded parameter: its local shard, from the rank 0 of the replicas holding the same shard)."""
        for g, pg in enumerate(param_groups):
            for p, a in zip(pg["params"], self.of(g)):
                if group is not False:
                    src = dist.get_global_rank(group, 0) if group is not None else 0
                    dist.broadcast(local_of(p.detach()), src=src, group=group)
                local_of(a).copy_(local_of(p.detach()))
                if self.starts is not None:
                    self.starts[a].copy_(a)
        self.taken = True

    def pseudo_gradient(self, w: Work, flat: FlatGrads) -> Tensor:
        """``start - x`` of the work item's parameters (the start is the anchor without overlap), in its persistent
        flat buffer (also ``w.flat``)."""
        buf, views = flat.get(w)
        for p, a, view in zip(w.params, w.like, views):
            p, a = local_of(p.detach()), local_of(self.start_of(a))
            view.copy_(a)
            view.sub_(p if p.dtype == a.dtype else p.to(a.dtype))
        w.flat = buf
        return buf

    def step_on(self, estimates: list[tuple[Work, list[Tensor]]]) -> None:
        """The outer step on the round's estimate (each anchor's view of it)."""
        for w, views in estimates:
            for a, view in zip(w.like, views):
                a.grad = grad_like(a, view)
        inner_step(self.outer)
        for w, _ in estimates:
            for a in w.like:
                a.grad = None

    def reset(self, works: list[Work]) -> None:
        for w in works:
            for p, a in zip(w.params, w.like):
                self._put(p, a)

    def hold(self, param_groups, trained: set[int]) -> None:
        """The parameters frozen now (``requires_grad`` off) whose ids are in ``trained`` put at their anchors (and
        period starts)."""
        for g, pg in enumerate(param_groups):
            for p, a in zip(pg["params"], self.of(g)):
                if not p.requires_grad and id(p) in trained:
                    self._put(p, a)

    def _put(self, p: Tensor, a: Tensor) -> None:
        """Parameter ``p`` at its anchor ``a``, and its period start there."""
        local_of(p.detach()).copy_(local_of(a))
        if self.starts is not None:
            self.starts[a].copy_(a)

    def restart(self, works: list[Work], deltas: list[list[Tensor]]) -> None:
        """overlap: this rank at ``anchor - delta`` (the anchor with its own last progress), the period's start."""
        self._move_starts(works, deltas, lambda start, a, view: start.copy_(a).sub_(view))

    def shift(self, works: list[Work], deltas: list[list[Tensor]]) -> None:
        """overlap: this rank's period start moved by ``delta`` (in the anchor's dtype) and the rank put there."""
        self._move_starts(works, deltas, lambda start, a, view: start.add_(view))

    def _move_starts(self, works: list[Work], deltas: list[list[Tensor]], move) -> None:
        """Each period start set by ``move(start, anchor, delta)`` (local shards, in the anchor's dtype), then the
        parameter put there and the start made what the parameter holds (bf16: rounded)."""
        for w, views in zip(works, deltas):
            for p, a, view in zip(w.params, w.like, views):
                start = local_of(self.starts[a])
                move(start, local_of(a), view.reshape(start.shape))
                local_of(p.detach()).copy_(start)
                start.copy_(local_of(p.detach()))

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self, param_groups, *, mid_period: bool) -> dict[str, Any]:
        names, params = _named(param_groups)
        return {
            "anchored": self.taken,
            "anchors": {n: local_of(a).detach().clone() for n, a in zip(names, self.all())},
            "outer": self.outer.state_dict(),
            # between synchronisations each rank's parameters are its own, and a framework's (or DCP's) model
            # checkpoint holds one rank's: keep this rank's
            "params": {n: local_of(p.detach()).clone() for n, p in zip(names, params)} if mid_period else None,
            "starts": None if self.starts is None else {
                n: local_of(self.starts[a]).detach().clone() for n, a in zip(names, self.all())},
        }  # fmt: skip

    def check(self, saved: Mapping[str, Any], param_groups) -> dict[str, Any]:
        check_groups("outer", self.outer, saved.get("outer"))
        names, params = _named(param_groups)
        if not isinstance(saved.get("anchors"), Mapping):
            raise ValueError("LocalSGD state_dict has no 'anchors' mapping")
        anchors = _checked_tensors("anchor", saved["anchors"], names, [local_of(a) for a in self.all()])
        local = saved.get("params")
        local = None if local is None else _checked_tensors("parameter", local, names, [local_of(p) for p in params])
        starts = saved.get("starts")
        if (starts is None) != (self.starts is None):
            raise ValueError("LocalSGD state_dict: period starts saved with overlap, or missing with it")
        if starts is not None:
            starts = _checked_tensors("period start", starts, names, [local_of(a) for a in self.all()])
        return {"outer": saved["outer"], "anchors": anchors, "params": local, "anchored": saved.get("anchored", True),
                "starts": starts}  # fmt: skip

    def apply(self, checked: dict[str, Any], param_groups) -> None:
        try:
            self.outer.load_state_dict(checked["outer"])
        except Exception as exc:
            raise ValueError(f"cannot load LocalSGD state: the outer optimizer refused its state ({exc!r})") from exc
        for a, t in zip(self.all(), checked["anchors"]):  # nothing below can fail
            local_of(a).copy_(t)
        for a, t in zip(self.all(), checked.get("starts") or ()):
            local_of(self.starts[a]).copy_(t)
        self.taken = bool(checked["anchored"])
        self.local_params = checked["params"]
        self.put_back(param_groups)

    def put_back(self, param_groups, params: list[Tensor] | None = None) -> None:
        """This rank's restored parameters of the middle of a period (``params``, default the ones kept until the
        next step), back in place."""
        params = self.local_params if params is None else params
        if params is not None:
            with torch.no_grad():
                for p, t in zip(_named(param_groups)[1], params):
                    local_of(p.detach()).copy_(t)


def _configuration(opt: LocalSGD) -> dict[str, Any]:
    """What every rank of a LocalSGD run must have alike (compared at the first step and after a load)."""
    return {
        "method": opt.feedback.config(),
        "optimizer": type(opt.inner).__name__,
        "outer": type(opt.outer).__name__,
        "sync_every": opt.sync_every,
        "overlap": opt.overlap,
        "overlap_mix": opt.overlap_mix,
        "nonfinite": opt.nonfinite,
        "wire_dtype": str(opt.wire_dtype),
        "layout": [[str(p.dtype), list(p.shape), p.requires_grad] for g in opt.param_groups for p in g["params"]],
        "options": group_options(opt.param_groups),
        "outer options": group_options(opt.outer.param_groups),
        "feedback": {**opt.round.shared(), "local step": opt.local_step},
    }


def _named(param_groups) -> tuple[list[str], list[Tensor]]:
    names = [f"{gi}.{pi}" for gi, g in enumerate(param_groups) for pi in range(len(g["params"]))]
    return names, [p for g in param_groups for p in g["params"]]


def _checked_tensors(what: str, saved: Mapping, names: list[str], mine: list[Tensor]) -> list[Tensor]:
    """``saved`` (name -> tensor) in the order of ``names``, each of ``mine``'s shape and dtype, and finite."""
    if sorted(saved, key=str) != sorted(names):
        missing = [n for n in names if n not in saved]
        unexpected = [n for n in saved if n not in names]
        raise ValueError(f"checkpoint {what}s do not match the parameters: missing {missing}, unexpected {unexpected}")
    out = []
    for n, a in zip(names, mine):
        t = saved[n]
        if not isinstance(t, Tensor) or t.shape != a.shape or t.dtype != a.dtype:
            desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"checkpoint {what} {n!r} is {desc}, the parameter's {what} {tuple(a.shape)} {a.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"checkpoint {what} {n!r} holds non-finite values")
        out.append(t)
    return out


def _anchor_dtype(dtype: torch.dtype) -> torch.dtype:
    """An anchor's dtype: fp32 for bf16/fp16 parameters (complex64 for complex32), else the parameter's."""
    return {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.complex32: torch.complex64}.get(
        dtype, dtype
    )


def _new_anchor(p: Tensor) -> Tensor:
    return p.detach().to(dtype=_anchor_dtype(p.dtype), copy=True)
