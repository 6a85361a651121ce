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


def agree(mine: dict[str, Any], *, group, world_size: int, rank: int, what: str) -> None:
    """Every rank has the same configuration ``mine``, or every rank raises ``ValueError`` naming the first
    difference. ``what`` names what each rank must build alike."""
    theirs = [None] * world_size
    dist.all_gather_object(theirs, mine, group=group)
    for r, other in enumerate(theirs):
        diff = [k for k in mine if other.get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"ranks are configured differently: rank {r} has {diff[0]} {other[diff[0]]!r}, rank "
                f"{rank} has {mine[diff[0]]!r}; every rank must build the same {what}"
            )
