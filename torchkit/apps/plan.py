"""Will compression help on my cluster? A cost model calibrated on your own machines, before you spend GPU hours.

    torchkit plan [--task char_lm] [--ranks 2] [--rate 1gbit] [--methods ddp ddp_bf16 powersgd4 ef14@0.01 ...]

It starts ``--ranks`` Gloo processes (in a namespace whose loopback is shaped to ``--rate`` when run as root, as
``torchkit bench network`` does) and measures, on every rank at once:

- the training step's compute (forward, backward and an SGD step of the task's model under DDP over a group of one
  rank, so the ranks compete for the machine as in training and no collective waits on the link), and the buckets;
- each hook's own work on this machine, timed inside the hook in the same interleaved steps: torchkit's hook at each
  density and wire asked for (worker step, packing, bookkeeping), PyTorch's PowerSGD hook at each rank asked for
  (its products, until its future completes); LocalSGD's worker step with its packing; the decode of a message;
- the collectives' time against message size over every rank (``all_reduce`` and ``all_gather``, and
  ``broadcast`` when a method asks for ``exchange="auto"``, up to the model's size), fitted as
  ``latency + bytes / bandwidth`` each.

From these it predicts the seconds per step of each method::

    ddp            compute + buckets x latency + 4 d / bandwidth       (all_reduce)
    ddp_bf16       compute + buckets x latency + 2 d / bandwidth
    powersgd<r>    compute + its hook's work + all_reduce(P) + all_reduce(Q) + all_reduce(what it leaves dense)
    <ef>@<rho>     compute + its hook's work + buckets x latency + one message / bandwidth (all_gather)
                   + (n - 1) messages' decode; where the all-gather would not pay (the hook's byte model,
                   ``min_compression_rate`` 2) DDP's all_reduce instead, or with ``:auto`` a shared support:
                   broadcast(k indices) + all_reduce(k values) (its one decode is in the hook's work)
    local<H>@<rho> compute + (worker step + all_gather + n messages' decode) / H  (TopK per 65536-chunk, int8 values)
    diloco<H>      compute + all_reduce(4 d) / H

and the time to a target, ``steps x steps factor x seconds per step``: the factor (how many more steps a method
needs than dense training for the same loss) is yours to give (``--steps-factor ef14@0.01=1.2``; 1 by default), from
your own convergence runs or the README's studies. It prints the measurements, the predictions and the fastest
method, and writes them to ``--out`` as JSON. The model is additive: it credits no overlap of communication with
the backward pass. ``benchmarks/validate_plan.py`` compares its predictions with the step times of the shaped-link
benchmark, measured in the same hour; ``benchmarks/plan_clusters.py`` extrapolates it to clusters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import _progress as progress
from . import links, netbench
from ._paths import out_file

DEFAULT_METHODS = ("ddp", "ddp_bf16", "powersgd1", "powersgd4", "ef14@0.01", "ef14@0.001", "local8@0.03", "diloco8")


# ---------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Link:
    """One collective's time among the calibrated ranks: ``latency_s + nbytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def fit_link(sizes: list[float], seconds: list[float]) -> Link:
    """Least squares of ``t = a + x / b`` over the measured (bytes, seconds), with ``a >= 0`` and ``b > 0``."""
    if len(sizes) != len(seconds) or len(sizes) < 2:
        raise ValueError(f"fit_link needs two or more (size, seconds) pairs, got {len(sizes)} and {len(seconds)}")
    mx, my = statistics.fmean(sizes), statistics.fmean(seconds)
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx if sxx > 0 else 0.0
    slope = max(slope, 1e-15)  # a flat fit: bandwidth not measurable at these sizes
    a = my - slope * mx
    if a < 0:  # through the origin instead
        a, slope = 0.0, max(sum(x * y for x, y in zip(sizes, seconds)) / sum(x * x for x in sizes), 1e-15)
    return Link(a, 1.0 / slope)


