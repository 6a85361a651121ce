"""Compressed local SGD on one machine: loss against bytes sent for error feedback on pseudo-gradients.

Runs :func:`torchkit.sim.simulate_local` (the trajectory of :class:`torchkit.LocalSGD`, tested equal on 3 Gloo
ranks) on a small real task: an MLP on the demo's generated 10-class data (labels from a random teacher network),
split iid over ``--workers`` workers, AdamW inner steps, the same number of gradient steps for every run.

Compared (every run over the same inner learning-rate grid and seeds; the best rate per configuration by mean final
loss is reported):
- ``ddp``: synchronous data parallelism, AdamW on the mean gradient, the dense fp32 gradient sent every step;
- ``diloco-H``: uncompressed local SGD (DiLoCo): H AdamW steps, exact averaging of the fp32 pseudo-gradients
  (``EF14(Identity())``), outer SGD with Nesterov momentum (lr 0.7, momentum 0.9);
- ``<method>-<k>%-H``: EF14 / EF21 / EControl (eta = k) with TopK k% on the pseudo-gradient, values sent in bf16
  with int32 indices (``wire_dtype=torch.bfloat16``), plain averaging as the outer step (SparseLoCo's choice).

Bytes are the payload one worker sends (as ``Feedback.wire_bytes``; a dense round counts 4 bytes per fp32 value),
not what a particular collective moves. Nothing here measures wall time on a network link.

    python benchmarks/bench_local_sgd.py            # about 15 to 25 minutes on 2 busy CPU cores
    python benchmarks/bench_local_sgd.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

import torchkit as tk
from torchkit._results import save_result
from torchkit.apps.bench import device_name
from torchkit.apps.demo import make_data
from torchkit.sim import simulate_local

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "local_sgd"
HIDDEN = 64
SHAPES = [(32, HIDDEN), (HIDDEN,), (HIDDEN, HIDDEN), (HIDDEN,), (HIDDEN, 10), (10,)]
SIZES = [math.prod(s) for s in SHAPES]
D = sum(SIZES)
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)


def _unflat(X: torch.Tensor) -> list[torch.Tensor]:
    out, off = [], 0
    for shape, n in zip(SHAPES, SIZES):
        out.append(X[:, off : off + n].view(X.shape[0], *shape))
        off += n
    return out


def _logits(X: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Per-worker MLP: X [n, D] parameters, xb [n, batch, 32] inputs."""
    w1, b1, w2, b2, w3, b3 = _unflat(X)
    h = torch.relu(torch.bmm(xb, w1) + b1[:, None])
    h = torch.relu(torch.bmm(h, w2) + b2[:, None])
    return torch.bmm(h, w3) + b3[:, None]


def _init(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for shape in SHAPES:
        fan_in = shape[0] if len(shape) == 2 else HIDDEN
        parts.append(((torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan_in)).reshape(-1))
    return torch.cat(parts)


class Task:
    """The data split over workers; ``grad_fn`` draws each worker's next minibatch (the same sequence for every
    configuration of a seed)."""

    def __init__(self, seed: int, workers: int, batch: int, n_train: int):
        x, y, xt, yt = make_data(seed, n_train=n_train, n_test=4096)
        self.x, self.y, self.xt, self.yt = x, y, xt, yt
        self.workers, self.batch = workers, batch
        self.shards = [torch.arange(i, x.shape[0], workers) for i in range(workers)]
        self.gen = torch.Generator().manual_seed(1000 + seed)
        self.eval_idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:4096]

    def grad_fn(self, X: torch.Tensor) -> torch.Tensor:
        picks = [s[torch.randint(len(s), (self.batch,), generator=self.gen)] for s in self.shards]
        idx = torch.stack(picks)
        with torch.enable_grad():
            Xr = X.detach().requires_grad_(True)
            logits = _logits(Xr, self.x[idx])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), self.y[idx].reshape(-1), reduction="none")
            loss.view(self.workers, -1).mean(1).sum().backward()  # row i: worker i's mean loss
        return Xr.grad

    @torch.no_grad()
    def loss(self, x: torch.Tensor) -> float:
        idx = self.eval_idx
        return float(torch.nn.functional.cross_entropy(_logits(x[None], self.x[idx][None])[0], self.y[idx]))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor) -> float:
        return float((_logits(x[None], self.xt[None])[0].argmax(1) == self.yt).float().mean())


def _configs(hs, ratios, methods):
    cfgs = [{"name": "ddp", "kind": "ddp", "H": 1}]
    cfgs += [{"name": f"diloco-{h}", "kind": "diloco", "H": h} for h in hs if h > 1]
    for m in methods:
        for r in ratios:
            cfgs += [{"name": f"{m}-{r:g}%-{h}", "kind": m, "ratio": r / 100, "H": h} for h in hs]
    return cfgs


def _feedback(cfg):
    comp = tk.TopK(ratio=cfg.get("ratio", 1.0))
    return {
        "diloco": lambda: tk.EF14(tk.Identity()),
        "ef14": lambda: tk.EF14(comp),
        "ef21": lambda: tk.EF21(comp),
        "econtrol": lambda: tk.EControl(comp, eta=cfg["ratio"]),
    }[cfg["kind"]]()


