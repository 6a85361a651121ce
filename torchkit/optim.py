"""``CompressedOptimizer``: any torch optimizer, stepping on an error-feedback estimate.

Each step copies a parameter group's gradients into one persistent flat buffer per dtype, runs one round of the
feedback method on it (:func:`torchkit.comm.start_round`, the same round as the DDP hook and the simulator),
leaves the estimate in that buffer with ``p.grad`` viewing it, and lets the inner optimizer step. With a process
group of more than one rank the messages are exchanged over ``torch.distributed``; alone it is the
single-worker version of the method.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ._wrapped import (
    Work,
    WorkCache,
    WrappedOptimizer,
    called_from_dcp_init,
    check_common_args,
    check_options,
    check_sharding,
    grad_like,
    group_options,
    inner_step,
    is_view_of,
    local_of,
    options_payload,
    parameters_fingerprint,
    run_eagerly,
    shard_count,
)
from .comm import (
    RoundOptions,
    RoundResult,
    _done,
    agree_max,
    agreement_bytes,
    check_wire,
    nonfinite_flag,
    settle_nonfinite,
    start_round,
)
from .coupling import warn_coupling
from .feedback import Feedback
from .frontend import RESUME_HINTS, agree, live_instances, make_exchanger
from .metrics import CommMetrics
from .node import agree_on_nodes, node_shards
from .state import RoundState, checkpoint_count, split_flat

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
        node_group: node-aware compression (dense inside a node, compressed between nodes): the group of this
            rank's node, with ``process_group`` the group of its peers on the other nodes
            (:func:`torchkit.node.node_groups` builds both from ``torchrun``). The node's ranks reduce-scatter each
            gradient, each runs the round on its ``1/L`` shard of the node's mean between nodes, and they all-gather
            the estimate: each rank sends ``d/L x density`` between nodes and holds ``1/L`` of the feedback state
            (:mod:`torchkit.node`).
        wire_dtype: what the sent values travel as (``torch.bfloat16``, ``torch.int8`` with one scale per chunk,
            ``torch.int2`` with two magnitudes per chunk, ...; ``None``: the state dtype). What rounding removes
            stays in the feedback state. With ``TopK(ratio=..., chunk=65536)`` the indices travel as 16-bit offsets
            (12-bit for chunks of at most 4096): int8 values make 3 bytes per entry, 2-bit values with 12-bit
            offsets 1.75 (:class:`torchkit.comm.RoundOptions`).
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
        node_group: dist.ProcessGroup | None = None,
        **defaults: Any,
    ):
        check_common_args("CompressedOptimizer", feedback, optimizer_class, nonfinite, grad_scaler)
        node = node_shards(node_group, process_group, feedback)
        warn_coupling(feedback, optimizer_class, defaults)  # known-bad pairs warn once, naming the fix
        self._wrap(optimizer_class, params, defaults)  # the inner optimizer owns param_groups, state, defaults
        self._options = RoundOptions(wire_dtype=wire_dtype)  # finiteness is checked (and agreed) before the round
        check_wire(feedback, wire_dtype)
        self.feedback = feedback
        self.process_group = process_group
        self.nonfinite = nonfinite
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self.metrics = CommMetrics()
        self.round = RoundState(feedback)
        self._exchanger = make_exchanger(process_group)
        self._node = node
        self._agreed = False
        self._warned: set[str] = set()
        self._layout = WorkCache()

    # ------------------------------------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None):
        """One step: every rank's round of the method, then the inner optimizer's step on the estimate. Under
        ``torch.compile`` it runs eagerly (its host-side checks, agreements and collectives are not traceable:
        Dynamo failed on its first compiled step)."""
        return run_eagerly(self._step, closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None = None):
        if closure is None and called_from_dcp_init():
            return self._init_inner_state_for_dcp()
        if not self.__dict__.get("_comm_checked"):
            self.__dict__["_comm_checked"] = True
            _warn_if_ddp_communicates(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_feedback()
        works = self._works()  # validation first: nothing below changes state before every check passed
        self.round.restored_at = None  # a step runs: a restored state is no longer kept against a later load
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not self._agreed and self.world_size > 1:
            self._agree(works)
        active, bad, flag_bytes = self._active_and_bad(works, grad_scale, found_inf)
        if found_inf is not None:
            self._share_found_inf(bad)
        self.metrics.steps += 1
        self.metrics.bytes_sent += flag_bytes  # the step's agreement: on the wire whether or not a round runs
        if bad:
            unchanged = "the step was not taken and the feedback state is unchanged on every rank"
            settle_nonfinite(self.nonfinite, scaled=found_inf is not None, what="gradient", unchanged=unchanged)
            self.skipped_steps += 1
            self.metrics.skipped_steps += 1
            self.metrics.skipped_rounds += 1
            return loss
        if not any(active):
            return loss  # no rank has a gradient anywhere: nothing to send, nothing to step
        futures, laid_out = [], []
        for w in works:
            futures.append(self._round(w, [i for i in w.ids if active[i]], laid_out))
        self.metrics.record_round([fut.wait() for fut in futures])
        self.metrics.last_bytes_sent += flag_bytes
        for p, view in laid_out:  # the estimate in the parameter's own layout, as autograd would lay its gradient
            if p.grad is None or p.grad.stride() != p.stride() or p.grad.dtype != p.dtype:
                p.grad = torch.empty_like(p)
            p.grad.copy_(view)
        if self._node is not None:
            self.metrics.record_node(sum(self._node.sent_bytes(w.sizes, w.flat.element_size()) for w in works))
        self.round.step += 1
        inner_step(self.inner)
        return loss

    def _works(self) -> list[Work]:
        """One work item per (parameter group, dtype, device): its parameters, checked (the items are kept while
        the parameter layout is unchanged: :class:`torchkit._wrapped.WorkCache`)."""
        works = self._layout.works(self.param_groups)
        if (
            self._node is not None
            and any(w.dtensors for w in works)
            and shard_count([p for w in works for p in w.params]) > 1
        ):
            raise ValueError("node_group is for replicated parameters; a sharded (FSDP2) model is node-aware already")
        return works

    def _split(self):
        return self._node

    def _round_works(self) -> list[Work]:
        works = self._works()
        if self._node is None:
            return works
        return [self._shard(w) for w in works]

    def _shard(self, w: Work, flat: Tensor | None = None) -> Work:
        """Work item ``w`` as this rank's round sees it, node-aware: the pieces of its parameters in its shard."""
        names, sizes = self._node.pieces(w.names, w.sizes)
        return dataclasses.replace(w, names=names, sizes=sizes, flat=flat)

    def _mesh(self) -> dict[str, int] | None:
        if self._node is None:
            return super()._mesh()
        return self._node.mesh(self.world_size)

    def _active_and_bad(self, works, grad_scale, found_inf) -> tuple[list[bool], bool, int]:
        """Which parameters have a gradient on some rank, whether any rank's gradient is non-finite, and the bytes
        this rank sent to agree on them (one small all_reduce between ranks, one read on the host)."""
        has, bads = [], []
        for w in works:
            w.flat = self._flat_grad(w, grad_scale, has)
            bads.append(nonfinite_flag(w.flat).float().reshape(1))
        agreement = self._agreement_of(self._layout.shards)
        dev = agreement.device
        if found_inf is not None:
            bads.append((found_inf.float() > 0).float().reshape(1))
        bad = torch.cat([b.to(dev) for b in bads]).amax().reshape(1) if bads else torch.zeros(1, device=dev)
        # each group's hyper-parameters, checked alike on every rank (options_payload)
        options = torch.tensor(options_payload(self.param_groups), dtype=torch.float64, device=dev)
        has_t = torch.tensor(has, dtype=torch.float64, device=dev)
        sent = torch.cat([bad.double(), has_t, options])
        flags = agree_max(agreement, sent).tolist()
        n = len(has)
        check_options(flags[1 + n :], self.param_groups, self.round.step)
        flag_bytes = agreement_bytes(agreement, sent)
        return [bool(f) for f in flags[1 : 1 + n]], bool(flags[0]), flag_bytes

    def _flat_grad(self, w: Work, grad_scale, has: list[bool]) -> Tensor:
        """The group's gradients in the persistent flat buffer (missing ones zero), unscaled when GradScaler
        asked us to; appends to ``has`` whether each parameter has a gradient. A gradient that is its view of the
        buffer already (``p.grad`` as the last step left it, accumulated into) is not copied."""
        buf, views = self._flat.get(w)
        grads = [p.grad for p in w.params]
        has += [g is not None for g in grads]
        if w.dtensors:
            grads = [local_of(g) for g in grads]
        zeros, copies_src, copies_dst = [], [], []
        for g, view in zip(grads, views):
            if g is view:
                continue
            if g is None:
                zeros.append(view)
            elif g._base is not buf or not is_view_of(g, view):  # only a view of the buffer can be its view
                copies_src.append(g)
                copies_dst.append(view)
        if zeros:
            torch._foreach_zero_(zeros)
        if copies_dst:
            torch._foreach_copy_(copies_dst, copies_src)
        if grad_scale is not None:  # GradScaler did not unscale: do it here, as its unscale_ would
            buf.mul_(grad_scale.double().reciprocal().float().to(buf.device))
        return buf

    def _round(self, w: Work, pick: list[int], laid_out: list):
        chosen = [i - w.first for i in pick]
        if self._node is None:
            fut = self._start(w, chosen, len(w.params))
        else:  # node-aware: the round runs on this rank's shard of the node's mean, then the node gathers it
            shard = self._shard(w, self._node.scatter_mean(w.flat, w.sizes))
            on = {w.names[i] for i in chosen}
            fut = self._start(shard, [j for j, n in enumerate(shard.names) if n in on], len(shard.names))
            fut = self._node.gathered(fut, shard.flat, w.flat, w.sizes)
        params, views, dtensors = w.params, self._flat.get(w)[1], w.dtensors
        if len(chosen) < len(params):
            params, views = [params[i] for i in chosen], [views[i] for i in chosen]
        for p, view in zip(params, views):  # the estimate, in the flat buffer, found in place
            if dtensors:
                p.grad = grad_like(p, view)
            elif _own_layout(p):  # channels_last and other dense layouts: copied into that layout after the round
                laid_out.append((p, view))
            elif p.grad is not view:
                p.grad = view
        return fut

    def _start(self, w: Work, chosen: list[int], total: int):
        """Start the round of ``w``'s flat vector over the parameters (or pieces) ``chosen`` of its ``total``."""
        if total == 0 or not chosen:  # node-aware: an empty shard, or none of its pieces has a gradient anywhere
            return _done(RoundResult(w.flat[:0], None, 0, 0, skipped=True))
        blk = self._block(w)
        if len(chosen) == total:
            return start_round(self.feedback, self._exchanger, blk, w.flat, self.round.step, self._options)
        return _partial_round(self, blk, w, chosen)  # some parameters have no gradient on any rank: the rest waits

    # --------------------------------------------------------------------------------------- multi-rank checks
    def _agree(self, works) -> None:
        """Every rank runs the same method with the same hyper-parameters over the same parameters, from the same
        shared feedback state, or every rank raises naming the difference (and what to do). Node-aware, the whole
        world holds the same model and settings, and the ranks that hold the same shard on every node the same
        shared state of it."""
        check_sharding([p for w in works for p in w.params], self.process_group)
        mine = {
            "method": self.feedback.config(),
            "optimizer": type(self.inner).__name__,
            "options": group_options(self.param_groups),
            "wire": str(self._options.wire_dtype),
            "layout": [[w.key[0], w.key[1], list(w.sizes)] for w in works],
            "parameters": [parameters_fingerprint(w.params) for w in works],
            "feedback": self.round.shared(),
        }
        what = "model and CompressedOptimizer"
        if self._node is not None:
            shared = {"feedback": mine.pop("feedback")}
            agree_on_nodes(mine, shared, between=self.process_group, node=self._node, what=what, hints=RESUME_HINTS)
        else:
            agree(mine, group=self.process_group, world_size=self.world_size, rank=self.rank, what=what,
                  hints=RESUME_HINTS, everyone=self._everyone())  # fmt: skip
        self._agreed = True

    def __getstate__(self) -> dict[str, Any]:
        if self.__dict__.get("_node") is not None:
            raise TypeError(
                "a node-aware CompressedOptimizer (node_group=...) cannot be pickled: its process groups do not "
                "pickle; checkpoint it with state_dict() or DCP"
            )
        out = super().__getstate__()
        out["_layout"] = WorkCache()  # built again from the unpickled parameters
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_node", None)  # pickled before node-aware compression existed
        self.__dict__.setdefault("_layout", WorkCache())  # pickled before the work items were kept

    def _share_found_inf(self, bad: bool) -> None:
        """GradScaler records found_inf per rank; make every rank record the agreed one (node-aware: every rank of
        the world, though the group between nodes may be this rank alone: one node)."""
        if self.world_size == 1 and self._node is None:
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
    # the envelope, its checks and the load are the front-end contract's (torchkit.frontend, torchkit._wrapped);
    # this front end adds its counter of skipped steps and the migration of format 1
    kind = "CompressedOptimizer"

    def _extras(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, **self._mesh_extra()}

    def _extra_problems(self, sd) -> list[str]:
        if "local_sgd" in sd:  # its error state is of pseudo-gradients, its anchors would be dropped
            raise ValueError("a LocalSGD state_dict, not a CompressedOptimizer's: load it into a LocalSGD")
        return self._mesh_problems(sd)

    def _check_extras(self, sd) -> int:
        return checkpoint_count("skipped_steps", sd.get("skipped_steps"))

    def _apply_extras(self, skipped_steps: int) -> None:
        self.skipped_steps = skipped_steps

    def _migrate_optimizer_state(self, sd):
        if "torchkit" not in sd and sd.get("format_version") == 1:
            return _migrated_v1(sd, self.param_groups, self.world_size)
        return sd

    # ---------------------------------------------------------------------------------------- other stacks


