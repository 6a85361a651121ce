"""``torchkit demo``: real DDP training on N worker processes, uncompressed against error feedback
(every method of :mod:`torchkit.registry` with a recommended configuration: EF14, EF21, EF21-SGDM, EControl on
TopK, through :mod:`torchkit.ddp`) and PyTorch's PowerSGD hook.

Data: a generated 10-class problem (labels from a random teacher network; nothing is downloaded),
split across workers. Model: an MLP. Every method starts from the same weights and sees the same
batches. Output: a table, ``results.json`` and ``loss_vs_bytes.png`` in the output folder.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from . import _progress as progress
from .links import free_port

__all__ = ["choices", "run_demo", "format_table", "plot"]

_BASELINES = {"none": "uncompressed", "powersgd": "PowerSGD"}  # the runs besides torchkit's methods


def choices() -> tuple[str, ...]:
    """The demo's runs: uncompressed, every method of :mod:`torchkit.registry` with a recommended configuration
    (read now, so a method registered before the call is one of them), and PyTorch's PowerSGD."""
    from .. import registry

    return ("none", *registry.recommendable(), "powersgd")


def __getattr__(name: str):
    if name == "METHODS":  # the current choices(), for code that reads the demo's list as a constant
        return choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _label(method: str) -> str:
    from .. import registry

    return _BASELINES[method] if method in _BASELINES else registry.get(method).label


IN, HIDDEN, CLASSES = 32, 256, 10


