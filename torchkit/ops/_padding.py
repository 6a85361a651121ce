"""Flat vectors whose storage runs on to a multiple of ``PAD`` elements, with the tail owned by the fused ops.

A Triton load or store is 128 bits wide only where its mask is constant over the vector width, i.e. where the
launch length is a known multiple of 16. A buffer made by :func:`padded_zeros` lets the kernels run over its
padded length: they read and overwrite the tail freely and never select it (selection stays below the vector's
length). Which tensors qualify is recorded here, by data pointer: exactly the view :func:`padded_zeros` returned
(or another 1-D view of the same length and dtype at the same address) while its buffer lives. A slice, a copy, a
pickled or deep-copied version is an ordinary tensor to the ops, so nothing outside a buffer torchkit allocated is
ever written.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = ["PAD", "padded_zeros", "owns_padding", "padded_length"]

PAD = 16
_owned: dict[int, tuple[weakref.ref, int]] = {}  # data pointer -> (buffer, vector length)


def padded_length(n: int) -> int:
    return -(-n // PAD) * PAD


def padded_zeros(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``n`` zeros: the first ``n`` entries of a zeroed buffer of :func:`padded_length` ``(n)`` elements, whose
    tail the fused ops may read and overwrite (it is never selected)."""
    buf = torch.zeros(padded_length(n), dtype=dtype, device=device)
    view = buf[:n]
    if n == 0:
        return view
    ptr = view.data_ptr()
    ref = weakref.ref(buf)
    _owned[ptr] = (ref, n)
    weakref.finalize(buf, _forget, ptr, ref)
    return view


def _forget(ptr: int, ref: weakref.ref) -> None:
    entry = _owned.get(ptr)
    if entry is not None and entry[0] is ref:
        del _owned[ptr]


def owns_padding(t: Tensor) -> bool:
    """Whether ``t`` is a live :func:`padded_zeros` vector: the kernels may then use its tail."""
    if t.dim() != 1 or t.numel() == 0:
        return False
    entry = _owned.get(t.data_ptr())
    if entry is None:
        return False
    ref, n = entry
    buf = ref()
    return buf is not None and t.numel() == n and t.dtype == buf.dtype and buf.data_ptr() == t.data_ptr()
