"""The judge: time and bytes to a target loss on a shaped network, torchkit against DDP and PowerSGD.

    sudo torchkit bench network [--rates 1gbit 100mbit] [--ranks 2 4] [--tasks char_lm digits_cnn]
                                [--steps 300] [--repeats 2] [--out torchkit-network]
    sudo python benchmarks/bench_network.py ...   # the same, writing under benchmarks/results

For each link rate it creates a network namespace of its own (``ip netns add``), brings up its loopback and
shapes it with ``tc qdisc add dev lo root tbf rate R burst ... latency ...`` (``rate/<d>ms``: ``netem`` adds a
one-way delay of d ms; where the kernel has no netem, :class:`torchkit.apps.links.EmulatedLink` carries the ranks'
traffic instead: a namespace per rank, one queue at the rate, the delay), and runs N Gloo ranks with
``torch.distributed.run`` across it, one training run per method: DDP's all-reduce, PyTorch's PowerSGD hook (rank 1
and 4) and torchkit's hook with each method's recommended configuration (``torchkit.coupling.recommended``) at
1% and 0.1%. Every run trains the same model on the same per-rank batches (``torchkit.apps.tasks``); every method runs
at every learning rate of ``--lr`` (one grid for all), and runs are interleaved over the repeats. A method at one
learning rate is one configuration; the tables take each family's best configuration. Measured per run: the
median step time, the bytes on the wire (the namespace's loopback counters, so protocol overhead included), the
steps and seconds until rank 0's smoothed training loss first reaches the target (the dense run's smoothed loss
at 60% of its steps, on the fastest link, at the first learning rate of ``--lr``), and local SGD's compute
utilisation (:func:`utilisation`). The namespace is deleted on
every exit path. Without root or ``tc`` it says so and runs unshaped. Writes ``<out>/<device>/network.json`` and
``network.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _progress as progress
from . import links
from ._paths import out_folder

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the torchkit package, for the workers' path
METHODS = ("ddp", "ddp_bf16", "powersgd1", "powersgd4", "ef14@0.01", "ef21@0.01", "ef14@0.001", "ef21@0.001")
# compressed local SGD (LocalSGD): "local<H>@<ratio>" = EF14 on the pseudo-gradient every H steps ("olocal": with
# the round overlapped with the next period's inner steps, LocalSGD(overlap=True)),
# TopK per 65536-chunk with int8 values (the compact wire format), averaging outer step; "diloco<H>" = the same
# without compression (Identity, fp32)
LOCAL_METHODS = ("local8@0.03", "local32@0.03", "local8@0.01", "diloco8")
# torchkit's hook compresses a bucket while its dense payload is at least this many times the compressed exchange's
# (PyTorch's PowerSGD default; the byte model of torchkit.comm.plan_exchange), and sends it dense otherwise
HOOK_MIN_COMPRESSION_RATE = 2.0


# -------------------------------------------------------------------------------------------------- a run
def run_one(link: links.Link, n: int, cfg: dict, timeout: float) -> dict:
    """One training run of ``cfg`` on ``n`` ranks across ``link``: the rank 0 worker's result, with the bytes
    that crossed the link."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**cfg, "out": os.path.join(tmp, "result.json")}
        before = link.wire_bytes()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        code, text = link.run(n, ["-m", "torchkit.apps.netbench", "--worker", json.dumps(cfg)], env, timeout)
        wire = link.wire_bytes() - before
        if code != 0 or not Path(cfg["out"]).exists():
            rate = cfg["rate"].replace("/", "+")  # 100mbit/25ms: no folder in the name
            log = Path(tempfile.gettempdir()) / f"bench_network_{cfg['method']}_{rate}_{cfg['ranks']}.log"
            log.write_text(text)
            raise RuntimeError(f"run {cfg['method']} failed (exit {code}); its output: {log}")
        res = json.loads(Path(cfg["out"]).read_text())
    res["wire_bytes_total"] = wire
    res["wire_bytes_per_step"] = wire / max(1, res["steps_run"])
    res["link"] = link.kind
    return res


