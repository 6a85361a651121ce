r"""How an error-feedback method meets the optimizer around it: worker-side momentum and Adam, the
configuration torchkit recommends per method, and a construction-time warning for known failures.

Why (benchmarks/results/convergence, algorithms.md §6.4): the EF21 family (EF21, EF21-W, EF21-SGDM,
EControl) steps on a shift :math:`h` that is dense but stale: after the first rounds, each coordinate of
:math:`h` changes only when TopK selects it, about once per ``1/density`` steps. Whatever the shift
holds is then applied again at every step until it is refreshed.

- A noisy stochastic gradient held that way turns its noise into drift, and a momentum optimizer
  outside multiplies the drift by ``1/(1 - momentum)``. Fix: put the momentum inside, before
  compression (EF21-SGDM, Fatkhullin, Tyurin, Richtárik 2023; :class:`LocalMomentum`), and use
  plain SGD outside. What the shift then holds is the smooth, heavy-tailed momentum.
- An adaptive optimizer outside (Adam, AdamW, ...) divides each coordinate by its own running
  magnitude, so every stale coordinate takes a full ``lr`` step in a fixed direction. With the momentum
  inside and ``betas=(0, beta2)`` outside, the optimizer still normalises, but what it normalises is a
  compressed momentum, not a frozen gradient sample.
- The dense first round (``init="full"``, the papers' code) puts the first gradient, usually the largest
  of the run, into every coordinate of the shift, where it stays for ``1/density`` steps; ``init=
  "compressed"`` starts from an ordinary compressed round.

Measured (benchmarks/results/convergence: TopK 1%, 4 workers, a 120,704-parameter character
transformer, 300 steps; fraction of dense training's loss reduction at each configuration's best
learning rate, median of 3 seeds, "inside" one seed): SGD momentum 0.9 with EF21 inside 78%, EF21 on the
worker's momentum (``init="compressed"``, plain SGD outside) 90%, EF14 inside 91%; AdamW with EF21
inside 71%, the momentum inside and ``betas=(0, 0.999)`` 87%, EF14 inside 86%.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._validation import check_unit_interval
from .compress import Compressor
from .feedback import EF14, EF21, EF21SGDM, EControl, Feedback

__all__ = [
    "LocalMomentum",
    "LocalAdam",
    "Recommendation",
    "recommended",
    "coupling_advice",
    "warn_coupling",
    "CouplingWarning",
]


class _Local(Feedback):
    """Run an optimizer's per-coordinate math on the worker's fresh gradient, then the wrapped method on
    the resulting update direction. The server then applies plain SGD: ``x <- x - lr * estimate``."""

    _local_names: tuple[str, ...] = ()

    def __init__(self, method: Feedback):
        if not isinstance(method, Feedback) or isinstance(method, _Local):
            raise TypeError(f"method must be a torchkit feedback method (EF21, ...), got {type(method).__name__}")
        self.method = method
        self.compressor = method.compressor
        self.granularity = method.granularity
        self.state_names = method.state_names + self._local_names
        self.server_state = method.server_state
        self.full_first_round = method.full_first_round
        self.absorb_rule = method.absorb_rule
        self.estimate_state = method.estimate_state
        self.neutral_state = None  # a zero gradient: the local moments decay and stay finite

    def _config_extra(self) -> dict:
        return {"inner": self.method.config(), **self._local_config()}

    def _local_config(self) -> dict:
        return {}

    def input_scale(self, worker: int, n_workers: int) -> float:
        return self.method.input_scale(worker, n_workers)

    def aggregation_weights(self, n_workers: int) -> list[float]:
        return self.method.aggregation_weights(n_workers)

    def sends_in_round(self, step: int) -> str:
        return self.method.sends_in_round(step)

    def _step(self, state, g, step, worker, segments):
        return self.method._step(state, self._direction(state, g, step), step, worker, segments)

    def _direction(self, state, g: Tensor, step: int) -> Tensor:
        raise NotImplementedError

    def with_compressor(self, compressor: Compressor) -> Feedback:
        import copy

        other = copy.copy(self)
        other.method = self.method.with_compressor(compressor)
        other.compressor = other.method.compressor
        return other

    def distortion_sq(self, state, grad=None, *, worker: int = 0, n_workers: int = 1) -> Tensor:
        """The wrapped method's, on the direction it was given (the local momentum or Adam step)."""
        return self.method.distortion_sq(state, self._last_direction(state), worker=worker, n_workers=n_workers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r}{self._repr_extra()})"


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
    - ``LocalMomentum(EF14(C), mu)`` is DGC's momentum correction (Lin et al. 2018, arXiv:1712.01887)
      without momentum-factor masking.

    Args:
        method: the error-feedback method that compresses the momentum.
        momentum: ``mu`` in [0, 1).
        nesterov: send ``g + mu b`` as ``SGD(nesterov=True)`` steps.
    """

    _local_names = ("local_m",)

    def __init__(self, method: Feedback, momentum: float = 0.9, *, nesterov: bool = False):
        super().__init__(method)
        self.momentum = check_unit_interval("momentum", momentum)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.nesterov = bool(nesterov)

    def _direction(self, state, g, step):
        b = state["local_m"]
        if step == 0:
            b.copy_(g)
        else:
            b.mul_(self.momentum).add_(g.to(b.dtype))
        return g.to(b.dtype) + self.momentum * b if self.nesterov else b

    def _last_direction(self, state) -> Tensor:
        return state["local_m"]

    def _repr_extra(self) -> str:
        return f", momentum={self.momentum}" + (", nesterov=True" if self.nesterov else "")

    def _local_config(self) -> dict:
        return {"momentum": self.momentum, "nesterov": self.nesterov}


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

    def __init__(self, method: Feedback, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(method)
        b1, b2 = betas
        self.betas = (check_unit_interval("betas[0]", b1), check_unit_interval("betas[1]", b2))
        if not (b1 < 1.0 and b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not (eps > 0):
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = float(eps)

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

    def _repr_extra(self) -> str:
        return f", betas={self.betas}, eps={self.eps}"

    def _local_config(self) -> dict:
        return {"betas": list(self.betas), "eps": self.eps}


# ------------------------------------------------------------------------------------- recommendations
Method = Literal["ef14", "ef21", "ef21sgdm", "econtrol"]


@dataclass(frozen=True)
class Recommendation:
    """A configuration the convergence study found to train (benchmarks/results/convergence).

    Attributes:
        feedback: the feedback object to pass to :class:`torchkit.CompressedOptimizer` (or the DDP hook).
        optimizer_kwargs: what to change in the optimizer's arguments (``{"momentum": 0.0}`` for SGD,
            ``{"betas": (0.0, beta2)}`` for Adam-style optimizers; empty when it stays as it is).
        lr_scale: multiply the learning rate tuned for dense training by this (EF21-SGDM's ``eta``
            parametrisation under SGD: ``1/eta``).
        momentum: the momentum (or beta1) left outside the method.
        description: one line for tables and logs.
    """

    feedback: Feedback
    optimizer_kwargs: dict
    lr_scale: float
    momentum: float
    description: str


def _is_adaptive(optimizer_class: type) -> bool:
    return any(issubclass(optimizer_class, c) for c in _ADAPTIVE)


_ADAPTIVE = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Adafactor")
    if hasattr(torch.optim, n)
)


def _outer_momentum(optimizer_class: type, defaults: Mapping[str, Any]) -> float:
    """The momentum (SGD, RMSprop) or beta1 (Adam family) the optimizer will apply."""
    sig_defaults = _signature_defaults(optimizer_class)
    if "betas" in defaults or "betas" in sig_defaults:
        betas = defaults.get("betas", sig_defaults.get("betas"))
        return float(betas[0]) if betas is not None else 0.0
    mom = defaults.get("momentum", sig_defaults.get("momentum", 0.0))
    return float(mom) if isinstance(mom, (int, float)) else 0.0


def _signature_defaults(optimizer_class: type) -> dict:
    import inspect

    try:
        params = inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}


def recommended(
    method: Method,
    compressor: Compressor,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD,
    *,
    momentum: float = 0.9,
    beta2: float = 0.999,
) -> Recommendation:
    """The configuration of ``method`` that trains with ``optimizer_class`` (SGD with momentum, or an
    adaptive optimizer such as AdamW), from the convergence study.

    - ``"ef14"``: ``EF14(compressor)`` inside the optimizer as it is.
    - ``"ef21"``: ``LocalMomentum(EF21(compressor, init="compressed"), momentum)``; the optimizer without
      momentum (SGD ``momentum=0``, Adam ``betas=(0, beta2)``).
    - ``"ef21sgdm"``: ``EF21SGDM(compressor, eta=1 - momentum, init="compressed", momentum_init="zero")``;
      the optimizer without momentum; under SGD the learning rate times ``1/eta``. (This is the ``"ef21"``
      configuration in EF21-SGDM's parametrisation: the same iterates up to rounding.)
    - ``"econtrol"``: ``LocalMomentum(EControl(compressor, eta=alpha, init="compressed"), momentum)``; the
      optimizer without momentum.

    Example::

        >>> rec = tk.recommended("ef21", tk.TopK(ratio=0.01), torch.optim.AdamW)
        >>> opt = tk.CompressedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3 * rec.lr_scale,
        ...                              feedback=rec.feedback, **rec.optimizer_kwargs)
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_class must be a torch.optim.Optimizer subclass (the class, such as torch.optim.AdamW, not an "
            f"instance), got {optimizer_class!r}"
        )
    mu = check_unit_interval("momentum", momentum)
    if mu >= 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    adaptive = _is_adaptive(optimizer_class)
    opt_name = optimizer_class.__name__
    # by capability: what the optimizer's own momentum is called, if it has one
    knobs = _signature_defaults(optimizer_class)
    if "betas" in knobs:  # the Adam family
        keep, off = {"betas": (mu, float(beta2))}, {"betas": (0.0, float(beta2))}
        outer = f"{opt_name}(betas=(0, {beta2:g}))"
    elif "momentum" in knobs:  # SGD, RMSprop
        keep, off = {"momentum": mu}, {"momentum": 0.0}
        outer = f"{opt_name}(momentum=0)"
    else:  # no momentum of its own (Adagrad, Adadelta, Adafactor, Rprop, ASGD): nothing to change
        keep, off = {}, {}
        outer = f"{opt_name} (no momentum of its own)"
    mu_outside = mu if keep else 0.0
    if method == "ef14":
        what = f"EF14 inside {opt_name}" + (f" (momentum {mu:g})" if keep else "")
        return Recommendation(EF14(compressor), keep, 1.0, mu_outside, what)
    if method == "ef21":
        fb = LocalMomentum(EF21(compressor, init="compressed"), mu)
        return Recommendation(fb, off, 1.0, 0.0, f"EF21 on the worker's momentum {mu:g}, {outer} outside")
    if method == "ef21sgdm":
        eta = round(1.0 - mu, 12) if mu > 0 else 1.0
        scale = 1.0 if adaptive else 1.0 / eta
        fb = EF21SGDM(compressor, eta=eta, init="compressed", momentum_init="zero")
        return Recommendation(fb, off, scale, 0.0, f"EF21-SGDM eta={eta:g}, {outer} outside, lr x{scale:g}")
    if method == "econtrol":
        fb = LocalMomentum(EControl(compressor, init="compressed"), mu)
        return Recommendation(fb, off, 1.0, 0.0, f"EControl (eta=alpha) on the worker's momentum {mu:g}, {outer}")
    raise ValueError(f"method must be 'ef14', 'ef21', 'ef21sgdm' or 'econtrol', got {method!r}")


