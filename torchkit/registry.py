"""The one registry of error-feedback methods: name -> :class:`MethodSpec`.

Adding a method is exactly: one class (a :class:`~torchkit.feedback.Feedback` subclass, in the library or
outside it), one ``register(name, MethodSpec(...))`` call, and one float64 reference in the tests'
``tests/refs.py`` (named by :attr:`MethodSpec.reference`). Everything that lists methods reads this registry:
:func:`torchkit.recommended` and the coupling advice (:mod:`torchkit.coupling`), the CLI's method choices
(demo, network benchmark), the paper reproductions, ``benchmarks/bench_convergence.py`` and the tests' method
lists, so a registered method runs through every front end and shows up wherever a method can be chosen.

Example (the test suite registers its own method this way, in ``tests/methods.py``)::

    class MyEF14(tk.feedback.Feedback):  # state_names, update or _step, distortion_sq: see Feedback
        ...

    tk.registry.register("my_ef14", tk.registry.MethodSpec(MyEF14, "EF14, my way", reference="my_ef14"))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from .compress import Compressor, TopK
from .feedback import EF14, EF21, EF21SGDM, EF21W, EControl, Feedback
from .feedback_local import LocalMomentum

__all__ = [
    "MethodSpec",
    "Recipe",
    "register",
    "get",
    "names",
    "recommendable",
    "make",
    "name_of",
    "external_modules",
    "METHODS",
]


@dataclass(frozen=True)
class Recipe:
    """A configuration of a method that the convergence study found to train (benchmarks/results/convergence);
    :func:`torchkit.recommended` turns it into a :class:`~torchkit.coupling.Recommendation` for an optimizer.

    Attributes:
        feedback: the feedback object.
        momentum_inside: the method applies the momentum before compression, so the optimizer outside runs
            without its own (SGD ``momentum=0``, Adam ``betas=(0, beta2)``); otherwise it keeps it.
        sgd_lr_scale: the learning-rate factor under a non-adaptive optimizer (EF21-SGDM's ``eta``
            parametrisation: ``1/eta``); adaptive optimizers get 1.
        description: one line for tables and logs, with the format fields ``{optimizer}`` (its name),
            ``{outer}`` (the optimizer as run outside), ``{momentum}``, ``{lr_scale}``, ``{kept}`` (`` (momentum
            0.9)`` when the optimizer keeps its momentum, else empty) and ``{masked}`` (``", masked"`` when the
            feedback handed out masks its momentum, else empty).
    """

    feedback: Feedback
    momentum_inside: bool
    sgd_lr_scale: float = 1.0
    description: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        cls: the :class:`~torchkit.feedback.Feedback` subclass.
        description: a short description (one line).
        label: the name in tables and plots (default: the class name).
        reference: the method's name in the tests' float64 references (``tests/refs.py``'s ``run_reference``),
            or ``None`` for a method the reference tests leave out.
        build: ``(compressor, n_workers, **options) -> Feedback``; default ``cls(compressor, **options)``.
        recommended: ``(compressor, momentum) -> Recipe``, the configuration :func:`torchkit.recommended`
            hands out, or ``None`` when torchkit recommends none (the method is then not offered by the CLI).
    """

    cls: type[Feedback]
    description: str
    label: str = ""
    reference: str | None = None
    build: Callable[..., Feedback] | None = None
    recommended: Callable[[Compressor, float], Recipe] | None = None

    def __post_init__(self):
        if not (isinstance(self.cls, type) and issubclass(self.cls, Feedback)):
            raise TypeError(f"MethodSpec.cls must be a torchkit.feedback.Feedback subclass, got {self.cls!r}")
        if not self.label:
            object.__setattr__(self, "label", self.cls.__name__)

    def make(self, compressor: Compressor, n_workers: int = 1, **options) -> Feedback:
        """The method with this compressor for ``n_workers`` workers and the given constructor options."""
        if self.build is not None:
            return self.build(compressor, n_workers, **options)
        return self.cls(compressor, **options)


_METHODS: dict[str, MethodSpec] = {}
#: The registered methods, in registration order (read-only).
METHODS = MappingProxyType(_METHODS)


