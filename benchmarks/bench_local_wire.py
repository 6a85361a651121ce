"""Local SGD at a quarter bit per parameter: the 2-bit wire against DiLoCo on the character language model.

Runs :func:`torchkit.sim.simulate_local` (the trajectory of :class:`torchkit.LocalSGD`, tested equal to it on Gloo
ranks with every wire) on ``char_lm`` (4 workers, iid), AdamW inner steps, the same H and the same inner steps
(tokens) for every configuration:

- ``diloco``: exact averaging of the fp32 pseudo-gradients (``EF14(Identity())``), outer SGD with Nesterov momentum
  (lr 0.7, momentum 0.9), DiLoCo's outer step;
- ``average``: the same fp32 round with plain averaging as the outer step (local SGD), the compressed runs' outer
  step without compression;
- ``topk-<wire>``: EF14 with TopK 1.56% in chunks of 4096 (SparseLoCo's and Covenant-72B's density), values in
  ``<wire>`` (bf16, int8 with one scale per chunk, or 2-bit codes with two magnitudes per chunk: ``torch.int2``),
  12-bit chunk offsets, plain averaging as the outer step (SparseLoCo's choice: the error feedback carries what
  momentum would); what the wire rounds away stays in the error;
- ``topk-int2-overlap``: the 2-bit run with overlapped rounds (``overlap=True``: each round runs during the next
  period and its outer step is applied one period late, as overlapping DiLoCo), each worker's next period started
  from half its own progress and half its own message (``overlap_mix=0.5``, the default);
- ``topk-int2-overlap-nomix``: the same from its whole own progress (``overlap_mix=0``, the plain delayed start);
  ``topk-int2-overlap-mix<m>``: the same with ``overlap_mix=m`` (the sweep behind the default).

Fair tuning: every configuration over the same inner learning-rate grid and seeds; its best rate is the one with
the lowest median final loss. Reported per configuration at its best rate: the median (and range) over the seeds
of the final training loss (a fixed sample of training batches) and of the test loss, and the bits per parameter
per sync one worker sends (``Feedback.wire_bytes``, exact: values, offsets, scales).

    python benchmarks/bench_local_wire.py [--procs 2]    # about 27 minutes on 2 CPU cores; resumes from runs.jsonl
    python benchmarks/bench_local_wire.py --report

Results: ``benchmarks/results/local_wire/`` (runs.jsonl, summary.json, table.md).
"""

from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent / "results" / "local_wire"
H, STEPS, WORKERS = 8, 320, 4
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2)
RATIO, CHUNK = 0.0156, 4096
CONFIGS = (
    "diloco",
    "average",
    "topk-bf16",
    "topk-int8",
    "topk-int2",
    "topk-int2-overlap",
    "topk-int2-overlap-nomix",
    "topk-int2-overlap-mix0.25",
    "topk-int2-overlap-mix0.75",
    "topk-int2-overlap-mix1",
)
WIRES = {"bf16": torch.bfloat16, "int8": torch.int8, "int2": torch.int2}


def _feedback(config: str):
    import torchkit as tk

    if config in ("diloco", "average"):
        return tk.EF14(tk.Identity()), None
    return tk.EF14(tk.TopK(ratio=RATIO, chunk=CHUNK)), WIRES[config.split("-")[1]]


def _mix(config: str) -> float | None:
    if config.endswith("-nomix"):
        return 0.0
    return float(config.split("-mix")[1]) if "-mix" in config else None


