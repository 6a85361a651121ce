"""torchkit: communication-efficient training with error feedback.

Compressors (:class:`TopK`, :class:`RandK`, :class:`CyclicTopK`, :class:`ScaledSign`, :class:`Identity`), error-feedback
methods (:class:`EF14`, :class:`EF21`, :class:`EF21W`, :class:`EF21SGDM`, :class:`EControl`; by name in
:mod:`torchkit.registry`, where a method defined elsewhere registers itself) and four
front ends that run the same round: :class:`CompressedOptimizer`, :mod:`torchkit.ddp`, :class:`LocalSGD`
(compressed local SGD: error feedback on DiLoCo-style outer steps) and the simulator
(:func:`torchkit.sim.simulate`, :func:`torchkit.sim.simulate_local`).
"""

from __future__ import annotations

from . import comm, coupling, ops, registry, sim, theory
from .comm import NonFiniteGradientError
from .compress import CyclicTopK, DensityWarmup, Identity, RandK, ScaledSign, TopK
from .coupling import recommended
from .feedback import EF14, EF21, EF21SGDM, EF21W, EControl
from .feedback_local import LocalAdam, LocalMomentum
from .local_sgd import LocalSGD
from .metrics import CommMetrics
from .optim import CompressedOptimizer
from .process_group import init_process_group

__version__ = "0.1.0"

__all__ = [
    "TopK",
    "RandK",
    "CyclicTopK",
    "DensityWarmup",
    "ScaledSign",
    "Identity",
    "EF14",
    "EF21",
    "EF21W",
    "EF21SGDM",
    "EControl",
    "LocalMomentum",
    "LocalAdam",
    "recommended",
    "CompressedOptimizer",
    "LocalSGD",
    "NonFiniteGradientError",
    "init_process_group",
    "CommMetrics",
    "theory",
    "sim",
    "ops",
    "comm",
    "coupling",
    "registry",
    "ddp",
    "checkpoint",
    "fsdp",
]


_LAZY = ("ddp", "checkpoint", "integrations", "fsdp")  # imported on first use (torch.distributed hook machinery, ...)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'torchkit' has no attribute {name!r}")
