"""Why the EF21 family trails EF14 with one worker, measured (issue 24, item 3).

One worker on the convergence study's transformer (``char_lm``), TopK 1%, 300 steps, 3 seeds, every configuration at
its best rate of the same grid as dense training (seed 0 picks the rate by final training loss; the table gives the
median over seeds of the fraction of dense training's loss reduction, ``(L0 - L) / (L0 - L_dense)``).

Configurations:
- ``ef14``, ``ef21``, ``ef21sgdm``: ``tk.recommended`` (EF14 inside SGD momentum 0.9; EF21 on the worker's momentum,
  SGD without momentum outside; EF21-SGDM with its own momentum), next to ``dense`` (SGD momentum 0.9);
- ``ef21_full``: EF21 with ``init="full"`` (the first round sends the whole gradient, so the estimate starts right);
- ``ef21_warmup``: EF21 under DGC's density warm-up (25% down to 1% over the first 60 rounds, 4 stages);
- ``ef14_sgd``, ``ef21_sgd`` against ``dense_sgd``: the two methods inside plain SGD, no momentum anywhere, where the
  mechanism shows cleanly. Measured there each step: the share of the applied estimate's squared norm held by
  entries the estimate last changed at least 20 steps before (``stale``: EF14 sends fresh entries only, EF21 keeps
  applying every entry of its estimate until TopK selects it again), the cosine between the applied estimate and
  the current gradient, and at the end the gap between the summed updates and the summed gradients,
  ``|sum est - sum g| / |sum g|`` (EF14: its error, ``|e_T|``).

    python benchmarks/bench_ef21_gap.py [--procs 2]   # about 5 minutes on 2 CPU cores; resumes from runs.jsonl

Results: ``benchmarks/results/ef21_gap/`` (runs.jsonl, summary.json, table.md).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent / "results" / "ef21_gap"
STEPS, DENSITY, STALE_AFTER = 300, 0.01, 20
LRS = {"sgdm": (0.003, 0.01, 0.03, 0.1, 0.3), "sgd": (0.03, 0.1, 0.3, 1.0)}
SEEDS = (0, 1, 2)
CONFIGS = {  # name: (inner group, dense reference)
    "dense": ("sgdm", "dense"),
    "ef14": ("sgdm", "dense"),
    "ef21": ("sgdm", "dense"),
    "ef21sgdm": ("sgdm", "dense"),
    "ef21_full": ("sgdm", "dense"),
    "ef21_warmup": ("sgdm", "dense"),
    "dense_sgd": ("sgd", "dense_sgd"),
    "ef14_sgd": ("sgd", "dense_sgd"),
    "ef21_sgd": ("sgd", "dense_sgd"),
}


def build(config: str):
    """(compression, inner optimizer name of benchmarks/_train.py, lr multiplier)."""
    import torchkit as tk
    from torchkit.coupling import recommended

    comp = tk.TopK(ratio=DENSITY)
    if config == "dense":
        return "dense", "sgdm", 1.0
    if config == "dense_sgd":
        return "dense", "sgd", 1.0
    if config in ("ef14_sgd", "ef21_sgd"):
        return (tk.EF14(comp) if config == "ef14_sgd" else tk.EF21(comp, init="compressed")), "sgd", 1.0
    if config == "ef21_full":
        return tk.LocalMomentum(tk.EF21(comp, init="full"), 0.9), "sgd", 1.0
    if config == "ef21_warmup":
        warm = tk.DensityWarmup(comp, start=0.25, steps=60, stages=4)
        return tk.LocalMomentum(tk.EF21(warm, init="compressed"), 0.9), "sgd", 1.0
    rec = recommended(config, comp, torch.optim.SGD)
    return rec.feedback, ("sgdm" if rec.momentum else "sgd"), rec.lr_scale


class Probe:
    """Per step: the stale share of the estimate and its cosine with the gradient; the summed-update gap."""

    def __init__(self):
        self.t, self.prev, self.last, self.sum_est, self.sum_g = 0, None, None, None, None
        self.stale, self.cos = [], []

    def __call__(self, grads: torch.Tensor, est: torch.Tensor) -> None:
        g = grads.mean(0)
        est = est.detach().clone()
        if self.prev is None:
            self.last = torch.zeros_like(est, dtype=torch.long)
            self.sum_est, self.sum_g = torch.zeros_like(est), torch.zeros_like(g)
        else:
            self.last[est != self.prev] = self.t
        old = (self.t - self.last >= STALE_AFTER) & (est != 0)
        total = float(est.pow(2).sum())
        self.stale.append(float(est[old].pow(2).sum()) / total if total > 0 else 0.0)
        self.cos.append(float(torch.nn.functional.cosine_similarity(est, g, dim=0)))
        self.sum_est += est
        self.sum_g += g
        self.prev, self.t = est, self.t + 1

    def result(self) -> dict:
        return {
            "stale_share_mean": statistics.fmean(self.stale),
            "cos_mean": statistics.fmean(self.cos),
            "sum_gap": float((self.sum_est - self.sum_g).norm() / self.sum_g.norm()),
        }


def run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    from _train import run

    from torchkit.apps.tasks import char_lm

    task = char_lm(1, "iid")
    comp, inner, scale = build(job["config"])
    probe = Probe() if job["config"].endswith("_sgd") and job["config"] != "dense_sgd" else None
    r = run(task, compression=comp, inner=inner, lr=job["lr"] * scale, steps=STEPS, seed=job["seed"], probe=probe)
    r.pop("curve")
    return {**job, **r, **(probe.result() if probe else {})}


def _key(r: dict) -> tuple:
    return (r["config"], r["lr"], r["seed"])


def _best(done: dict, config: str) -> float | None:
    lrs = [lr for lr in LRS[CONFIGS[config][0]] if (config, lr, 0) in done]
    ok = [lr for lr in lrs if not done[(config, lr, 0)]["diverged"]]
    return min(ok, key=lambda lr: done[(config, lr, 0)]["train_loss"]) if ok else None


def summarize(done: dict) -> dict:
    best = {c: _best(done, c) for c in CONFIGS}
    rows = []
    for config, (group, ref) in CONFIGS.items():
        lr, ref_lr = best[config], best[ref]
        runs = [done.get((config, lr, s)) for s in SEEDS]
        refs = [done.get((ref, ref_lr, s)) for s in SEEDS]
        if lr is None or None in runs or None in refs:
            continue
        frac = [(r["L0"] - r["train_loss"]) / (d["L0"] - d["train_loss"]) for r, d in zip(runs, refs)]
        row = {"config": config, "inner": group, "lr": lr, "train_loss_median": statistics.median(
            r["train_loss"] for r in runs), "fraction_median": statistics.median(frac), "fraction_range": [
            min(frac), max(frac)]}  # fmt: skip
        for name in ("stale_share_mean", "cos_mean", "sum_gap"):
            if name in runs[0]:
                row[name] = statistics.median(r[name] for r in runs)
        rows.append(row)
    return {"steps": STEPS, "density": DENSITY, "seeds": list(SEEDS), "lrs": LRS, "best_lr": best, "rows": rows}


def table(summary: dict, device: str) -> str:
    lines = [
        f"# EF21 against EF14 with one worker: char_lm, TopK {100 * summary['density']:g}%, {summary['steps']} steps, "
        f"seeds {summary['seeds']}, each at its best rate of its group's grid {summary['lrs']}; {device}",
        "",
        "| configuration | lr | final train loss (median) | share of dense's loss reduction, median [range] | "
        "stale share of the estimate | cos(estimate, gradient) | summed-update gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lo, hi = r["fraction_range"]
        extra = [f"{r[n]:.3f}" if n in r else "" for n in ("stale_share_mean", "cos_mean", "sum_gap")]
        lines.append(
            f"| {r['config']} | {r['lr']:g} | {r['train_loss_median']:.4f} | "
            f"{100 * r['fraction_median']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {' | '.join(extra)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from _train import describe_run, run_jobs, save_study, study_cli

    args, path, done = study_cli(argv, __doc__, OUT, _key)

    if not args.report:  # seed 0 over the grid, then seeds 1 and 2 at each configuration's best rate
        grid = [{"config": c, "lr": lr, "seed": 0} for c, (g, _) in CONFIGS.items() for lr in LRS[g]]
        run_jobs([j for j in grid if _key(j) not in done], done, path, args.procs, run_job, _key, describe_run)
        more = [{"config": c, "lr": _best(done, c), "seed": s} for c in CONFIGS for s in SEEDS[1:]]
        more = [j for j in more if j["lr"] is not None and _key(j) not in done]
        run_jobs(more, done, path, args.procs, run_job, _key, describe_run)
    save_study(args.out, summarize(done), table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
