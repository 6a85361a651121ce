"""Momentum factor masking for every method, at 300 and 3000 steps, on three tasks (issue 24, item 2).

DGC's momentum factor masking (``tk.LocalMomentum(method, 0.9, mask=True)``: where a sparse message sent an entry,
the worker's momentum restarts from zero) had been measured on EF14 only, at 300 steps. This study puts every method
on the worker's momentum with and without masking, next to EF14 inside the optimizer, TopK 1% (0.1% in tier D), on:

- ``char_lm``: the convergence study's character transformer (120,704 parameters) on the standard library's sources;
- ``digits_cnn``: the convergence study's CNN on scikit-learn's digits (38,282 parameters);
- ``phishing``: a task of another kind, ``tk.apps.tasks.libsvm_mlp`` on the LIBSVM phishing file (tabular, binary,
  8,706 parameters; ``--data`` names the file).

Configurations (``C = TopK(density)``; the outer optimizer without momentum wherever the momentum sits on the worker):

- ``dense``: SGD momentum 0.9 (AdamW);
- ``ef14``: ``EF14(C)`` inside SGD momentum (AdamW) as it is; ``ef14_mask``: ``LocalMomentum(EF14(C), 0.9, mask=True)``;
- ``ef21``: ``LocalMomentum(EF21(C, init="compressed"), 0.9)``; ``ef21_mask``: the same with ``mask=True``;
- ``ef21sgdm``: ``EF21SGDM(C, eta=0.1, init="compressed", momentum_init="zero")``, lr x 10 under SGD (EF21 on the
  worker's momentum re-parametrised; not run at 3000 steps on the transformer);
- ``econtrol``: ``LocalMomentum(EControl(C, eta=alpha, init="compressed"), 0.9)``; ``econtrol_mask``: with
  ``mask=True``; ``econtrol_mask_eta``: masked, with ``eta = 0.3 sqrt(alpha)`` (0.03 at TopK 1%, 0.0095 at 0.1%:
  the best of the strengths ``bench_stale_shift.py`` tried on the transformer at 3000 steps, 4 workers).

Tiers, run in this order by default (a stopped run leaves whole tiers; each tier runs its seed-0 grids first):

- A: the transformer, SGD momentum: 4 workers at 300 and 3000 steps, 1 worker at 300 and 3000 steps;
- E: the transformer, AdamW, 300 steps, 4 workers and 1;
- B: phishing, 4 workers iid and non-iid (label-sorted shards) and 1 worker, 300 and 3000 steps;
- C: digits, the same cells as B;
- D: the transformer at TopK 0.1% (4 workers, 300 and 3000 steps) and on its non-iid split (4 workers, 300 steps).

Fair tuning as in the convergence study: every configuration runs the same learning-rate grid with seed 0, the value
with the lowest final training loss then runs with seeds 1 and 2; a cell is the median (range) over the 3 seeds of
the share of dense training's loss reduction, ``(L0 - L) / (L0 - L_dense)``, per seed against dense training with the
same seed at dense's best rate of the same grid. The transformer's 3000-step grid has three values (0.03-0.3; a run
takes 2-4 minutes on one shared core), the others four (300 steps) or three (3000).

    python benchmarks/bench_horizon.py [--procs 2] [--tiers A E B C D] [--max-steps 300]   # resumes from runs.jsonl
    python benchmarks/bench_horizon.py --report                          # summary.json, table.md, curves.png
    python benchmarks/bench_horizon.py --probe                           # resend_probe.json
    python benchmarks/bench_horizon.py --probe --probe-density 0.001 --probe-steps 3000 --probe-lr 0.03

    python benchmarks/bench_horizon.py --tiers D A --min-steps 3000 --edge 0.01   # the grid's edge, extended

Results: ``benchmarks/results/horizon/``; ``edge_check.jsonl`` holds the runs outside the grid (``--edge``: lr 0.01
for every 3000-step cell whose best rate was the grid's lowest, 0.03; seeds 1 and 2 where it won). They count as
part of their cell's grid: a cell's best rate is chosen over both, and † marks the edge of the extended grid.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent / "results" / "horizon"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "phishing.txt"
SEEDS = (0, 1, 2)
CONFIGS = ("dense", "ef14", "ef14_mask", "ef21", "ef21_mask", "ef21sgdm", "econtrol", "econtrol_mask",
           "econtrol_mask_eta")  # fmt: skip
ADAMW_CONFIGS = ("dense", "ef14", "ef14_mask", "ef21", "ef21_mask", "econtrol", "econtrol_mask", "econtrol_mask_eta")
LONG_CONFIGS = ADAMW_CONFIGS  # the transformer's 3000 steps: EF21-SGDM is EF21 on the worker's momentum re-parametrised
LABELS = {
    "dense": "dense",
    "ef14": "EF14 inside the optimizer",
    "ef14_mask": "EF14 on the worker's momentum, masked",
    "ef21": "EF21 on the worker's momentum",
    "ef21_mask": "EF21 on the worker's momentum, masked",
    "ef21sgdm": "EF21-SGDM (eta 0.1)",
    "econtrol": "EControl on the worker's momentum",
    "econtrol_mask": "EControl on the worker's momentum, masked",
    "econtrol_mask_eta": "EControl (eta = 0.3 sqrt(alpha)) on the worker's momentum, masked",
}
GRIDS = {  # (task, inner, steps) -> learning rates
    ("char_lm", "sgdm", 300): (0.01, 0.03, 0.1, 0.3),
    ("char_lm", "sgdm", 3000): (0.03, 0.1, 0.3),
    ("char_lm", "adamw", 300): (1e-3, 3e-3, 1e-2),
    **{(t, "sgdm", 300): (0.01, 0.03, 0.1, 0.3) for t in ("digits_cnn", "phishing")},
    **{(t, "sgdm", 3000): (0.01, 0.03, 0.1) for t in ("digits_cnn", "phishing")},
}
SETUPS = ((4, "iid"), (1, "iid"), (4, "noniid"))


def _cells(tier: str):
    """The cells of one tier: dicts of task, inner, workers, split, steps, density, config."""

    def cells(task, inner, setups, densities, steps, configs=CONFIGS):
        for workers, split in setups:
            for st in steps:
                for config in configs:
                    for dens in (None,) if config == "dense" else densities:
                        yield dict(task=task, inner=inner, workers=workers, split=split, steps=st, density=dens,
                                   config=config)  # fmt: skip

    if tier == "A":
        yield from cells("char_lm", "sgdm", SETUPS[:1], (0.01,), (300,))
        yield from cells("char_lm", "sgdm", SETUPS[:1], (0.01,), (3000,), LONG_CONFIGS)
        yield from cells("char_lm", "sgdm", SETUPS[1:2], (0.01,), (300,))
        yield from cells("char_lm", "sgdm", SETUPS[1:2], (0.01,), (3000,), LONG_CONFIGS)
    elif tier == "B":
        yield from cells("phishing", "sgdm", SETUPS, (0.01,), (300, 3000))
    elif tier == "C":
        yield from cells("digits_cnn", "sgdm", SETUPS, (0.01,), (300, 3000))
    elif tier == "D":
        yield from cells("char_lm", "sgdm", SETUPS[:1], (0.001,), (300, 3000), LONG_CONFIGS)
        yield from cells("char_lm", "sgdm", SETUPS[2:], (0.01,), (300,))
    elif tier == "E":
        yield from cells("char_lm", "adamw", SETUPS[:2], (0.01,), (300,), ADAMW_CONFIGS)
    else:
        raise ValueError(f"tier must be one of A-E, got {tier!r}")


def build(config: str, inner: str, density: float | None):
    """(compression, inner optimizer name of benchmarks/_train.py, lr multiplier, description)."""
    import torchkit as tk

    adamw = inner == "adamw"
    if config == "dense":
        return "dense", inner, 1.0, f"dense, {inner}"
    comp = tk.TopK(ratio=density)
    mask = "_mask" in config
    outer = "adamw0" if adamw else "sgd"  # the momentum is on the worker
    if config == "ef14":
        return tk.EF14(comp), inner, 1.0, f"EF14(TopK) inside {inner}"
    if config == "ef21sgdm":
        fb = tk.EF21SGDM(comp, eta=0.1, init="compressed", momentum_init="zero")
        return fb, outer, 1.0 if adamw else 10.0, f"{fb!r}, {outer}"
    method = {
        "ef14": lambda: tk.EF14(comp),
        "ef21": lambda: tk.EF21(comp, init="compressed"),
        "econtrol": lambda: tk.EControl(comp, init="compressed"),  # eta = alpha
        "econtrol_eta": lambda: tk.EControl(comp, eta=0.3 * math.sqrt(density), init="compressed"),
    }[config.replace("_mask", "")]()
    fb = tk.LocalMomentum(method, 0.9, mask=mask)
    return fb, outer, 1.0, f"{fb!r}, {outer}"


def make_task(name: str, workers: int, split: str, data: Path = DATA):
    from torchkit.apps.tasks import char_lm, digits_cnn, libsvm_mlp

    if name == "phishing":
        return libsvm_mlp(data, workers, split)
    return {"char_lm": char_lm, "digits_cnn": digits_cnn}[name](workers, split)


def run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    from _train import run

    task = make_task(job["task"], job["workers"], job["split"], Path(job["data"]))
    comp, inner, scale, desc = build(job["config"], job["inner"], job["density"])
    r = run(task, compression=comp, inner=inner, lr=job["lr"] * scale, steps=job["steps"], seed=job["seed"],
            log_every=max(10, job["steps"] // 100))  # fmt: skip
    return {**job, **r, "description": desc, "inner_used": inner, "lr_used": job["lr"] * scale}


def _key(r: dict) -> tuple:
    return tuple(r[k] for k in ("task", "inner", "workers", "split", "steps", "density", "config", "lr", "seed"))


def _loss(r: dict) -> float:
    return math.inf if r["diverged"] else r["train_loss"]


def _lrs(done: dict, cell: dict) -> list[float]:
    """The cell's grid, extended by every rate outside it that ``--edge`` ran with seed 0 (``edge_check.jsonl``)."""
    grid = GRIDS[_grid(cell)]
    extra = {k[7] for k in done if k[:7] == _key({**cell, "lr": None, "seed": 0})[:7] and k[8] == 0}
    return sorted({*grid, *extra})


