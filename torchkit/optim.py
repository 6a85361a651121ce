"""``CompressedOptimizer``: any torch optimizer, stepping on an error-feedback estimate.

Each step flattens a parameter group's gradients, runs one round of the feedback method
(:func:`torchkit.comm.run_round`), writes the estimate into ``p.grad`` and lets the inner optimizer
step. With a process group of more than one rank the messages are exchanged over
``torch.distributed``; alone it is the single-worker version of the method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import DistExchanger, LocalExchanger, run_round
from .coupling import warn_coupling
from .feedback import Feedback

__all__ = ["CompressedOptimizer"]

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1


class CompressedOptimizer(torch.optim.Optimizer):
    r"""Wrap ``optimizer_class`` so that it steps on the error-feedback estimate of the gradient.

    Follows ``torch.distributed.optim.ZeroRedundancyOptimizer(params, optimizer_class, **defaults)``:
    the inner optimizer is built from ``params`` and ``defaults``, and shares its ``param_groups`` with
    this wrapper, so LR schedulers and per-group options work unchanged.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        optimizer_class: the torch optimizer to wrap (``torch.optim.SGD``, ``AdamW``, ...).
        feedback: the error-feedback method (:class:`torchkit.EF21` ...). One global top-k per parameter
            group, or one per tensor with ``granularity="tensor"``.
        process_group: group to exchange messages over. ``None`` uses the default group when it is
            initialised with more than one rank, else runs as a single worker.
        nonfinite: what a non-finite gradient on any rank does, decided before any state is touched:
            ``"raise"`` (default) raises ``ValueError`` on every rank, ``"skip"`` skips the step on every
            rank (feedback state and parameters unchanged, :attr:`skipped_steps` counts it). Under
            ``torch.amp.GradScaler`` the step is always skipped, as GradScaler does.
        **defaults: passed to ``optimizer_class``.

    After :meth:`step`, ``p.grad`` holds the estimate the inner optimizer used. The feedback state is
    kept in fp32 (fp64 for fp64 parameters) whatever the parameter dtype, and survives
    :meth:`state_dict`/:meth:`load_state_dict` bit for bit. Each rank saves and loads its own state.

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
        **defaults: Any,
    ):
        if not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a torchkit feedback method (EF21, ...), got {type(feedback).__name__}")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        warn_coupling(feedback, optimizer_class, defaults)  # known-bad pairs warn once, naming the fix
        self.inner = optimizer_class(params, **defaults)
        self._ready = False
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.param_groups = self.inner.param_groups  # one list: schedulers and add_param_group see both
        self.state = self.inner.state  # opt.state[p] is the inner optimizer's per-parameter state
        self._ready = True
        self.feedback = feedback
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._exchanger = self._make_exchanger(process_group)
        self._buffers: dict[int, dict[str, Any]] = {}  # group index -> flat state, server estimate, step

    @staticmethod
    def _make_exchanger(group):
        if group is not None or (dist.is_available() and dist.is_initialized()):
            if dist.get_world_size(group) > 1:
                return DistExchanger(group)
        return LocalExchanger(1)

    @property
    def world_size(self) -> int:
        return self._exchanger.n_workers

    @property
    def rank(self) -> int:
        return self._exchanger.first_worker

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", False):
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("process_group", None)
        state.pop("_exchanger", None)
        return state

    # --------------------------------------------------------------------------------------- buffers
    def _group_buffers(self, gi: int, group: dict[str, Any]) -> dict[str, Any]:
        buf = self._buffers.get(gi)
        params = [p for p in group["params"] if p.requires_grad]
        sizes = [p.numel() for p in params]
        if buf is not None and buf["sizes"] != sizes:
            raise RuntimeError(f"parameter group {gi} changed its parameters after the first step")
        if buf is None:
            p0 = params[0] if params else None
            dtype = Feedback.state_dtype(p0.dtype) if p0 is not None else torch.float32
            device = p0.device if p0 is not None else None
            buf = {
                "sizes": sizes,
                "state": self.feedback.init_state(sum(sizes), dtype=dtype, device=device),
                "server": torch.zeros(sum(sizes), dtype=dtype, device=device),
                "step": 0,
            }
            self._buffers[gi] = buf
        buf["params"] = params
        return buf

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        work = []
        for gi, group in enumerate(self.param_groups):
            buf = self._group_buffers(gi, group)
            active = [i for i, p in enumerate(buf["params"]) if p.grad is not None]
            if not active:
                continue
            for i in active:
                if buf["params"][i].grad.is_sparse:
                    raise TypeError(f"sparse gradients are not supported (parameter group {gi})")
            work.append((buf, active, self._flat_grad(buf, active, grad_scale)))
        if not work:
            return loss
        if self._any_nonfinite([w[2] for w in work], found_inf):
            if found_inf is not None or self.nonfinite == "skip":
                self.skipped_steps += 1
                log.warning("non-finite gradient: step skipped on every rank, feedback state unchanged")
                return loss
            raise ValueError(
                "non-finite gradient (NaN or Inf) on at least one rank; the step was not taken and the "
                "feedback state is unchanged (pass nonfinite='skip' to skip such steps instead)"
            )
        for buf, active, flat in work:
            self._round(buf, active, flat)
        self.inner.step()
        return loss

    def _flat_grad(self, buf, active, grad_scale) -> Tensor:
        state_dtype = buf["server"].dtype
        flat = torch.cat([buf["params"][i].grad.reshape(-1).to(state_dtype) for i in active])
        if grad_scale is not None:  # GradScaler did not unscale: do it here, as its unscale_ would
            flat.mul_(grad_scale.double().reciprocal().float().to(flat.device))
        return flat

    def _any_nonfinite(self, flats: list[Tensor], found_inf: Tensor | None) -> bool:
        bad = torch.stack([~torch.isfinite(f).all() for f in flats]).any().to(torch.float32)
        if found_inf is not None:
            bad = torch.maximum(bad, (found_inf.to(bad.device) > 0).to(torch.float32))
        if isinstance(self._exchanger, DistExchanger):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(bad.item())

    def _round(self, buf, active, flat: Tensor) -> None:
        sizes = buf["sizes"]
        full = len(active) == len(sizes)
        if full:
            state, server = buf["state"], buf["server"]
        else:  # some parameters have no gradient: run on the subset, then write their state back
            spans = _spans(sizes)
            pick = torch.cat([torch.arange(*spans[i], device=flat.device) for i in active])
            state = {k: v[pick] for k, v in buf["state"].items()}
            server = buf["server"][pick]
        segments = self.feedback.segments_for([sizes[i] for i in active])
        estimate, _ = run_round(self.feedback, self._exchanger, state, server, flat, buf["step"], segments=segments)
        if not full:
            for k, v in state.items():
                buf["state"][k][pick] = v
            buf["server"][pick] = server
        buf["step"] += 1
        off = 0
        for i in active:
            p = buf["params"][i]
            p.grad.copy_(estimate[off : off + p.numel()].view_as(p.grad))
            off += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state plus this rank's feedback state, with rank and world size."""
        groups = {}
        for gi, buf in self._buffers.items():
            groups[gi] = {
                "sizes": list(buf["sizes"]),
                "step": buf["step"],
                "state": {k: v.clone() for k, v in buf["state"].items()},
                "server": buf["server"].clone(),
            }
        return {
            "format_version": _FORMAT_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "feedback": repr(self.feedback),
            "inner": self.inner.state_dict(),
            "groups": groups,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "format_version" not in state_dict:
            raise ValueError("state_dict is not a CompressedOptimizer state_dict (no format_version)")
        if state_dict["format_version"] > _FORMAT_VERSION:
            raise ValueError(f"state_dict format_version {state_dict['format_version']} is newer than this torchkit")
        if state_dict["world_size"] != self.world_size:
            raise ValueError(
                f"state_dict was saved with world_size={state_dict['world_size']}, this run has "
                f"world_size={self.world_size}; error-feedback state is per rank and cannot be re-sharded"
            )
        if state_dict["rank"] != self.rank:
            raise ValueError(f"state_dict belongs to rank {state_dict['rank']}, this is rank {self.rank}")
        if state_dict["feedback"] != repr(self.feedback):
            raise ValueError(
                f"state_dict was saved with feedback {state_dict['feedback']}, this optimizer has {self.feedback!r}"
            )
        for gi, saved in state_dict["groups"].items():
            gi = int(gi)
            if gi >= len(self.param_groups):
                raise ValueError(f"state_dict has parameter group {gi}, this optimizer has {len(self.param_groups)}")
            buf = self._group_buffers(gi, self.param_groups[gi])
            if list(saved["sizes"]) != buf["sizes"]:
                raise ValueError(
                    f"parameter layout differs in group {gi}: saved sizes {saved['sizes']}, current {buf['sizes']}"
                )
            for k, v in saved["state"].items():
                buf["state"][k].copy_(v)  # copy_ keeps our fp32 dtype (no cast to the parameter dtype)
            buf["server"].copy_(saved["server"])
            buf["step"] = int(saved["step"])
        self.inner.load_state_dict(state_dict["inner"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def feedback_state(self, group: int = 0) -> dict[str, Tensor]:
        """This rank's flat feedback state of one parameter group (views, for inspection)."""
        return dict(self._buffers[group]["state"]) if group in self._buffers else {}


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    out, off = [], 0
    for n in sizes:
        out.append((off, off + n))
        off += n
    return out