def worker(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .. import ddp
    from ..comm import NonFiniteGradientError
    from ..compress import Identity
    from ..coupling import recommended
    from ..feedback import EF14
    from ..local_sgd import LocalSGD
    from . import tasks

    for module in cfg.get("registering_modules", ()):  # methods registered outside torchkit, as in the driver
        importlib.import_module(module)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    make_task = {"char_lm": tasks.char_lm, "digits_cnn": tasks.digits_cnn}[cfg["task"]]
    task = make_task(n_workers=n, split=cfg["split"], **cfg.get("task_kwargs", {}))
    method, lr = cfg["method"], cfg["lr"]
    opt_kwargs = {"momentum": cfg["momentum"]}
    local = method.startswith(("local", "olocal", "diloco"))
    if local:
        model = task.model(cfg["seed"])
    elif method.startswith("powersgd"):
        # PyTorch's PowerSGD hook issues its later collectives from completion callbacks; with several buckets
        # their order can differ between Gloo ranks (a size-mismatch abort at 4 ranks), so it gets one bucket.
        model = DDP(task.model(cfg["seed"]), bucket_cap_mb=1024)
    else:
        model = DDP(task.model(cfg["seed"]))
    if local:
        every = _sync_every(method)
        if method.startswith("diloco"):
            fb, wire = EF14(Identity()), None
        else:
            fb, wire = EF14(topk_for(float(method.split("@")[1]), "int8")), torch.int8
        opt = LocalSGD(model.parameters(), torch.optim.SGD, feedback=fb, sync_every=every, wire_dtype=wire,
                       lr=lr, momentum=cfg["momentum"], overlap=method.startswith("olocal"))  # fmt: skip
    elif method == "ddp":
        pass
    elif method == "ddp_bf16":  # what practitioners run: DDP's bf16 all-reduce (half the bytes)
        model.register_comm_hook(None, _bf16_hook)
    elif method.startswith("powersgd"):
        state = powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(method[-1]), start_powerSGD_iter=2, random_seed=0
        )
        model.register_comm_hook(state, powersgd.powerSGD_hook)
    else:
        name, ratio, wire_name, exchange = split_method(method)
        # ":auto": TopK(exchange="auto"): the all-gather, a shared support or dense, by the byte model
        rec = recommended(name, topk_for(ratio, wire_name, exchange), torch.optim.SGD, momentum=cfg["momentum"])
        ddp.register(model, rec.feedback, min_compression_rate=HOOK_MIN_COMPRESSION_RATE,
                     wire_dtype=wire_dtype(wire_name))  # fmt: skip
        opt_kwargs = rec.optimizer_kwargs
        lr = lr * rec.lr_scale
    if not local:
        opt = torch.optim.SGD(model.parameters(), lr=lr, **opt_kwargs)
    losses, times, diverged = [], [], False
    for step in range(cfg["steps"]):
        xs, ys = task.batches(step)
        t0 = time.perf_counter()
        opt.zero_grad()
        try:
            loss = task.loss(model(xs[rank]), ys[rank])
            loss.backward()
            opt.step()
        except NonFiniteGradientError:  # raised on every rank at the same step: the run diverged
            diverged = True
            break
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    t0 = time.perf_counter()
    if local and opt.overlap:
        opt.finish_round()  # the last round in flight: no collective left behind at exit
    tail = time.perf_counter() - t0  # the drain: training is not over before it
    diverged = diverged or not losses or not math.isfinite(losses[-1])
    if rank == 0:
        nan = {"loss": float("nan"), "accuracy": float("nan")}
        ev = nan if diverged else task.evaluate(model if local else model.module)
        Path(cfg["out"]).write_text(
            json.dumps(
                {
                    **cfg,
                    "steps_run": len(losses),
                    "diverged": diverged,
                    "losses": losses,
                    "step_seconds": times,
                    "step_ms_median": 1e3 * statistics.median(times[5:] or times or [math.nan]),
                    "seconds_total": sum(times),
                    # a local run's compute utilisation: in steady state, and with the last round's drain
                    "utilisation": utilisation(times, every) if local else None,
                    "utilisation_with_drain": utilisation(times, every, tail) if local else None,
                    "drain_seconds": tail,
                    "test": ev,
                }
            )
        )
    dist.barrier()  # nobody leaves while a peer still has traffic in flight
    os._exit(0)  # results are written; skip the teardown (a Gloo pair can abort at interpreter exit)