# ------------------------------------------------------------------------------------------- warnings
class CouplingWarning(UserWarning):
    """A feedback method and an inner optimizer that the convergence study found not to train together."""


def coupling_advice(feedback: Feedback, optimizer_class: type, defaults: Mapping[str, Any] | None = None) -> str | None:
    """Why ``feedback`` inside ``optimizer_class(**defaults)`` is a known failure, and what to use
    instead; ``None`` when the combination is fine (EF14 anywhere, anything inside plain SGD)."""
    defaults = dict(defaults or {})
    outer = _outer_momentum(optimizer_class, defaults)
    adaptive = _is_adaptive(optimizer_class)
    name = optimizer_class.__name__
    fix = "betas=(0.0, beta2)" if adaptive and "betas" in _signature_defaults(optimizer_class) else "momentum=0"
    inside = isinstance(feedback, (_Local, EF21SGDM))
    if inside and outer > 0:
        return (
            f"{feedback!r} already applies momentum before compression; {name} with momentum {outer:g} applies "
            f"it a second time (double momentum: measured to diverge). Pass {fix} to {name}."
        )
    base = feedback.method if isinstance(feedback, _Local) else feedback
    if isinstance(base, EF14) or not isinstance(base, (EF21, EControl)):
        return None
    if inside:
        return None
    if adaptive or outer > 0:
        kind = "an adaptive optimizer" if adaptive else f"momentum {outer:g}"
        method = "ef21" if isinstance(base, EF21) else "econtrol"
        return (
            f"{feedback!r} inside {name} ({kind}): the EF21 family's shift is dense but stale (each coordinate "
            f"is refreshed about once per 1/density steps) and {name} keeps stepping along the stale coordinates "
            f"(measured: EF21 inside AdamW diverges, inside SGD momentum 0.9 it loses to EF14). Use "
            f"tk.recommended({method!r}, compressor, torch.optim.{name}): momentum inside the method "
            f"(feedback=tk.LocalMomentum({type(base).__name__}(compressor, init='compressed'), 0.9)) and "
            f"{fix} for {name}; or tk.EF14(compressor) inside {name} as it is."
        )
    return None


def warn_coupling(
    feedback: Feedback, optimizer_class: type, defaults: Mapping[str, Any] | None = None, *, stacklevel: int = 3
) -> str | None:
    """Emit :class:`CouplingWarning` once (per call site) when :func:`coupling_advice` has advice."""
    msg = coupling_advice(feedback, optimizer_class, defaults)
    if msg is not None:
        warnings.warn(msg, CouplingWarning, stacklevel=stacklevel)
    return msg
