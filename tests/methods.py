"""The one registry of feedback methods for every test, with the float64 reference of each.

Adding a method to the library is one class (in ``torchkit/feedback.py``) and one line here: every front-end
test (simulator against its reference, optimizer and hook against the simulator, resume) then runs it.
:class:`DecayedEF14` below is defined in the test suite only, to show that this holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import torchkit as tk
from torchkit.feedback import Feedback, _dense_of

ETA = 0.3  # EF21-SGDM's and EControl's eta in every test
DECAY = 0.9


class DecayedEF14(Feedback):
    """EF14 whose error decays by ``beta`` every round: ``u = C(e + g)``, ``e <- beta (e + g - u)``.

    A test-only method: it exists to show that one class, fulfilling :class:`~torchkit.feedback.Feedback`'s
    contract, runs through every front end.
    """

    state_names = ("error",)
    absorb_rule = (("error", 1.0),)
    server_state = False
    full_first_round = False

    def __init__(self, compressor, beta: float = DECAY, *, granularity="global"):
        super().__init__(compressor, granularity=granularity)
        self.beta = float(beta)

    def _config_extra(self):
        return {"beta": self.beta}

    def _step(self, state, g, step, worker, segments):
        e = state["error"]
        e.add_(g.to(e.dtype))
        msg = self._compress(e, segments, worker, step)
        e.sub_(_dense_of(msg, e)).mul_(self.beta)
        return msg

    def distortion_sq(self, state, grad=None, *, worker=0, n_workers=1):
        return state["error"].pow(2).sum()


def _weights(n: int) -> list[float]:
    w = torch.arange(1, n + 1, dtype=torch.float64)
    return (w / w.sum()).tolist()


@dataclass(frozen=True)
class Method:
    make: Callable[..., Feedback]  # (compressor, n_workers, granularity) -> Feedback
    reference: str  # the method name in tests/refs.py's run_reference
    extra: dict  # keyword arguments of run_reference for this method


METHODS: dict[str, Method] = {
    "ef14": Method(lambda c, n, gr: tk.EF14(c, granularity=gr), "ef14", {}),
    "ef21": Method(lambda c, n, gr: tk.EF21(c, granularity=gr), "ef21", {}),
    "ef21w": Method(lambda c, n, gr: tk.EF21W(c, _weights(n), granularity=gr), "ef21w", {"weights": "n"}),
    "ef21sgdm": Method(lambda c, n, gr: tk.EF21SGDM(c, eta=ETA, granularity=gr), "ef21sgdm", {"eta": ETA}),
    "econtrol": Method(lambda c, n, gr: tk.EControl(c, eta=ETA, granularity=gr), "econtrol", {"eta": ETA}),
    "decayed_ef14": Method(lambda c, n, gr: DecayedEF14(c, granularity=gr), "decayed_ef14", {"beta": DECAY}),
}


def make(name: str, compressor: tk.compress.Compressor, *, n_workers: int = 1, granularity: str = "global"):
    """The registry's method ``name`` with this compressor, for ``n_workers`` workers."""
    return METHODS[name].make(compressor, n_workers, granularity)


def factories(compressor_of: Callable[[], tk.compress.Compressor], **kw) -> dict[str, Callable[[], Feedback]]:
    """``{name: () -> Feedback}`` for every registered method (a fresh compressor each time)."""
    return {name: (lambda name=name: make(name, compressor_of(), **kw)) for name in METHODS}


def reference_kwargs(name: str, n: int) -> dict:
    """The keyword arguments of ``run_reference`` that ``name`` needs."""
    out = {}
    for k, v in METHODS[name].extra.items():
        out[k] = _weights(n) if v == "n" else v
    return out