def _best_lr(done: dict, cell: dict) -> float | None:
    """The rate with the lowest seed-0 training loss, over the grid and its extensions; None until the whole grid
    has run."""
    if any(done.get(_key({**cell, "lr": lr, "seed": 0})) is None for lr in GRIDS[_grid(cell)]):
        return None
    return min((_loss(done[_key({**cell, "lr": lr, "seed": 0})]), lr) for lr in _lrs(done, cell))[1]


def edge_jobs(done: dict, cells: list[dict], lr: float) -> tuple[list[dict], list[dict]]:
    """``--edge lr``: the seed-0 runs at ``lr`` of every cell whose best rate sits at the grid's edge on ``lr``'s side
    (the lowest value when ``lr`` is below the grid, the highest when above), and the seeds 1 and 2 at ``lr`` of every
    such cell where ``lr`` has become the best."""
    first, rest = [], []
    for c in cells:
        grid, best = GRIDS[_grid(c)], _best_lr(done, c)
        if best is None or best != (grid[0] if lr < grid[0] else grid[-1]) and best != lr:
            continue
        if done.get(_key({**c, "lr": lr, "seed": 0})) is None:
            first.append({**c, "lr": lr, "seed": 0})
        elif best == lr:
            rest += [{**c, "lr": lr, "seed": s} for s in SEEDS[1:]]
    return first, rest


