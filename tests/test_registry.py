"""The method registry (torchkit.registry) and the declarative methods (torchkit.feedback): a method is one class,
one register call and one float64 reference; everything that lists methods reads the registry; the base class runs
step 0, the repr and the choice of fused kernel for every method."""

import argparse
import re
from pathlib import Path

import pytest
import torch

import torchkit as tk
from tests.methods import DECAY, METHODS, DecayedEF14, make
from tests.refs import run_reference
from torchkit import feedback, registry
from torchkit.registry import MethodSpec, Recipe

PKG = Path(tk.__file__).resolve().parent


def test_every_method_lists_read_the_registry_and_the_tests_method_is_in_them():
    assert list(METHODS) == [n for n, s in registry.METHODS.items() if s.reference]
    assert registry.names()[:5] == ["ef14", "ef21", "ef21w", "ef21sgdm", "econtrol"]  # the built-ins, in order
    assert "decayed_ef14" in registry.names() and registry.get("decayed_ef14").cls is DecayedEF14
    assert registry.recommendable() == ["ef14", "ef21", "ef21sgdm", "econtrol", "decayed_ef14"]
    assert {s.reference for s in METHODS.values()} <= {"ef14", "ef21", "ef21w", "ef21sgdm", "econtrol", "decayed_ef14"}


def test_every_reference_exists_in_tests_refs():
    """tests/refs.py has a float64 reference for every registered method that names one."""
    grad = lambda x: torch.stack([torch.as_tensor(x), 2 * torch.as_tensor(x)]).numpy()  # noqa: E731
    for name, spec in METHODS.items():
        xs = run_reference(spec.reference, grad, [1.0, -2.0, 3.0], n=2, steps=2, lr=0.1, k=1, weights=[0.5, 0.5])
        assert len(xs) == 3, name


def _parser_choices(parser: argparse.ArgumentParser, command: str, option: str) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for a in action.choices[command]._actions:
                if option in a.option_strings:
                    return list(a.choices)
    raise AssertionError(f"{command} {option} not found")


def test_a_registered_method_is_a_choice_of_the_cli_and_no_library_file_names_it():
    from torchkit.apps import cli, demo, netbench

    choices = _parser_choices(cli._parser(), "demo", "--methods")
    assert choices == ["none", "ef14", "ef21", "ef21sgdm", "econtrol", "decayed_ef14", "powersgd"]
    assert demo.choices() == tuple(choices) and demo.METHODS == tuple(choices)
    assert netbench.check_method("decayed_ef14@0.01:int8") == "decayed_ef14@0.01:int8"
    with pytest.raises(ValueError, match="method one of ef14, ef21, ef21sgdm, econtrol, decayed_ef14;"):
        netbench.check_method("ef21w@0.01")  # registered, but without a recommended configuration
    named = [p for p in PKG.rglob("*.py") if re.search(r"decayed_ef14|DecayedEF14", p.read_text())]
    assert not named, named
    # the spawned demo workers import the module that registered it
    assert registry.external_modules(["ef21", "decayed_ef14", "none"]) == ["tests.methods"]


def test_a_method_registered_later_is_offered_by_a_parser_built_later():
    from torchkit.apps import cli

    class Later(DecayedEF14):
        pass

    registry.register(
        "later_ef14", MethodSpec(Later, "a test method", recommended=lambda c, mu: Recipe(Later(c), False))
    )
    try:
        assert "later_ef14" in _parser_choices(cli._parser(), "demo", "--methods")
        assert isinstance(tk.recommended("later_ef14", tk.TopK(2)).feedback, Later)
    finally:
        registry._METHODS.pop("later_ef14")
    assert "later_ef14" not in _parser_choices(cli._parser(), "demo", "--methods")


def test_register_refuses_bad_names_duplicates_and_non_specs():
    spec = registry.get("ef14")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("ef14", spec)
    for bad in ("", "EF14", "ef 14", "ef14@0.1", 3):
        with pytest.raises(ValueError, match="lower-case word"):
            registry.register(bad, spec)
    with pytest.raises(TypeError, match="MethodSpec"):
        registry.register("x", {"cls": tk.EF14})
    with pytest.raises(TypeError, match="Feedback subclass"):
        MethodSpec(torch.optim.SGD, "not a method")
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: ef14, ef21"):
        registry.get("nope")
    registry.register("ef14", spec, replace=True)
    assert registry.names()[0] == "ef14"