def run_one(cfg, lr, seed, args, every):
    task = Task(seed, args.workers, args.batch, args.n_train)
    x0 = _init(seed)
    inner = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    steps, losses, sent = [], [], []
    if cfg["kind"] == "ddp":
        x = x0.clone()
        opt = inner([x])
        for t in range(args.steps + 1):
            if t % every == 0:
                steps.append(t)
                losses.append(task.loss(x))
                sent.append(t * 4 * D)
            if t == args.steps:
                break
            x.grad = task.grad_fn(x.expand(args.workers, D)).mean(0)
            opt.step()
        return {"steps": steps, "loss": losses, "bytes": sent, "accuracy": task.accuracy(x)}
    H = cfg["H"]
    stride = max(1, every // H)
    fb = _feedback(cfg)
    diloco = cfg["kind"] == "diloco"
    evals = []

    def eval_fn(anchor):
        r = len(evals)
        evals.append(task.loss(anchor) if r % stride == 0 or r == args.steps // H else float("nan"))
        return evals[-1]

    res = simulate_local(
        fb,
        task.grad_fn,
        x0,
        n_workers=args.workers,
        rounds=args.steps // H,
        sync_every=H,
        inner_optimizer=inner,
        outer_optimizer=NESTEROV if diloco else None,
        segments=SIZES,
        wire_dtype=None if diloco else torch.bfloat16,
        eval_fn=eval_fn,
    )
    for r, v in enumerate(res.evals.tolist()):
        if not math.isnan(v):
            steps.append(r * H)
            losses.append(v)
            sent.append(int(res.wire_bytes[r]))
    return {"steps": steps, "loss": losses, "bytes": sent, "accuracy": task.accuracy(res.x)}


def summarize(runs, cfgs, lrs, seeds, target_factor=1.02):
    """Per configuration: the inner rate with the lowest mean final loss, and at it, per seed, the final loss
    relative to synchronous data parallelism's (ddp at its best rate, same seed: the seed draws the data, the
    initial weights and the batches) and the bytes and inner steps until the loss first falls to
    ``target_factor`` times ddp's final loss (evaluated every ``max(H)`` inner steps)."""
    by = {}
    for r in runs:
        by.setdefault((r["config"], r["lr"]), []).append(r)
    best = {}
    for cfg in cfgs:
        cands = [(sum(x["loss"][-1] for x in by[(cfg["name"], lr)]) / len(seeds), lr) for lr in lrs]
        best[cfg["name"]] = min(cands)[1]
    ddp_final = {x["seed"]: x["loss"][-1] for x in by[("ddp", best["ddp"])]}
    target = {seed: target_factor * v for seed, v in ddp_final.items()}

    def first_hit(x):
        at = next((i for i, v in enumerate(x["loss"]) if v <= target[x["seed"]]), None)
        return None if at is None else (x["bytes"][at], x["steps"][at])

    ddp_hit = {x["seed"]: first_hit(x) for x in by[("ddp", best["ddp"])]}
    rows = []
    for cfg in cfgs:
        rs = by[(cfg["name"], best[cfg["name"]])]
        rel = [x["loss"][-1] / ddp_final[x["seed"]] for x in rs]
        hits = {x["seed"]: first_hit(x) for x in rs}
        reached = {k: v for k, v in hits.items() if v is not None}
        fewer = [ddp_hit[k][0] / v[0] for k, v in reached.items() if ddp_hit.get(k) is not None and v[0] > 0]
        rows.append(
            {
                "config": cfg["name"],
                "H": cfg["H"],
                "ratio": cfg.get("ratio"),
                "lr": best[cfg["name"]],
                "final_loss_mean": sum(x["loss"][-1] for x in rs) / len(rs),
                "final_vs_ddp_mean": sum(rel) / len(rel) - 1,
                "final_vs_ddp_min": min(rel) - 1,
                "final_vs_ddp_max": max(rel) - 1,
                "accuracy_mean": sum(x["accuracy"] for x in rs) / len(rs),
                "mb_sent": rs[0]["bytes"][-1] / 1e6,
                "seeds_reaching_target": len(reached),
                "mb_to_target_mean": sum(v[0] for v in reached.values()) / len(reached) / 1e6 if reached else None,
                "steps_to_target_mean": sum(v[1] for v in reached.values()) / len(reached) if reached else None,
                "fewer_bytes_to_target_than_ddp": [min(fewer), sum(fewer) / len(fewer), max(fewer)] if fewer else None,
            }
        )
    return {"target_factor": target_factor, "ddp_final_loss": ddp_final, "best_lr": best, "rows": rows}


def table(summary, n_seeds) -> str:
    lines = [
        f"Per seed, the target is {summary['target_factor']:g} x ddp's final loss (ddp at its best inner rate, the "
        f"same seed); every configuration at its own best inner rate (lowest mean final loss); {n_seeds} seeds: "
        "mean [min, max]",
        "",
        "| configuration | H | inner lr | final loss | vs ddp | test acc | MB sent per worker | seeds at target | "
        "MB to target | inner steps to target | fewer bytes to target than ddp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        to, steps, few = r["mb_to_target_mean"], r["steps_to_target_mean"], r["fewer_bytes_to_target_than_ddp"]
        lines.append(
            f"| {r['config']} | {r['H']} | {r['lr']:g} | {r['final_loss_mean']:.4f} | "
            f"{100 * r['final_vs_ddp_mean']:+.1f}% [{100 * r['final_vs_ddp_min']:+.1f}, "
            f"{100 * r['final_vs_ddp_max']:+.1f}] | {100 * r['accuracy_mean']:.1f}% | {r['mb_sent']:.3f} | "
            f"{r['seeds_reaching_target']}/{n_seeds} | {'-' if to is None else f'{to:.3f}'} | "
            f"{'-' if steps is None else f'{steps:.0f}'} | "
            f"{'-' if few is None else f'{few[1]:.0f}x [{few[0]:.0f}, {few[2]:.0f}]'} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {r["config"]: r["lr"] for r in result["summary"]["rows"]}
    curves = {}
    for run in result["runs"]:
        if best.get(run["config"]) == run["lr"]:
            curves.setdefault(run["config"], []).append(run)
    methods = result["args"]["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.5), sharey=True, squeeze=False)
    colors = {1: "tab:blue", 8: "tab:orange", 32: "tab:red"}

    ddp_final = {int(k): v for k, v in result["summary"]["ddp_final_loss"].items()}

    def line(ax, name, **kw):
        rs = curves[name]
        n = min(len(r["loss"]) for r in rs)
        mean = [sum(r["loss"][i] / ddp_final[r["seed"]] for r in rs) / len(rs) for i in range(n)]
        pts = [(rs[0]["bytes"][i] / 1e6, mean[i]) for i in range(n) if rs[0]["bytes"][i] > 0]  # log axis
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **kw)

    for ax, m in zip(axes[0], methods):
        line(ax, "ddp", color="black", lw=2)
        for name in curves:
            if name.startswith("diloco-"):
                line(ax, name, color="gray", ls=":" if name.endswith("-8") else "-.", lw=1.5)
            elif name.startswith(m + "-"):
                h = int(name.rsplit("-", 1)[1])
                ls = "-" if "-1%-" in name else "--"
                line(ax, name, color=colors.get(h, "tab:green"), ls=ls)
        ax.axhline(result["summary"]["target_factor"], color="k", lw=0.5, ls=":")
        ax.set_ylim(0.9, 2.0)
        ax.set_xscale("log")
        ax.set_xlabel("MB sent per worker")
        ax.set_title(f"{m}: TopK 1% (solid), 3% (dashed); H by colour")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss / ddp's final loss (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1536, help="inner (gradient) steps per worker, every run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=16384)
    ap.add_argument("--H", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 3.0], help="TopK, percent")
    ap.add_argument("--methods", nargs="+", default=["ef14", "ef21", "econtrol"])
    ap.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        help="inner AdamW rates, every configuration",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="configuration names to run")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 steps, one seed, one rate")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.lrs = 64, [0], [3e-3]
    torch.set_num_threads(1)
    every = max(args.H)
    cfgs = _configs(args.H, args.ratios, args.methods)
    if args.only:
        cfgs = [c for c in cfgs if c["name"] in args.only]
    t0 = time.time()
    runs = []
    for cfg in cfgs:
        for lr in args.lrs:
            for seed in args.seeds:
                s = time.time()
                out = run_one(cfg, lr, seed, args, every)
                runs.append({"config": cfg["name"], "lr": lr, "seed": seed, **out})
                print(
                    f"{cfg['name']:>18} lr={lr:g} seed={seed}: loss {out['loss'][-1]:.4f} "
                    f"acc {out['accuracy']:.3f} MB {out['bytes'][-1] / 1e6:.3f} ({time.time() - s:.1f} s)",
                    flush=True,
                )
    elapsed = time.time() - t0
    summary = summarize(runs, cfgs, args.lrs, args.seeds)
    text = table(summary, len(args.seeds))
    print(text)
    print(f"total {elapsed:.0f} s")
    result = {
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "commit": _commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(elapsed),
        "command": " ".join(["python", "benchmarks/bench_local_sgd.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task": f"MLP 32-{HIDDEN}-{HIDDEN}-10 ({D} parameters) on torchkit.apps.demo.make_data (seed = run seed), "
        f"{args.n_train} training examples split iid over {args.workers} workers, batch {args.batch} per worker, "
        "AdamW inner steps (weight decay 0), loss = cross-entropy on 4096 training examples at the anchor",
        "bytes": "payload one worker sends, Feedback.wire_bytes: ddp 4 d per step; diloco 4 d per round (fp32); "
        "EF methods: bf16 values + int32 indices per round, the EF21 family's dense first round in bf16",
        "summary": summary,
        "runs": runs,
    }
    if not args.quick:
        save_result(result, args.out, "results", plot)
        (args.out / "table.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
