"""The tests' view of the method registry (:mod:`torchkit.registry`), with the float64 reference of each method.

Adding a method is one class, one :func:`torchkit.registry.register` call and one reference in
``tests/refs.py``: every front-end test (simulator against its reference, optimizer, hook and LocalSGD against
the simulator, resume, coupling, the CLI's choices) then runs it. :class:`DecayedEF14` below is defined and
registered in the test suite only, to show that this holds: no library file names it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import torchkit as tk
from torchkit.feedback import Feedback, _dense_of
from torchkit.registry import MethodSpec, Recipe, register

ETA = 0.3  # EF21-SGDM's and EControl's eta in every test
DECAY = 0.9


class DecayedEF14(Feedback):
    """EF14 whose error decays by ``beta`` every round: ``u = C(e + g)``, ``e <- beta (e + g - u)``.

    A test-only method: it exists to show that one class, fulfilling :class:`~torchkit.feedback.Feedback`'s
    contract, runs through every front end. Its update is its own (:meth:`_step`), not one of the declared kinds.
    """

    state_names = ("error",)
    absorb_rule = (("error", 1.0),)
    server_state = False
    options = ("beta",)

    def __init__(self, compressor, beta: float = DECAY, *, granularity="global"):
        super().__init__(compressor, granularity=granularity)
        self.beta = float(beta)

    def _step(self, state, g, step, worker, segments):
        e = state["error"]
        e.add_(g.to(e.dtype))
        msg = self._compress(e, segments, worker, step)
        e.sub_(_dense_of(msg, e)).mul_(self.beta)
        return msg

    def distortion_sq(self, state, grad=None, *, worker=0, n_workers=1):
        return state["error"].pow(2).sum()


register(
    "decayed_ef14",
    MethodSpec(
        DecayedEF14,
        "EF14 with an error that decays by beta per round (test-only)",
        reference="decayed_ef14",
        recommended=lambda c, mu: Recipe(DecayedEF14(c), False, description="decayed EF14 inside {optimizer}{kept}"),
    ),
)


def _weights(n: int) -> list[float]:
    w = torch.arange(1, n + 1, dtype=torch.float64)
    return (w / w.sum()).tolist()


# The options the tests give a method (the same keyword arguments go to tests/refs.py's run_reference); a method
# not named here runs with its defaults.
_OPTIONS: dict[str, Callable[[int], dict]] = {
    "ef21w": lambda n: {"weights": _weights(n)},  # unequal weights
    "ef21sgdm": lambda n: {"eta": ETA},
    "econtrol": lambda n: {"eta": ETA},
    "decayed_ef14": lambda n: {"beta": DECAY},
}

#: Every registered method that has a float64 reference, by name.
METHODS: dict[str, MethodSpec] = {name: spec for name, spec in tk.registry.METHODS.items() if spec.reference}


def options(name: str, n: int) -> dict:
    """The options the tests give method ``name`` for ``n`` workers."""
    return _OPTIONS[name](n) if name in _OPTIONS else {}


def make(name: str, compressor: tk.compress.Compressor, *, n_workers: int = 1, granularity: str = "global"):
    """The registry's method ``name`` with this compressor and the tests' options, for ``n_workers`` workers."""
    return METHODS[name].make(compressor, n_workers, granularity=granularity, **options(name, n_workers))


def factories(compressor_of: Callable[[], tk.compress.Compressor], **kw) -> dict[str, Callable[[], Feedback]]:
    """``{name: () -> Feedback}`` for every registered method (a fresh compressor each time)."""
    return {name: (lambda name=name: make(name, compressor_of(), **kw)) for name in METHODS}


def reference_kwargs(name: str, n: int) -> dict:
    """The keyword arguments of ``run_reference`` that ``name`` needs."""
    return options(name, n)
