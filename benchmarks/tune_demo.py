"""Learning rates for ``torchkit demo``: each method in the demo's configuration (``tk.recommended``, with
``heterogeneous=True`` on the label-sorted shards) on the demo's own model and data (4 workers simulated in one
process, global TopK 1% over the model as the demo's single DDP bucket), over the same grid; per method, the value
with the lowest sum of the two splits' final training losses goes into ``torchkit.apps.demo.TUNED_LR``.

    python benchmarks/tune_demo.py     # writes results/demo/lr_sweep.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train import run  # noqa: E402

from torchkit.apps import demo  # noqa: E402
from torchkit.apps.tasks import Task  # noqa: E402

GRID = (0.03, 0.1, 0.3, 1.0)
OUT = Path(__file__).resolve().parent / "results" / "demo" / "lr_sweep.json"


def demo_task(n_workers: int = 4, noniid: bool = False, batch: int = 64, seed: int = 0) -> Task:
    x, y, xt, yt = demo.make_data(seed)
    if noniid:
        order = torch.argsort(y, stable=True)
        per = x.shape[0] // n_workers
        shards = [order[r * per : (r + 1) * per] for r in range(n_workers)]
    else:
        shards = [torch.arange(r, x.shape[0], n_workers) for r in range(n_workers)]

    def batches(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = [s[torch.randint(0, s.numel(), (batch,), generator=g)] for s in shards]
        return torch.stack([x[p] for p in picks]), torch.stack([y[p] for p in picks])

    return Task("demo_mlp", "noniid" if noniid else "iid", n_workers, demo.make_model, batches, (xt, yt))


def main() -> int:
    torch.set_num_threads(1)
    out = {"grid": GRID, "steps": 600, "runs": {}}
    # "noniid_masked": the shuffled-data configuration on the label-sorted shards, where it differs (the masking)
    for split, noniid, het in (("iid", False, False), ("noniid", True, True), ("noniid_masked", True, False)):
        task = demo_task(noniid=noniid)
        for method in demo.METHODS:
            fb, opt_kw, scale, desc = demo._config(method, 0.01, heterogeneous=het)
            if split == "noniid_masked" and not getattr(fb, "mask", False):
                continue
            comp = {"none": "dense", "powersgd": "powersgd"}.get(method, fb)
            inner = "sgdm" if opt_kw["momentum"] else "sgd"
            for lr in GRID:
                t0 = time.perf_counter()
                r = run(task, compression=comp, inner=inner, lr=lr * scale, steps=600, log_every=600)
                key = f"{split}/{method}/{lr}"
                out["runs"][key] = {k: r[k] for k in ("train_loss", "test_accuracy", "diverged")} | {"config": desc}
                took = time.perf_counter() - t0
                print(key, f"{r['train_loss']:.4f} {r['test_accuracy']:.3f} {took:.1f}s", flush=True)
    best = {}  # one rate per method: the lowest sum of the two splits' final training losses
    for method in demo.METHODS:
        total = {
            lr: sum(out["runs"][f"{split}/{method}/{lr}"]["train_loss"] for split in ("iid", "noniid")) for lr in GRID
        }
        best[method] = min((s if s == s else float("inf"), lr) for lr, s in total.items())[1]
    out["best"] = best
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print(json.dumps(best, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
