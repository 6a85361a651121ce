"""What the optimizer front ends share (:class:`~torchkit.CompressedOptimizer`, :class:`~torchkit.LocalSGD`).

:class:`WrappedOptimizer` builds the inner optimizer and lets it own ``param_groups``, ``state`` and ``defaults``
(``ZeroRedundancyOptimizer``'s convention, so LR schedulers drive it), and loads an optimizer state_dict once for
both: the inner optimizer's part, and the feedback state under ``"torchkit"`` through the front-end contract
(:class:`torchkit.frontend.FrontEnd`). :class:`Work` is one typed record of parameters that share a round,
:class:`WorkCache` keeps the records while the parameter layout is unchanged and :class:`FlatGrads` keeps each
one's persistent flat buffer with every parameter's view of it; the functions check
the constructor arguments with one wording and make hyper-parameters comparable between ranks. The front ends
themselves do not import each other.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import operator
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .feedback import Feedback
from .frontend import RESUME_HINTS, FrontEnd, make_exchanger, mesh_problems

__all__ = [
    "WrappedOptimizer",
    "Work",
    "collect_works",
    "check_grads",
    "WorkCache",
    "FlatGrads",
    "unscaled_and_bad",
    "local_of",
    "grad_like",
    "shard_count",
    "check_common_args",
    "needs_closure",
    "check_sharding",
    "run_eagerly",
    "real_dtype",
    "numel_real",
    "grad_view",
    "is_view_of",
    "group_options",
    "options_digest",
    "options_payload",
    "unique_params",
    "check_options",
    "parameters_fingerprint",
    "check_parameter_order",
    "check_inner_state",
]

log = logging.getLogger("torchkit")


def _inner_property(name: str) -> property:
    def get(self):
        return getattr(self.inner, name) if self.__dict__.get("_ready") else self.__dict__.get("_pre_" + name)

    def set_(self, value):
        if self.__dict__.get("_ready"):
            setattr(self.inner, name, value)
        else:  # torch.optim.Optimizer.__init__ assigns placeholders before the inner optimizer takes over
            self.__dict__["_pre_" + name] = value

    return property(get, set_)


class WrappedOptimizer(torch.optim.Optimizer, FrontEnd):
    """A torch optimizer around ``self.inner``, which owns ``param_groups``, ``state`` and ``defaults``.

    Subclasses call :meth:`_wrap` first in ``__init__``, and keep ``process_group`` and ``_exchanger``
    (rebuilt on unpickling: a process group does not pickle). Their state_dict is ``torch.optim``'s layout (the
    inner optimizer's ``state`` and ``param_groups``) with this rank's feedback state dict under ``"torchkit"``.
    """

    restart_hint = "opt.load_state_dict(torchkit.checkpoint.without_feedback(state_dict)) on every rank"
    #: whether the inner optimizer's state differs between ranks (LocalSGD's local steps): the feedback state dict
    #: then holds it, and a state_dict loaded after this rank's own was restored does not replace it
    inner_state_per_rank = False
    #: what a plain optimizer state_dict restarts, in the warning that says so
    plain_load_restarts = "the feedback method starts again at its step 0"

    def _wrap(self, optimizer_class: type[torch.optim.Optimizer], params, defaults: dict[str, Any]) -> None:
        self.__dict__["_ready"] = False
        self.inner = optimizer_class(params, **defaults)
        torch.optim.Optimizer.__init__(self, self.inner.param_groups, self.inner.defaults)
        self.__dict__["_ready"] = True  # from here on param_groups, state and defaults are the inner optimizer's
        self._flat = FlatGrads()

    param_groups = _inner_property("param_groups")
    state = _inner_property("state")
    defaults = _inner_property("defaults")

    @property
    def world_size(self) -> int:
        return self._exchanger.n_workers

    @property
    def rank(self) -> int:
        return self._exchanger.first_worker

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        try:
            index = len(self.param_groups)
        except AttributeError:  # (while torch.optim builds the groups, before the inner optimizer exists)
            index = 0
        param_group = unique_params(param_group, index)
        if not self.__dict__.get("_ready"):
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s layout (the inner optimizer's ``state`` and ``param_groups``) plus this rank's feedback
        state dict under ``"torchkit"`` (:meth:`feedback_state_dict`).

        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps ``state`` and ``param_groups``
        only; save the feedback state with DCP through :meth:`feedback_stateful`. The hooks registered on this
        optimizer (``register_state_dict_pre_hook``, ``..._post_hook``) run as torch.optim runs them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.inner.state_dict()
        sd["torchkit"] = self._with_frozen_names(self.feedback_state_dict())
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            sd = _or(post_hook(self, sd), sd)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class; everything is checked before anything changes.

        A plain optimizer's state_dict (``set_optimizer_state_dict`` hands over one) loads with a warning: the
        feedback method restarts (:func:`torchkit.checkpoint.without_feedback` says that is meant, and does not
        warn). Feedback state of another rank or world size raises ``ValueError`` saying how to keep per-rank
        state. When this rank's feedback state was just restored from its own side file or DCP entry
        (:mod:`torchkit.checkpoint`) and no step has run since, that state is kept and only the inner optimizer's
        state is loaded. The load hooks registered on this optimizer run as torch.optim runs them (a pre hook may
        return a replacement state_dict)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)  # shallow copy, as torch.optim's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = _or(pre_hook(self, state_dict), state_dict)
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = self._migrate_optimizer_state(state_dict)
        inner = {k: v for k, v in state_dict.items() if k != "torchkit"}
        if not {"state", "param_groups"} <= set(inner):
            raise ValueError(f"not a {self.kind} or torch.optim state_dict (no 'state'/'param_groups')")
        check_inner_state(self.inner, inner)
        check_groups("inner", self.inner, inner)  # what torch's load_state_dict refuses, refused before any change
        if self.round.restored():  # the state restored from this rank's own checkpoint stays
            if not self.inner_state_per_rank:
                self.inner.load_state_dict(inner)
            self._kept_restored_state()
            log.info("%s: kept the feedback state restored from this rank's per-rank checkpoint", self.kind)
            return
        if state_dict.get("torchkit") is None:
            self.inner.load_state_dict(inner)
            self._restart()
            if "torchkit" in state_dict:  # torchkit.checkpoint.without_feedback: a restart asked for
                log.info("%s: feedback method restarted at its step 0 (without_feedback)", self.kind)
                return
            warnings.warn(
                f"loaded a plain optimizer state_dict: it holds no error-feedback state, so {self.plain_load_restarts} "
                "(torch.distributed.checkpoint's optimizer state_dict leaves it out: load it with "
                "opt.feedback_stateful(); see torchkit.checkpoint)",
                stacklevel=3,
            )
            return
        plan = self.check_feedback_state_dict(state_dict["torchkit"])
        plan.apply()  # its extras may still refuse (LocalSGD's outer optimizer), before anything changed
        self.inner.load_state_dict(inner)  # checked above: cannot refuse

    def _init_inner_state_for_dcp(self):
        """``get_optimizer_state_dict`` steps a fresh optimizer on zero gradients with lr 0 to create its state:
        that step initialises the inner optimizer only; no round runs and no state of this front end changes."""
        return inner_step(self.inner)

    optional_keys = ("mesh",)

    @property
    def _agreement(self):
        """Who agrees on a step's flags (non-finite input, hyper-parameters): the exchange group, or for a sharded
        model every rank, since FSDP's reduce-scatter carries one rank's NaN into one shard, which one replicate group
        alone would see."""
        return self._agreement_of(shard_count([p for g in self.param_groups for p in g["params"]]))

    def _agreement_of(self, shards: int):
        """:attr:`_agreement` for parameters shared by ``shards`` ranks each (known already: no second scan)."""
        if shards == 1 and self._split() is None:
            return self._exchanger
        if self.__dict__.get("_world") is None:  # the default group
            from .comm import DistExchanger

            self.__dict__["_world"] = DistExchanger(None)
        return self.__dict__["_world"]

    def _split(self):
        """The :class:`torchkit.node.NodeShards` of a node-aware layout (every rank holds the full model, each
        compresses one shard of its node's mean gradient), else None."""
        return None

    def _everyone(self):
        """For :func:`torchkit.frontend.agree`: the exchanger beyond the exchange group that must hear of a
        difference (a sharded model's), else None."""
        agreement = self._agreement
        return None if agreement is self._exchanger else agreement

    def _mesh(self) -> dict[str, int] | None:
        """Replicas x shards of a sharded model (FSDP2 inside each replica), and where this rank sits in it (its
        replica and shard: a mesh of the same shape that maps the ranks otherwise holds other shards), else None."""
        params = [p for g in self.param_groups for p in g["params"]]
        shards = shard_count(params)
        if shards == 1:
            return None
        return {"replicas": self.world_size, "shards": shards, "replica": self.rank, "shard": shard_index(params)}

    def _mesh_extra(self) -> dict[str, Any]:
        mesh = self._mesh()
        return {"mesh": mesh} if mesh else {}

    def _mesh_problems(self, sd) -> list[str]:
        return mesh_problems(sd.get("mesh"), self._mesh())

    def _kept_restored_state(self) -> None:
        """A state_dict came after this rank's own state was restored (a framework's rank-0 checkpoint)."""

    def _restart(self) -> None:
        """A plain optimizer state_dict was loaded: the feedback method starts again at its step 0."""
        self.round.reset()
        self._agreed = False

    def _migrate_optimizer_state(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """An older format's state_dict in the current one."""
        return state_dict

    def _feedback_layout(self) -> dict[Any, tuple[int, torch.dtype, Any]]:
        return {n: (s, self.feedback.state_dtype(w.dtype), w.device) for w in self._round_works() for n, s in w.sized()}

    def _frozen_layout(self) -> dict[Any, tuple[int, torch.dtype, Any]]:
        if self._split() is not None:  # node-aware: a parameter's piece follows the trainable ones' layout; not kept
            return {}
        return {
            f"{gi}.{pi}": (numel_real(local_of(p)), self.feedback.state_dtype(real_dtype(local_of(p).dtype)), p.device)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if not p.requires_grad
        }

    def _placed(self) -> None:
        for w in self._round_works():  # place the loaded state now, so that it can be inspected before the next step
            self._block(w)

    def _round_works(self) -> list[Work]:
        """The work items as the rounds see them: :meth:`_works`, or this rank's shard of each (node-aware)."""
        return self._works()

    def _block(self, w: Work):
        """The round's block of work item ``w``."""
        return self.round.block(
            w.key,
            w.names,
            w.sizes,
            dtype=self.feedback.state_dtype(w.dtype),
            device=w.device,
            with_server=self._with_server(),
        )

    def _works(self) -> list[Work]:
        raise NotImplementedError

    def __repr__(self) -> str:
        """torch's listing of the parameter groups, headed by the inner optimizer and the method (torch's own
        header named only this class)."""
        body = torch.optim.Optimizer.__repr__(self)
        inner, feedback = self.__dict__.get("inner"), self.__dict__.get("feedback")
        if inner is None:  # in the middle of construction
            return body
        head = f"{type(self).__name__}({type(inner).__name__}, feedback={feedback!r})"
        return head + body[len(type(self).__name__) :]

    def feedback_state(self, group: int = 0) -> dict[str, Tensor]:
        """This rank's flat feedback state of one parameter group (views, for inspection)."""
        for key, blk in self.round.blocks.items():
            if key[0] == group:
                return dict(blk.state)
        return {}

    def __getstate__(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("process_group", None)
        out.pop("_exchanger", None)
        out.pop("_world", None)
        out["_flat"] = FlatGrads()  # views of the flat buffers are rebuilt, not pickled apart from them
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._exchanger = make_exchanger(None)  # the default group if initialised, else a single worker
        self._agreed = False
        self.__dict__.setdefault("_flat", FlatGrads())


@dataclass
class Work:
    """Parameters of one parameter group, dtype and device: they go through one round together, in one flat buffer.

    ``like`` are the tensors the buffer's views are shaped as (the parameters, or LocalSGD's anchors; a ``DTensor``'s
    local shard); ``dtype`` is the buffer's (real) dtype; ``first`` is the index of the first parameter among all
    of the wrapper's."""

    key: tuple
    names: tuple
    params: list
    like: list
    sizes: tuple
    dtype: torch.dtype
    device: torch.device
    first: int
    dtensors: bool = False  # whether some of its parameters are DTensors (gradients then go through local_of)
    flat: Tensor | None = None  # this step's flat gradient (or pseudo-gradient), once gathered

    def sized(self):
        return zip(self.names, self.sizes)

    def grads(self) -> list[Tensor]:
        """The gradients its parameters have (complex ones viewed as real)."""
        return [
            torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad for p in self.params if p.grad is not None
        ]

    @property
    def ids(self) -> range:
        return range(self.first, self.first + len(self.params))


def _dtensor_type():
    """``DTensor`` when ``torch.distributed.tensor`` has been imported (no DTensor can exist before), else None."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def local_of(t: Tensor | None) -> Tensor | None:
    """A ``DTensor``'s local shard (FSDP2's sharded parameters and gradients), else ``t`` itself."""
    dtensor = _dtensor_type()
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


def grad_like(p: Tensor, view: Tensor) -> Tensor:
    """``view`` as ``p``'s gradient: itself, or for a ``DTensor`` parameter a ``DTensor`` whose local shard it is."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return view
    return dtensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def shard_count(params) -> int:
    """How many ranks share each parameter (FSDP2's shard group size; 1 for plain tensors)."""
    dtensor = _dtensor_type()
    counts = {p.device_mesh.size() for p in params if dtensor is not None and isinstance(p, dtensor)}
    if len(counts) > 1:
        raise ValueError(f"parameters are sharded over meshes of different sizes {sorted(counts)}")
    if counts and any(not isinstance(p, dtensor) for p in params):
        raise TypeError("some parameters are DTensors (fully_shard) and others are not: shard the whole model")
    return counts.pop() if counts else 1


def check_sharding(params, group) -> None:
    """Refuse an exchange ``group`` that holds another shard of a sharded (FSDP2) parameter: the round would
    average different shards. ``fully_shard`` over the whole group (plain FSDP, default group) failed later, as
    "ranks are configured differently: ... parameters" with advice to build the model alike, which it was."""
    dtensor = _dtensor_type()
    p = next((p for p in params if dtensor is not None and isinstance(p, dtensor)), None)
    if p is None:
        return
    mine = set(dist.get_process_group_ranks(group)) if group is not None else set(range(dist.get_world_size()))
    for dim, placement in enumerate(p.placements):
        if placement.is_shard() and len(mine & set(dist.get_process_group_ranks(p.device_mesh.get_group(dim)))) > 1:
            raise ValueError(
                "process_group holds ranks with other shards of the same parameters (fully_shard shards them over "
                "it): the round would average different shards. Compress between the replicas of each shard "
                "(HSDP: fully_shard over the shard mesh, process_group the replicate group), or for plain FSDP "
                "compress its reduce-scatter: torchkit.fsdp.compress_reduce_scatter(model, feedback)"
            )


def shard_index(params) -> int:
    """This rank's place in its parameters' shard group (FSDP2's mesh)."""
    dtensor = _dtensor_type()
    return next(p.device_mesh.get_local_rank() for p in params if isinstance(p, dtensor))


def collect_works(param_groups, like_of=None) -> list[Work]:
    """One :class:`Work` per (parameter group, dtype, device) of the parameters that train, named
    ``"<group>.<index>"``. ``like_of(group_index)`` gives the tensors the flat buffer is shaped as (default: the
    parameters). Gradients are checked first (:func:`check_grads`)."""
    check_grads(param_groups)
    return _works_of(param_groups, like_of)


def check_grads(param_groups) -> None:
    """The gradients of the parameters that train: sparse ones raise ``TypeError``, a wrong shape ``ValueError``
    (the first in parameter order)."""
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None or not p.requires_grad:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise TypeError(f"sparse gradients are not supported (parameter {gi}.{pi})")
            if g.shape != p.shape:
                raise ValueError(f"parameter {gi}.{pi} has a gradient of shape {tuple(g.shape)}")


def _works_of(param_groups, like_of=None) -> list[Work]:
    """:func:`collect_works` without the gradient checks: what depends on the parameter layout only."""
    works, first = [], 0
    dtensor = _dtensor_type()
    for gi, group in enumerate(param_groups):
        likes = group["params"] if like_of is None else like_of(gi)
        by_kind: dict[tuple, list] = {}
        for pi, (p, like) in enumerate(zip(group["params"], likes)):
            if p.requires_grad and p.numel():  # (an empty parameter has nothing to send; a DTensor's: its global size)
                by_kind.setdefault((p.dtype, p.device), []).append((f"{gi}.{pi}", p, like))
        for (dtype, device), named in by_kind.items():
            works.append(
                Work(
                    key=(gi, str(dtype), str(device)),
                    names=tuple(n for n, _, _ in named),
                    params=[p for _, p, _ in named],
                    like=[t for _, _, t in named],
                    sizes=tuple(numel_real(local_of(p)) for _, p, _ in named),
                    dtype=real_dtype(local_of(named[0][2]).dtype),
                    device=device,
                    first=first,
                    dtensors=dtensor is not None and any(isinstance(p, dtensor) for _, p, _ in named),
                )
            )
            first += len(named)
    return works


_PLACE = operator.attrgetter("requires_grad", "shape", "dtype", "device")
_GRAD = operator.attrgetter("grad")


class WorkCache:
    """:func:`collect_works` over the parameters themselves, the work items built once per parameter layout.

    The layout is what the items depend on: each group's parameters (their identities, in order) and each one's
    ``requires_grad``, shape, dtype and device (a ``DTensor``'s local shard's too). Each call compares it with the
    one the items were built for, so whatever changes it (``add_param_group``, a group's ``params`` replaced,
    ``p.data = ...``, a parameter frozen) builds them again; hyper-parameters and state (a loaded state_dict) are
    not part of it. The gradients are checked on every call."""

    def __init__(self):
        self._key: tuple | None = None
        self._held: tuple = ()  # the key's parameters, kept alive so that no id in the key is reused
        self._works: list[Work] = []
        self._shapes: list[tuple] = []
        self._dtensors = False
        self._shards: int | None = None

    def works(self, param_groups, like_of=None, accept=None) -> list[Work]:
        """:func:`collect_works` (``param_groups``, ``like_of``): fresh :class:`Work` records (``flat`` unset) of the
        layout (``like_of``'s tensors must change only with it: LocalSGD's anchors, one per parameter). ``accept``:
        a check of a new layout, run when the items are built; one that raises leaves the layout unaccepted, so the
        next call checks it again."""
        key = self._key_of(param_groups, self._dtensors)
        if key != self._key:
            check_grads(param_groups)
            self._key = None
            if accept is not None:
                accept()
            self._works = _works_of(param_groups, like_of)
            self._shapes = [tuple(p.shape for p in w.params) for w in self._works]
            self._dtensors = any(w.dtensors for w in self._works)
            self._shards = None
            self._held = tuple(tuple(g["params"]) for g in param_groups)
            self._key = self._key_of(param_groups, self._dtensors)
        else:
            strided = torch.strided
            for w, shapes in zip(self._works, self._shapes):
                for g, shape in zip(map(_GRAD, w.params), shapes):
                    if g is not None and (g.layout is not strided or g.shape != shape):
                        check_grads(param_groups)  # raises, naming the first in parameter order
        return [dataclasses.replace(w) for w in self._works]

    @property
    def shards(self) -> int:
        """:func:`shard_count` of the parameters of the last :meth:`works` call."""
        if self._shards is None:
            self._shards = shard_count([p for group in self._held for p in group])
        return self._shards

    @staticmethod
    def _key_of(param_groups, dtensors: bool) -> tuple:
        key = []
        for g in param_groups:
            ps = g["params"]
            key += [tuple(map(id, ps)), tuple(map(_PLACE, ps))]
            if dtensors:
                key.append(tuple(_PLACE(local_of(p)) for p in ps))
        return tuple(key)


def unscaled_and_bad(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
    """Unscale the gradients in place when GradScaler asked the front end to (as its ``unscale_`` would); whether
    this rank's gradient is non-finite (GradScaler's ``found_inf`` when it has one): one host read per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().float()
        for device, gs in by_device.items():
            torch._foreach_mul_(gs, inv.to(device))
    if found_inf is not None:
        return bool(found_inf.item() > 0)
    by_kind: dict[tuple, list[Tensor]] = {}
    for g in grads:
        g = local_of(g)  # this rank's shard: on a DTensor the max would be a collective (and MAX may drop a NaN)
        if g.is_complex():
            g = torch.view_as_real(g)  # each part's magnitude: a finite value's modulus may overflow
        if g.numel():  # an empty one has no largest magnitude, and nothing to check
            by_kind.setdefault((g.device, g.dtype), []).append(g)
    # each gradient's largest magnitude (NaN where it holds one; no overflow, unlike the 2-norm): one multi-tensor
    # op per device and dtype, where a check per tensor cost two launches each (LocalSGD's local steps: 7-13x a
    # plain SGD step at 1000 small tensors)
    flags = [torch.stack(torch._foreach_norm(gs, float("inf"))).isfinite().all().cpu() for gs in by_kind.values()]
    return not all(bool(f) for f in flags)


class FlatGrads:
    """A persistent flat buffer per work item (padded as the fused kernels want it), with each tensor's view of it.

    The buffer is built once per layout (names and sizes) and reused every step; ``p.grad`` can then view it."""

    def __init__(self):
        self._bufs: dict[Any, tuple[tuple, Tensor, list[Tensor]]] = {}

    def get(self, w: Work) -> tuple[Tensor, list[Tensor]]:
        ident = (w.names, w.sizes, w.dtype, str(w.device))
        entry = self._bufs.get(w.key)
        if entry is None or entry[0] != ident:
            buf = ops.padded_zeros(sum(w.sizes), dtype=w.dtype, device=w.device)  # the kernels own the tail
            views, a = [], 0
            for n, t in zip(w.sizes, w.like):
                views.append(grad_view(buf, a, a + n, local_of(t)))
                a += n
            entry = self._bufs[w.key] = (ident, buf, views)
        return entry[1], entry[2]


def called_from_dcp_init() -> bool:
    """Whether ``torch.distributed.checkpoint.state_dict._init_optim_state`` is calling :meth:`step`."""
    frame = sys._getframe(2)  # the caller of step()
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


def check_groups(label: str, opt: torch.optim.Optimizer, sd: Any) -> None:
    """What ``Optimizer.load_state_dict`` checks, checked before anything is loaded."""
    if not isinstance(sd, Mapping) or not isinstance(sd.get("param_groups"), list) or "state" not in sd:
        raise ValueError(f"the {label} optimizer's state_dict lacks 'state'/'param_groups'")
    saved = [len(g.get("params", ())) for g in sd["param_groups"]]
    mine = [len(g["params"]) for g in opt.param_groups]
    if saved != mine:
        raise ValueError(f"the {label} optimizer's saved parameter groups have sizes {saved}, this one {mine}")


def check_common_args(
    cls_name: str, feedback: Any, optimizer_class: Any, nonfinite: Any, grad_scaler: Any = None
) -> None:
    """The constructor checks both front ends make, each error naming its argument."""
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback must be a torchkit feedback method (EF21, ...), got {type(feedback).__name__}")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if needs_closure(optimizer_class):
        raise TypeError(
            f"{optimizer_class.__name__}.step needs a closure that re-evaluates the loss several times per step; "
            f"{cls_name} runs one communication round per step and does not support it"
        )
    if issubclass(optimizer_class, torch.optim.SparseAdam):
        raise TypeError(
            f"optimizer_class SparseAdam steps on sparse gradients, which {cls_name} does not take (its estimate is "
            "dense); use Adam or AdamW, or keep the sparse parameters out of the compressed ones"
        )
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


def needs_closure(cls: type[torch.optim.Optimizer]) -> bool:
    param = inspect.signature(cls.step).parameters.get("closure")
    return param is not None and param.default is inspect.Parameter.empty


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}.get(
        dtype, dtype
    )


def numel_real(p: Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)


def grad_view(buf: Tensor, a: int, b: int, p: Tensor) -> Tensor:
    """The slice of the flat buffer that is ``p``'s gradient (complex parameters: viewed as complex)."""
    piece = buf[a:b]
    if p.is_complex():
        return torch.view_as_complex(piece.view(*p.shape, 2))
    return piece.view_as(p)


def is_view_of(g: Tensor, view: Tensor) -> bool:
    return g.data_ptr() == view.data_ptr() and g.shape == view.shape and g.stride() == view.stride()


_NOT_OPTIONS = ("params", "param_names")


def _plain(value: Any) -> Any:
    """A hyper-parameter as data that compares equal across processes (a tensor by its values, an object by type)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__qualname__  # a callable or other object: its address would differ on every rank


def group_options(param_groups) -> list[dict[str, Any]]:
    """Each parameter group's hyper-parameters (lr, momentum, betas, ...) and parameter names where the optimizer
    has them, as plain data: what every rank must set alike."""
    out = []
    for g in param_groups:
        opts = {k: _plain(v) for k, v in sorted(g.items()) if k not in _NOT_OPTIONS}
        if "param_names" in g:
            opts["param_names"] = list(g["param_names"])
        out.append(opts)
    return out


def _numbers(value: Any):
    if isinstance(value, bool):
        yield float(value)
    elif isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def options_digest(param_groups) -> list[float]:
    """One number per parameter group summing its numeric hyper-parameters with distinct weights: ranks that
    digest alike set them alike (what a scheduler changes every step), at the cost of two floats per group in a
    collective the step runs anyway."""
    out = []
    for g in group_options(param_groups):
        total, w = 0.0, 1.0
        for key in sorted(g):
            for x in _numbers(g[key]):
                total += w * (math.copysign(1e300, x) if math.isinf(x) else x)  # inf: "no limit", a value ranks share
                w *= 1.6180339887
        out.append(total)
    return out


def unique_params(param_group: dict[str, Any], index: int) -> dict[str, Any]:
    """``param_group`` with its parameters as a list, refused when it lists one twice: torch only warns, and the
    parameter would be stepped twice, its feedback state kept twice and its bytes sent twice."""
    params = param_group.get("params") if isinstance(param_group, Mapping) else None
    if params is None or isinstance(params, (set, Tensor)):
        return param_group  # torch's own checks name these
    params = list(params)
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"parameter group {index} lists a parameter twice (positions {seen[id(p)]} and {i})")
        seen[id(p)] = i
    return {**param_group, "params": params}


def options_payload(param_groups) -> list[float]:
    """What a MAX all-reduce over the ranks turns into a check of the groups' hyper-parameters
    (:func:`check_options`): each group's digest, then their negations (after MAX, ``max(d) == -max(-d)`` on every
    rank iff all ranks agree). A group with a NaN hyper-parameter (NaN compares unequal even to itself) sends +inf
    in both places, which no finite digest reaches in the second; an infinite one (``inf`` for "no limit") is a
    value like any other."""
    digest = [x if math.isfinite(x) else None for x in options_digest(param_groups)]
    return [math.inf if x is None else x for x in digest] + [math.inf if x is None else -x for x in digest]


def check_options(
    agreed: list[float], param_groups, step: int, what: str = "parameter group", unchanged: str = "nothing was changed"
) -> None:
    """``ValueError`` on every rank where, after the MAX of every rank's :func:`options_payload`, a group has a NaN
    hyper-parameter on some rank, or the ranks set a group's differently."""
    n = len(agreed) // 2
    hi, lo = agreed[:n], [-x for x in agreed[n:]]
    for g in range(n):
        if lo[g] == -math.inf:
            mine = [k for k, v in group_options(param_groups)[g].items() if any(map(math.isnan, _numbers(v)))]
            where = f"here: {', '.join(mine)}" if mine else "on another rank"
            raise ValueError(f"{what} {g} has a hyper-parameter that is NaN ({where}) at step {step}; {unchanged}")
    for g in range(n):
        if hi[g] != lo[g]:
            raise ValueError(
                f"ranks are configured differently: {what} {g}'s hyper-parameters (lr, momentum, ...) differ "
                f"between ranks at step {step}; {unchanged}. {RESUME_HINTS['options']}"
            )


def check_parameter_order(params, group, world_size: int) -> None:
    """``ValueError`` on every rank when a rank lists the same parameters as rank 0 in another order (the same
    fingerprints, :func:`parameters_fingerprint`, at other positions). LocalSGD lets ranks start from different
    values (it takes rank 0's as the anchor, position by position), so it cannot ask for equal fingerprints; but
    rank 0's values in another rank's other parameter (two layers of one shape) would mix two layers for good."""
    mine = parameters_fingerprint(params)
    theirs: list = [None] * world_size
    dist.all_gather_object(theirs, mine, group=group)
    first = theirs[0]
    for r, other in enumerate(theirs):
        if other != first and sorted(map(repr, other)) == sorted(map(repr, first)):
            moved = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
            raise ValueError(
                f"ranks are configured differently: rank {r} lists the same parameters as rank 0 in another order "
                f"(first at position {moved}); every rank must pass its parameters in the same order"
            )


def parameters_fingerprint(params) -> list[list]:
    """Each parameter's shape and the float64 sum and sum of squares of its values: replicas start alike and step
    alike, so a difference means another model, another parameter order or another initialisation on some rank."""
    out = []
    for p in params:
        p = local_of(p)  # a shard: the ranks that compare it hold the same one
        x = p.detach().reshape(-1)
        x = torch.view_as_real(x) if x.is_complex() else x
        x = x.to(torch.float64)
        out.append([list(p.shape), float(x.sum()), float(x.square().sum())])
    return out


#: per-parameter buffers of torch.optim's optimizers that have the parameter's shape (Adafactor's row and column
#: factors do not, and are not listed)
_PARAMETER_SHAPED = (
    "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg", "acc_delta", "sum",
    "exp_inf", "ax", "prev", "step_size", "momentum",
)  # fmt: skip


def check_inner_state(inner: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """A ``torch.optim`` state_dict whose per-parameter buffers have another parameter's shape (another model, or
    parameters in another order) raises ``ValueError`` naming the first, before anything is loaded; torch's own
    ``load_state_dict`` takes it and the next step fails far from the cause."""
    params = [p for g in inner.param_groups for p in g["params"]]
    ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
    for i, pid in enumerate(ids):
        entry = state_dict.get("state", {}).get(pid)
        if i >= len(params) or not isinstance(entry, dict):
            continue
        for key in _PARAMETER_SHAPED:
            t = entry.get(key)
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape != params[i].shape:
                raise ValueError(
                    f"optimizer state {key!r} of parameter {i} has shape {tuple(t.shape)}, the parameter "
                    f"{tuple(params[i].shape)}: this state_dict belongs to another model or parameter order; "
                    "nothing was loaded"
                )


def _or(result, default):
    """A hook's result, or ``default`` where it returned None (torch.optim's rule for state_dict hooks)."""
    return default if result is None else result


def inner_step(inner: torch.optim.Optimizer):
    """``inner.step()`` inside the wrapper's own step, without torch.optim's global step hooks
    (``register_optimizer_step_pre_hook``/``..._post_hook``), which the wrapper's step has run already: a hook
    counting steps would count each one twice. Where the inner optimizer has step hooks or a patched ``step`` of its
    own (someone set them on it), its step runs as it is."""
    step = type(inner).step
    raw = getattr(step, "__wrapped__", None)
    if (
        raw is None
        or not getattr(step, "hooked", False)
        or "step" in vars(inner)
        or inner._optimizer_step_pre_hooks
        or inner._optimizer_step_post_hooks
    ):
        return inner.step()
    return raw(inner)


def run_eagerly(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, run eagerly where ``torch.compile`` traces the caller (a front end's step: host-side checks,
    agreements and collectives Dynamo cannot trace). The guard is made only then: decorating with
    ``torch.compiler.disable`` at import would import Dynamo in every process, and with Dynamo loaded Triton's
    interpreter no longer patched ``tl.zeros`` in the kernels it runs on CPU tensors."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(fn)(*args)
    return fn(*args)
