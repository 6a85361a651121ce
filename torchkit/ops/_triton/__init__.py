"""Triton kernels, imported lazily so that ``import torchkit`` never needs Triton."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["available", "segments_module", "decode_module"]


@functools.cache
def _importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def available(device: torch.device) -> bool:
    """CUDA tensors run compiled kernels; CPU tensors only under ``TRITON_INTERPRET=1``."""
    if not _importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def segments_module():
    """The many-small-segments kernel (``segments.py``), shared by both GPU kernel sets; ``None`` without Triton."""
    if not _importable():
        return None
    from . import segments

    return segments


def decode_module():
    """The tiled decode (``decode.py``: a round's decode in two launches), shared by both GPU kernel sets; ``None``
    without Triton."""
    if not _importable():
        return None
    from . import decode

    return decode