def _migrated_v1(sd: dict[str, Any], param_groups, world_size: int) -> dict[str, Any]:
    """Format 1 kept one flat vector per parameter group; split it per parameter."""
    params = {}
    for gi, saved in sd["groups"].items():
        names = [f"{int(gi)}.{pi}" for pi, p in enumerate(param_groups[int(gi)]["params"]) if p.requires_grad]
        if len(names) != len(saved["sizes"]):
            raise ValueError(
                f"parameter layout differs in group {gi}: saved sizes {list(saved['sizes'])}, "
                f"current {len(names)} parameters"
            )
        vecs = {**saved["state"], **({"server": saved["server"]} if world_size > 1 else {})}
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


def _partial_round(opt: CompressedOptimizer, blk, w: Work, chosen: list[int]):
    """A round over the parameters some rank has a gradient for; the others keep their state as it is."""
    names = [w.names[i] for i in chosen]
    sub = opt.round.sub_block(blk, names)
    grads = torch.cat([w.flat[slice(*blk.spans[n])] for n in names])
    fut = start_round(opt.feedback, opt._exchanger, sub, grads, opt.round.step, opt._options)

    def write_back(f):
        res = f.wait()
        opt.round.write_sub_block(blk, sub)
        off = 0
        for n in names:
            a, b = blk.spans[n]
            w.flat[a:b].copy_(grads[off : off + b - a])
            off += b - a
        return res

    return fut.then(write_back)