def _sync_every(method: str) -> int:
    """H of a local SGD method's name: ``local8@0.03``, ``olocal8@0.03``, ``diloco8``."""
    return int(method.split("@")[0].removeprefix("o").removeprefix("local").removeprefix("diloco"))


def _split_steps(step_seconds: list[float], every: int) -> tuple[list[float], list[float]]:
    """The steps after the first without a synchronisation, and those with one (every ``every``-th)."""
    inner, sync = [], []
    for i, t in enumerate(step_seconds[1:], start=1):
        (sync if (i + 1) % every == 0 else inner).append(t)
    return inner, sync


def utilisation(step_seconds: list[float], every: int, tail_seconds: float = 0.0) -> float:
    """Compute utilisation of a local SGD run (a synchronisation every ``every`` steps) in steady state: a step's
    compute, taken as the median of the steps without a synchronisation, times the steps, over their wall time,
    plus ``tail_seconds`` (a round still waited for after the last step). The first step is left out: it holds
    the start-up broadcast of the model, which DDP does in its constructor, outside the timed steps. With
    overlapped rounds the steps without a synchronisation share the cores with the round in flight, and what that
    costs them counts as compute here (on the 2-core machine their median was within the blocking runs' spread)."""
    inner, _ = _split_steps(step_seconds, every)
    if not inner:
        return math.nan
    return statistics.median(inner) * (len(step_seconds) - 1) / (sum(step_seconds[1:]) + tail_seconds)


def _bf16_hook(group, bucket):
    """PyTorch's ``bf16_compress_hook`` on any backend (PyTorch's own refuses all but NCCL and XCCL; Gloo sums
    bf16): the bucket cast to bf16 and divided by the ranks, summed by ``all_reduce``, cast back into the bucket."""
    import torch
    import torch.distributed as dist

    buf = bucket.buffer()
    half = buf.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(half, group=group, async_op=True).get_future()

    def back(f):
        return buf.copy_(f.value()[0])

    return fut.then(back)


# ---------------------------------------------------------------------------------------------- the driver
def add_arguments(p: argparse.ArgumentParser, out: str = "torchkit-network") -> None:
    """The benchmark's options (``torchkit bench network`` and ``benchmarks/bench_network.py`` share them)."""
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rates", nargs="+", default=["10gbit", "1gbit", "100mbit"],
                   help="tc tbf link rates (unshaped: a namespace without tc); rate/<d>ms adds a one-way delay of d "
                        "ms (round trip 2d; netem, or torchkit.apps.links' emulated link): 100mbit/25ms")  # fmt: skip
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4], help="Gloo processes per run")
    p.add_argument("--tasks", nargs="+", default=["char_lm", "digits_cnn"], choices=["char_lm", "digits_cnn"],
                   help="models from torchkit.apps.tasks: the character transformer and the digits CNN")  # fmt: skip
    p.add_argument("--lm-width", type=int, default=256, help="char_lm's width (256 with 4 layers: 3.2M parameters)")
    p.add_argument("--lm-layers", type=int, default=4, help="char_lm's transformer layers")
    p.add_argument("--split", default="iid", choices=["iid", "noniid"], help="how the data is split among ranks")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="ddp, ddp_bf16 (DDP's bf16_compress_hook), powersgd<rank>, "
                        "<ef14|ef21|...>@<density>[:bf16|:int8|:int2][:auto] (the wire's values; auto, fp32 "
                        "and bf16 only: TopK(exchange='auto'), a shared support where the all-gather does not pay), "
                        "local<H>@<density> (olocal: overlapped rounds), diloco<H>")  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--repeats", type=int, default=2, help="seeds per configuration, run interleaved")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + repeats - 1 (--merge: add seeds to a run)")  # fmt: skip
    p.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[0.1],
        help="SGD learning rates: every method runs at each (the first one's dense run sets the target)",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (inside the method where recommended)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument(
        "--out", type=out_folder, default=out, help="results go to <out>/<device>/network.json and network.png"
    )
    p.add_argument("--merge", action="store_true",
                   help="keep the saved network.json and its targets; the runs named here replace theirs")  # fmt: skip