def parse_method(m: str) -> dict:
    """``ddp``, ``ddp_bf16``, ``powersgd<r>``, ``<ef>@<rho>[:<wire>][:auto]``, ``local<H>@<rho>``, ``diloco<H>``
    as a dict."""
    netbench.check_method(m)
    if m in ("ddp", "ddp_bf16"):
        return {"kind": m}
    if m.startswith("powersgd"):
        return {"kind": "powersgd", "rank": int(m[len("powersgd") :])}
    if m.startswith("diloco"):
        return {"kind": "diloco", "every": int(m[len("diloco") :])}
    head, _, ratio = m.partition("@")
    if head.startswith(("local", "olocal")):
        return {"kind": "local", "every": int(head.lstrip("o").removeprefix("local")), "ratio": float(ratio),
                "wire": "int8", "exchange": "gather"}  # fmt: skip
    name, ratio, wire, exchange = netbench.split_method(m)
    return {"kind": "ef", "method": name, "ratio": ratio, "wire": wire, "exchange": exchange}


def compressed_key(spec: dict) -> str:
    """The calibration entry of a compressed method's worker step: density and wire."""
    return f"{spec['ratio']:g}:{spec['wire']}"


def wire_bytes(d: int, spec: dict) -> int:
    """One rank's message of a compressed method, as the front ends pack it (values, indices, zeros to a multiple
    of 8 bytes, its sender's float64 non-finite check)."""

    from ..comm import CHECK_BYTES
    from ..feedback import EF14

    msg = EF14(_topk(spec)).wire_bytes((d,), 1, value_dtype=_wire_dtype(spec))
    return -(-msg // 8) * 8 + CHECK_BYTES  # the check at the next multiple of 8 bytes


def _wire_dtype(spec: dict):
    import torch

    return netbench.wire_dtype(spec["wire"]) or torch.float32


def _topk(spec: dict):
    return netbench.topk_for(spec["ratio"], spec["wire"], spec["exchange"])


def hook_exchange(d: int, n: int, buckets: int, spec: dict) -> tuple[str, int, int]:
    """How torchkit's hook exchanges the buckets of a compressed method among ``n`` ranks, as the library decides
    it (:func:`torchkit.comm.plan_exchange` at the benchmark's ``min_compression_rate``, for buckets of
    ``d / buckets`` entries): ``"all-gather"`` (every rank's message), ``"dense"`` (an fp32 all-reduce: the
    compressed exchange would not pay) or ``"shared support"`` (``exchange="auto"`` only); and for a shared support
    the bytes of the leader's indices (broadcast) and of the values (all-reduced) over all buckets, else 0 and 0."""
    import torch

    from ..comm import plan_exchange
    from ..compress import Identity
    from ..feedback import EF14

    size, wire = -(-d // buckets), _wire_dtype(spec)
    comp = plan_exchange(EF14(_topk(spec)), [size], 1, n, wire, torch.float32,
                         netbench.HOOK_MIN_COMPRESSION_RATE).compressor  # fmt: skip
    if isinstance(comp, Identity):
        return "dense", 0, 0
    if not comp.shared_support:
        return "all-gather", 0, 0
    k = buckets * comp.k_for(size)
    return "shared support", k * comp.index_bytes(size), k * comp.value_bytes(wire)


def powersgd_bytes(shapes: list[list[int]], rank: int) -> tuple[int, int, int]:
    """PyTorch's PowerSGD hook (``min_compression_rate`` 2): fp32 bytes of P, of Q, and of the tensors it leaves
    uncompressed (vectors, and matrices too small to pay)."""
    p = q = dense = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) <= 1:
            dense += numel
            continue
        rows, cols = shape[0], numel // shape[0]
        r = min(rank, rows, cols)
        if rows * cols >= (rows + cols) * r * 2:
            p, q = p + rows * r, q + cols * r
        else:
            dense += numel
    return 4 * p, 4 * q, 4 * dense


def predict(cal: dict, method: str) -> float:
    """Seconds per step of ``method`` from a calibration (:func:`worker`'s JSON): compute, the method's own work
    measured on this machine, and its collectives on the link (one per DDP bucket; PowerSGD: one bucket, P and Q)."""
    spec = parse_method(method)
    d, n, buckets = cal["d"], cal["ranks"], cal["buckets"]
    ar, ag = Link(**cal["all_reduce"]), Link(**cal["all_gather"])
    compute = cal["compute_s"]

    def reduce(nbytes, calls=buckets):
        return calls * ar.latency_s + nbytes / ar.bytes_per_s

    if spec["kind"] == "ddp":
        return compute + reduce(4 * d)
    if spec["kind"] == "ddp_bf16":
        return compute + reduce(2 * d)
    if spec["kind"] == "powersgd":
        p, q, dense = powersgd_bytes(cal["shapes"], spec["rank"])
        return compute + cal["hook_s"][method] + reduce(dense, 1) + reduce(p, 1) + reduce(q, 1)
    if spec["kind"] == "diloco":
        return compute + ar.time(4 * d) / spec["every"]
    msg = wire_bytes(d, spec)
    entries = _topk(spec).k_for(d)  # what a message decodes
    if spec["kind"] == "local":  # one round every H steps, of the whole model
        round_s = cal["compress_s"][compressed_key(spec)] + ag.time(msg) + n * entries * cal["decode_s_per_entry"]
        return compute + round_s / spec["every"]
    route, indices, values = hook_exchange(d, n, buckets, spec)
    hook = compute + cal["hook_s"][method]  # its work on the compressed path, one message decoded: an upper bound
    if route == "dense":
        return hook + reduce(4 * d)
    if route == "shared support":  # per bucket, the leader's indices broadcast and the values all-reduced
        if "broadcast" not in cal:
            raise ValueError(f"a calibration without a broadcast sweep cannot price {method} (a shared support)")
        bc = Link(**cal["broadcast"])
        return hook + buckets * bc.latency_s + indices / bc.bytes_per_s + reduce(values)
    gather = buckets * ag.latency_s + msg / ag.bytes_per_s
    return hook + gather + (n - 1) * entries * cal["decode_s_per_entry"]


def plan(cal: dict, methods: list[str], steps: int, factors: dict[str, float]) -> dict:
    """Predictions for every method and the fastest to the target (``steps x factor x seconds per step``)."""
    rows = []
    for m in methods:
        s = predict(cal, m)
        f = factors.get(m, 1.0)
        rows.append({"method": m, "step_s": s, "steps_factor": f, "time_to_target_s": s * steps * f,
                     "exchange": exchange_of(cal, m)})  # fmt: skip
    best = min(rows, key=lambda r: r["time_to_target_s"])
    return {"rows": rows, "recommended": best["method"]}


def exchange_of(cal: dict, method: str) -> str:
    """How a method's collectives run among the calibration's ranks, as :func:`predict` models them."""
    spec = parse_method(method)
    if spec["kind"] == "ef":
        return hook_exchange(cal["d"], cal["ranks"], cal["buckets"], spec)[0]
    return {"local": "all-gather", "powersgd": "all-reduce (P, Q)"}.get(spec["kind"], "all-reduce")


# ------------------------------------------------------------------------------------------ the measurements
def _median_time(fn, repeats: int, sync=None) -> float:
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _progress(done: int, total: int, what: str) -> None:
    print(f"PROGRESS {done} {total} {what}", flush=True)


def worker(cfg: dict) -> None:
    """One rank of the calibration (run by ``torch.distributed.run``); rank 0 writes ``cfg["out"]``.

    The training step of each method is timed with DDP over a process group of this rank alone, every rank at once
    (so the ranks compete for the machine as in training, and no collective waits on the link): DDP alone is the
    compute, and each hook's extra time is its work on this machine (the worker step, packing, PowerSGD's products,
    the hook's own bookkeeping per bucket). The link is measured apart, with the collectives over every rank."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .. import ddp
    from ..comm import aggregate_rows
    from ..compress import TopK, pack_message, unpack_message
    from ..coupling import recommended
    from ..feedback import EF14
    from . import tasks

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(n)][rank]  # every rank creates every group
    make_task = {"char_lm": tasks.char_lm, "digits_cnn": tasks.digits_cnn}[cfg["task"]]
    task = make_task(n_workers=n, **cfg.get("task_kwargs", {}))
    params = [p for p in task.model(0).parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    specs = {m: parse_method(m) for m in cfg["methods"]}
    hooked = [m for m, s in specs.items() if s["kind"] in ("ef", "powersgd")]
    local = sorted({compressed_key(s): s for s in specs.values() if s["kind"] == "local"}.items())
    sizes = [4096 * 4**i for i in range(12) if 4096 * 4**i < 4 * d] + [4 * d]
    collectives = [("all_reduce", _all_reduce), ("all_gather", _all_gather)]
    if any(s.get("exchange") == "auto" for s in specs.values()):  # a shared support's indices are broadcast
        collectives.append(("broadcast", _broadcast))
    total = 2 + len(local) + 1 + len(collectives) * len(sizes)
    done = 0
    warm, steps = 5, cfg["compute_steps"]
    batches = [tuple(b[rank] for b in task.batches(step)) for step in range(warm + steps)]

    def tick(what):
        nonlocal done
        done += 1
        if rank == 0:
            _progress(done, total, what)

    optimizers = {}

    def train_step(model, x, y):
        """A training step as the benchmark times one: zero_grad, forward, backward, SGD with momentum."""
        opt = optimizers.get(id(model)) or optimizers.setdefault(
            id(model), torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        )
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()

    def step_times(models: dict) -> dict:
        """Median seconds of forward and backward of each model, its steps interleaved with the others' (the
        machine's drift reaches all alike), the batches made beforehand as in training, every rank at once."""
        for model in models.values():
            for x, y in batches[:warm]:
                train_step(model, x, y)
        dist.barrier()
        times = {key: [] for key in models}
        in_hook = {key: [] for key in timers}
        for x, y in batches[warm:]:
            for key, model in models.items():
                before = timers[key]["seconds"] if key in timers else 0.0
                t0 = time.perf_counter()
                train_step(model, x, y)
                times[key].append(time.perf_counter() - t0)
                if key in timers:
                    in_hook[key].append(timers[key]["seconds"] - before)
        return {key: statistics.median(t) for key, t in times.items()}, {
            key: statistics.median(t) for key, t in in_hook.items()
        }

    models = {"plain": DDP(task.model(0), process_group=alone)}
    timers = {}
    for m in hooked:  # each hook's own work on this machine, over its DDP buckets
        spec = specs[m]
        if spec["kind"] == "powersgd":
            model = DDP(task.model(0), process_group=alone, bucket_cap_mb=1024)  # one bucket, as the judge runs it
            state = powersgd.PowerSGDState(process_group=alone, matrix_approximation_rank=spec["rank"],
                                           start_powerSGD_iter=2, random_seed=0)  # fmt: skip
            hook, timers[m] = _timed_hook(powersgd.powerSGD_hook, wait=True)  # its work runs in the callbacks
        else:
            model = DDP(task.model(0), process_group=alone)
            rec = recommended(spec["method"], _topk(spec), torch.optim.SGD)
            state = ddp.CompressionState(rec.feedback, process_group=alone,
                                         wire_dtype=netbench.wire_dtype(spec["wire"]),
                                         min_compression_rate=netbench.HOOK_MIN_COMPRESSION_RATE)  # fmt: skip
            state.bind(model)
            hook, timers[m] = _timed_hook(ddp.compression_hook, wait=False)  # rounds finish in its last call
        model.register_comm_hook(state, hook)
        models[m] = model
    tick("start")
    times, in_hook = step_times(models)
    plain = models["plain"]
    compute = times["plain"]
    buckets = len(plain._get_ddp_logging_data().get("bucket_sizes", "").split(","))
    out = {"task": cfg["task"], "task_kwargs": cfg.get("task_kwargs", {}), "ranks": n, "d": d, "compute_s": compute,
           "buckets": buckets, "shapes": [list(p.shape) for p in params], "compress_s": {},
           "hook_s": in_hook, "step_s": times}  # fmt: skip
    tick("compute and hooks")
    grad = torch.cat([p.grad.reshape(-1) for p in plain.module.parameters()])
    for key, spec in local:  # LocalSGD's round: the worker step with its packing (TopK per chunk, int8 values)
        fb = EF14(_topk(spec))  # TopK per 65536-chunk: the int8 wire's
        state = fb.init_state(d)

        def compress(fb=fb, state=state):
            return pack_message(fb.round_values_(state, fb.worker_step(state, grad.clone(), 1), torch.int8))

        out["compress_s"][key] = _median_time(compress, 5)
        tick(f"worker step {key}")
    # the decode of a message (fp32 values, int32 indices), per entry: a round decodes n, the one-rank hook one
    fb = EF14(TopK(ratio=0.01))
    msg = fb.worker_step(fb.init_state(d), grad.clone(), 1)
    packed, layout = pack_message(msg)
    gathered = packed.reshape(1, -1).expand(n, -1).contiguous()
    agg = torch.zeros(d)
    decode = _median_time(lambda: aggregate_rows(unpack_message(gathered, layout), [1.0 / n] * n, agg), 5)
    out["decode_s_per_entry"] = decode / (n * msg.values.shape[-1])
    tick("decode")
    # the collectives against message size, every rank at once
    for name, coll in collectives:
        secs = []
        for nbytes in sizes:
            buf = torch.zeros(max(1, nbytes // 4))
            coll(buf, n)
            reps = 3 if nbytes < 4 * d else 2
            secs.append(_median_time(lambda buf=buf, coll=coll: coll(buf, n), reps, sync=dist.barrier))
            tick(f"{name} {nbytes} B")
        link = fit_link([float(s) for s in sizes], secs)
        out[name] = {"latency_s": link.latency_s, "bytes_per_s": link.bytes_per_s}
        out[f"{name}_sweep"] = [[s, t] for s, t in zip(sizes, secs)]
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps(out))
    dist.barrier()
    os._exit(0)  # results are written; skip the teardown (a Gloo pair can abort at interpreter exit)


def _timed_hook(hook, *, wait: bool):
    """A DDP communication hook calling ``hook``, and its counter: ``counter["seconds"]`` adds up the time spent in
    ``hook`` (and, with ``wait``, until its future completes: work done in its callbacks)."""
    import torch
    import torch.distributed as dist

    counter = {"seconds": 0.0}

    def timed(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        t0 = time.perf_counter()
        fut = hook(state, bucket)
        if wait:
            fut.wait()
        counter["seconds"] += time.perf_counter() - t0
        return fut

    timed.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    return timed, counter


def _all_reduce(buf, n):
    import torch.distributed as dist

    dist.all_reduce(buf)


def _broadcast(buf, n):
    import torch.distributed as dist

    dist.broadcast(buf, src=n - 1)  # rank 0 keeps the times: a receiver's, as most ranks are in a round


def _all_gather(buf, n):
    import torch
    import torch.distributed as dist

    out = torch.empty(n * buf.numel())
    dist.all_gather_into_tensor(out, buf)


# ---------------------------------------------------------------------------------------------- the driver
def calibrate(ranks: int, rate: str, cfg: dict, timeout: float = 600.0, bar=None) -> dict:
    """Run the calibration on ``ranks`` local Gloo processes (in a namespace shaped to ``rate`` when root); its
    JSON. ``bar``: a tqdm bar the workers' progress lines move."""
    link = links.open_link(rate, ranks)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {**cfg, "out": os.path.join(tmp, "calibration.json")}
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(netbench.ROOT)}

            def progress(line):
                got = re.match(r"PROGRESS (\d+) (\d+) (.*)", line.strip())
                if got and bar is not None:
                    bar.total = bar.total or int(got[2])
                    bar.update(int(got[1]) - bar.n)
                    bar.set_postfix_str(got[3], refresh=False)

            argv = ["-m", "torchkit.apps.plan", "--worker", json.dumps(cfg)]
            try:
                code, text = link.run(ranks, argv, env, timeout, on_line=progress)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the calibration took more than {timeout:.0f} s") from None
            if code != 0 or not Path(cfg["out"]).exists():
                lines = text.splitlines(keepends=True)
                tracebacks = [line for line in lines if line.startswith("[rank")]  # the workers'
                tail = "".join((tracebacks or lines)[-40:])
                raise RuntimeError(f"the calibration failed (exit {code}):\n{tail}")
            cal = json.loads(Path(cfg["out"]).read_text())
    finally:
        link.close()
    cal["link"] = link.kind
    cal["rate"] = rate if link.kind != "host" or rate == "unshaped" else "unshaped (not root: the host's loopback)"
    return cal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", default="char_lm", choices=["char_lm", "digits_cnn"], help="the model to time")
    p.add_argument("--lm-width", type=int, default=256, help="char_lm's width (256 with 4 layers: 3.2M parameters)")
    p.add_argument("--lm-layers", type=int, default=4, help="char_lm's transformer layers")
    p.add_argument("--ranks", type=int, default=2, help="Gloo processes to calibrate on")
    p.add_argument("--rate", default="unshaped",
                   help="shape the link between the ranks to this rate (root; as torchkit bench network --rates: "
                        "1gbit/10ms adds a 10 ms one-way delay)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="as torchkit bench network's")
    p.add_argument("--steps", type=int, default=1000, help="dense training's steps to the target")
    p.add_argument("--steps-factor", nargs="*", default=[], metavar="METHOD=X",
                   help="how many times dense training's steps a method needs (1 if not given)")  # fmt: skip
    p.add_argument("--compute-steps", type=int, default=15, help="timed training steps")
    p.add_argument(
        "--out", type=out_file, default="torchkit-plan.json", help="where the calibration and predictions go"
    )


def _factors(items: list[str], methods: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        m, sep, x = item.partition("=")
        try:
            f = float(x)
        except ValueError:
            f = -1.0
        if not sep or m not in methods or not (f > 0 and math.isfinite(f)):
            raise ValueError(f"--steps-factor: expected METHOD=X with METHOD one of --methods and X > 0, got {item!r}")
        out[m] = f
    return out


def run(args: argparse.Namespace) -> int:
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    for m in args.methods:
        parse_method(m)
    if args.ranks < 2 or args.steps < 1 or args.compute_steps < 1:
        raise ValueError(f"--ranks must be at least 2, --steps and --compute-steps at least 1; got {args.ranks}, "
                         f"{args.steps}, {args.compute_steps}")  # fmt: skip
    if args.rate != "unshaped":
        links.bits_per_second(args.rate)
    factors = _factors(args.steps_factor, args.methods)
    kw = {"width": args.lm_width, "layers": args.lm_layers} if args.task == "char_lm" else {}
    cfg = {"task": args.task, "task_kwargs": kw, "methods": args.methods, "compute_steps": args.compute_steps}
    with progress.bar(0, "calibrating", "step") as bar, links.cleaned_up():
        cal = calibrate(args.ranks, args.rate, cfg, bar=bar)
    result = {"calibration": cal, **plan(cal, args.methods, args.steps, factors)}
    print(report(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written: {args.out}")
    return 0


def report(result: dict) -> str:
    cal = result["calibration"]
    ar, ag = cal["all_reduce"], cal["all_gather"]
    lines = [
        f"measured on {cal['ranks']} ranks, link {cal['rate']}: {cal['task']} ({cal['d']:,} parameters)",
        f"  compute per step {1e3 * cal['compute_s']:.1f} ms; decode {1e9 * cal['decode_s_per_entry']:.2f} ns/entry",
        f"  all_reduce {1e3 * ar['latency_s']:.2f} ms + bytes / {ar['bytes_per_s'] / 1e6:.1f} MB/s; all_gather "
        f"{1e3 * ag['latency_s']:.2f} ms + bytes per rank / {ag['bytes_per_s'] / 1e6:.1f} MB/s",
    ]
    if "broadcast" in cal:
        bc = cal["broadcast"]
        lines.append(f"  broadcast {1e3 * bc['latency_s']:.2f} ms + bytes / {bc['bytes_per_s'] / 1e6:.1f} MB/s")
    lines.append(f"  DDP buckets: {cal['buckets']}")
    for m, s in cal["hook_s"].items():
        lines.append(f"  {m}: the hook's own work {1e3 * s:.1f} ms per step")
    for key, s in cal["compress_s"].items():
        lines.append(f"  LocalSGD's worker step and packing at {key}: {1e3 * s:.1f} ms per round")
    lines.append("predicted (the additive model, no overlap credited):")
    lines.append(f"  {'method':<16} {'ms/step':>9} {'steps x':>8} {'to target':>10}  exchange")
    for r in sorted(result["rows"], key=lambda r: r["time_to_target_s"]):
        lines.append(f"  {r['method']:<16} {1e3 * r['step_s']:>9.1f} {r['steps_factor']:>8.2f} "
                     f"{r['time_to_target_s']:>9.1f}s  {r['exchange']}")  # fmt: skip
    lines.append(f"recommended: {result['recommended']} (fastest to the target with the steps factors given)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