def _warn_if_ddp_communicates(opt: CompressedOptimizer) -> None:
    """On the first step: warn when a DistributedDataParallel model that communicates holds the optimizer's
    parameters (each step would then exchange gradients twice)."""
    if opt.world_size == 1:
        return
    ddp = _communicating_ddp({id(p) for g in opt.param_groups for p in g["params"]})
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


def _communicating_ddp(param_ids: set[int]) -> str | None:
    """A live DistributedDataParallel model holding one of these parameters that communicates gradients (any comm
    hook but ``noop_hook``), described; ``None`` if there is none. Scans the garbage collector's objects once."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
    from torch.nn.parallel import DistributedDataParallel

    for obj in live_instances(DistributedDataParallel):
        if not any(id(p) in param_ids for p in obj.module.parameters()):
            continue
        hooks = [h for h, _ in getattr(obj, "_comm_hooks", [])]
        if hooks and all(h is noop_hook for h in hooks):
            continue
        how = getattr(hooks[-1], "__name__", "a comm hook") if hooks else "all-reduce"
        return f"{type(obj.module).__name__}, {how}"
    return None


def _own_layout(p: Tensor) -> bool:
    """Whether autograd lays ``p``'s gradient out otherwise than the flat buffer's contiguous view: a dense
    parameter in another memory format (channels_last), whose gradient keeps its strides (torch's gradient layout
    contract; a contiguous one made torch warn, and summed in another order in ``clip_grad_norm_``)."""
    return not (p.is_contiguous() or p.is_complex()) and torch.empty_like(p, device="meta").stride() == p.stride()