def main(argv=None, out: str = "torchkit-network") -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, out)
    return run(p.parse_args(argv))


def check_method(m: str) -> str:
    """``m`` if the benchmark knows it: ddp, powersgd<rank>, <method>@<density>[:<wire>][:auto] (a method of
    :mod:`torchkit.registry` with a recommended configuration: ef14, ef21, ef21sgdm, econtrol, ...),
    [o]local<H>@<density> or diloco<H>; otherwise a ValueError naming --methods."""
    import re

    from .. import registry

    names = registry.recommendable()
    wires = r"(:bf16:auto|:bf16|:int8|:int2|:auto)?"  # the exchange after the wire, a float wire's only
    ok = re.fullmatch(r"ddp|ddp_bf16|powersgd[1-9]\d*|diloco[1-9]\d*|o?local[1-9]\d*@(0?\.\d+)|"
                      rf"({'|'.join(map(re.escape, names))})@(0?\.\d+){wires}", m)  # fmt: skip
    if not ok or ("@" in m and not 0 < float(m.split("@")[1].split(":")[0]) < 1):
        raise ValueError(
            f"--methods: unknown method {m!r}; expected ddp, ddp_bf16, powersgd<rank>, "
            "<method>@<density>[:bf16|:int8|:int2][:auto] "
            f"(method one of {', '.join(names)}; density in (0, 1); the wire's values, fp32 without "
            "a suffix; auto: a shared support where the all-gather would not pay, float wires only), "
            "[o]local<H>@<density> or diloco<H>"
        )
    return m


def split_method(m: str) -> tuple[str, float, str, str]:
    """A hook method ``<method>@<density>[:<wire>][:auto]`` as (method, density, wire, TopK's exchange)."""
    name, _, rest = check_method(m).partition("@")
    ratio, *suffixes = rest.split(":")
    exchange = "auto" if "auto" in suffixes else "gather"
    wire = next((x for x in suffixes if x != "auto"), "fp32")
    return name, float(ratio), wire, exchange


def topk_for(ratio: float, wire: str, exchange: str = "gather"):
    """The TopK a compressed method runs on its wire: per 65536-chunk with 16-bit offsets for int8 values (one
    scale per chunk), per 4096-chunk with 12-bit offsets for int2 (two magnitudes per chunk), else one TopK."""
    from ..compress import TopK

    return TopK(ratio=ratio, chunk={"int8": 65536, "int2": 4096}.get(wire), exchange=exchange)


