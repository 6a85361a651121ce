r"""Worker-side optimizers around an error-feedback method: :class:`LocalMomentum` and :class:`LocalAdam`.

Each runs an optimizer's per-coordinate math on the worker's fresh gradient and the wrapped method on the
resulting update direction (:meth:`~torchkit.feedback.Feedback._direction`); the server then applies plain
SGD, ``x <- x - lr * estimate``. Why a method needs its momentum inside (the EF21 family's stale shift) and
what torchkit recommends per method: :mod:`torchkit.coupling`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import check_bool, check_momentum, check_positive, check_unit_interval
from .compress import Compressor
from .feedback import Feedback, mask_sent_

__all__ = ["LocalMomentum", "LocalAdam"]


class _Local(Feedback):
    """Run an optimizer's per-coordinate math on the worker's fresh gradient, then the wrapped method on
    the resulting update direction. The server then applies plain SGD: ``x <- x - lr * estimate``."""

    _local_names: tuple[str, ...] = ()
    momentum_inside = True

    def __init__(self, method: Feedback):
        if not isinstance(method, Feedback) or isinstance(method, _Local):
            raise TypeError(f"method must be a torchkit feedback method (EF21, ...), got {type(method).__name__}")
        self.method = method
        self.compressor = method.compressor
        self.granularity = method.granularity
        self.state_names = method.state_names + self._local_names
        self.server_state = method.server_state
        self.init = method.init
        self.absorb_rule = method.absorb_rule
        self.estimate_state = method.estimate_state
        self.neutral_state = None  # a zero gradient: the local moments decay and stay finite

    def _config_extra(self) -> dict:
        return {"inner": self.method.config(), **super()._config_extra()}

    def input_scale(self, worker: int, n_workers: int) -> float:
        return self.method.input_scale(worker, n_workers)

    def aggregation_weights(self, n_workers: int) -> list[float]:
        return self.method.aggregation_weights(n_workers)

    def _round(self, state, g, step, worker, segments):
        """The wrapped method's round (its step 0, its direction, its update) on the local optimizer's direction."""
        return self.method._round(state, self._direction(state, g, step), step, worker, segments)

    def with_compressor(self, compressor: Compressor) -> Feedback:
        other = self._copy()
        other.method = self.method.with_compressor(compressor)
        other.compressor = other.method.compressor
        return other

    def distortion_sq(self, state, grad=None, *, worker: int = 0, n_workers: int = 1) -> Tensor:
        """The wrapped method's, on the direction it was given (the local momentum or Adam step)."""
        return self.method.distortion_sq(state, self._last_direction(state), worker=worker, n_workers=n_workers)

    def _last_direction(self, state) -> Tensor:
        raise NotImplementedError


class LocalMomentum(_Local):
    r"""Momentum on the worker, before compression; use plain SGD (``momentum=0``) outside.

    .. math::
        b_i \leftarrow \mu b_i + g_i \ (b_i^0 = g_i^0), \qquad \text{then the wrapped method on } b_i
        \ (\text{or on } g_i + \mu b_i \text{ with } \texttt{nesterov=True})

    The server steps ``x <- x - lr * estimate`` (``torch.optim.SGD(lr, momentum=0)``), so ``lr`` keeps the
    meaning it has in ``SGD(lr, momentum=mu)``. What is compressed, and what an EF21-family shift holds
    between the rounds that refresh it, is the smooth momentum instead of a noisy gradient, whose stale
    coordinates would otherwise keep stepping in a fixed direction.

    - ``LocalMomentum(EF21(C), mu)`` is EF21-SGDM (Fatkhullin, Tyurin, Richtárik 2023, arXiv:2305.15155)
      with ``eta = 1 - mu`` and the step size scaled by ``1/eta`` (TopK and scaled sign are positively
      homogeneous), except that step 0 sends ``g`` rather than ``eta g``.
    - ``LocalMomentum(EF14(C), mu, clip=c, mask=True)`` is DGC's momentum correction (Lin et al. 2018,
      arXiv:1712.01887) with its local gradient clipping and momentum factor masking; with
      ``DensityWarmup(C, ...)`` it has DGC's density warm-up too.

    Args:
        method: the error-feedback method that compresses the momentum.
        momentum: ``mu`` in [0, 1).
        nesterov: send ``g + mu b`` as ``SGD(nesterov=True)`` steps.
        clip: local gradient clipping: each segment of the worker's gradient (each parameter tensor with
            ``granularity="tensor"``, else the vector the front end hands over) is scaled down to this norm
            before it enters the momentum. DGC clips at the global threshold times ``n_workers ** -0.5``.
        mask: momentum factor masking: where a sparse message sent an entry, the momentum restarts from zero,
            so a sent coordinate does not keep pushing (dense rounds, step 0 and the Identity fallback, leave it).
    """

    _local_names = ("local_m",)
    options = ("momentum", "nesterov")

    def __init__(
        self,
        method: Feedback,
        momentum: float = 0.9,
        *,
        nesterov: bool = False,
        clip: float | None = None,
        mask: bool = False,
    ):
        super().__init__(method)
        self.momentum = check_momentum("momentum", momentum)
        self.nesterov = check_bool("nesterov", nesterov)
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
                                 or not math.isfinite(clip)):  # fmt: skip
            raise ValueError(f"clip must be a positive finite norm or None, got {clip!r}")
        check_bool("mask", mask)
        self.clip = None if clip is None else float(clip)
        self.mask = mask

    def _config_extra(self) -> dict:
        extra = super()._config_extra()  # clip and mask only when set: older checkpoints compare equal
        if self.clip is not None:
            extra["clip"] = self.clip
        if self.mask:
            extra["mask"] = True
        return extra

    def _round(self, state, g, step, worker, segments):
        if self.clip is not None:
            g = _clipped(g, segments, self.clip)
        msg = super()._round(state, g, step, worker, segments)
        if self.mask:
            mask_sent_(state["local_m"], msg)
        return msg

    def _direction(self, state, g, step):
        b = state["local_m"]
        if step == 0:
            b.copy_(g)
        else:
            b.mul_(self.momentum).add_(g.to(b.dtype))
        return g.to(b.dtype) + self.momentum * b if self.nesterov else b

    def _last_direction(self, state) -> Tensor:
        return state["local_m"]


