"""``CompressedOptimizer``: any torch optimizer, stepping on an error-feedback estimate.

Each step copies a parameter group's gradients into one persistent flat buffer per dtype, runs one round of the
feedback method on it (:func:`torchkit.comm.start_round`, the same round as the DDP hook and the simulator),
leaves the estimate in that buffer with ``p.grad`` viewing it, and lets the inner optimizer step. With a process
group of more than one rank the messages are exchanged over ``torch.distributed``; alone it is the
single-worker version of the method.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ._frontend import WrappedOptimizer, agree, check_common_args, make_exchanger
from ._frontend import collective_device as _collective_device
from ._frontend import grad_view as _grad_view
from ._frontend import is_view_of as _is_view_of
from ._frontend import numel_real as _numel_real
from ._frontend import real_dtype as _real_dtype
from .comm import DistExchanger, RoundOptions, start_round
from .feedback import Feedback
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
        **defaults: Any,
    ):
        check_common_args("CompressedOptimizer", feedback, optimizer_class, nonfinite, grad_scaler)
        self._wrap(optimizer_class, params, defaults)  # the inner optimizer owns param_groups, state, defaults
        self.feedback = feedback
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self.round = RoundState(feedback)
        self._exchanger = make_exchanger(process_group)
        self._agreed = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
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
        if bad:
            if found_inf is not None or self.nonfinite == "skip":
                self.skipped_steps += 1
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
        for fut in futures:
            fut.wait()
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
        """Which parameters have a gradient on some rank, and whether any rank's gradient is non-finite."""
        has = []
        bad = torch.zeros((), dtype=torch.float32)
        for w in works:
            flat = self._flat_grad(w, grad_scale)
            w["flat"] = flat
            has += [p.grad is not None for p in w["params"]]
            bad = torch.maximum(bad, (~torch.isfinite(flat).all()).float().cpu())
        if found_inf is not None:
            bad = torch.maximum(bad, (found_inf.float() > 0).float().cpu())
        flags = torch.tensor([float(bad)] + [float(h) for h in has], dtype=torch.float32)
        if isinstance(self._exchanger, DistExchanger):
            flags = flags.to(_collective_device(works))
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            flags = flags.cpu()
        return [bool(f) for f in flags[1:].tolist()], bool(flags[0])

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
            blk.grads = torch.zeros(blk.numel, dtype=w["dtype"], device=w["device"])
            blk.grad_views = [_grad_view(blk.grads, *blk.spans[n], p) for n, p in zip(w["names"], w["params"])]
        return blk

    def _round(self, w, pick: list[int]):
        blk = self._block(w)
        first = w["ids"][0]
        chosen = [i - first for i in pick]
        if len(chosen) == len(w["params"]):
            fut = start_round(self.feedback, self._exchanger, blk, w["flat"], self.round.step, _WRAPPER_ROUND)
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
        fut = start_round(self.feedback, self._exchanger, sub, grads, self.round.step, _WRAPPER_ROUND)

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
        """Every rank runs the same method over the same layout, or every rank raises naming the difference."""
        mine = {
            "method": self.feedback.config(),
            "optimizer": type(self.inner).__name__,
            "layout": [[w["key"][0], w["key"][1], list(w["sizes"])] for w in works],
        }
        agree(
            mine,
            group=self.process_group,
            world_size=self.world_size,
            rank=self.rank,
            what="model and CompressedOptimizer",
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
        feedback state under ``"torchkit"``, with rank and world size."""
        sd = self.inner.state_dict()
        sd["torchkit"] = {
            "format_version": FORMAT_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "skipped_steps": self.skipped_steps,
            **self.round.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class (or of format 1). A plain optimizer's state_dict loads too, with a
        warning: the feedback state then starts at step 0. Everything is checked before anything changes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "torchkit" not in state_dict and state_dict.get("format_version") == 1:
            state_dict = self._migrate_v1(state_dict)
        if "torchkit" not in state_dict:
            if not {"state", "param_groups"} <= set(state_dict):
                raise ValueError("not a CompressedOptimizer or torch.optim state_dict (no 'state'/'param_groups')")
            self.inner.load_state_dict(state_dict)
            self.round.reset()
            warnings.warn(
                "loaded a plain optimizer state_dict: it holds no error-feedback state, so the feedback method "
                "starts again at its step 0",
                stacklevel=2,
            )
            return
        tk = state_dict["torchkit"]
        problems = check_envelope(
            tk, kind="CompressedOptimizer", rank=self.rank, world_size=self.world_size, feedback=self.feedback
        )
        if problems:
            raise ValueError("cannot load CompressedOptimizer state: " + "; ".join(problems))
        works = self._collect()
        sizes = {n: s for w in works for n, s in zip(w["names"], w["sizes"])}
        prepared = self.round.check(tk, sizes=sizes, strict=True)
        inner = {k: v for k, v in state_dict.items() if k != "torchkit"}
        self.inner.load_state_dict(inner)  # raises before any feedback state changed
        self.round.apply(prepared)
        for w in works:  # place the loaded state now, so that it can be inspected before the next step
            self._block(w)
        self.skipped_steps = int(tk.get("skipped_steps", 0))
        self._agreed = False

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


_WRAPPER_ROUND = RoundOptions()  # finiteness is checked (and agreed) before the round