def wire_dtype(wire: str):
    """A wire's value dtype as the front ends take it (``None``: the gradient's own, fp32 here)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8, "int2": torch.int2}[wire]


def run(args: argparse.Namespace) -> int:
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    from .. import registry

    for m in args.methods:
        check_method(m)
    for r in args.rates:
        if r != "unshaped":
            links.bits_per_second(r)
    if not all(lr > 0 and math.isfinite(lr) for lr in args.lr):
        raise ValueError(f"--lr: learning rates must be positive and finite, got {args.lr}")
    if min(args.ranks) < 2 or args.steps < 1 or args.repeats < 1 or args.first_seed < 0:
        raise ValueError(f"--ranks must be at least 2, --steps and --repeats at least 1, --first-seed at least 0; "
                         f"got {args.ranks}, {args.steps}, {args.repeats}, {args.first_seed}")  # fmt: skip
    if args.steps < WINDOW:  # no run could reach the target: every row would say "not reached"
        raise ValueError(f"--steps must be at least {WINDOW}: a run reaches the target when its loss averaged over "
                         f"{WINDOW} steps does; got {args.steps}")  # fmt: skip
    shaped = links.privileged()
    rates = args.rates
    if not shaped:
        print("not root, or no ip/tc on this machine: running unshaped on the host's loopback", flush=True)
        rates = ["unshaped"]
    order = sorted(rates, key=lambda r: -links.bits_per_second(r) if r != "unshaped" else 0)  # fastest first
    rows, targets = [], {}
    out_dir = Path(args.out)
    seeds = range(args.first_seed, args.first_seed + args.repeats)
    if args.merge:
        rows, targets = _load(out_dir, set(args.methods), set(rates), set(args.ranks), set(args.tasks), set(seeds),
                              set(args.lr))  # fmt: skip
    total = len(order) * len(args.ranks) * len(args.tasks) * len(seeds) * len(args.methods) * len(args.lr)
    bar = progress.bar(total, "network runs", "run")  # shown at once, with an ETA from the runs done
    with links.cleaned_up():  # no namespace left behind, whatever stops the runs
        try:
            for rate in order:
                link = links.open_link(rate, max(args.ranks))
                try:
                    for n in args.ranks:
                        for task in args.tasks:
                            key = (task, n)
                            for rep in seeds:
                                configs = [(m, lr) for m in args.methods for lr in args.lr]
                                random.Random(rep).shuffle(configs)
                                if ("ddp", args.lr[0]) in configs and key not in targets:  # it sets the target first
                                    configs.remove(("ddp", args.lr[0]))
                                    configs.insert(0, ("ddp", args.lr[0]))
                                for m, lr in configs:
                                    kw = {"width": args.lm_width, "layers": args.lm_layers} if task == "char_lm" else {}
                                    cfg = {"task": task, "split": args.split, "method": m, "steps": args.steps,
                                           "lr": lr, "momentum": args.momentum, "seed": rep, "task_kwargs": kw,
                                           "rate": rate, "ranks": n}  # fmt: skip
                                    extra = registry.external_modules([m.partition("@")[0]])
                                    if extra:  # a method registered outside torchkit: the workers import its module
                                        cfg["registering_modules"] = extra
                                    bar.set_postfix_str(f"{rate} n={n} {task} {m} lr={lr:g}", refresh=False)
                                    try:
                                        res = run_one(link, n, cfg, args.timeout)
                                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                                        print(f"  {rate} n={n} {task} {m}: {exc}", flush=True)
                                        rows.append({**cfg, "failed": str(exc)})
                                        continue
                                    finally:
                                        bar.update(1)
                                    if m == "ddp" and lr == args.lr[0] and key not in targets:
                                        at = max(20, int(0.6 * len(res["losses"])))
                                        targets[key] = statistics.fmean(res["losses"][at - 20 : at])
                                        res["target_set"] = targets[key]
                                    res.pop("out", None)
                                    rows.append(res)
                                    for row in rows:  # the target may have come after the run
                                        if (row["task"], row["ranks"]) == key and "failed" not in row:
                                            row["reached"] = reached(row, targets.get(key))
                                    print(_line(res), flush=True)
                                    _save(rows, targets, out_dir, shaped)
                finally:
                    link.close()
        finally:
            bar.close()
    print(summary(rows))
    return 0


WINDOW = 20  # steps the training loss is averaged over to decide when a run reaches the target


def reached(r: dict, target: float | None, window: int = WINDOW) -> dict | None:
    """The first step at which the run's smoothed training loss (mean of the last ``window``) is at or below
    ``target``, with the seconds spent until then (the sum of the step times: compute and communication)."""
    if target is None or "losses" not in r:
        return None
    elapsed = 0.0
    for i, dt in enumerate(r["step_seconds"]):
        elapsed += dt
        if i + 1 >= window and statistics.fmean(r["losses"][i + 1 - window : i + 1]) <= target:
            return {"step": i + 1, "seconds": elapsed}
    return None


def _line(r: dict) -> str:
    got = r.get("reached")
    when = f"{got['seconds']:.1f} s ({got['step']} steps)" if got else "not reached"
    mb = r["wire_bytes_per_step"] / 1e6
    return (f"{r['rate']:>9s} n={r['ranks']} {r['task']:10s} {r['method']:11s} lr {r['lr']:<6g} "
            f"step {r['step_ms_median']:8.1f} ms  wire {mb:8.3f} MB/step  to target {when}  "
            f"utilisation {r.get('utilisation') or math.nan:.3f}  test {r['test']['loss']:.3f}")  # fmt: skip


FAMILIES = {
    "DDP": lambda k: k == "ddp",
    "DDP bf16": lambda k: k == "ddp_bf16",
    "PowerSGD": lambda k: k.startswith("powersgd"),
    "EF": lambda k: "@" in k and not k.startswith(("local", "olocal")),  # torchkit's hook, a round every step
    "local": lambda k: k.startswith(("local", "olocal", "diloco")),  # torchkit's LocalSGD
}


def labeler(rows: list[dict]):
    """A run's configuration as the tables name it: the method, and its learning rate where the rows hold more
    than one (``ef14@0.01 lr=0.2``)."""
    several = len({r.get("lr") for r in rows}) > 1
    return lambda r: f"{r['method']} lr={r['lr']:g}" if several else r["method"]


def best_by_family(rows: list[dict]) -> dict:
    """Per (rate, ranks, task) and family: ``(median seconds, configuration, seconds per seed)`` of the
    configuration (a method at a learning rate, :func:`labeler`) with the lowest median time to the target, one
    counting only if every one of its seeds reached it; ``(inf, "-", [])`` when none did. Where some configurations
    ran more seeds than others, a family's best is taken among those with the most seeds it has (a lucky single
    seed does not beat a median of three; a learning rate screened on one seed counts once it has as many)."""
    by: dict = {}
    label = labeler(rows)
    for r in rows:
        if "failed" not in r:
            by.setdefault((r["rate"], r["ranks"], r["task"]), {}).setdefault(label(r), []).append(r)
    out = {}
    for key, configs in by.items():
        out[key] = {}
        for family, pick in FAMILIES.items():
            best = (float("inf"), "-", [])
            most = max((len(rs) for rs in configs.values() if pick(rs[0]["method"])), default=0)
            for m, rs in configs.items():
                if not pick(rs[0]["method"]) or len(rs) < most:
                    continue
                got = [x["reached"]["seconds"] for x in rs if x.get("reached")]
                if got and len(got) == len(rs) and statistics.median(got) < best[0]:
                    best = (statistics.median(got), m, sorted(got))
            out[key][family] = best
    return out


def summary(rows: list[dict]) -> str:
    """Per (rate, ranks, task): the fastest run to the target of each family (DDP, PowerSGD, per-step error
    feedback, local SGD), as median seconds, and PowerSGD's time over each torchkit family's (above 1: sooner)."""
    lines = []
    for (rate, n, task), best in best_by_family(rows).items():
        text = ", ".join(f"{'ddp' if f == 'DDP' else f} {k} {t:.1f} s" if k != "-" else f"{f} none"
                         for f, (t, k, _) in best.items())  # fmt: skip
        psgd = best["PowerSGD"][0]
        for f in ("EF", "local"):
            if best[f][0] < float("inf") and psgd < float("inf"):
                text += f"; PowerSGD/{f} {psgd / best[f][0]:.2f}x"
        lines.append(f"{rate:>9s} n={n} {task:10s} {text}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """:func:`summary` as a markdown table: each family's best method, its median seconds to the target with the
    range over its seeds, and torchkit's best time over PowerSGD's (below 1: torchkit sooner)."""

    def cell(t, m, got, family, key):
        if m == "-":
            tried = any(FAMILIES[family](r["method"]) and (r["rate"], r["ranks"], r["task"]) == key for r in rows)
            return "not reached" if tried else "not run"
        spread = f" [{got[0]:.1f}-{got[-1]:.1f}]" if len(got) > 1 else ""
        return f"`{m}` {t:.1f} s{spread} ({len(got)} seed{'s' if len(got) > 1 else ''})"

    def rate_order(key):
        rate, n, task = key
        return task, n, -links.bits_per_second(rate) if rate != "unshaped" else -float("inf")

    names = {"DDP": "DDP", "DDP bf16": "DDP bf16", "PowerSGD": "PowerSGD", "EF": "torchkit per step (EF)",
             "local": "torchkit local SGD"}  # fmt: skip
    ran = {r["method"] for r in rows if "failed" not in r}
    families = [f for f in FAMILIES if f != "DDP bf16" or any(FAMILIES[f](m) for m in ran)]  # bf16: where it ran
    head = [names[f] for f in families] + ["EF / PowerSGD", "local / PowerSGD"]
    lines = ["| task | ranks | link | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(head)]
    best_all = best_by_family(rows)
    for key in sorted(best_all, key=rate_order):
        rate, n, task = key
        best = best_all[key]
        psgd = best["PowerSGD"][0]
        ratios = [f"{best[f][0] / psgd:.2f}" if psgd < float("inf") and best[f][0] < float("inf") else "-"
                  for f in ("EF", "local")]  # fmt: skip
        cells = [cell(*best[f], f, key) for f in families]
        lines.append(f"| {task} | {n} | {rate} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def step_table(rows: list[dict], rate: str = "unshaped") -> str:
    """Per task and ranks on link ``rate``: each method's median step time over its seeds (compute and
    communication, the per-run medians) and its ratio to DDP's all-reduce step."""
    by: dict = {}
    label = labeler([r for r in rows if r["rate"] == rate])
    for r in rows:
        if r["rate"] == rate and "failed" not in r:
            by.setdefault((r["task"], r["ranks"]), {}).setdefault(label(r), []).append(r["step_ms_median"])
    lines = [f"| task | ranks | method | ms per step ({rate}) | x DDP |", "|---|---|---|---|---|"]
    for (task, n), methods in sorted(by.items()):
        ddp = statistics.median(methods["ddp"]) if "ddp" in methods else float("nan")
        for m, ms in sorted(methods.items(), key=lambda kv: statistics.median(kv[1])):
            spread = f" [{min(ms):.1f}-{max(ms):.1f}]" if len(ms) > 1 else ""
            lines.append(f"| {task} | {n} | `{m}` | {statistics.median(ms):.1f}{spread} | "
                         f"{statistics.median(ms) / ddp:.2f} |")  # fmt: skip
    return "\n".join(lines)


