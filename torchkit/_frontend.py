"""What the optimizer front ends share (:class:`~torchkit.CompressedOptimizer`, :class:`~torchkit.LocalSGD`).

:class:`WrappedOptimizer` builds the inner optimizer and lets it own ``param_groups``, ``state`` and ``defaults``
(``ZeroRedundancyOptimizer``'s convention, so LR schedulers drive it); the functions check the constructor
arguments with one wording, pick the exchanger for a process group, view flat buffers as parameters' gradients,
and make the ranks agree on their configuration. The front ends themselves do not import each other.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import DistExchanger, LocalExchanger
from .feedback import Feedback

__all__ = [
    "WrappedOptimizer",
    "check_common_args",
    "make_exchanger",
    "needs_closure",
    "real_dtype",
    "numel_real",
    "grad_view",
    "is_view_of",
    "collective_device",
    "agree",
    "group_options",
    "options_digest",
    "parameters_fingerprint",
    "check_inner_state",
]


def _inner_property(name: str) -> property:
    def get(self):
        return getattr(self.inner, name) if self.__dict__.get("_ready") else self.__dict__.get("_pre_" + name)

    def set_(self, value):
        if self.__dict__.get("_ready"):
            setattr(self.inner, name, value)
        else:  # torch.optim.Optimizer.__init__ assigns placeholders before the inner optimizer takes over
            self.__dict__["_pre_" + name] = value

    return property(get, set_)


class WrappedOptimizer(torch.optim.Optimizer):
    """A torch optimizer around ``self.inner``, which owns ``param_groups``, ``state`` and ``defaults``.

    Subclasses call :meth:`_wrap` first in ``__init__``, and keep ``process_group`` and ``_exchanger``
    (rebuilt on unpickling: a process group does not pickle).
    """

    def _wrap(self, optimizer_class: type[torch.optim.Optimizer], params, defaults: dict[str, Any]) -> None:
        self.__dict__["_ready"] = False
        self.inner = optimizer_class(params, **defaults)
        torch.optim.Optimizer.__init__(self, self.inner.param_groups, self.inner.defaults)
        self.__dict__["_ready"] = True  # from here on param_groups, state and defaults are the inner optimizer's

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
        if not self.__dict__.get("_ready"):
            return super().add_param_group(param_group)
        self.inner.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("process_group", None)
        out.pop("_exchanger", None)
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._exchanger = make_exchanger(None)  # the default group if initialised, else a single worker
        self._agreed = False


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
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


def make_exchanger(group):
    if group is not None or (dist.is_available() and dist.is_initialized()):
        if dist.get_world_size(group) > 1:
            return DistExchanger(group)
    return LocalExchanger(1)


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


def collective_device() -> torch.device:
    """Where a small flag tensor must live for the default group's collectives."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(mine: dict[str, Any], *, group, world_size: int, rank: int, what: str, hints: dict[str, str] | None = None):
    """Every rank has the same configuration ``mine``, or every rank raises ``ValueError`` naming the first
    difference. ``what`` names what each rank must build alike; ``hints`` add advice for some keys."""
    theirs = [None] * world_size
    dist.all_gather_object(theirs, mine, group=group)
    for r, other in enumerate(theirs):
        diff = [k for k in mine if other.get(k) != mine[k]]
        if diff:
            key = diff[0]
            where, a, b = _first_difference(key, other.get(key), mine[key])
            hint = (hints or {}).get(key)
            raise ValueError(
                f"ranks are configured differently: rank {r} has {where} {a!r}, rank {rank} has {b!r}; every rank must "
                f"build the same {what}" + (f". {hint}" if hint else "")
            )


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
                total += w * x
                w *= 1.6180339887
        out.append(total)
    return out


def parameters_fingerprint(params) -> list[list]:
    """Each parameter's shape and the float64 sum and sum of squares of its values: replicas start alike and step
    alike, so a difference means another model, another parameter order or another initialisation on some rank."""
    out = []
    for p in params:
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