def register(name: str, spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Register ``spec`` as ``name`` (lower case, no spaces: it is a CLI choice); ``replace=True`` to redefine."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or any(c in name for c in " @:,"):
        raise ValueError(f"method name must be a non-empty lower-case word without ' @:,', got {name!r}")
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec must be a torchkit.registry.MethodSpec, got {type(spec).__name__}")
    if name in _METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered ({_METHODS[name].cls.__name__}); pass replace=True")
    _METHODS[name] = spec
    return spec


def get(name: str) -> MethodSpec:
    """The spec registered as ``name``; a ValueError naming the registered methods otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_METHODS)}") from None


def names() -> list[str]:
    """Every registered method's name, in registration order."""
    return list(_METHODS)


def recommendable() -> list[str]:
    """The methods with a recommended configuration (:func:`torchkit.recommended`): the CLI's choices."""
    return [n for n, s in _METHODS.items() if s.recommended is not None]


def make(name: str, compressor: Compressor, n_workers: int = 1, **options) -> Feedback:
    """``get(name).make(compressor, n_workers, **options)``."""
    return get(name).make(compressor, n_workers, **options)


def external_modules(method_names) -> list[str]:
    """The importable modules outside torchkit that define the registered classes of ``method_names`` (names that
    are not registered are skipped): a worker process the CLI spawns imports them, so that their ``register``
    calls run there too."""
    mods = {_METHODS[m].cls.__module__ for m in method_names if m in _METHODS}
    return sorted(m for m in mods if m != "__main__" and m.split(".")[0] != "torchkit")


def name_of(cls: type[Feedback], *, recommendable_only: bool = False) -> str | None:
    """The name ``cls`` (or the nearest registered class it derives from) is registered under, or ``None``."""
    for base in cls.__mro__:
        for name, spec in _METHODS.items():
            if spec.cls is base and (spec.recommended is not None or not recommendable_only):
                return name
    return None


# ------------------------------------------------------------------------------------- the built-in methods
def _ef14(c: Compressor, mu: float) -> Recipe:
    # DGC's momentum correction and momentum factor masking (benchmarks/results/horizon: on the character transformer
    # at TopK 1%, 99% of dense's loss reduction at 3000 steps against 92% for EF14 inside SGD momentum). EF21 and
    # EF21-SGDM stay unmasked: masking cost EF21 5 points there.
    fb = LocalMomentum(EF14(c), mu, mask=True)
    return Recipe(fb, True, description="EF14 on the worker's momentum {momentum:g}{masked}, {outer} outside")


def _ef21(c: Compressor, mu: float) -> Recipe:
    fb = LocalMomentum(EF21(c, init="compressed"), mu)
    return Recipe(fb, True, description="EF21 on the worker's momentum {momentum:g}, {outer} outside")


def _ef21sgdm(c: Compressor, mu: float) -> Recipe:
    eta = round(1.0 - mu, 12) if mu > 0 else 1.0
    fb = EF21SGDM(c, eta=eta, init="compressed", momentum_init="zero")
    return Recipe(fb, True, 1.0 / eta, f"EF21-SGDM eta={eta:g}, {{outer}} outside, lr x{{lr_scale:g}}")


def _econtrol(c: Compressor, mu: float) -> Recipe:
    # masked: 94% against 90% unmasked at 1% and 3000 steps (benchmarks/results/horizon)
    eta = recommended_econtrol_eta(c)
    fb = LocalMomentum(EControl(c, eta, init="compressed"), mu, mask=True)
    strength = "alpha" if eta is None else f"{eta:.3g}"
    return Recipe(fb, True, description=f"EControl (eta={strength}) on the worker's momentum {{momentum:g}}{{masked}}, "
                                        "{outer}")  # fmt: skip


def recommended_econtrol_eta(c: Compressor) -> float | None:
    """The ``eta`` of :func:`torchkit.recommended`'s EControl: ``max(r, min(0.01, 0.3 sqrt(r)))`` for
    ``TopK(ratio=r)`` below 1% (0.0095 at 0.1%), from the nominal ratio (a small tensor's k/d may be larger);
    ``None`` (EControl's default, :func:`torchkit.theory.econtrol_eta`: alpha, per vector) from 1% up and for every
    other compressor.

    Measured on the character transformer, 4 workers, masked, on the worker's momentum (benchmarks/results/
    stale_shift and horizon): at TopK 0.1%, eta = alpha (0.001) kept 74% of dense training's loss reduction at 3000
    steps and 92% at 300; 0.0095 keeps 82% and 94% (0.003: 77%, 0.03: 78%, 0.1 and 0.3 diverge), since a larger
    eta feeds back more of what the shift has not followed yet, as EF14's error does. At 1%, 0.03 gained up to a
    point on the transformer with SGD momentum (95% at 3000 steps, seed ranges overlapping), none with AdamW, and one
    digits run of three diverged at 3000 steps, so alpha stays there."""
    ratio = getattr(c, "ratio", None) if type(c) is TopK else None
    if ratio is None or ratio >= 0.01:
        return None
    return max(ratio, min(0.01, 0.3 * math.sqrt(ratio)))


def _ef21w(c: Compressor, n: int, weights=None, **options) -> Feedback:
    return EF21W(c, [1.0 / n] * n if weights is None else weights, **options)


_BUILTIN = {
    "ef14": MethodSpec(EF14, "classic error feedback (Seide et al. 2014)", reference="ef14", recommended=_ef14),
    "ef21": MethodSpec(EF21, "a learned shift per worker (Richtárik et al. 2021)", reference="ef21", recommended=_ef21),
    "ef21w": MethodSpec(
        EF21W, "EF21 with worker weights, equal by default (2024)", "EF21-W", reference="ef21w", build=_ef21w
    ),
    "ef21sgdm": MethodSpec(
        EF21SGDM,
        "momentum before compression (Fatkhullin et al. 2023)",
        "EF21-SGDM",
        reference="ef21sgdm",
        recommended=_ef21sgdm,
    ),
    "econtrol": MethodSpec(
        EControl, "EF21 with a controlled error (Gao et al. 2024)", reference="econtrol", recommended=_econtrol
    ),
}
for _name, _spec in _BUILTIN.items():
    register(_name, _spec)
del _name, _spec
