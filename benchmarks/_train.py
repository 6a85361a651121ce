"""One training run of n simulated workers in one process (the convergence study's engine).

Per step: every worker computes its gradient on its own batch (a loop of small backward passes),
the gradients are stacked into ``[n, d]``, one round of the method runs
(:func:`torchkit.comm.run_round` with :class:`torchkit.comm.LocalExchanger`, as :func:`torchkit.sim.simulate`
does), the estimate is written into ``p.grad`` and the inner torch optimizer steps. Dense training
averages the gradients; PowerSGD is the single-process equivalent of PyTorch's ``powerSGD_hook``
(see :class:`PowerSGD`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

import torch

from torchkit.apps.tasks import Task
from torchkit.comm import LocalExchanger, run_round
from torchkit.feedback import Feedback


class PowerSGD:
    """PyTorch's ``powerSGD_hook`` algorithm for n workers in one process (Vogels et al. 2019).

    Per parameter of 2+ dimensions, viewed as an ``n x m`` matrix, when ``(n + m) r * min_rate < n m``
    (the hook's ``min_compression_rate=2``): ``M_i = g_i + e_i``; ``P = mean_i M_i Q``; orthogonalise P;
    ``Q = mean_i M_i^T P``; the estimate is ``P Q^T`` and ``e_i = M_i - P Q^T`` (error feedback);
    Q is reused next step (warm start). Other tensors are averaged dense. Starts compressing at step 0
    (the hook's ``start_powerSGD_iter >= 2`` exists only because DDP rebuilds buckets).
    """

    def __init__(self, shapes: list[torch.Size], n_workers: int, rank: int = 1, min_rate: float = 2.0, seed: int = 0):
        self.shapes, self.rank, self.n = shapes, rank, n_workers
        g = torch.Generator().manual_seed(seed)
        self.mats, self.q, self.err = {}, {}, {}
        for i, s in enumerate(shapes):
            if len(s) >= 2:
                rows, cols = s[0], math.prod(s[1:])
                if (rows + cols) * rank * min_rate < rows * cols:
                    self.mats[i] = (rows, cols)
                    self.q[i] = torch.randn(cols, rank, generator=g)
                    self.err[i] = torch.zeros(n_workers, rows, cols)
        self.bytes_per_step = 4 * sum(
            (self.mats[i][0] + self.mats[i][1]) * rank if i in self.mats else math.prod(s) for i, s in enumerate(shapes)
        )

    def round(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``grads[j]``: ``[n, *shape_j]``; returns the averaged estimate per parameter."""
        out = []
        for i, g in enumerate(grads):
            if i not in self.mats:
                out.append(g.mean(0))
                continue
            m = g.reshape(self.n, *self.mats[i]) + self.err[i]
            p = (m @ self.q[i]).mean(0)  # all-reduce of P
            p, _ = torch.linalg.qr(p)  # orthogonalise (Gram-Schmidt in the hook; same span)
            q = (m.transpose(1, 2) @ p).mean(0)  # all-reduce of Q
            approx = p @ q.T
            self.err[i] = m - approx
            self.q[i] = q
            out.append(approx.reshape(self.shapes[i]))
        return out


def make_inner(name: str, params, lr: float, weight_decay: float | None = None):
    """``sgdm``: SGD momentum 0.9; ``sgd``: plain SGD; ``adamw``: AdamW (weight decay 0.01 unless given);
    ``adamw0``: AdamW with beta1 = 0 (the momentum is inside the method); ``sgdwd``: SGD, decay 0.01."""
    if name == "adamw0":
        wd = 0.01 if weight_decay is None else weight_decay
        return torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.999), weight_decay=wd)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay or 0.0)
    if name == "sgdwd":  # AdamW's decoupled decay 0.01 when the Adam direction comes from tk.LocalAdam
        return torch.optim.SGD(params, lr=lr, weight_decay=0.01 if weight_decay is None else weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01 if weight_decay is None else weight_decay)
    raise ValueError(name)


@torch.no_grad()
def train_eval_loss(task: Task, model, samples: int = 4) -> float:
    """The global training objective (mean over workers) on a fixed sample of training batches."""
    tot = 0.0
    for j in range(samples):
        xs, ys = task.batches(10**7 + j)
        tot += sum(float(task.loss(model(x), y)) for x, y in zip(xs, ys)) / xs.shape[0]
    return tot / samples