def _clipped(g: Tensor, segments, clip: float) -> Tensor:
    """``g`` with each segment of each row scaled to a norm of at most ``clip`` (a new tensor; NaN stays NaN)."""
    rows = g if g.dim() == 2 else g.unsqueeze(0)
    parts = []
    for seg in rows.split(list(segments), dim=1):
        norm = torch.linalg.vector_norm(seg.to(torch.promote_types(seg.dtype, torch.float32)), dim=1, keepdim=True)
        parts.append(seg * (clip / norm).clamp(max=1.0).to(seg.dtype))
    out = torch.cat(parts, dim=1)
    return out if g.dim() == 2 else out[0]


class LocalAdam(_Local):
    r"""Adam's moments on the worker's fresh gradient, the wrapped method on Adam's update direction;
    use ``torch.optim.SGD`` (``momentum=0``, AdamW's ``lr`` and ``weight_decay``) outside.

    .. math::
        m_i \leftarrow \beta_1 m_i + (1-\beta_1) g_i, \quad v_i \leftarrow \beta_2 v_i + (1-\beta_2) g_i^2,
        \quad u_i = \frac{m_i/(1-\beta_1^{t+1})}{\sqrt{v_i/(1-\beta_2^{t+1})} + \epsilon},
        \quad \text{then the wrapped method on } u_i

    The server steps ``x <- x - lr * (estimate + weight_decay * x)``, which is AdamW's decoupled decay
    when ``SGD(lr, weight_decay=wd)`` is the outer optimizer. An adaptive optimizer outside an EF21-family
    method divides every stale coordinate of the shift by its own magnitude, so each one takes a full
    ``lr`` step in a fixed direction until TopK refreshes it (the divergence of EF21 inside AdamW). Here
    the second moment is that of the fresh gradients, noise included, so noisy coordinates carry small
    values and the estimate's coordinates are bounded by about 1 whatever their age.

    The worker-side Adam with compressed updates is "Quantized Adam with error feedback" (Chen, Shen,
    Huang, Liu 2021, arXiv:2004.14180); 1-bit Adam (Tang et al. 2021, arXiv:2102.02888) also updates the
    momentum locally and compresses it, but freezes a dense-warm-up variance instead. Each worker keeps
    its own ``v_i`` (they differ on non-iid data); nothing but the method's messages is exchanged.

    Args:
        method: the error-feedback method that compresses the update direction.
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
    """

    _local_names = ("local_m", "local_v")
    options = ("betas", "eps")

    def __init__(self, method: Feedback, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(method)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = betas
        self.betas = (check_unit_interval("betas[0]", b1), check_unit_interval("betas[1]", b2))
        if not (b1 < 1.0 and b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.eps = check_positive("eps", eps)

    def _direction(self, state, g, step):
        m, v = state["local_m"], state["local_v"]
        b1, b2 = self.betas
        g = g.to(m.dtype)
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        return self._last_direction(state, step + 1)

    def _last_direction(self, state, t: int | None = None) -> Tensor:
        m, v = state["local_m"], state["local_v"]
        b1, b2 = self.betas
        c1 = 1.0 - b1**t if t else 1.0
        c2 = 1.0 - b2**t if t else 1.0
        return (m / c1) / ((v / c2).sqrt() + self.eps)
