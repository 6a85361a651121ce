r"""How an error-feedback method meets the optimizer around it: the configuration torchkit recommends per
method (from the method registry, :mod:`torchkit.registry`) and a construction-time warning for known failures.
The worker-side momentum and Adam are :class:`torchkit.LocalMomentum` and :class:`torchkit.LocalAdam`
(:mod:`torchkit.feedback_local`).

Why (benchmarks/results/convergence, algorithms.md §6.4): the EF21 family (EF21, EF21-W, EF21-SGDM,
EControl) steps on a shift :math:`h` that is dense but stale: after the first rounds, each coordinate of
:math:`h` changes only when TopK selects it, about once per ``1/density`` steps. Whatever the shift
holds is then applied again at every step until it is refreshed.

- A noisy stochastic gradient held that way turns its noise into drift, and a momentum optimizer
  outside multiplies the drift by ``1/(1 - momentum)``. Fix: put the momentum inside, before
  compression (EF21-SGDM, Fatkhullin, Tyurin, Richtárik 2023; :class:`torchkit.LocalMomentum`), and use
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
inside 71%, the momentum inside and ``betas=(0, 0.999)`` 87%, EF14 inside 86%. With DGC's momentum factor
masking on the worker's momentum (benchmarks/results/horizon, the same transformer, 3 seeds): EF14 101% at 300
steps and 99% at 3000 (91% and 92% inside SGD momentum), EControl 101% and 94%; AdamW outside, 4 workers, 300
steps: EF14 94% (85% inside AdamW). Masking costs EF21 at 3000 steps (82% against 87%), so EF21 stays unmasked.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import registry
from ._validation import check_bool, check_momentum
from .compress import Compressor
from .feedback import Feedback

__all__ = ["Recommendation", "recommended", "coupling_advice", "warn_coupling", "CouplingWarning"]


# ------------------------------------------------------------------------------------- recommendations
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
    method: str,
    compressor: Compressor,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD,
    *,
    momentum: float = 0.9,
    beta2: float = 0.999,
    heterogeneous: bool = False,
) -> Recommendation:
    """The configuration of ``method`` (a name in :mod:`torchkit.registry` with a recommended configuration)
    that trains with ``optimizer_class`` (SGD with momentum, or an adaptive optimizer such as AdamW), from the
    convergence study. The built-in methods:

    - ``"ef14"``: ``LocalMomentum(EF14(compressor), momentum, mask=True)``: DGC's worker (momentum correction and
      momentum factor masking); the optimizer without momentum (SGD ``momentum=0``, Adam ``betas=(0, beta2)``).
    - ``"ef21"``: ``LocalMomentum(EF21(compressor, init="compressed"), momentum)``; the optimizer without
      momentum.
    - ``"ef21sgdm"``: ``EF21SGDM(compressor, eta=1 - momentum, init="compressed", momentum_init="zero")``;
      the optimizer without momentum; under SGD the learning rate times ``1/eta``. (This is the ``"ef21"``
      configuration in EF21-SGDM's parametrisation: the same iterates up to rounding.)
    - ``"econtrol"``: ``LocalMomentum(EControl(compressor, eta, init="compressed"), momentum, mask=True)`` with
      ``eta`` = alpha, or for ``TopK(ratio=r)`` below 1% ``max(r, min(0.01, 0.3 sqrt(r)))``
      (:func:`torchkit.registry.recommended_econtrol_eta`: 0.0095 at 0.1%, where alpha fed back too little of its
      error); the optimizer without momentum.

    Momentum factor masking (where a message sent an entry, the worker's momentum restarts there) is what brings
    EF14 and EControl close to dense training on shuffled data (benchmarks/results/horizon); on workers whose data
    differ systematically it hurt (the demo's label-sorted shards, simulated: EF14's final loss 0.360 unmasked,
    0.507 masked; benchmarks/results/demo/lr_sweep.json), so ``heterogeneous=True`` leaves it off.

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
    mu = check_momentum("momentum", momentum)
    check_momentum("beta2", beta2)
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
    spec = registry.METHODS.get(method) if isinstance(method, str) else None
    if spec is None or spec.recommended is None:
        raise ValueError(f"method must be one of {', '.join(map(repr, registry.recommendable()))}, got {method!r}")
    check_bool("heterogeneous", heterogeneous)
    recipe = spec.recommended(compressor, mu)
    if heterogeneous and getattr(recipe.feedback, "mask", False):
        recipe = replace(recipe, feedback=_unmasked(recipe.feedback))
    inside = recipe.momentum_inside
    scale = 1.0 if adaptive else recipe.sgd_lr_scale
    what = recipe.description.format(
        optimizer=opt_name, outer=outer, momentum=mu, lr_scale=scale, kept=f" (momentum {mu:g})" if keep else "",
        masked=", masked" if getattr(recipe.feedback, "mask", False) else "",
    )  # fmt: skip
    if inside:
        return Recommendation(recipe.feedback, off, scale, 0.0, what)
    return Recommendation(recipe.feedback, keep, scale, mu if keep else 0.0, what)


def _unmasked(feedback: Feedback) -> Feedback:
    """The same feedback object with momentum factor masking off (a copy; the recipe's object is left alone)."""
    other = feedback._copy()
    other.mask = False
    return other


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
    inside = feedback.momentum_inside
    if inside and outer > 0:
        return (
            f"{feedback!r} already applies momentum before compression; {name} with momentum {outer:g} applies "
            f"it a second time (double momentum: measured to diverge). Pass {fix} to {name}."
        )
    if inside or not feedback.server_state:  # no stale server estimate: EF14 and the like
        return None
    if adaptive or outer > 0:
        kind = "an adaptive optimizer" if adaptive else f"momentum {outer:g}"
        method = registry.name_of(type(feedback), recommendable_only=True)
        use = f"tk.recommended({method!r}, compressor, torch.optim.{name}): " if method is not None else ""
        return (
            f"{feedback!r} inside {name} ({kind}): the EF21 family's shift is dense but stale (each coordinate "
            f"is refreshed about once per 1/density steps) and {name} keeps stepping along the stale coordinates "
            f"(measured: EF21 inside AdamW diverges, inside SGD momentum 0.9 it loses to EF14). Use "
            f"{use}momentum inside the method "
            f"(feedback=tk.LocalMomentum({type(feedback).__name__}(compressor, init='compressed'), 0.9)) and "
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
