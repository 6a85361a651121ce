"""Paper reproductions on LIBSVM data: ``torchkit repro ef21`` and ``torchkit repro ef21w``.

EF21 (docs/algorithms.md §2.7): logistic regression with the nonconvex regulariser (lambda = 0.1), n = 20
workers on a contiguous split, x0 ~ N(0, I), TopK on the whole vector, step size = multiplier x the
theoretical EF21 step size, ``||grad f||^2`` against bits per worker (32 bits per sent value).
EF21-W (§3): the same problem on a split made heterogeneous (worker i's rows scaled by s_i), EF21
with the quadratic-mean step size against EF21-W with the arithmetic-mean one.

The paper's settings come from an explicit preset (``PRESETS``), never from the file name. Each run is
repeated for several seeds (the seed draws x0) and reported as a mean with its range over the seeds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from .. import registry, theory
from .._results import save_result
from ..compress import TopK
from ..feedback import EF21W
from ..sim import LogisticRegression, contiguous_split, load_libsvm, simulate

__all__ = ["PRESETS", "ProgressBar", "ef21_settings", "ef21w_settings", "describe", "repro_ef21", "repro_ef21w"]

# EF21 poster (docs/algorithms.md §2.7): TopK k and the best multipliers of EF21 and EF14 per dataset, and the
# bits/n axis range (stated for phishing and mushrooms; a9a and w8a use mushrooms' 2e5). d: the features of
# the LIBSVM training file, checked against the data so that a preset is not applied to the wrong file.
PRESETS: dict[str, dict[str, float]] = {
    "phishing": {"d": 68, "k": 1, "ef21": 16, "ef14": 16, "bits": 2e4},
    "mushrooms": {"d": 112, "k": 2, "ef21": 1024, "ef14": 64, "bits": 2e5},
    "a9a": {"d": 123, "k": 4, "ef21": 64, "ef14": 64, "bits": 2e5},
    "w8a": {"d": 300, "k": 1, "ef21": 64, "ef14": 32, "bits": 2e5},
}
_GENERIC_EF21 = {"k": 1, "ef21": 1, "ef14": 1, "bits": 2e5}  # no preset: the theoretical step itself
# the runs of repro_ef21; "a@b": method a at b's multiplier
_EF21_RUNS = ("ef21", "ef14", "ef14@ef21", "econtrol", "econtrol@ef14", "econtrol(eta=0.1)", "ef21sgdm")
_DEFAULT_SEEDS = (0, 1, 2)


class ProgressBar(Protocol):
    """What the reproductions report progress to (a ``tqdm`` bar fits): one ``update`` per gradient round."""

    def update(self, n: int = 1) -> object: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> object: ...
    def close(self) -> object: ...


ProgressFactory = Callable[[int], ProgressBar]  # called once with the total number of rounds


def _check_common(preset: str | None, n_workers: int, seeds: Sequence[int]) -> list[int]:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive int, got {n_workers!r}")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    return seeds


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _pick(name: str, given, preset_value, preset: str | None, source: dict) -> float:
    if given is not None:
        source[name] = "given"
        return given
    source[name] = f"preset {preset}" if preset else "default"
    return preset_value


def ef21_settings(
    preset: str | None = None,
    *,
    k: int | None = None,
    multipliers: dict[str, float] | None = None,
    bits: float | None = None,
    n_workers: int = 20,
    seeds: Sequence[int] = _DEFAULT_SEEDS,
    tol: float = 1e-6,
) -> dict:
    """The settings ``repro_ef21`` runs with: the preset's unless given, with where each one came from."""
    seeds = _check_common(preset, n_workers, seeds)
    base = PRESETS[preset] if preset else _GENERIC_EF21
    multipliers = dict(multipliers or {})
    source: dict[str, str] = {}
    s = {
        "paper": "ef21",
        "preset": preset,
        "k": _pick("k", k, int(base["k"]), preset, source),
        "ef21": _pick("ef21", multipliers.pop("ef21", None), base["ef21"], preset, source),
        "ef14": _pick("ef14", multipliers.pop("ef14", None), base["ef14"], preset, source),
        "bits": _pick("bits", bits, base["bits"], preset, source),
        "other_multipliers": multipliers,
        "n_workers": n_workers,
        "lam": 0.1,
        "seeds": seeds,
        "tol": _positive("tol", tol),
        "source": source,
    }
    unknown = sorted(set(multipliers) - set(_EF21_RUNS))
    if unknown:
        raise ValueError(f"multipliers has unknown runs {unknown}; runs are {list(_EF21_RUNS)}")
    if isinstance(s["k"], bool) or not isinstance(s["k"], int) or s["k"] < 1:
        raise ValueError(f"k must be a positive int, got {s['k']!r}")
    for name in ("ef21", "ef14", "bits"):
        _positive(name if name == "bits" else f"multipliers[{name!r}]", s[name])
    s["steps"] = int(s["bits"] // (32 * s["k"])) + 1
    return s


def ef21w_settings(
    preset: str | None = None,
    *,
    k: int | None = None,
    n_workers: int = 20,
    max_scale: float = 10.0,
    multiplier: float = 64.0,
    steps: int = 10000,
    tols: Sequence[float] = (1.0, 0.1, 0.01),
    seeds: Sequence[int] = _DEFAULT_SEEDS,
) -> dict:
    """The settings ``repro_ef21w`` runs with. A preset fixes Top-1 (the EF21-W paper's compressor) and checks d;
    the split, the scales and the multiplier are torchkit's (the paper's per-dataset settings are not public)."""
    seeds = _check_common(preset, n_workers, seeds)
    source: dict[str, str] = {}
    k = _pick("k", k, 1, preset, source)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if max_scale < 1 or not math.isfinite(max_scale):
        raise ValueError(f"max_scale must be >= 1, got {max_scale!r}")
    tols = [_positive("tols", t) for t in tols]
    if not tols:
        raise ValueError("tols must not be empty")
    return {
        "paper": "ef21w",
        "preset": preset,
        "k": k,
        "n_workers": n_workers,
        "lam": 0.1,
        "max_scale": max_scale,
        "multiplier": _positive("multiplier", multiplier),
        "steps": steps,
        "tols": tols,
        "seeds": seeds,
        "source": source,
    }


def describe(settings: dict, data: str | Path | None = None) -> str:
    """The settings as the lines the command line prints before a run."""
    s, src = settings, settings["source"]
    preset = (
        f"preset {s['preset']}" if s["preset"] else "no preset: generic settings (pass --preset NAME for a paper's)"
    )
    lines = [f"repro {s['paper']}, {preset}"]
    if data is not None:
        lines.append(f"  data        {data}")
    seeds = ", ".join(map(str, s["seeds"]))
    lines.append(
        f"  problem     logistic regression, nonconvex regulariser lambda = {s['lam']}, n = {s['n_workers']} workers"
        " (contiguous split)"
        + (f", rows of worker i scaled by s_i in [1, {s['max_scale']:g}]" if "max_scale" in s else "")
    )
    lines.append(f"  start       x0 ~ N(0, I) per seed; seeds {seeds} (results: mean and range over them)")
    lines.append(f"  compressor  Top-{s['k']} on the whole vector ({src['k']})")
    if s["paper"] == "ef21":
        lines.append(
            f"  step sizes  multiples of the theoretical EF21 step: EF21 {s['ef21']:g}x ({src['ef21']}), "
            f"EF14 {s['ef14']:g}x ({src['ef14']}); EControl and EF21-SGDM at EF21's"
        )
        lines.append(f"  budget      {s['bits']:g} bits per worker ({src['bits']}) = {s['steps']} rounds of 32 k bits")
        lines.append(f"  target      ||grad f||^2 < {s['tol']:g}")
    else:
        lines.append(
            f"  step sizes  {s['multiplier']:g}x each method's theoretical step: EF21 with L_QM, EF21-W with L_AM"
        )
        lines.append(f"  rounds      at most {s['steps']}, stop below ||grad f||^2 < {min(s['tols']):g}")
    return "\n".join(lines)


def _problem(path: str | Path, preset: str | None, n_workers: int, scales: Sequence[float] | None = None):
    A, y = load_libsvm(path)
    if preset is not None and A.shape[1] != PRESETS[preset]["d"]:
        raise ValueError(
            f"preset {preset!r} is the paper's setting for {preset} (d = {PRESETS[preset]['d']:g} features), "
            f"but {path} has d = {A.shape[1]}: pass the {preset} file, or no preset"
        )
    if scales is not None:
        for s, (a, b) in zip(scales, contiguous_split(A.shape[0], n_workers)):
            A[a:b] *= s
    return LogisticRegression(A, y, n_workers)


def _first_below(values: torch.Tensor, tol: float) -> int | None:
    hit = (values < tol).nonzero()
    return int(hit[0]) if hit.numel() else None


def _x0(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _spread(values: Sequence[float | None], *, geometric: bool = False) -> dict:
    """Mean (geometric for quantities spanning decades) and range over the seeds that have a value."""
    got = [float(v) for v in values if v is not None]
    out = {"mean": None, "min": None, "max": None, "count": len(got), "of": len(values)}
    if got:
        if geometric and all(v > 0 and math.isfinite(v) for v in got):
            mean = math.exp(sum(math.log(v) for v in got) / len(got))
        elif geometric:  # the limit: nan and inf propagate, a zero gives zero
            mean = math.nan if any(math.isnan(v) for v in got) else (math.inf if math.inf in got else 0.0)
        else:
            mean = sum(got) / len(got)
        out.update(mean=mean, min=min(got), max=max(got))
    return out


def _run(fb, prob, x0, *, steps, lr, stop_below=None, bar=None, label=""):
    fn = prob.grad_fn
    if bar is not None:
        bar.set_postfix_str(label, refresh=False)

        def fn(x, _g=prob.grad_fn):
            bar.update(1)
            return _g(x)

    res = simulate(fb, fn, x0, n_workers=prob.n_workers, steps=steps, lr=lr, stop_below=stop_below)
    if bar is not None:
        bar.update(steps + 1 - len(res.grad_norm_sq))  # rounds a stop_below run did not need
    return res


def _check_k(k: int, d: int) -> None:
    """TopK's k within the data's d features (k > d was refused only as "alpha must be in (0, 1], got 50.0")."""
    if k > d:
        raise ValueError(f"k = {k} is more than the data's {d} features: choose k <= {d} (--k)")


def repro_ef21(
    data: str | Path,
    *,
    preset: str | None = None,
    k: int | None = None,
    multipliers: dict[str, float] | None = None,
    bits: float | None = None,
    n_workers: int = 20,
    seeds: Sequence[int] = _DEFAULT_SEEDS,
    tol: float = 1e-6,
    out: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> dict:
    """EF21 against EF14, EControl and EF21-SGDM at the preset's multipliers (or the given ones), per seed.

    EControl runs with ``eta = alpha = k/d`` (the papers' deep-learning runs use eta = 0.1 at alpha = 0.1);
    one run keeps eta = 0.1 to show that it does not converge when alpha is far smaller.
    """
    s = ef21_settings(preset, k=k, multipliers=multipliers, bits=bits, n_workers=n_workers, seeds=seeds, tol=tol)
    name = preset or Path(data).stem.split(".")[0].lower()
    k, steps = s["k"], s["steps"]
    prob = _problem(data, preset, n_workers)
    _check_k(k, prob.d)
    L, L_i = prob.smoothness()
    gamma = theory.ef21_stepsize(L, L_i, alpha=k / prob.d)
    mult = {
        "ef21": s["ef21"],
        "ef14": s["ef14"],
        "ef14@ef21": s["ef21"],
        "econtrol": s["ef21"],
        "econtrol@ef14": s["ef14"],
        "econtrol(eta=0.1)": s["ef21"],
        "ef21sgdm": s["ef21"],
    }
    mult.update(s["other_multipliers"])
    for twin, base in (("ef14@ef21", "ef14"), ("econtrol@ef14", "econtrol")):
        if mult[twin] == mult[base]:
            del mult[twin]
    alpha = k / prob.d
    spec = {  # label -> (the method's name in torchkit.registry, its options)
        "ef21": ("ef21", {}),
        "ef14": ("ef14", {}),
        "ef14@ef21": ("ef14", {}),
        "econtrol": ("econtrol", {"eta": alpha}),
        "econtrol@ef14": ("econtrol", {"eta": alpha}),
        "econtrol(eta=0.1)": ("econtrol", {"eta": 0.1}),
        "ef21sgdm": ("ef21sgdm", {"eta": 0.5}),
    }
    make = {label: functools.partial(registry.make, m, TopK(k), n_workers, **kw) for label, (m, kw) in spec.items()}
    bar = progress(len(mult) * len(s["seeds"]) * (steps + 1)) if progress else None
    every = max(1, steps // 400)
    runs = {}
    try:
        for label, m in mult.items():
            per_seed, curves = [], []
            for seed in s["seeds"]:
                res = _run(make[label](), prob, _x0(prob.d, seed), steps=steps, lr=m * gamma, bar=bar, label=label)
                g = res.grad_norm_sq
                finite = torch.isfinite(g)
                hit = _first_below(g, tol)
                per_seed.append(
                    {
                        "seed": seed,
                        "final_grad_norm_sq": float(g[-1]),
                        "min_grad_norm_sq": float(g[finite].min()) if finite.any() else math.nan,
                        "bits_to_tol": int(res.bits[hit]) if hit is not None else None,
                    }
                )
                curves.append(g.tolist()[::every])
            runs[label] = {
                "multiplier": m,
                "lr": m * gamma,
                **{
                    key: _spread([r[key] for r in per_seed], geometric=key != "bits_to_tol")
                    for key in ("final_grad_norm_sq", "min_grad_norm_sq", "bits_to_tol")
                },
                "per_seed": per_seed,
                "bits": res.bits.tolist()[::every],
                "grad_norm_sq": curves,
            }
    finally:
        if bar is not None:
            bar.close()
    result = {
        "dataset": name,
        "d": prob.d,
        "m": prob.A.shape[0],
        "n_workers": n_workers,
        "k": k,
        "L": L,
        "L_QM": theory.mean_smoothness(L_i, weighted=False),
        "gamma_theory": gamma,
        "steps": steps,
        "tol": tol,
        "seeds": s["seeds"],
        "settings": s,
        "runs": runs,
    }
    if out is not None:
        save_result(result, out, f"ef21_{name}", _plot_ef21)
    return result


def repro_ef21w(
    data: str | Path,
    *,
    preset: str | None = None,
    k: int | None = None,
    n_workers: int = 20,
    max_scale: float = 10.0,
    multiplier: float = 64.0,
    steps: int = 10000,
    tols: Sequence[float] = (1.0, 0.1, 0.01),
    seeds: Sequence[int] = _DEFAULT_SEEDS,
    out: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> dict:
    """Rounds to ``||grad f||^2 < tol`` for EF21 (L_QM step) and EF21-W (L_AM step), per seed.

    Both run at the same ``multiplier`` of their theoretical step size (as the EF21 experiments do),
    so the ratio of their steps is the theory's ``(L + L_QM s)/(L + L_AM s)``.
    """
    s = ef21w_settings(
        preset,
        k=k,
        n_workers=n_workers,
        max_scale=max_scale,
        multiplier=multiplier,
        steps=steps,
        tols=tols,
        seeds=seeds,
    )
    k, tols = s["k"], s["tols"]
    name = preset or Path(data).stem.split(".")[0].lower()
    scales = [math.exp(math.log(max_scale) * i / max(1, n_workers - 1)) for i in range(n_workers)]
    prob = _problem(data, preset, n_workers, scales)
    _check_k(k, prob.d)
    L, L_i = prob.smoothness()
    alpha = k / prob.d
    g_qm = theory.ef21_stepsize(L, L_i, alpha)
    g_am = theory.ef21_stepsize(L, L_i, alpha, weighted=True)
    methods = (
        ("EF21 (L_QM step)", lambda: registry.make("ef21", TopK(k), n_workers), g_qm),
        ("EF21-W (L_AM step)", lambda: EF21W.from_smoothness(TopK(k), L_i), g_am),
    )
    bar = progress(len(methods) * len(s["seeds"]) * (steps + 1)) if progress else None
    runs = {}
    try:
        for label, make, lr in methods:
            per_seed, curves = [], []
            for seed in s["seeds"]:
                x0 = _x0(prob.d, seed)
                res = _run(
                    make(), prob, x0, steps=steps, lr=multiplier * lr, stop_below=min(tols), bar=bar, label=label
                )
                g = res.grad_norm_sq
                every = max(1, len(g) // 400)
                per_seed.append(
                    {
                        "seed": seed,
                        "final_grad_norm_sq": float(g[-1]),
                        "rounds_to": {str(t): _first_below(g, t) for t in tols},
                    }
                )
                curves.append({"rounds": list(range(0, len(g), every)), "grad_norm_sq": g.tolist()[::every]})
            runs[label] = {
                "lr": multiplier * lr,
                "theory_lr": lr,
                "rounds_to": {str(t): _spread([r["rounds_to"][str(t)] for r in per_seed]) for t in tols},
                "per_seed": per_seed,
                "curves": curves,
            }
    finally:
        if bar is not None:
            bar.close()
    old, new = (r["per_seed"] for r in runs.values())
    ratios = {}
    for t in map(str, tols):  # per seed: EF21 rounds / EF21-W rounds, where both reached t
        pairs = [(a["rounds_to"][t], b["rounds_to"][t]) for a, b in zip(old, new)]
        ratios[t] = _spread([a / b if a and b else None for a, b in pairs])
    l_am, l_qm = theory.mean_smoothness(L_i, weighted=True), theory.mean_smoothness(L_i, weighted=False)
    result = {
        "dataset": name,
        "d": prob.d,
        "n_workers": n_workers,
        "k": k,
        "scales": [scales[0], scales[-1]],
        "L": L,
        "L_AM": l_am,
        "L_QM": l_qm,
        "L_var": l_qm**2 - l_am**2,
        "multiplier": multiplier,
        "gamma_ratio_predicted": g_am / g_qm,
        "tols": tols,
        "seeds": s["seeds"],
        "settings": s,
        "rounds_ratio": ratios,
        "runs": runs,
    }
    if out is not None:
        save_result(result, out, f"ef21w_{name}", _plot_ef21w)
    return result


def _plot_ef21(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, r in result["runs"].items():
        curves = torch.tensor(r["grad_norm_sq"], dtype=torch.float64)
        curves = torch.where(torch.isfinite(curves), curves, torch.nan)
        geo = curves.clamp_min(1e-300).log().mean(0).exp()
        (line,) = ax.semilogy(r["bits"], geo, label=f"{label.split('@')[0].upper()} {r['multiplier']:g}x")
        if curves.shape[0] > 1:
            ax.fill_between(r["bits"], curves.amin(0), curves.amax(0), color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(result["tol"], color="k", lw=0.6, ls=":")
    ax.set_xlabel("bits sent per worker (32 per value)")
    ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$ (geometric mean, range shaded)")
    ax.set_ylim(1e-10, 1e2)
    ax.set_title(
        f"{result['dataset']}: n={result['n_workers']}, Top-{result['k']}, multiples of the EF21 step, "
        f"{len(result['seeds'])} seeds",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ef21w(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, r) in enumerate(result["runs"].items()):
        for j, c in enumerate(r["curves"]):
            ax.semilogy(c["rounds"], c["grad_norm_sq"], color=f"C{i}", lw=1, alpha=0.8, label=None if j else label)
    for t in result["tols"]:
        ax.axhline(t, color="k", lw=0.6, ls=":")
    ax.set_xlabel("communication rounds")
    ax.set_ylabel(r"$\|\nabla f(x^t)\|^2$ (one line per seed)")
    ax.set_title(
        f"{result['dataset']}, rows scaled 1..{result['scales'][1]:g} (L_var = {result['L_var']:.3g}), "
        f"Top-{result['k']}, {result['multiplier']:g}x theory",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