def test_make_builds_with_the_workers_and_options():
    fb = registry.make("ef21w", tk.TopK(2), 4, init="compressed")
    assert fb.weights == (0.25,) * 4 and fb.init == "compressed"
    assert registry.make("econtrol", tk.TopK(2), eta=0.2).config()["eta"] == 0.2
    assert make("decayed_ef14", tk.TopK(2)).beta == DECAY
    assert registry.name_of(tk.EF21W) == "ef21w" and registry.name_of(tk.EF21W, recommendable_only=True) == "ef21"
    assert registry.name_of(tk.LocalMomentum) is None


# -------------------------------------------------------------------------------------- declarative methods
# The reprs as they were before the methods became declarative: checkpoint format 1 stored them, and
# torchkit.state compares a format-1 checkpoint's repr with the running method's.
FORMAT_1_REPRS = [
    (lambda: tk.EF14(tk.TopK(3)), "EF14(TopK(k=3))"),
    (lambda: tk.EF14(tk.TopK(ratio=0.3), granularity="tensor"), "EF14(TopK(ratio=0.3), granularity='tensor')"),
    (lambda: tk.EF21(tk.TopK(ratio=0.5)), "EF21(TopK(ratio=0.5))"),
    (lambda: tk.EF21(tk.TopK(2), "zero"), "EF21(TopK(k=2), init='zero')"),
    (
        lambda: tk.EF21W(tk.TopK(2), [0.25, 0.75], "compressed"),
        "EF21W(TopK(k=2), weights=[0.25, 0.75], init='compressed')",
    ),
    (lambda: tk.EF21SGDM(tk.TopK(2)), "EF21SGDM(TopK(k=2), eta=0.1)"),
    (
        lambda: tk.EF21SGDM(tk.TopK(ratio=0.1), 0.3, init="compressed", momentum_init="zero", granularity="tensor"),
        "EF21SGDM(TopK(ratio=0.1), eta=0.3, init='compressed', momentum_init='zero', granularity='tensor')",
    ),
    (lambda: tk.EControl(tk.TopK(2)), "EControl(TopK(k=2))"),
    (lambda: tk.EControl(tk.ScaledSign(), 0.2, init="zero"), "EControl(ScaledSign(), eta=0.2, init='zero')"),
    (lambda: tk.LocalMomentum(tk.EF21(tk.TopK(2))), "LocalMomentum(EF21(TopK(k=2)), momentum=0.9)"),
    (
        lambda: tk.LocalMomentum(tk.EF14(tk.TopK(2)), 0.5, nesterov=True),
        "LocalMomentum(EF14(TopK(k=2)), momentum=0.5, nesterov=True)",
    ),
    (lambda: tk.LocalAdam(tk.EF14(tk.TopK(2))), "LocalAdam(EF14(TopK(k=2)), betas=(0.9, 0.999), eps=1e-08)"),
]


@pytest.mark.parametrize("build, text", FORMAT_1_REPRS, ids=[t for _, t in FORMAT_1_REPRS])
def test_the_repr_derived_from_config_is_the_format_1_repr(build, text):
    assert repr(build()) == text


def test_a_format_1_checkpoint_of_a_local_wrapper_still_loads():
    from torchkit import state

    fb = tk.LocalMomentum(tk.EF21SGDM(tk.TopK(2), 0.2, init="compressed"), 0.8)
    old = {"format_version": 1, "world_size": 1, "rank": 0, "feedback": repr(fb)}
    assert old["feedback"] == "LocalMomentum(EF21SGDM(TopK(k=2), eta=0.2, init='compressed'), momentum=0.8)"
    assert state.check_envelope(old, kind="optimizer", rank=0, world_size=1, feedback=fb) == []