def utilisation_table(rows: list[dict]) -> str:
    """Per link, ranks, task and local SGD configuration: compute utilisation (:func:`utilisation`) in steady
    state and with the last round's drain, the median step without and with a synchronisation, the whole run's
    seconds and the seconds to the target, each the median [range] over the seeds (a seed that did not reach the
    target counts as never: inf). Diverged runs are left out."""

    def med(xs, fmt):
        xs = sorted(xs)
        spread = f" [{fmt.format(xs[0])}-{fmt.format(xs[-1])}]" if len(xs) > 1 else ""
        return fmt.format(statistics.median(xs)) + spread

    by: dict = {}
    label = labeler(rows)
    for r in rows:
        u = r.get("utilisation")
        if FAMILIES["local"](r["method"]) and u is not None and math.isfinite(u) and not r.get("diverged", True):
            by.setdefault((r["task"], r["ranks"], r["rate"], label(r)), []).append(r)
    lines = [
        "| task | ranks | link | method | seeds | utilisation | with the drain | step without a sync, ms | "
        "synchronising step, ms | run, s | to target, s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, n, rate, m), rs in sorted(by.items()):
        every = _sync_every(rs[0]["method"])
        inner, sync = [], []
        for r in rs:
            without, with_sync = _split_steps(r["step_seconds"], every)
            inner.append(1e3 * statistics.median(without))
            sync.append(1e3 * statistics.median(with_sync))
        got = [r["reached"]["seconds"] if r.get("reached") else math.inf for r in rs]
        lines.append(
            f"| {task} | {n} | {rate} | `{m}` | {len(rs)} | {med([r['utilisation'] for r in rs], '{:.3f}')} | "
            f"{med([r['utilisation_with_drain'] for r in rs], '{:.3f}')} | {med(inner, '{:.0f}')} | "
            f"{med(sync, '{:.0f}')} | {med([sum(r['step_seconds']) + r['drain_seconds'] for r in rs], '{:.1f}')} | "
            f"{med(got, '{:.1f}')} |"
        )
    return "\n".join(lines)


def _result_dir(out_dir: Path) -> tuple[str, Path]:
    import torch

    from .._results import device_slug
    from . import bench

    name = bench.device_name(torch.device("cpu"))
    return name, out_dir / device_slug(name)


def _load(out_dir: Path, methods: set, rates: set, ranks: set, tasks: set, seeds: set, lrs: set) -> tuple[list, dict]:
    """The saved rows and targets, less the rows of the runs about to be repeated (``--merge``): those of the
    named methods, rates, ranks, tasks, seeds and learning rates."""
    path = _result_dir(out_dir)[1] / "network.json"
    old = json.loads(path.read_text())
    targets = {(k.split("/n=")[0], int(k.split("/n=")[1])): v for k, v in old["targets"].items()}
    redo = [r for r in old["rows"] if r["method"] in methods and r["rate"] in rates and r["ranks"] in ranks
            and r["task"] in tasks and r["seed"] in seeds and r["lr"] in lrs]  # fmt: skip
    return [r for r in old["rows"] if r not in redo], targets


def _save(rows, targets, out_dir: Path, shaped: bool) -> None:
    import torch

    from .._results import save_result
    from . import bench

    name, where = _result_dir(out_dir)
    result = {
        "device": name,
        "shaped": bool(shaped),
        "torch": torch.__version__,
        "commit": bench._git_commit(),
        "targets": {f"{t}/n={n}": v for (t, n), v in targets.items()},
        "rows": rows,
    }
    save_result(result, where, "network", plot)
    text = table([r for r in rows if r["rate"] != "unshaped"])
    if any(r["rate"] == "unshaped" for r in rows):
        text += "\n\n" + step_table(rows)
    if any(r.get("utilisation") is not None for r in rows):
        text += "\n\n" + utilisation_table(rows)
    (where / "network.md").write_text(text + "\n")


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tasks = sorted({r["task"] for r in rows})
    ranks = sorted({r["ranks"] for r in rows})
    fig, axes = plt.subplots(len(tasks), len(ranks), figsize=(5 * len(ranks), 3.8 * len(tasks)), squeeze=False)
    label = labeler(rows)
    for i, task in enumerate(tasks):
        for j, n in enumerate(ranks):
            ax = axes[i][j]
            for m in sorted({label(r) for r in rows}):
                pts = {}
                for r in rows:
                    ok = "failed" not in r and r["rate"] != "unshaped" and "/" not in r["rate"]  # x: the rate alone
                    if ok and r["task"] == task and r["ranks"] == n and label(r) == m:
                        sec = r["reached"]["seconds"] if r.get("reached") else float("nan")
                        pts.setdefault(links.bits_per_second(r["rate"]), []).append(sec)
                xs = sorted(x for x in pts if all(v == v for v in pts[x]))  # rates where every seed reached it
                if xs:
                    ys = [statistics.median(pts[x]) for x in xs]
                    ax.plot([x / 1e6 for x in xs], ys, "o-", label=m)
            if ax.lines:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_xlabel("link rate (Mbit/s)")
            ax.set_ylabel("seconds to target loss")
            ax.set_title(f"{task}, {n} ranks")
            ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].lines:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