def _grid(cell: dict) -> tuple:
    return cell["task"], cell["inner"], cell["steps"]


def summarize(done: dict, tiers) -> dict:
    """Per cell: the best rate, the 3 seeds' training losses and their shares of dense's loss reduction."""
    out = {}
    for tier in tiers:
        for cell in _cells(tier):
            lr = _best_lr(done, cell)
            runs = [done.get(_key({**cell, "lr": lr, "seed": s})) for s in SEEDS] if lr is not None else []
            dense = {**cell, "config": "dense", "density": None}
            dense_lr = _best_lr(done, dense)
            refs = [done.get(_key({**dense, "lr": dense_lr, "seed": s})) for s in SEEDS] if dense_lr else []
            pairs = [(r, d) for r, d in zip(runs, refs) if r is not None and d is not None]
            if not pairs:
                continue
            fr = [(r["L0"] - _loss(r)) / (d["L0"] - d["train_loss"]) for r, d in pairs]
            lrs = _lrs(done, cell)
            name = "/".join(str(cell[k]) for k in ("task", "inner", "workers", "split", "steps", "density", "config"))
            out[name] = {
                **cell,
                "lr": lr,
                "at_grid_edge": lr in (lrs[0], lrs[-1]),
                "description": pairs[0][0]["description"],
                "seeds": len(pairs),
                "diverged_seeds": sum(r["diverged"] for r, _ in pairs),
                "train_loss_median": statistics.median(_loss(r) for r, _ in pairs),
                "fraction_median": statistics.median(fr),
                "fraction_range": [min(fr), max(fr)],
                "fraction_per_seed": fr,
                "test_accuracy_median": statistics.median(r["test_accuracy"] for r, _ in pairs),
                "MB_per_worker": pairs[0][0]["bytes_per_worker"] / 1e6,
                "curve_seed0": pairs[0][0]["curve"],
            }
    return out


