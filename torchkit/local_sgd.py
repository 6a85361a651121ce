r"""``LocalSGD``: compressed local SGD, error feedback on DiLoCo-style outer steps.

Each rank steps its inner optimizer on its own gradients; every ``sync_every`` steps it forms the pseudo-gradient
:math:`\Delta_i = x_{\text{anchor}} - x_i` (the anchor is the last synchronised point), runs one round of the
feedback method on it (:func:`torchkit.comm.start_round`, the round of every front end, so the trajectory is the
simulator's, :func:`torchkit.sim.simulate_local`), applies the aggregated estimate to the anchor with the outer
optimizer (plain averaging by default, as SparseLoCo; SGD with Nesterov momentum for DiLoCo) and resets its
parameters to the new anchor. Between synchronisations the ranks do not communicate.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from ._frontend import (
    RESUME_HINTS,
    WrappedOptimizer,
    agree,
    check_common_args,
    collective_device,
    grad_view,
    group_options,
    make_exchanger,
    needs_closure,
    numel_real,
    real_dtype,
)
from ._validation import check_int
from .comm import DistExchanger, RoundOptions, start_round
from .feedback import Feedback
from .metrics import CommMetrics
from .state import FORMAT_VERSION, RoundState, check_envelope

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
        nonfinite: a non-finite gradient is never stepped on. ``"raise"`` (default): alone, ``ValueError`` at
            once, before anything changes; on several ranks the step is left out and every rank raises
            ``ValueError`` at the next synchronisation (ranks only talk then), after returning to the anchor.
            ``"skip"``: the step is left out on that rank (:attr:`skipped_steps` counts it). Under
            ``torch.amp.GradScaler`` the step is skipped (as GradScaler does; each rank keeps its own loss scale).
            A non-finite pseudo-gradient on any rank makes every rank skip the round (``"skip"``) or raise
            (``"raise"``); either way the anchor and the feedback state are unchanged and every rank returns to
            the anchor.
        wire_dtype: dtype of the values sent (``None``: the anchor's, fp32 for bf16/fp16 parameters); what the
            rounding removes stays in the feedback state.
        **defaults: passed to ``optimizer_class``.

    Do not wrap the model in ``DistributedDataParallel`` (it would all-reduce every step's gradients); build the
    same model on every rank and let this class communicate.

    The anchor is kept in fp32 for bf16/fp16 parameters (fp64 for fp64) and is taken at the first :meth:`step`,
    from rank 0 on every rank (as DDP broadcasts at construction), so a model loaded after building the wrapper
    is the starting point. The ranks' configurations are compared then; a difference raises ``ValueError`` on
    every rank. :meth:`state_dict` follows ``torch.optim``'s layout with this rank's state (feedback state,
    anchors, outer optimizer, position in the period) under ``"torchkit"``; with the model's state_dict it
    resumes bit-exactly, also in the middle of a period.

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
        **defaults: Any,
    ):
        check_common_args("LocalSGD", feedback, optimizer_class, nonfinite)
        check_int("sync_every", sync_every)
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise TypeError(
                "outer_optimizer must build an optimizer from parameter groups (a torch.optim class, or e.g. "
                f"functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)), got {outer_optimizer!r}"
            )
        self._options = RoundOptions(wire_dtype=wire_dtype)  # checks wire_dtype; finiteness is checked before
        self._wrap(optimizer_class, params, defaults)
        self.feedback = feedback
        self.sync_every = sync_every
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.wire_dtype = wire_dtype
        self.round = RoundState(feedback)
        self._exchanger = make_exchanger(process_group)
        self.outer = self._build_outer(outer_optimizer)
        self.local_step = 0  # step() calls since the last synchronisation
        self.synced = False  # whether the last step() ended with a synchronisation
        self.skipped_steps = 0
        self.skipped_rounds = 0
        self.metrics = CommMetrics()
        self.bytes_sent = 0  # payload this rank put on the wire, over all rounds
        self.dense_bytes = 0  # what dense rounds would have sent
        self._bad_pending = False  # a local step was left out under nonfinite="raise" on several ranks
        self._anchored = False
        self._agreed = False

    # --------------------------------------------------------------------------------------------- anchors
    def _build_outer(self, factory: OuterFactory | None) -> torch.optim.Optimizer:
        groups = [{"params": [_new_anchor(p) for p in g["params"]]} for g in self.param_groups]
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
        return outer

    def _anchors(self, gi: int) -> list[Tensor]:
        return self.outer.param_groups[gi]["params"]

    @property
    def rounds(self) -> int:
        """Synchronisations run so far (skipped ones not counted)."""
        return self.round.step

    @property
    def anchors(self) -> list[Tensor]:
        """The anchors (the last synchronised parameters), in the order of the inner optimizer's parameters."""
        return [a for g in self.outer.param_groups for a in g["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self.__dict__.get("_ready"):
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)
        self.outer.add_param_group({"params": [_new_anchor(p) for p in self.param_groups[-1]["params"]]})
        self._agreed = False

    def _start(self) -> None:
        """At the first step (and after a load): compare the ranks, take the anchor (from rank 0)."""
        if self.world_size > 1 and not self._agreed:
            agree(
                self._config(),
                group=self.process_group,
                world_size=self.world_size,
                rank=self.rank,
                what="model and LocalSGD",
                hints=RESUME_HINTS,
            )
            self._agreed = True
        if not self._anchored:
            for g, group in enumerate(self.param_groups):
                for p, a in zip(group["params"], self._anchors(g)):
                    if self.world_size > 1:
                        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
                        dist.broadcast(p.data, src=src, group=self.process_group)
                    a.copy_(p.detach())
            self._anchored = True

    def _config(self) -> dict[str, Any]:
        return {
            "method": self.feedback.config(),
            "optimizer": type(self.inner).__name__,
            "outer": type(self.outer).__name__,
            "sync_every": self.sync_every,
            "nonfinite": self.nonfinite,
            "wire_dtype": str(self.wire_dtype),
            "layout": [[str(p.dtype), list(p.shape), p.requires_grad] for g in self.param_groups for p in g["params"]],
            "options": group_options(self.param_groups),
            "outer options": group_options(self.outer.param_groups),
            "feedback": {**self.round.shared(), "local step": self.local_step},
        }

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One local step; every ``sync_every``-th call also synchronises (:attr:`synced` says so)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._checked_grads()  # validation first: nothing below changes state before it passed
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._start()
        self.synced = False
        self.metrics.steps += 1
        if self._local_bad(grads, grad_scale, found_inf):
            if found_inf is None and self.nonfinite == "raise":
                if self.world_size == 1:
                    raise ValueError(
                        "non-finite gradient (NaN or Inf); the step was not taken and nothing changed "
                        "(pass nonfinite='skip' to skip such steps instead)"
                    )
                self._bad_pending = True  # every rank raises at the synchronisation
            else:
                self.skipped_steps += 1
                self.metrics.skipped_steps += 1
                log.warning("non-finite gradient: local step skipped on this rank")
        else:
            self.inner.step()
        self.local_step += 1
        if self.local_step >= self.sync_every:
            self._sync()
        return loss

    def _checked_grads(self) -> list[Tensor]:
        grads = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise TypeError(f"sparse gradients are not supported (parameter {gi}.{pi})")
                if g.shape != p.shape:
                    raise ValueError(f"parameter {gi}.{pi} has a gradient of shape {tuple(g.shape)}")
                grads.append(torch.view_as_real(g) if g.is_complex() else g)
        return grads

    def _local_bad(self, grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
        """Unscale the gradients when GradScaler asked us to; whether this rank's gradient is non-finite."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        if grad_scale is not None:  # as GradScaler.unscale_ would
            inv = grad_scale.double().reciprocal().float()
            for device, gs in by_device.items():
                torch._foreach_mul_(gs, inv.to(device))
        if found_inf is not None:
            return bool(found_inf.item() > 0)
        flags = [torch.stack([torch.isfinite(g).all() for g in gs]).all().cpu() for gs in by_device.values()]
        return not all(bool(f) for f in flags)  # one host synchronisation per device

    # ------------------------------------------------------------------------------------------------ sync
    def _sync(self) -> None:
        works = self._collect()
        bad = torch.zeros((), dtype=torch.float32)
        for w in works:
            buf = self._pseudo_gradient(w)
            bad = torch.maximum(bad, (~torch.isfinite(buf).all()).float().cpu())
        if self._bad_pending:
            bad.fill_(1.0)
        if isinstance(self._exchanger, DistExchanger):
            flag = bad.reshape(1).to(collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
            bad = flag.cpu()[0]
        if bool(bad > 0):
            self._bad_pending = False
            self._reset_to_anchor(works)
            if self.nonfinite == "raise":
                raise ValueError(
                    "non-finite gradient or pseudo-gradient (NaN or Inf) on at least one rank: the round was not "
                    "run, the anchor and the feedback state are unchanged and every rank is back at the anchor "
                    "(pass nonfinite='skip' to skip such rounds instead)"
                )
            self.skipped_rounds += 1
            self.metrics.skipped_rounds += 1
            log.warning("non-finite pseudo-gradient: round skipped on every rank, back at the anchor")
            return
        futures = [
            start_round(self.feedback, self._exchanger, self._block(w), w["flat"], self.round.step, self._options)
            for w in works
        ]
        results = [fut.wait() for fut in futures]
        self.metrics.record_round(results)
        for res in results:
            self.bytes_sent += res.sent_bytes
            self.dense_bytes += res.dense_bytes
        for w in works:
            blk = self._block(w)
            for a, view in zip(w["anchors"], blk.grad_views):
                a.grad = view  # the estimate
        self.outer.step()
        for w in works:
            for a in w["anchors"]:
                a.grad = None
        self._reset_to_anchor(works)
        self.round.step += 1
        self.synced = True

    def _reset_to_anchor(self, works) -> None:
        for w in works:
            for p, a in zip(w["params"], w["anchors"]):
                p.copy_(a)
        self.local_step = 0

    def _collect(self) -> list[dict[str, Any]]:
        """One work item per (parameter group, dtype, device) of the parameters that train."""
        works = []
        for gi, group in enumerate(self.param_groups):
            by_kind: dict[tuple, list] = {}
            for pi, (p, a) in enumerate(zip(group["params"], self._anchors(gi))):
                if p.requires_grad:
                    by_kind.setdefault((p.dtype, p.device), []).append((f"{gi}.{pi}", p, a))
            for (dtype, device), named in by_kind.items():
                works.append(
                    {
                        "key": (gi, str(dtype), str(device)),
                        "names": tuple(n for n, _, _ in named),
                        "params": [p for _, p, _ in named],
                        "anchors": [a for _, _, a in named],
                        "sizes": tuple(numel_real(p) for _, p, _ in named),
                        "dtype": real_dtype(named[0][2].dtype),  # the anchor's: fp32 for bf16/fp16 parameters
                        "device": device,
                    }
                )
        return works

    def _block(self, w):
        server = self.feedback.server_state and self.world_size > 1
        blk = self.round.block(
            w["key"],
            w["names"],
            w["sizes"],
            dtype=self.feedback.state_dtype(w["dtype"]),
            device=w["device"],
            with_server=server,
        )
        if blk.grads is None:
            blk.grads = ops.padded_zeros(blk.numel, dtype=w["dtype"], device=w["device"])  # kernels own the tail
            blk.grad_views = [grad_view(blk.grads, *blk.spans[n], a) for n, a in zip(w["names"], w["anchors"])]
        return blk

    def _pseudo_gradient(self, w) -> Tensor:
        """``anchor - x`` of the work item's parameters, in its persistent flat buffer."""
        blk = self._block(w)
        for p, a, view in zip(w["params"], w["anchors"], blk.grad_views):
            view.copy_(a)
            view.sub_(p if p.dtype == a.dtype else p.to(a.dtype))
        w["flat"] = blk.grads
        return blk.grads

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s layout (the inner optimizer's ``state`` and ``param_groups``) plus this rank's state
        under ``"torchkit"``: the feedback state, the anchors, the outer optimizer, the position in the period."""
        sd = self.inner.state_dict()
        names = [f"{gi}.{pi}" for gi, g in enumerate(self.param_groups) for pi in range(len(g["params"]))]
        sd["torchkit"] = {
            "format_version": FORMAT_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "skipped_steps": self.skipped_steps,
            **self.round.state_dict(),
            "local_sgd": {
                "sync_every": self.sync_every,
                "local_step": self.local_step,
                "anchored": self._anchored,
                "bad_pending": self._bad_pending,
                "skipped_rounds": self.skipped_rounds,
                "bytes_sent": self.bytes_sent,
                "dense_bytes": self.dense_bytes,
                "anchors": {n: a.detach().clone() for n, a in zip(names, self.anchors)},
                "outer": self.outer.state_dict(),
            },
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class; everything is checked before anything changes. A plain optimizer's
        state_dict loads too, with a warning: the anchor is then taken again at the next step and the feedback
        method starts at its step 0."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if state_dict.get("torchkit") is None:
            if not {"state", "param_groups"} <= set(state_dict):
                raise ValueError("not a LocalSGD or torch.optim state_dict (no 'state'/'param_groups')")
            self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "torchkit"})
            self.round.reset()
            self.local_step, self._anchored, self._agreed = 0, False, False
            if "torchkit" in state_dict:  # torchkit.checkpoint.without_feedback: a restart asked for
                log.info("LocalSGD: anchor and feedback method restarted (without_feedback)")
                return
            warnings.warn(
                "loaded a plain optimizer state_dict: it holds no anchor or error-feedback state, so the anchor is "
                "taken again at the next step and the feedback method starts at its step 0",
                stacklevel=2,
            )
            return
        tk = state_dict["torchkit"]
        problems = check_envelope(
            tk, kind="LocalSGD", rank=self.rank, world_size=self.world_size, feedback=self.feedback
        )
        local = tk.get("local_sgd")
        if not isinstance(local, Mapping):
            raise ValueError("not a LocalSGD state_dict (no 'local_sgd' entry; a CompressedOptimizer's?)")
        if local.get("sync_every") != self.sync_every:
            problems.append(f"saved with sync_every={local.get('sync_every')!r}, this run has {self.sync_every}")
        if problems:
            raise ValueError("cannot load LocalSGD state: " + "; ".join(problems))
        step = local.get("local_step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.sync_every:
            raise ValueError(f"local_step must be an int in [0, sync_every={self.sync_every}), got {step!r}")
        anchors = self._checked_anchors(local.get("anchors"))
        works = self._collect()
        sizes = {n: s for w in works for n, s in zip(w["names"], w["sizes"])}
        prepared = self.round.check(tk, sizes=sizes, strict=True)
        outer_sd = local.get("outer")
        for label, opt, sd in (("inner", self.inner, state_dict), ("outer", self.outer, outer_sd)):
            _check_groups(label, opt, sd)
        inner_before = copy.deepcopy(self.inner.state_dict())
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "torchkit"})
        try:
            self.outer.load_state_dict(outer_sd)
        except Exception as exc:
            self.inner.load_state_dict(inner_before)
            raise ValueError(f"cannot load LocalSGD state: the outer optimizer refused its state ({exc!r})") from exc
        # nothing below can fail
        for a, t in zip(self.anchors, anchors):
            a.copy_(t)
        self.round.apply(prepared)
        for w in works:  # place the loaded state now, so that it can be inspected before the next step
            self._block(w)
        self.local_step = step
        self._anchored = bool(local.get("anchored", True))
        self._bad_pending = bool(local.get("bad_pending", False))
        self.skipped_steps = int(tk.get("skipped_steps", 0))
        self.skipped_rounds = int(local.get("skipped_rounds", 0))
        self.bytes_sent = int(local.get("bytes_sent", 0))
        self.dense_bytes = int(local.get("dense_bytes", 0))
        self._agreed = False

    def _checked_anchors(self, saved: Any) -> list[Tensor]:
        if not isinstance(saved, Mapping):
            raise ValueError("LocalSGD state_dict has no 'anchors' mapping")
        mine = self.anchors
        names = [f"{gi}.{pi}" for gi, g in enumerate(self.param_groups) for pi in range(len(g["params"]))]
        if sorted(saved, key=str) != sorted(names):
            missing = [n for n in names if n not in saved]
            unexpected = [n for n in saved if n not in names]
            raise ValueError(
                f"checkpoint anchors do not match the parameters: missing {missing}, unexpected {unexpected}"
            )
        out = []
        for n, a in zip(names, mine):
            t = saved[n]
            if not isinstance(t, Tensor) or t.shape != a.shape or t.dtype != a.dtype:
                desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"checkpoint anchor {n!r} is {desc}, the parameter's anchor {tuple(a.shape)} {a.dtype}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"checkpoint anchor {n!r} holds non-finite values")
            out.append(t)
        return out

    def feedback_state(self, group: int = 0) -> dict[str, Tensor]:
        """This rank's flat feedback state of one parameter group (views, for inspection)."""
        for key, blk in self.round.blocks.items():
            if key[0] == group:
                return dict(blk.state)
        return {}


def _new_anchor(p: Tensor) -> Tensor:
    dtype = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.complex32: torch.complex64}.get(
        p.dtype, p.dtype
    )
    return p.detach().to(dtype=dtype, copy=True)


def _check_groups(label: str, opt: torch.optim.Optimizer, sd: Any) -> None:
    """What ``Optimizer.load_state_dict`` checks, checked before anything is loaded."""
    if not isinstance(sd, Mapping) or not isinstance(sd.get("param_groups"), list) or "state" not in sd:
        raise ValueError(f"the {label} optimizer's state_dict lacks 'state'/'param_groups'")
    saved = [len(g.get("params", ())) for g in sd["param_groups"]]
    mine = [len(g["params"]) for g in opt.param_groups]
    if saved != mine:
        raise ValueError(f"the {label} optimizer's saved parameter groups have sizes {saved}, this one {mine}")