def test_config_records_the_declared_options_in_order():
    fb = tk.LocalAdam(tk.EF21W(tk.TopK(ratio=0.2), [0.5, 0.5], init="zero"), betas=(0.8, 0.9))
    assert fb.config() == {
        "method": "LocalAdam",
        "compressor": {"type": "TopK", "k": None, "ratio": 0.2, "approx": False},
        "granularity": "global",
        "inner": {
            "method": "EF21W",
            "compressor": {"type": "TopK", "k": None, "ratio": 0.2, "approx": False},
            "granularity": "global",
            "init": "zero",
            "weights": [0.5, 0.5],
        },
        "betas": [0.8, 0.9],
        "eps": 1e-08,
    }
    assert list(tk.EF21SGDM(tk.TopK(2)).config()) == [
        "method", "compressor", "granularity", "eta", "init", "momentum_init"
    ]  # fmt: skip
    assert repr(DecayedEF14(tk.TopK(2), 0.5)) == "DecayedEF14(TopK(k=2), beta=0.5)"


def test_step_zero_is_the_base_class_for_every_method_with_an_init():
    """A method that only declares its state, its estimate and an update kind gets all three ``init`` choices."""

    class Shift(tk.feedback.Feedback):
        state_names = ("shift",)
        estimate_state = "shift"
        options = ("init",)
        update = "ef21"

        def __init__(self, compressor, init="full"):
            super().__init__(compressor)
            self._set_init(init)

    g = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    for init in ("full", "compressed", "zero"):
        a, b = Shift(tk.TopK(4), init), tk.EF21(tk.TopK(4), init)
        sa, sb = a.init_state(40, rows=3), b.init_state(40, rows=3)
        for t in range(3):
            ma, mb = a.worker_step(sa, g * (t + 1), t), b.worker_step(sb, g * (t + 1), t)
            assert (ma is None) == (mb is None) and (ma is None or torch.equal(ma.to_dense(), mb.to_dense()))
            assert a.sends_in_round(t) == b.sends_in_round(t) and a.full_first_round == b.full_first_round
        assert torch.equal(sa["shift"], sb["shift"])
    with pytest.raises(ValueError, match="init must be 'full', 'compressed' or 'zero'"):
        Shift(tk.TopK(4), "dense")
    assert tk.EF14(tk.TopK(2)).init == "compressed" and not tk.EF14(tk.TopK(2)).full_first_round


def test_the_update_table_picks_the_fused_kernel(monkeypatch):
    """Methods name what they compute; feedback.UPDATES alone maps the kind to a fused op."""
    assert {tk.EF14.update, tk.EF21.update, tk.EF21SGDM.update, tk.EControl.update} == set(feedback.UPDATES)
    calls = []
    for kind, upd in list(feedback.UPDATES.items()):

        def spy(*args, _fn=upd.fused, _kind=kind, **kw):
            calls.append(_kind)
            return _fn(*args, **kw)

        monkeypatch.setitem(feedback.UPDATES, kind, feedback.Update(upd.states, spy, upd.plain, upd.formula))
    for fb in (tk.EF14(tk.TopK(2)), tk.EF21SGDM(tk.TopK(2), init="compressed"), tk.EControl(tk.TopK(2), 0.1)):
        fb.worker_step(fb.init_state(10), torch.randn(10), 1)
    fb = tk.EF21(tk.RandK(2, seed=0))  # no fused kernel for RandK: the plain form
    fb.worker_step(fb.init_state(10), torch.randn(10), 1)
    assert calls == ["ef14", "ef21", "econtrol"]
    with pytest.raises(TypeError, match="update must be one of"):
        type("Bad", (tk.feedback.Feedback,), {"update": "ef99"})


@pytest.mark.dist
def test_the_demo_trains_a_method_registered_outside_the_library(tmp_path):
    """The demo's spawned workers import tests.methods, so the method registered there trains in them too."""
    from torchkit.apps.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--workers", "2", "--steps", "3", "--methods", "decayed_ef14", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| DecayedEF14 |" in table and "decayed EF14 inside SGD (momentum 0.9)" in (out / "results.json").read_text()
