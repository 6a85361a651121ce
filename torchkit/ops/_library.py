"""The fused ops as ``torch.library`` operators (``torch.ops.torchkit.*``), with fake implementations.

Every public op of :mod:`torchkit.ops` checks its arguments and picks an implementation in Python, then calls one
of these with the implementation's name: one dispatcher call per launch, which ``torch.compile`` traces as one node
(no graph break; the fake implementation gives it the output shapes, and the mutated arguments are functionalized
as for any custom op), ``torch.library.opcheck`` tests, and a ``TorchDispatchMode`` or the profiler sees as
``torchkit::<op>``. The kernels are registered for every backend (``CompositeExplicitAutograd``; not through
``torch.library.custom_op``, whose Python wrappers cost about 45 us a call on the 2-core machine against about
6 us here); which implementation runs (reference, C++ CPU kernel, CUDA C++ kernels, Triton) is the ``impl`` argument.
None has an autograd formula: they run on gradients, under ``no_grad``.

Values come back in the state dtype (``topk``: the input's), indices as :func:`~torchkit.ops.index_dtype` of the
vector's length; a ``[rows, d]`` input gives ``[rows, k]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._reference import index_dtype

__all__ = [
    "SCHEMAS",
    "topk",
    "ef14_step_",
    "ef21_step_",
    "econtrol_step_",
    "accumulate_",
    "wire_round",
    "segments_step_",
]

SCHEMAS = {
    "topk": "topk(Tensor x, int k, str impl) -> (Tensor, Tensor)",
    "ef14_step_": "ef14_step_(Tensor grad, Tensor(a!) error, int k, bool approx, str impl) -> (Tensor, Tensor)",
    "ef21_step_": "ef21_step_(Tensor grad, Tensor(a!) estimate, int k, bool approx, str impl) -> (Tensor, Tensor)",
    "econtrol_step_": (
        "econtrol_step_(Tensor grad, Tensor(a!) error, Tensor(b!) shift, int k, float eta, bool approx, str impl) "
        "-> (Tensor, Tensor)"
    ),
    "accumulate_": (
        "accumulate_(Tensor(a!) out, Tensor values, Tensor indices, float[] scales, bool zero, Tensor? poison, "
        "str impl) -> ()"
    ),
    "wire_round": "wire_round(Tensor values, ScalarType dtype) -> (Tensor, Tensor)",
    "segments_step_": (
        "segments_step_(int kind, Tensor grad, Tensor(a!)? error, Tensor(b!)? shift, int[] sizes, int[] ks, "
        "float eta, bool approx, str impl) -> (Tensor, Tensor)"
    ),
}


def _kernels(name: str):
    from . import _kernels  # (the package imports this module: a late import, cached after the first call)

    global _kernels_of
    _kernels_of = _kernels
    return _kernels(name)


_kernels_of = _kernels


def _approx(name: str, approx: bool) -> dict:
    return {"approx": approx} if name != "reference" else {}


def _topk(x, k, impl):
    return _kernels_of(impl).topk(x, k)


def _ef14(grad, error, k, approx, impl):
    return _kernels_of(impl).ef14_step_(grad, error, k, **_approx(impl, approx))


def _ef21(grad, estimate, k, approx, impl):
    return _kernels_of(impl).ef21_step_(grad, estimate, k, **_approx(impl, approx))


def _econtrol(grad, error, shift, k, eta, approx, impl):
    return _kernels_of(impl).econtrol_step_(grad, error, shift, k, eta, **_approx(impl, approx))


def _accumulate(out, values, indices, scales, zero, poison, impl):
    _kernels_of(impl).accumulate_(out, values, indices, scales, zero, poison)


def _segments(kind, grad, error, shift, sizes, ks, eta, approx, impl):  # kind: 1 EF14, 2 EF21, 3 EControl
    return _kernels_of(impl).segments_step_(kind, grad, error, shift, sizes, ks, eta, **_approx(impl, approx))


def _segments_out(grad, error, shift, ks) -> tuple[Tensor, Tensor]:
    state = error if error is not None else shift
    total = sum(ks)
    return state.new_empty(total), state.new_empty(total, dtype=index_dtype(grad.shape[-1]))


def _out(state: Tensor, k: int) -> tuple[Tensor, Tensor]:
    shape = (*state.shape[:-1], k)
    return state.new_empty(shape), state.new_empty(shape, dtype=index_dtype(state.shape[-1]))


_FAKES = {
    "topk": lambda x, k, impl: _out(x, k),
    "ef14_step_": lambda grad, error, k, approx, impl: _out(error, k),
    "ef21_step_": lambda grad, estimate, k, approx, impl: _out(estimate, k),
    "econtrol_step_": lambda grad, error, shift, k, eta, approx, impl: _out(error, k),
    "accumulate_": lambda out, values, indices, scales, zero, poison, impl: None,
    "wire_round": lambda values, dtype: (torch.empty_like(values, dtype=dtype), torch.empty_like(values)),
    "segments_step_": lambda kind, grad, error, shift, sizes, ks, eta, approx, impl: _segments_out(
        grad, error, shift, ks
    ),
}
_KERNELS = {
    "topk": _topk,
    "ef14_step_": _ef14,
    "ef21_step_": _ef21,
    "econtrol_step_": _econtrol,
    "accumulate_": _accumulate,
    "wire_round": lambda values, dtype: _kernels_of("reference").wire_round(values, dtype),
    "segments_step_": _segments,
}

_LIB = torch.library.Library("torchkit", "DEF")  # kept alive: dropping it would unregister the ops
for _name, _schema in SCHEMAS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, _KERNELS[_name], "CompositeExplicitAutograd")  # every backend (CPU, CUDA, MPS, ...)
    torch.library.register_fake(f"torchkit::{_name}", _FAKES[_name], lib=_LIB)

topk = torch.ops.torchkit.topk
ef14_step_ = torch.ops.torchkit.ef14_step_
ef21_step_ = torch.ops.torchkit.ef21_step_
econtrol_step_ = torch.ops.torchkit.econtrol_step_
accumulate_ = torch.ops.torchkit.accumulate_
wire_round = torch.ops.torchkit.wire_round
segments_step_ = torch.ops.torchkit.segments_step_
