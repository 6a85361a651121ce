"""Which scalable exchange? All-gathered TopK against the shared-support exchanges at equal bytes per rank.

With n workers, an all-gathered TopK brings each rank ``(n - 1) 8 k`` bytes; the shared-support exchanges, whose
values are summed by ``all_reduce``, bring ``2 (n-1)/n 4 k`` (plus the leader's indices, ``(n-1)/n 4 k``, for
:class:`~torchkit.CyclicTopK`) whatever n (:func:`torchkit.comm.received_bytes`). So at equal bytes per rank they
afford a larger k: ``2n/3`` times TopK's for CyclicTopK, ``n`` times for ``RandK(shared=True)``.

Grid: digits_cnn, SGD momentum 0.9, 8 and 16 simulated workers, iid and non-iid, EF14 and EF21 in torchkit's
recommended configurations, exchange {all-gathered TopK at 1% and 0.1%, CyclicTopK, shared RandK at its bytes per
rank}, next to dense training. Fair tuning as in ``bench_convergence.py``: the same learning-rate grid for every
method with seed 0, seeds 1 and 2 at the best value; reported: the median over the 3 seeds (and the range) of the
fraction of dense training's loss reduction, and the bytes each rank receives per step.

    python benchmarks/bench_exchange_study.py [--procs 2]     # resumes from runs.jsonl
    python benchmarks/bench_exchange_study.py --report

Results: ``benchmarks/results/exchange/`` (runs.jsonl, study.json, table.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent / "results" / "exchange"
TASK, INNER, STEPS = "digits_cnn", "sgdm", 200
DENSITIES = (0.01, 0.001)  # of the all-gathered TopK; the shared supports get its bytes per rank
LRS = (0.01, 0.03, 0.1)
WORKERS = (8, 16)
SPLITS = ("iid", "noniid")
METHODS = ("ef14", "ef21")
EXCHANGES = ("allgather", "cyclic", "shared_randk")
SEEDS = (0, 1, 2)


def density_of(exchange: str, n: int, density: float) -> float:
    """The density whose bytes per rank equal all-gathered TopK's at ``density`` with n workers (fp32 values,
    int32 indices)."""
    if exchange == "allgather":
        return density
    per_k = {"cyclic": 12 * (n - 1) / n, "shared_randk": 8 * (n - 1) / n}[exchange]  # bytes per kept entry
    return min(1.0, density * 8 * (n - 1) / per_k)


def received_per_step(exchange: str, n: int, d: int, density: float) -> float:
    """Bytes a rank receives per step: ``bench_exchange.model`` (checked against Gloo there) at the density sent."""
    from bench_exchange import model

    return model(exchange, n, d, 1.0 if exchange == "dense" else density_of(exchange, n, density))


def build(method: str, exchange: str, n: int, density: float):
    import torchkit as tk
    from torchkit.coupling import recommended

    if method == "dense":
        return "dense", "sgdm", 1.0
    rho = density_of(exchange, n, density)
    comp = {
        "allgather": lambda: tk.TopK(ratio=rho),
        "cyclic": lambda: tk.CyclicTopK(ratio=rho),
        "shared_randk": lambda: tk.RandK(ratio=rho, shared=True, seed=1),
    }[exchange]()
    rec = recommended(method, comp, torch.optim.SGD)
    return rec.feedback, {0.9: "sgdm", 0.0: "sgd"}[rec.momentum], rec.lr_scale


def _run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    from _train import run

    from torchkit.apps.tasks import digits_cnn

    task = digits_cnn(job["workers"], job["split"])
    comp, inner, scale = build(job["method"], job["exchange"], job["workers"], job["density"])
    r = run(task, compression=comp, inner=inner, lr=job["lr"] * scale, steps=STEPS, seed=job["seed"])
    r["received_per_step"] = received_per_step(job["exchange"], job["workers"], r["params"], job["density"])
    return {**job, **r, "config": repr(comp), "inner_used": inner}


def _key(j: dict) -> tuple:
    dens = None if j["method"] == "dense" else j.get("density", 0.01)  # the first runs were all at 1%
    return (j["workers"], j["split"], j["method"], j["exchange"], dens, j["lr"], j["seed"])


def _cells():
    for n in WORKERS:
        for split in SPLITS:
            yield dict(workers=n, split=split, method="dense", exchange="dense", density=None)
            for density in DENSITIES:
                for m in METHODS:
                    for ex in EXCHANGES:
                        yield dict(workers=n, split=split, method=m, exchange=ex, density=density)


def _run_many(jobs, done, path, procs):
    from _train import run_jobs

    run_jobs([j for j in jobs if _key(j) not in done], done, path, procs, _run_job, _key, lambda r: (
        f"n={r['workers']} {r['split']} {r['method']} {r['exchange']} {r.get('density')} lr={r['lr']} "
        f"seed={r['seed']}: {r['train_loss']:.4f}"))  # fmt: skip


def _loss(r):
    return float("inf") if r["diverged"] or r["train_loss"] != r["train_loss"] else r["train_loss"]


def _best_lr(done, cell):
    runs = [done[_key({**cell, "lr": lr, "seed": 0})] for lr in LRS]
    return min(runs, key=_loss)["lr"]


def _pct(x: float) -> str:
    return f"{x:.1%}" if x == x and abs(x) != float("inf") else "diverged"  # a seed that diverged: loss inf


def report(done: dict) -> dict:
    cells = []
    for cell in _cells():
        lr = _best_lr(done, cell)
        runs = [done[_key({**cell, "lr": lr, "seed": s})] for s in SEEDS]
        dense_cell = {**cell, "method": "dense", "exchange": "dense", "density": None}
        dense = [done[_key({**dense_cell, "lr": _best_lr(done, dense_cell), "seed": s})] for s in SEEDS]
        fr = [(r["L0"] - _loss(r)) / (dn["L0"] - _loss(dn)) for r, dn in zip(runs, dense)]
        cells.append({**cell, "lr": lr, "sent_density": None if cell["method"] == "dense" else
                      density_of(cell["exchange"], cell["workers"], cell["density"]),
                      "fraction_of_dense": statistics.median(fr),
                      "fraction_range": [min(fr), max(fr)], "train_loss": statistics.median(_loss(r) for r in runs),
                      "test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
                      "received_per_step_MB": runs[0]["received_per_step"] / 1e6})  # fmt: skip
    lines = [
        f"# Exchanges at equal bytes per rank ({TASK}, SGD momentum, {STEPS} steps, 3 seeds, median [range])",
        "",
        "| workers | split | bytes of TopK at | method | exchange | density sent | received per step | lr |"
        " share of dense's loss reduction | test acc. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        dens = "-" if c["sent_density"] is None else f"{c['sent_density']:.2%}"
        at = "-" if c["density"] is None else f"{c['density']:.1%}"
        lo, hi = c["fraction_range"]
        lines.append(f"| {c['workers']} | {c['split']} | {at} | {c['method']} | {c['exchange']} | {dens} | "
                     f"{c['received_per_step_MB']:.3f} MB | {c['lr']} | {_pct(c['fraction_of_dense'])} "
                     f"[{_pct(lo)}, {_pct(hi)}] | {c['test_accuracy']:.3f} |")  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    from torchkit.apps import bench

    result = {"device": bench.device_name(torch.device("cpu")), "torch": torch.__version__, "task": TASK,
              "steps": STEPS, "lrs": LRS, "seeds": SEEDS, "cells": cells}  # fmt: skip
    (OUT / "study.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    path = OUT / "runs.jsonl"
    OUT.mkdir(parents=True, exist_ok=True)
    from _train import load_runs

    done = load_runs(path, _key)
    if not args.report:
        _run_many([{**c, "lr": lr, "seed": 0} for c in _cells() for lr in LRS], done, path, args.procs)
        best = [{**c, "lr": _best_lr(done, c), "seed": s} for c in _cells() for s in SEEDS[1:]]
        _run_many(best, done, path, args.procs)
    report(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