def run(
    task: Task,
    *,
    compression: Feedback | str | Callable[[torch.Tensor, int], tuple[torch.Tensor, int]],
    inner: str,
    lr: float,
    steps: int,
    seed: int = 0,
    weight_decay: float | None = None,
    log_every: int = 10,
    powersgd_rank: int = 1,
    warmup: int = 0,
    probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Train ``task`` for ``steps`` rounds. ``compression``: a feedback object, ``"dense"``, ``"powersgd"``, or a
    callable ``(grads [n, d], step) -> (estimate [d], bytes sent per worker)`` (a method under study, not in torchkit).
    ``probe(grads, estimate)``, if given, sees every round's ``[n, d]`` gradients and the estimate applied."""
    model = task.model(seed)
    params = [p for p in model.parameters()]
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    n = task.n_workers
    opt = make_inner(inner, params, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup)) if warmup else None
    l0 = train_eval_loss(task, model)
    fb = compression if isinstance(compression, Feedback) else None
    if fb is not None:
        segs = fb.segments_for(sizes)
        state = fb.init_state(d, rows=n)
        server = torch.zeros(d)
        exchanger = LocalExchanger(n)
    elif compression == "powersgd":
        psgd = PowerSGD([p.shape for p in params], n, rank=powersgd_rank, seed=seed)
    elif compression != "dense" and not callable(compression):
        raise ValueError(compression)
    sent, curve, window, diverged = 0, [], [], False
    t0 = time.perf_counter()
    for step in range(steps):
        xs, ys = task.batches(step + 1000 * seed)
        grads = torch.empty(n, d)
        losses = []
        for w in range(n):
            for p in params:
                p.grad = None
            loss = task.loss(model(xs[w]), ys[w])
            loss.backward()
            losses.append(float(loss.detach()))
            torch.cat([p.grad.reshape(-1) for p in params], out=grads[w])
        window.append(sum(losses) / n)
        if not math.isfinite(window[-1]) or window[-1] > 3 * l0 + 10:
            diverged = True
            break
        if fb is not None:
            est, _ = run_round(fb, exchanger, state, server, grads, step, segments=segs)
            sent += fb.wire_bytes(segs, step)
            flat = est
        elif compression == "dense":
            flat = grads.mean(0)
            sent += 4 * d
        elif callable(compression):
            flat, nbytes = compression(grads, step)
            sent += nbytes
        else:
            per = [g.reshape(n, *p.shape) for g, p in zip(grads.split(sizes, dim=1), params)]
            flat = torch.cat([e.reshape(-1) for e in psgd.round(per)])
            sent += psgd.bytes_per_step
        if probe is not None:
            probe(grads, flat)
        off = 0
        for p, s in zip(params, sizes):
            p.grad = flat[off : off + s].view_as(p).clone()
            off += s
        opt.step()
        if sched is not None:
            sched.step()
        if (step + 1) % log_every == 0:
            curve.append((step + 1, sent, sum(window) / len(window)))
            window = []
    wall = time.perf_counter() - t0
    if diverged:
        final, ev = float("nan"), {"loss": float("nan"), "accuracy": float("nan")}
    else:
        final = train_eval_loss(task, model)
        ev = task.evaluate(model)
        diverged = not math.isfinite(final) or final > l0 + 1.0
    return {
        "L0": l0,
        "train_loss": final,
        "test_loss": ev["loss"],
        "test_accuracy": ev["accuracy"],
        "bytes_per_worker": sent,
        "dense_bytes_per_worker": 4 * d * steps,
        "diverged": diverged,
        "curve": curve,
        "wall_s": wall,
        "params": d,
    }


def run_jobs(todo: list[dict], done: dict, path: Path, procs: int, run_job: Callable[[dict], dict],
             key: Callable[[dict], tuple], describe: Callable[[dict], str]) -> None:  # fmt: skip
    """Run ``todo`` in a pool of ``procs`` spawned processes, each result appended to ``path`` (JSON lines, so a
    study resumes where it stopped) and to ``done`` under ``key(result)`` as it arrives, with a progress line."""
    if not todo:
        return
    t0 = time.time()
    with mp.get_context("spawn").Pool(procs) as pool, path.open("a") as f:
        for i, r in enumerate(pool.imap_unordered(run_job, todo)):
            done[key(r)] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"[{i + 1}/{len(todo)} {time.time() - t0:.0f}s] {describe(r)}", flush=True)


def study_cli(
    argv,
    doc: str,
    out: Path,
    key: Callable[[dict], tuple],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, Path, dict]:
    """A small study's command line (``--procs``, ``--report``, ``--out``, and the study's own arguments, which
    ``add_arguments`` adds): the arguments, its ``runs.jsonl`` and the runs already there."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n", 1)[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only summarise runs.jsonl")
    ap.add_argument("--out", type=Path, default=out)
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.jsonl"
    return args, path, load_runs(path, key)


def describe_run(r: dict) -> str:
    return f"{r['config']} lr={r['lr']:g} seed={r['seed']}: loss {r['train_loss']:.4f}"


def load_runs(path: Path, key: Callable[[dict], tuple]) -> dict:
    """The runs a study appended to ``path`` (JSON lines, blank ones skipped; no file yet: none), by ``key``."""
    if not path.exists():
        return {}
    return {key(r): r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}


def save_study(out: Path, summary: dict, table: Callable[[dict, str], str]) -> str:
    """Write ``summary.json`` (with the CPU named) and ``table.md`` under ``out``, print and return the table."""
    from torchkit.apps.bench import device_name

    device = device_name(torch.device("cpu"))
    summary["device"] = device
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = table(summary, device)
    (out / "table.md").write_text(text)
    print(text)
    return text
