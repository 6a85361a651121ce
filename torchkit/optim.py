"""``CompressedOptimizer``: any torch optimizer, stepping on an error-feedback estimate.

Each step copies a parameter group's gradients into one persistent flat buffer per dtype, runs one round of the
feedback method on it (:func:`torchkit.comm.start_round`, the same round as the DDP hook and the simulator),
leaves the estimate in that buffer with ``p.grad`` viewing it, and lets the inner optimizer step. With a process
group of more than one rank the messages are exchanged over ``torch.distributed``; alone it is the
single-worker version of the method.
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings
from collections.abc import Callable
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
    check_inner_state,
    group_options,
    make_exchanger,
    options_digest,
    parameters_fingerprint,
)
from ._frontend import collective_device as _collective_device
from ._frontend import grad_view as _grad_view
from ._frontend import is_view_of as _is_view_of
from ._frontend import numel_real as _numel_real
from ._frontend import real_dtype as _real_dtype
from .comm import DistExchanger, RoundOptions, nonfinite_flag, start_round
from .coupling import warn_coupling
from .feedback import Feedback
from .metrics import CommMetrics
from .state import FORMAT_VERSION, RoundState, check_envelope, split_flat

__all__ = ["CompressedOptimizer"]

log = logging.getLogger(__name__)


class CompressedOptimizer(WrappedOptimizer):
    r"""Wrap ``optimizer_class`` so that it steps on the error-feedback estimate of the gradient.

    Follows ``torch.distributed.optim.ZeroRedundancyOptimizer(params, optimizer_class, **defaults)``:
    the inner optimizer is built from ``params`` and ``defaults``, and shares its ``param_groups`` and ``state``
    with this wrapper (also after :meth:`load_state_dict`), so LR schedulers and per-group options work unchanged.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        optimizer_class: the torch optimizer to wrap (``torch.optim.SGD``, ``AdamW``, ...). Optimizers whose
            ``step`` needs a closure (LBFGS) are refused: each closure call would need its own round.
        feedback: the error-feedback method (:class:`torchkit.EF21` ...). One global top-k per parameter
            group and dtype, or one per tensor with ``granularity="tensor"``.
        process_group: group to exchange messages over. ``None`` uses the default group when it is
            initialised with more than one rank, else runs as a single worker.
        nonfinite: what a non-finite gradient on any rank does, decided on every rank before any state is
            touched: ``"raise"`` (default) raises ``ValueError`` on every rank, ``"skip"`` skips the step on every
            rank (feedback state and parameters unchanged, :attr:`skipped_steps` counts it). Under
            ``torch.amp.GradScaler`` the step is always skipped, as GradScaler does.
        grad_scaler: the ``torch.amp.GradScaler`` of a multi-rank run, so that every rank records the same
            ``found_inf`` and the ranks' loss scales stay equal.
        wire_dtype: what the sent values travel as (``torch.bfloat16``, ``torch.int8`` with one scale per chunk,
            ...; ``None``: the state dtype). What rounding removes stays in the feedback state. With
            ``TopK(ratio=..., chunk=65536)`` the indices travel as 16-bit offsets: int8 values make 3 bytes per
            entry (:class:`torchkit.comm.RoundOptions`).
        **defaults: passed to ``optimizer_class``.

    A parameter takes part in a step's round when at least one rank has a gradient for it; a rank without one
    contributes zero (as DDP's ``find_unused_parameters``). Parameters no rank has a gradient for are left out on
    every rank (their state is kept and ``p.grad`` stays ``None``). The ranks' configurations (method, parameter
    layout) are compared on the first step and a difference raises ``ValueError`` on every rank.

    After :meth:`step`, ``p.grad`` holds the estimate the inner optimizer used (a view of the wrapper's flat
    buffer). The feedback state is kept in fp32 (fp64 for fp64 parameters) whatever the parameter dtype, and
    survives :meth:`state_dict`/:meth:`load_state_dict` bit for bit; the state_dict follows ``torch.optim``'s
    layout (``state``, ``param_groups``) with this rank's feedback state under ``"torchkit"``.

    Example::

        >>> model = torch.nn.Linear(10, 2)
        >>> opt = CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1,
        ...                           feedback=tk.EF21(tk.TopK(ratio=0.1)))
        >>> model(torch.randn(4, 10)).sum().backward(); opt.step(); opt.zero_grad()
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf; we unscale ourselves

    def __init__(
        self,
        params,
        optimizer_class: type[torch.optim.Optimizer],
        *,
        feedback: Feedback,
        process_group: dist.ProcessGroup | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        grad_scaler: torch.amp.GradScaler | None = None,
        wire_dtype: torch.dtype | None = None,
        **defaults: Any,
    ):
        check_common_args("CompressedOptimizer", feedback, optimizer_class, nonfinite, grad_scaler)
        warn_coupling(feedback, optimizer_class, defaults)  # known-bad pairs warn once, naming the fix
        self._wrap(optimizer_class, params, defaults)  # the inner optimizer owns param_groups, state, defaults
        self._options = RoundOptions(wire_dtype=wire_dtype)  # finiteness is checked (and agreed) before the round
        self.feedback = feedback
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self.metrics = CommMetrics()
        self.round = RoundState(feedback)
        self._exchanger = make_exchanger(process_group)
        self._agreed = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        if closure is None and _called_from_dcp_init():
            return self._init_inner_state_for_dcp()
        if not self.__dict__.get("_comm_checked"):
            self._warn_if_ddp_communicates()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = self._collect()  # validation first: nothing below changes state before every check passed
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not self._agreed and self.world_size > 1:
            self._agree(works)
        active, bad = self._active_and_bad(works, grad_scale, found_inf)
        if found_inf is not None:
            self._share_found_inf(bad)
        self.metrics.steps += 1
        if bad:
            if found_inf is not None or self.nonfinite == "skip":
                self.skipped_steps += 1
                self.metrics.skipped_steps += 1
                self.metrics.skipped_rounds += 1
                log.warning("non-finite gradient: step skipped on every rank, feedback state unchanged")
                return loss
            raise ValueError(
                "non-finite gradient (NaN or Inf) on at least one rank; the step was not taken and the "
                "feedback state is unchanged (pass nonfinite='skip' to skip such steps instead)"
            )
        if not any(active):
            return loss  # no rank has a gradient anywhere: nothing to send, nothing to step
        futures = []
        for w in works:
            pick = [i for i, on in zip(w["ids"], active) if on]
            futures.append(self._round(w, pick))
        self.metrics.record_round([fut.wait() for fut in futures])
        self.round.step += 1
        self.inner.step()
        return loss

    def _collect(self) -> list[dict[str, Any]]:
        """One work item per (parameter group, dtype, device): its parameters and where their flat gradient is."""
        works, pid = [], 0
        for gi, group in enumerate(self.param_groups):
            by_kind: dict[tuple, list] = {}
            for pi, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                g = p.grad
                if g is not None:
                    if g.is_sparse or g.layout != torch.strided:
                        raise TypeError(f"sparse gradients are not supported (parameter group {gi})")
                    if g.shape != p.shape:
                        raise ValueError(f"parameter {gi}.{pi} has a gradient of shape {tuple(g.shape)}")
                by_kind.setdefault((p.dtype, p.device), []).append((f"{gi}.{pi}", p))
            for (dtype, device), named in by_kind.items():
                real = _real_dtype(dtype)
                names = tuple(n for n, _ in named)
                params = [p for _, p in named]
                sizes = tuple(_numel_real(p) for p in params)
                works.append(
                    {
                        "key": (gi, str(dtype), str(device)),
                        "names": names,
                        "params": params,
                        "sizes": sizes,
                        "dtype": real,
                        "device": device,
                        "ids": list(range(pid, pid + len(params))),
                    }
                )
                pid += len(params)
        return works

    def _active_and_bad(self, works, grad_scale, found_inf) -> tuple[list[bool], bool]:
        """Which parameters have a gradient on some rank, and whether any rank's gradient is non-finite (one
        small all_reduce between ranks, one read on the host)."""
        has, bads = [], []
        for w in works:
            w["flat"] = self._flat_grad(w, grad_scale)
            has += [p.grad is not None for p in w["params"]]
            bads.append(nonfinite_flag(w["flat"]).float().reshape(1))
        dev = _collective_device() if isinstance(self._exchanger, DistExchanger) else torch.device("cpu")
        if found_inf is not None:
            bads.append((found_inf.float() > 0).float().reshape(1))
        bad = torch.cat([b.to(dev) for b in bads]).amax().reshape(1) if bads else torch.zeros(1, device=dev)
        # each group's hyper-parameters as d and -d: after MAX, max(d) == -max(-d) on every rank iff all ranks agree
        digest = torch.tensor(options_digest(self.param_groups), dtype=torch.float64, device=dev)
        flags = torch.cat([bad.double(), torch.tensor(has, dtype=torch.float64, device=dev), digest, -digest])
        if isinstance(self._exchanger, DistExchanger):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        flags = flags.cpu()
        n = len(has)
        hi, lo = flags[1 + n : 1 + n + len(digest)], -flags[1 + n + len(digest) :]
        if not torch.equal(hi, lo):
            g = int((hi != lo).nonzero()[0])
            raise ValueError(
                f"ranks are configured differently: parameter group {g}'s hyper-parameters (lr, momentum, ...) differ "
                f"between ranks at step {self.round.step}; nothing was changed. {RESUME_HINTS['options']}"
            )
        return [bool(f) for f in flags[1 : 1 + n].tolist()], bool(flags[0])

    def _flat_grad(self, w, grad_scale) -> Tensor:
        """The group's gradients in the persistent flat buffer (missing ones zero), unscaled when GradScaler
        asked us to."""
        blk = self._block(w, with_grads=True)
        buf = blk.grads
        views = blk.grad_views
        copies_src, copies_dst = [], []
        for p, view in zip(w["params"], views):
            g = p.grad
            if g is None:
                view.zero_()
            elif not _is_view_of(g, view):
                copies_src.append(g)
                copies_dst.append(view)
        if copies_dst:
            torch._foreach_copy_(copies_dst, copies_src)
        if grad_scale is not None:  # GradScaler did not unscale: do it here, as its unscale_ would
            buf.mul_(grad_scale.double().reciprocal().float().to(buf.device))
        return buf

    def _block(self, w, *, with_grads: bool = False):
        server = self.feedback.server_state and self.world_size > 1
        state_dtype = self.feedback.state_dtype(w["dtype"])
        blk = self.round.block(
            w["key"], w["names"], w["sizes"], dtype=state_dtype, device=w["device"], with_server=server
        )
        if with_grads and blk.grads is None:
            blk.grads = ops.padded_zeros(blk.numel, dtype=w["dtype"], device=w["device"])  # kernels own the tail
            blk.grad_views = [_grad_view(blk.grads, *blk.spans[n], p) for n, p in zip(w["names"], w["params"])]
        return blk

    def _round(self, w, pick: list[int]):
        blk = self._block(w)
        first = w["ids"][0]
        chosen = [i - first for i in pick]
        if len(chosen) == len(w["params"]):
            fut = start_round(self.feedback, self._exchanger, blk, w["flat"], self.round.step, self._options)
        else:  # some parameters have no gradient on any rank: run on the others, keep the rest as it is
            fut = self._partial_round(blk, w, chosen)
        for i in chosen:
            p, view = w["params"][i], blk.grad_views[i]
            p.grad = view  # the estimate, in the flat buffer: the next step finds it in place
        return fut

    def _partial_round(self, blk, w, chosen):
        names = [w["names"][i] for i in chosen]
        sub = self.round.sub_block(blk, names)
        grads = torch.cat([w["flat"][slice(*blk.spans[n])] for n in names])
        fut = start_round(self.feedback, self._exchanger, sub, grads, self.round.step, self._options)

        def write_back(f):
            res = f.wait()
            self.round.write_sub_block(blk, sub)
            off = 0
            for n in names:
                a, b = blk.spans[n]
                w["flat"][a:b].copy_(grads[off : off + b - a])
                off += b - a
            return res

        return fut.then(write_back)

    # --------------------------------------------------------------------------------------- multi-rank checks
    def _agree(self, works) -> None:
        """Every rank runs the same method with the same hyper-parameters over the same parameters, from the same
        shared feedback state, or every rank raises naming the difference (and what to do)."""
        mine = {
            "method": self.feedback.config(),
            "optimizer": type(self.inner).__name__,
            "options": group_options(self.param_groups),
            "wire": str(self._options.wire_dtype),
            "layout": [[w["key"][0], w["key"][1], list(w["sizes"])] for w in works],
            "parameters": [parameters_fingerprint(w["params"]) for w in works],
            "feedback": self.round.shared(),
        }
        agree(
            mine,
            group=self.process_group,
            world_size=self.world_size,
            rank=self.rank,
            what="model and CompressedOptimizer",
            hints=RESUME_HINTS,
        )
        self._agreed = True

    def _share_found_inf(self, bad: bool) -> None:
        """GradScaler records found_inf per rank; make every rank record the agreed one."""
        if self.world_size == 1:
            return
        if self.grad_scaler is None:
            if "scaler" not in self._warned:
                self._warned.add("scaler")
                warnings.warn(
                    "CompressedOptimizer under GradScaler on several ranks: pass grad_scaler=scaler so that every "
                    "rank records the same found_inf (otherwise the ranks' loss scales can drift apart)",
                    stacklevel=3,
                )
            return
        per_device = self.grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        for t in per_device.values():
            t.fill_(float(bad))

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s layout (the inner optimizer's ``state`` and ``param_groups``) plus this rank's
        feedback state under ``"torchkit"``, with rank and world size.

        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps ``state`` and ``param_groups``
        only; save the feedback state with DCP through :meth:`feedback_stateful`."""
        sd = self.inner.state_dict()
        sd["torchkit"] = self.feedback_state_dict()
        return sd

    def feedback_state_dict(self) -> dict[str, Any]:
        """This rank's feedback state alone (what :meth:`state_dict` holds under ``"torchkit"``), for every
        parameter: before the first step, the state the first step starts from (so that a fresh optimizer's
        state_dict loads back into it, as Accelerate's ``prepare`` does, and DCP's keys do not depend on it)."""
        for w in self._collect():
            self._block(w)
        return {
            "format_version": FORMAT_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "skipped_steps": self.skipped_steps,
            **self.round.state_dict(),
        }

    def load_feedback_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's feedback state alone (from :meth:`feedback_state_dict`). Like a state restored by
        :func:`torchkit.checkpoint.load_feedback` or DCP, it is kept when a state_dict saved on another rank (or a
        plain optimizer state_dict) is loaded next, before any step."""
        self._apply_feedback(self._prepare_feedback(state_dict))
        self.round.mark_restored()

    def feedback_stateful(self):
        """This rank's feedback state as a DCP ``Stateful`` (:class:`torchkit.checkpoint.FeedbackStateful`)::

        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "feedback": opt.feedback_stateful()}, checkpoint_id=path)
        # resume, on every rank:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.load({"model": model_sd, "optim": optim_sd, "feedback": opt.feedback_stateful()}, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        """
        from .checkpoint import FeedbackStateful

        return FeedbackStateful(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class (or of format 1). Everything is checked before anything changes.

        A plain optimizer's state_dict (``set_optimizer_state_dict`` hands over one) loads with a warning: the
        feedback method starts again at its step 0. Feedback state of another rank or world size raises
        ``ValueError`` saying how to keep per-rank state. When this rank's feedback state was just restored from its
        own side file or DCP entry (:mod:`torchkit.checkpoint`) and no step has run since, that state is kept and
        only the inner optimizer's state is loaded."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "torchkit" not in state_dict and state_dict.get("format_version") == 1:
            state_dict = self._migrate_v1(state_dict)
        inner = {k: v for k, v in state_dict.items() if k != "torchkit"}
        if not {"state", "param_groups"} <= set(inner):
            raise ValueError("not a CompressedOptimizer or torch.optim state_dict (no 'state'/'param_groups')")
        check_inner_state(self.inner, inner)
        if self.round.restored():
            self.inner.load_state_dict(inner)  # the feedback state restored from this rank's own checkpoint stays
            log.info("CompressedOptimizer: kept the feedback state restored from this rank's per-rank checkpoint")
            return
        if state_dict.get("torchkit") is None:
            self.inner.load_state_dict(inner)
            self.round.reset()
            if "torchkit" in state_dict:  # torchkit.checkpoint.without_feedback: a restart asked for
                log.info("CompressedOptimizer: feedback method restarted at its step 0 (without_feedback)")
                return
            warnings.warn(
                "loaded a plain optimizer state_dict: it holds no error-feedback state, so the feedback method "
                "starts again at its step 0 (torch.distributed.checkpoint's optimizer state_dict leaves it out: "
                "load it with opt.feedback_stateful(); see torchkit.checkpoint)",
                stacklevel=2,
            )
            return
        prepared = self._prepare_feedback(state_dict["torchkit"])
        self.inner.load_state_dict(inner)  # raises before any feedback state changed
        self._apply_feedback(prepared)

    def _prepare_feedback(self, tk: Any) -> dict[str, Any]:
        """Check a feedback state_dict completely (envelope, method, layout); the input of :meth:`_apply_feedback`."""
        from .checkpoint import FOREIGN_RANK_HINT

        problems = check_envelope(
            tk, kind="CompressedOptimizer", rank=self.rank, world_size=self.world_size, feedback=self.feedback
        )
        if problems:
            restart = "opt.load_state_dict(torchkit.checkpoint.without_feedback(state_dict))"
            foreign = tk.get("world_size") == self.world_size and tk.get("rank") != self.rank
            hint = FOREIGN_RANK_HINT.format(restart=restart) if foreign else f"to restart the method: {restart}"
            raise ValueError("cannot load CompressedOptimizer state: " + "; ".join(problems) + ". " + hint)
        works = self._collect()
        sizes = {n: s for w in works for n, s in zip(w["names"], w["sizes"])}
        prepared = self.round.check(tk, sizes=sizes, strict=True)
        prepared["skipped_steps"] = int(tk.get("skipped_steps", 0))
        prepared["works"] = works
        return prepared

    def _apply_feedback(self, prepared: dict[str, Any]) -> None:
        self.round.apply(prepared)
        for w in prepared["works"]:  # place the loaded state now, so that it can be inspected before the next step
            self._block(w)
        self.skipped_steps = prepared["skipped_steps"]
        self._agreed = False

    def _feedback_state_dict_for_layout(self) -> dict[str, Any]:
        return self.feedback_state_dict()  # covers every parameter already

    # ---------------------------------------------------------------------------------------- other stacks
    def _init_inner_state_for_dcp(self):
        """``get_optimizer_state_dict`` steps a fresh optimizer on zero gradients with lr 0 to create its state:
        that step initialises the inner optimizer only; no round runs and the feedback state does not change."""
        return self.inner.step()

    def _warn_if_ddp_communicates(self) -> None:
        """Once, on the first step: warn when a DistributedDataParallel model that communicates holds these
        parameters (each step would then exchange gradients twice)."""
        self.__dict__["_comm_checked"] = True
        if self.world_size == 1:
            return
        ddp = _communicating_ddp({id(p) for g in self.param_groups for p in g["params"]})
        if ddp is not None:
            warnings.warn(
                f"CompressedOptimizer: its parameters belong to a DistributedDataParallel model ({ddp}) that also "
                "communicates the gradients, so every step communicates twice (DDP's all-reduce, then torchkit's "
                "all-gather) and the compression saves nothing. Use the DDP hook with a plain optimizer instead "
                "(tk.ddp.register(ddp_model, feedback); Lightning: torchkit.integrations.lightning.DDPStrategy("
                "feedback=...); Accelerate: torchkit.integrations.accelerate.register(accelerator, model, feedback)), "
                "or keep this optimizer and turn DDP's all-reduce off with ddp_model.register_comm_hook(None, "
                "torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks.noop_hook)",
                stacklevel=3,
            )

    def _migrate_v1(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Format 1 kept one flat vector per parameter group; split it per parameter."""
        params = {}
        for gi, saved in sd["groups"].items():
            names = [f"{int(gi)}.{pi}" for pi, p in enumerate(self.param_groups[int(gi)]["params"]) if p.requires_grad]
            if len(names) != len(saved["sizes"]):
                raise ValueError(
                    f"parameter layout differs in group {gi}: saved sizes {list(saved['sizes'])}, "
                    f"current {len(names)} parameters"
                )
            vecs = {**saved["state"], **({"server": saved["server"]} if self.world_size > 1 else {})}
            pieces = {k: split_flat(v, saved["sizes"]) for k, v in vecs.items()}
            for j, name in enumerate(names):
                params[name] = {k: pieces[k][j] for k in pieces}
        steps = {int(g["step"]) for g in sd["groups"].values()} or {0}
        tk = {
            "format_version": 1,
            "world_size": sd["world_size"],
            "rank": sd["rank"],
            "feedback": sd["feedback"],
            "skipped_steps": sd.get("skipped_steps", 0),
            "step": max(steps),
            "params": params,
        }
        return {**sd["inner"], "torchkit": tk}

    def feedback_state(self, group: int = 0) -> dict[str, Tensor]:
        """This rank's flat feedback state of one parameter group (views, for inspection)."""
        for key, blk in self.round.blocks.items():
            if key[0] == group:
                return dict(blk.state)
        return {}


def _called_from_dcp_init() -> bool:
    """Whether ``torch.distributed.checkpoint.state_dict._init_optim_state`` is calling :meth:`step`."""
    frame = sys._getframe(2)
    for _ in range(8):  # step's decorators (no_grad, the optimizer's profiling hook) sit in between
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_init_optim_state" and frame.f_globals.get("__name__", "").startswith(
            "torch.distributed.checkpoint"
        ):
            return True
        frame = frame.f_back
    return False


def _communicating_ddp(param_ids: set[int]) -> str | None:
    """A live DistributedDataParallel model holding one of these parameters that communicates gradients (any comm
    hook but ``noop_hook``), described; ``None`` if there is none. Scans the garbage collector's objects once."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
    from torch.nn.parallel import DistributedDataParallel

    for obj in gc.get_objects():
        if not isinstance(obj, DistributedDataParallel):
            continue
        if not any(id(p) in param_ids for p in obj.module.parameters()):
            continue
        hooks = [h for h, _ in getattr(obj, "_comm_hooks", [])]
        if hooks and all(h is noop_hook for h in hooks):
            continue
        how = getattr(hooks[-1], "__name__", "a comm hook") if hooks else "all-reduce"
        return f"{type(obj.module).__name__}, {how}"
    return None