def _fmt(s: dict | None) -> str:
    if s is None:
        return "-"
    lo, hi = s["fraction_range"]
    text = f"{s['fraction_median']:.0%}" + (f" ({lo:.0%}-{hi:.0%})" if s["seeds"] > 1 else " (1 seed)")
    if s["diverged_seeds"]:
        text += f", {s['diverged_seeds']} diverged"
    return text + ("†" if s["at_grid_edge"] else "")


def table(summary: dict, device: str) -> str:
    lines = [
        f"# Momentum factor masking, 300 and 3000 steps ({device})",
        "",
        "Share of dense training's loss reduction, median (range) over 3 seeds, each configuration at its best rate "
        "of the same grid as dense (seed 0 chooses); † = the best rate is at an edge of the grid; - = not run.",
    ]
    groups = sorted({(s["task"], s["inner"]) for s in summary.values()})
    for task, inner in groups:
        cols = sorted({(s["workers"], s["split"], s["density"] or 0.0, s["steps"]) for s in summary.values()
                       if (s["task"], s["inner"]) == (task, inner) and s["density"]},
                      key=lambda c: (-c[2], c[3], -c[0], c[1]))  # fmt: skip
        lines += ["", f"## {task}, {'SGD momentum 0.9' if inner == 'sgdm' else 'AdamW'}", "",
                  "| configuration | " + " | ".join(f"{w}w {sp} {d:.1%} {st}" for w, sp, d, st in cols) + " |",
                  "|---|" + "---|" * len(cols)]  # fmt: skip
        for config in CONFIGS:
            row = []
            for w, sp, d, st in cols:
                key = f"{task}/{inner}/{w}/{sp}/{st}/{None if config == 'dense' else d}/{config}"
                row.append(_fmt(summary.get(key)))
            if any(x != "-" for x in row):
                lines.append(f"| {LABELS[config]} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("char_lm", 4, "iid", 3000), ("char_lm", 1, "iid", 300)]
    panels += [(t, w, "iid", 3000) for t in ("phishing", "digits_cnn") for w in (4, 1)]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (task, w, split, steps) in zip(axes.T.flat, panels):
        for i, config in enumerate(CONFIGS):
            s = summary.get(f"{task}/sgdm/{w}/{split}/{steps}/{None if config == 'dense' else 0.01}/{config}")
            if s and s["curve_seed0"]:
                st, _, loss = zip(*s["curve_seed0"])
                ax.plot(st, loss, label=LABELS[config], color=f"C{i}", ls="--" if config.endswith("_mask") else "-")
        ax.set_title(f"{task}, {w} worker(s), {steps} steps, TopK 1%, seed 0 at its best lr", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (window mean)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1, 0].legend(fontsize=7)  # the panel with every configuration
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class ResendProbe:
    """Per round, the entries the method sent (EF14: the nonzero entries of the applied message; the EF21 family:
    the entries where the applied shift changed) and the share of them already sent in one of the ``window``
    rounds before: how much of TopK's budget goes back to coordinates it has just sent. For the EF21 family also
    the share of the applied shift's squared norm held by entries unchanged for ``stale_after`` rounds or more
    (EF14 applies fresh entries only: 0)."""

    def __init__(self, shift: bool, window: int = 5, stale_after: int = 20):
        self.shift, self.window, self.prev, self.recent, self.shares, self.sent = shift, window, None, [], [], []
        self.stale_after, self.changed_at, self.stale, self.t = stale_after, None, [], 0

    def __call__(self, grads: torch.Tensor, est: torch.Tensor) -> None:
        est = est.detach().clone()
        sent = (est != self.prev) if self.shift and self.prev is not None else (est != 0)
        if self.recent:
            seen = torch.stack(self.recent).any(0)
            self.shares.append(float((sent & seen).sum()) / max(1, int(sent.sum())))
        self.sent.append(int(sent.sum()))
        self.recent = [*self.recent[-(self.window - 1) :], sent] if self.window > 1 else [sent]
        if self.shift:
            self.changed_at = torch.zeros_like(est, dtype=torch.long) if self.changed_at is None else self.changed_at
            self.changed_at[sent] = self.t
            sq = est.double().pow(2)
            old = (self.t - self.changed_at) >= self.stale_after
            self.stale.append(float(sq[old].sum() / sq.sum().clamp_min(1e-300)))
        self.prev, self.t = est, self.t + 1

    def result(self) -> dict:
        half = lambda xs: xs[len(xs) // 2 :]  # noqa: E731  the second half of the run
        out = {"resend_share": statistics.fmean(half(self.shares)), "sent_per_round": statistics.fmean(self.sent)}
        if self.stale:
            out["stale_share"] = statistics.fmean(half(self.stale))
        return out


def resend_probe(out: Path, lr: float = 0.1, steps: int = 300, density: float = 0.01) -> dict:
    """One worker on the transformer, TopK ``density``, seed 0: the resend share of each method with and without
    masking (and the EF21 family's stale share), in ``resend_probe.json`` (1%, 300 steps) or
    ``resend_probe_<density>_<steps>.json``."""
    from _train import run

    torch.set_num_threads(1)
    task = make_task("char_lm", 1, "iid")
    rows = {}
    for config in ("ef14", "ef14_mask", "ef21", "ef21_mask", "econtrol", "econtrol_mask"):
        comp, inner, scale, desc = build(config, "sgdm", density)
        probe = ResendProbe(shift=not config.startswith("ef14"))
        r = run(task, compression=comp, inner=inner, lr=lr * scale, steps=steps, probe=probe)
        rows[config] = {"description": desc, "lr": lr, "density": density, "steps": steps,
                        "train_loss": r["train_loss"], **probe.result()}  # fmt: skip
        print(config, rows[config], flush=True)
    name = "resend_probe.json" if (density, steps) == (0.01, 300) else f"resend_probe_{density:g}_{steps}.json"
    (out / name).write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    import argparse

    from _train import describe_run, load_runs, run_jobs, save_study

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--tiers", nargs="+", default=list("AEBCD"), choices=list("ABCDE"))
    ap.add_argument("--data", type=Path, default=DATA, help="the LIBSVM file of the tabular task")
    ap.add_argument("--report", action="store_true", help="only summarise runs.jsonl")
    ap.add_argument("--probe", action="store_true", help="only the resend probe (resend_probe.json)")
    ap.add_argument("--probe-density", type=float, default=0.01, help="the probe's TopK density")
    ap.add_argument("--probe-steps", type=int, default=300, help="the probe's steps")
    ap.add_argument("--probe-lr", type=float, default=0.1, help="the probe's learning rate")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--max-steps", type=int, default=None, help="only the cells of at most this many steps")
    ap.add_argument("--min-steps", type=int, default=None, help="only the cells of at least this many steps")
    ap.add_argument("--edge", type=float, default=None, metavar="LR",
                    help="only extend the grid: the chosen tiers' cells whose best rate is the grid's edge on LR's "
                         "side run LR (seed 0; seeds 1 and 2 where it wins), in edge_check.jsonl")  # fmt: skip
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path, edge_path = args.out / "runs.jsonl", args.out / "edge_check.jsonl"
    done = {**load_runs(path, _key), **load_runs(edge_path, _key)}
    if args.probe:
        resend_probe(args.out, args.probe_lr, args.probe_steps, args.probe_density)
        return 0

    def go(jobs, to=path):
        todo = [{**j, "data": str(args.data)} for j in jobs if _key(j) not in done]
        todo.sort(key=lambda j: -j["steps"] * (30 if j["task"] == "char_lm" else 1) * j["workers"])  # long first
        run_jobs(todo, done, to, args.procs, run_job, _key, lambda r: (
            f"{r['task']} {r['workers']}w {r['split']} {r['steps']} {r['density']} " + describe_run(r)))  # fmt: skip

    if not args.report:
        for tier in args.tiers:
            cells = [c for c in _cells(tier) if (args.max_steps is None or c["steps"] <= args.max_steps)
                     and (args.min_steps is None or c["steps"] >= args.min_steps)]  # fmt: skip
            if args.edge is not None:
                go(edge_jobs(done, cells, args.edge)[0], edge_path)
                go(edge_jobs(done, cells, args.edge)[1], edge_path)
                continue
            go([{**c, "lr": lr, "seed": 0} for c in cells for lr in GRIDS[_grid(c)]])
            go([{**c, "lr": _best_lr(done, c), "seed": s} for c in cells for s in SEEDS[1:]])
    summary = summarize(done, list("ABCDE"))
    save_study(args.out, {"cells": summary, "grids": {"/".join(map(str, k)): v for k, v in GRIDS.items()}},
               lambda s, device: table(s["cells"], device))  # fmt: skip
    try:
        plot(summary, args.out / "curves.png")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