def run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    from _train import train_eval_loss

    from torchkit.apps.tasks import char_lm
    from torchkit.sim import simulate_local

    task = char_lm(WORKERS, "iid")
    model = task.model(job["seed"])
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    calls = {"t": 0}

    def grad_fn(X: torch.Tensor) -> torch.Tensor:
        xs, ys = task.batches(calls["t"] + 1000 * job["seed"])
        calls["t"] += 1
        out = torch.empty_like(X)
        for w in range(X.shape[0]):
            torch.nn.utils.vector_to_parameters(X[w], params)
            for p in params:
                p.grad = None
            with torch.enable_grad():
                task.loss(model(xs[w]), ys[w]).backward()
            torch.cat([p.grad.reshape(-1) for p in params], out=out[w])
        return out

    fb, wire = _feedback(job["config"])
    diloco = job["config"] == "diloco"
    x0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    inner = functools.partial(torch.optim.AdamW, lr=job["lr"], weight_decay=0.01)
    outer = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True) if diloco else None
    res = simulate_local(
        fb, grad_fn, x0, n_workers=WORKERS, rounds=STEPS // H, sync_every=H, inner_optimizer=inner,
        outer_optimizer=outer, segments=sizes, wire_dtype=wire, overlap="-overlap" in job["config"],
        overlap_mix=_mix(job["config"]),
    )  # fmt: skip
    rounds = STEPS // H
    wire_bytes = float(res.wire_bytes[rounds])  # one worker's, before the anchor after the last round
    torch.nn.utils.vector_to_parameters(res.x, params)
    final = train_eval_loss(task, model)
    test = task.evaluate(model)
    return {
        **job,
        "params": d,
        "train_loss": final,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "bytes_per_worker": wire_bytes,
        "bits_per_parameter_per_sync": 8 * wire_bytes / rounds / d,
    }


def _key(r: dict) -> tuple:
    return (r["config"], r["lr"], r["seed"])


def summarize(done: dict) -> dict:
    rows = []
    for config in CONFIGS:

        def at(lr, name, config=config):
            return [done[(config, lr, s)][name] for s in SEEDS if (config, lr, s) in done]

        lrs = [lr for lr in LRS if len(at(lr, "train_loss")) == len(SEEDS)]
        if not lrs:
            continue
        best = min(lrs, key=lambda lr: statistics.median(at(lr, "train_loss")))
        train, test = at(best, "train_loss"), at(best, "test_loss")
        rows.append({
            "config": config, "lr": best, "bits_per_parameter_per_sync": at(best, "bits_per_parameter_per_sync")[0],
            "train_loss_median": statistics.median(train), "train_loss_range": [min(train), max(train)],
            "test_loss_median": statistics.median(test), "test_loss_range": [min(test), max(test)],
            "train_loss_by_lr": {str(lr): statistics.median(at(lr, "train_loss")) for lr in lrs},
        })  # fmt: skip
    return {"H": H, "inner_steps": STEPS, "workers": WORKERS, "seeds": list(SEEDS), "lrs": list(LRS), "rows": rows}


def table(summary: dict, device: str) -> str:
    base = next((r for r in summary["rows"] if r["config"] == "diloco"), None)
    lines = [
        f"# Local SGD on char_lm: H = {summary['H']}, {summary['inner_steps']} AdamW inner steps, "
        f"{summary['workers']} workers, iid; seeds {summary['seeds']}, inner lr grid {summary['lrs']} for every "
        f"configuration; {device}",
        "",
        "| configuration | inner lr | bits per parameter per sync | final train loss, median [range] | vs DiLoCo | "
        "test loss, median [range] |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        vs = "" if base is None else f"{100 * (r['train_loss_median'] / base['train_loss_median'] - 1):+.2f}%"
        lo, hi = r["train_loss_range"]
        tlo, thi = r["test_loss_range"]
        lines.append(
            f"| {r['config']} | {r['lr']:g} | {r['bits_per_parameter_per_sync']:.3f} | "
            f"{r['train_loss_median']:.4f} [{lo:.4f}, {hi:.4f}] | {vs} | "
            f"{r['test_loss_median']:.4f} [{tlo:.4f}, {thi:.4f}] |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from _train import describe_run, run_jobs, save_study, study_cli

    args, path, done = study_cli(argv, __doc__, OUT, _key)
    if not args.report:
        jobs = [{"config": c, "lr": lr, "seed": s} for s in SEEDS for c in CONFIGS for lr in LRS]
        todo = [j for j in jobs if _key(j) not in done]

        run_jobs(todo, done, path, args.procs, run_job, _key, describe_run)
    save_study(args.out, summarize(done), table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