def make_data(seed: int = 0, n_train: int = 16384, n_test: int = 4096):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(IN, 64, generator=g) / math.sqrt(IN), torch.randn(64, CLASSES, generator=g) / 8]
    x = torch.randn(n_train + n_test, IN, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


#: Learning rate per method (SGD, the method's recommended configuration), tuned on this demo's model and data over
#: {0.03, 0.1, 0.3, 1}: the value with the lowest sum of the final training losses on interleaved and label-sorted
#: shards (with ``tk.recommended(..., heterogeneous=True)`` there: no momentum factor masking)
#: (benchmarks/tune_demo.py, benchmarks/results/demo/lr_sweep.json). EF21-SGDM's is in torch's convention (its eta
#: parametrisation gets 1/eta on top, see :func:`torchkit.recommended`). A method not listed runs at 0.1.
TUNED_LR = {"none": 0.1, "ef14": 0.3, "ef21": 0.1, "ef21sgdm": 0.1, "econtrol": 0.1, "powersgd": 0.03}


def _config(method: str, ratio: float, heterogeneous: bool = False):
    """(feedback or None, SGD keyword arguments besides lr, lr multiplier, description)."""
    import torchkit as tk

    if method in ("none", "powersgd"):
        return None, {"momentum": 0.9}, 1.0, "SGD momentum 0.9"
    rec = tk.recommended(method, tk.TopK(ratio=ratio), torch.optim.SGD, momentum=0.9, heterogeneous=heterogeneous)
    return rec.feedback, {"momentum": 0.9, **rec.optimizer_kwargs}, rec.lr_scale, rec.description


def _powersgd_bytes(model: torch.nn.Module, rank: int, min_rate: float = 2.0) -> int:
    """Bytes PowerSGD sends per step: r(n+m) floats per compressed matrix, the rest dense."""
    total = 0
    for p in model.parameters():
        if p.dim() == 2:
            n, m = p.shape
            compress = (n + m) * rank * min_rate < n * m
            total += (n + m) * rank if compress else n * m
        else:
            total += p.numel()
    return total * 4


def _worker(rank: int, world: int, port: int, cfg: dict, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = cfg["cuda"]
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    import torchkit as tk

    for module in cfg.get("registering_modules", ()):  # methods registered outside torchkit, as in the parent
        importlib.import_module(module)
    x, y, xt, yt = make_data(cfg["seed"])
    shard = torch.arange(rank, x.shape[0], world)  # interleaved shards
    if cfg["noniid"]:
        order = torch.argsort(y, stable=True)
        shard = order[rank * (x.shape[0] // world) : (rank + 1) * (x.shape[0] // world)]
    x, y = x[shard].to(device), y[shard].to(device)
    results = {}
    for method in cfg["methods"]:
        model = DDP(make_model(cfg["seed"]).to(device), device_ids=[rank] if use_cuda else None)
        fb, opt_kw, lr_scale, config = _config(method, cfg["ratio"], heterogeneous=cfg["noniid"])
        lr = (cfg["lr"] if cfg["lr"] is not None else TUNED_LR.get(method, 0.1)) * lr_scale
        d = sum(p.numel() for p in model.parameters())
        state = None
        if method == "none":
            hook_state, hook = None, default_hooks.allreduce_hook
        elif method == "powersgd":
            hook_state = powersgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=cfg["powersgd_rank"],
                start_powerSGD_iter=2,
                min_compression_rate=2.0,
            )
            hook = powersgd.powerSGD_hook
        else:
            state = tk.ddp.CompressionState(fb, track_error=False).bind(model)
            hook_state, hook = state, tk.ddp.compression_hook
        model.register_comm_hook(hook_state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=lr, **opt_kw)
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        sent, curve, backward, t_start = 0, [], 0.0, time.perf_counter()
        bar = _bar(_label(method), cfg["steps"]) if rank == 0 else None
        window = torch.zeros(2, device=device)  # loss sum and count since the last logged point
        for step in range(cfg["steps"]):
            idx = torch.randint(0, x.shape[0], (cfg["batch"],), generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            t0 = time.perf_counter()
            loss.backward()  # with the hook's compression and communication: every method's whole exchange
            backward += time.perf_counter() - t0
            opt.step()
            if method == "none":
                sent += d * 4
            elif method == "powersgd":
                sent += d * 4 if step < 2 else _powersgd_bytes(model.module, cfg["powersgd_rank"])
            else:
                sent += state.bytes_sent
            window += torch.stack([loss.detach(), torch.ones((), device=device)])
            if step % cfg["log_every"] == 0 or step == cfg["steps"] - 1:
                dist.all_reduce(window)  # mean training loss over the interval and the workers
                curve.append((step + 1, sent, float(window[0] / window[1])))
                window.zero_()
                if bar is not None:
                    bar.set_postfix(loss=f"{curve[-1][2]:.3f}", refresh=False)  # shown at the bar's own pace
                    bar.update(step + 1 - bar.n)
        wall = time.perf_counter() - t_start
        with torch.no_grad():
            acc = float((model.module(xt.to(device)).argmax(1) == yt.to(device)).float().mean())
        results[method] = {
            "label": _label(method),
            "config": config,
            "lr": lr,
            "eta": getattr(fb, "eta", None) if isinstance(fb, tk.EF21SGDM) else None,  # its lr reads with its eta
            "final_loss": curve[-1][2],
            "test_accuracy": acc,
            "bytes_sent_per_worker": sent,
            "dense_bytes_per_worker": d * 4 * cfg["steps"],
            "backward_seconds": backward,
            "wall_seconds": wall,
            "curve": curve,
            "params": d,
        }
        if bar is not None:
            bar.close()
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _bar(label: str, total: int):
    """tqdm's bar with an ETA on rank 0: live on a terminal, a line every 10 s elsewhere (a log file, CI)."""
    return progress.bar(total, f"{label:>12s}", "step")


def run_demo(
    workers: int = 4,
    steps: int = 600,
    ratio: float = 0.01,
    methods: Sequence[str] | None = None,
    out: str | Path = "torchkit-demo",
    *,
    seed: int = 0,
    batch: int = 64,
    lr: float | None = None,
    powersgd_rank: int = 1,
    noniid: bool = False,
) -> dict:
    """Train once per method on ``workers`` processes; write the table, JSON and PNG to ``out``.

    Each method runs in the configuration :func:`torchkit.recommended` gives for SGD with momentum 0.9
    (the momentum on the worker) at its tuned learning rate (:data:`TUNED_LR`); ``lr`` overrides it for every
    method. ``noniid=True`` sorts the training set by label before sharding, so each worker holds two or three
    of the ten classes, and takes the configurations for heterogeneous workers (``heterogeneous=True``: no
    momentum factor masking).
    """
    from .. import registry

    known = choices()
    methods = known if methods is None else tuple(methods)
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods must be among {known}, got {bad}")
    if workers < 2:
        raise ValueError(f"workers must be >= 2 for a distributed demo, got {workers}")
    if not (0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= workers
    cfg = dict(
        seed=seed,
        steps=steps,
        ratio=ratio,
        methods=list(methods),
        registering_modules=registry.external_modules(methods),
        batch=batch,
        lr=lr,
        powersgd_rank=powersgd_rank,
        noniid=noniid,
        cuda=cuda,
        log_every=max(1, steps // 30),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        res_file = os.path.join(tmp, "res.json")
        mp.spawn(_worker, args=(workers, free_port(), cfg, res_file), nprocs=workers, join=True)
        runs = json.loads(Path(res_file).read_text())
    result = {"config": {**cfg, "workers": workers, "backend": "nccl" if cuda else "gloo"}, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(format_table(result) + "\n")
    try:
        plot(result, out / "loss_vs_bytes.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return result


def format_table(result: dict) -> str:
    cfg = result["config"]
    head = (
        f"{cfg['workers']} workers ({cfg['backend']}, {'label-sorted' if cfg.get('noniid') else 'interleaved'} "
        f"shards), {cfg['steps']} steps, TopK ratio {cfg['ratio']}, "
        f"PowerSGD rank {cfg['powersgd_rank']}, MLP with {next(iter(result['runs'].values()))['params']} parameters"
    )
    lines = [
        head,
        "",
        "| method | lr | final loss | test accuracy | MB sent per worker | compression | backward ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"].values():
        ratio = r["dense_bytes_per_worker"] / max(r["bytes_sent_per_worker"], 1)
        lr = f"{r.get('lr', cfg['lr']):g}" + (f" (eta {r['eta']:g})" if r.get("eta") is not None else "")
        lines.append(
            f"| {r['label']} | {lr} | {r['final_loss']:.3f} | {r['test_accuracy']:.1%} | "
            f"{r['bytes_sent_per_worker'] / 1e6:.2f} | {ratio:.1f}x | "
            f"{1e3 * r['backward_seconds'] / cfg['steps']:.2f} |"
        )
    return "\n".join(lines)


def line_styles(n: int) -> list[dict]:
    """``n`` matplotlib styles that differ in colour, dash and marker at once, so that curves ending close together
    (EF21 and EF21-SGDM in the demo) stay apart."""
    dashes, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v", "x", "P")
    return [
        {"color": f"C{i % 10}", "linestyle": dashes[i % len(dashes)], "marker": markers[i % len(markers)],
         "markersize": 4}
        for i in range(n)
    ]  # fmt: skip


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    runs = list(result["runs"].values())
    for r, style in zip(runs, line_styles(len(runs))):
        steps, sent, loss = zip(*r["curve"])
        a.plot(steps, loss, label=r["label"], markevery=max(1, len(steps) // 8), **style)
        b.plot([s / 1e6 for s in sent], loss, label=r["label"], markevery=max(1, len(steps) // 8), **style)
    a.set_xlabel("step")
    b.set_xlabel("MB sent per worker (log)")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    a.legend()
    cfg = result["config"]
    fig.suptitle(
        f"torchkit demo: {cfg['workers']} workers, TopK {cfg['ratio']:.0%} vs PowerSGD rank {cfg['powersgd_rank']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
