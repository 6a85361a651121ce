"""Where the host time of one hook round and of one fused step goes (issue 21 item 3): cProfile and the torch
profiler over repeated calls, on any device.

    python benchmarks/profile_host.py [--device cuda] [--d 4e6] [--calls 50] [--out benchmarks/results]

For each method (EF14, EF21, EControl; TopK 1%) it profiles ``--calls`` calls of the fused op alone and of
:func:`torchkit.ddp.compression_hook` on one bucket of d fp32 elements (one rank: Gloo on CPU, NCCL on a GPU),
after two untimed rounds, each call on the next of 4 random gradients (the hook's copied into the bucket first, a
copy timed with the round; the optimizer step's likewise into the gradients). Printed and saved: the wall time
per call (``time.perf_counter`` over all calls, with a device synchronisation at the end only: the host's rate
when it is the bottleneck), the Python functions with the most own time per call (cProfile), and the device
operations launched per call with their host and device time (``torch.profiler``). ``--wrapper`` adds one
optimizer step over GPT-2 small's parameters: fused AdamW and CompressedOptimizer around it. Writes
``<out>/<device>/profile_host.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import torchkit as tk
from torchkit import ops
from torchkit._results import device_slug, save_result
from torchkit.apps import bench

METHODS = {
    "ef14": (lambda: tk.EF14(tk.TopK(ratio=0.01)), lambda g, st, k: ops.ef14_step_(g, st["error"], k)),
    "ef21": (lambda: tk.EF21(tk.TopK(ratio=0.01)), lambda g, st, k: ops.ef21_step_(g, st["shift"], k)),
    "econtrol": (
        lambda: tk.EControl(tk.TopK(ratio=0.01), eta=0.1),
        lambda g, st, k: ops.econtrol_step_(g, st["error"], st["shift"], k, 0.1),
    ),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _python_top(fn, calls: int, top: int) -> list[dict]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({
            "function": f"{Path(file).name}:{line}:{name}",
            "calls_per_call": ncalls / calls,
            "own_us_per_call": 1e6 * tottime / calls,
            "cum_us_per_call": 1e6 * cumtime / calls,
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["own_us_per_call"])[:top]


def _device_ops(fn, calls: int, dev: torch.device, top: int) -> list[dict]:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        _sync(dev)
    rows = []
    for ev in prof.key_averages():
        rows.append({
            "op": ev.key,
            "count_per_call": ev.count / calls,
            "host_us_per_call": ev.self_cpu_time_total / calls,
            "device_us_per_call": getattr(ev, "self_device_time_total", 0.0) / calls,
        })  # fmt: skip
    return sorted(rows, key=lambda r: -(r["host_us_per_call"] + r["device_us_per_call"]))[:top]


def _wall_us(fn, calls: int, dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(dev)
    return 1e6 * (time.perf_counter() - t0) / calls


class _Gradients:
    """A few random gradients taken in turn, so that no call runs on the state's own last input (EF21's g - h
    would be all zeros, every entry a tie, after a round on the same gradient)."""

    def __init__(self, d: int, dev: torch.device, n: int = 4):
        self.pool, self.i = [torch.randn(d, device=dev) for _ in range(n)], 0

    def __call__(self) -> Tensor:
        self.i = (self.i + 1) % len(self.pool)
        return self.pool[self.i]


def _kernel_call(kernel, grads: _Gradients, state: dict, k: int) -> None:
    kernel(grads(), state, k)


def _hook_round(state, bucket, grads: _Gradients) -> None:
    bucket.buffer().copy_(grads())  # as DDP would have written the bucket (one copy, timed with the round)
    tk.ddp.compression_hook(state, bucket).wait()


def measure(d: int, calls: int, dev: torch.device, top: int, log=print) -> list[dict]:
    rows = []
    k = max(1, d // 100)
    for name, (make, kernel) in METHODS.items():
        grads = _Gradients(d, dev)
        state = tk.ddp.CompressionState(make(), min_compression_rate=0)
        bucket = bench.OneBucket(torch.empty(d, device=dev), torch.nn.Parameter(torch.zeros(d, device=dev)))
        for _ in range(2):  # step 0 (dense for the EF21 family) and one compressed round
            _hook_round(state, bucket, grads)
        kstate = {n: t.clone() for n, t in state.round.blocks[0].state.items()}
        for what, fn in (
            ("kernel", functools.partial(_kernel_call, kernel, grads, kstate, k)),
            ("hook", functools.partial(_hook_round, state, bucket, grads)),
        ):
            rows.append(_profiled({"method": name, "what": what, "d": d}, fn, calls, dev, top, log))
    return rows


def _profiled(rec: dict, fn, calls: int, dev: torch.device, top: int, log) -> dict:
    fn()
    rec["wall_us_per_call"] = _wall_us(fn, calls, dev)
    rec["python"] = _python_top(fn, calls, top)
    rec["device_ops"] = _device_ops(fn, calls, dev, top)
    log(f"\n== {rec['method']} {rec['what']}: {rec['wall_us_per_call']:.0f} us per call (wall, {calls} calls)")
    for r in rec["python"][:15]:
        log(f"  py  {r['own_us_per_call']:7.1f} us own {r['cum_us_per_call']:7.1f} cum "
            f"x{r['calls_per_call']:5.1f}  {r['function']}")  # fmt: skip
    for r in rec["device_ops"][:15]:
        log(f"  op  host {r['host_us_per_call']:7.1f} us  device {r['device_us_per_call']:7.1f} us  "
            f"x{r['count_per_call']:5.1f}  {r['op'][:80]}")  # fmt: skip
    return rec


def measure_wrapper(calls: int, dev: torch.device, top: int, log=print) -> list[dict]:
    """One optimizer step over GPT-2 small's parameters (bench_e2e_gpu's model): fused AdamW (foreach on the
    CPU) alone, and wrapped by CompressedOptimizer with EF14 and EF21 at TopK 1%."""
    from bench_e2e_gpu import GPT

    model = GPT(ctx=1024).to(dev)
    params = list(model.parameters())
    pool = [[torch.randn_like(p) * 1e-3 for p in params] for _ in range(2)]
    fused = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    variants = {
        "adamw": lambda: torch.optim.AdamW(model.parameters(), lr=1e-6, **fused),
        "wrapper ef14": lambda: tk.CompressedOptimizer(
            model.parameters(), torch.optim.AdamW, feedback=tk.EF14(tk.TopK(ratio=0.01)), lr=1e-6, **fused
        ),
        "wrapper ef21": lambda: tk.CompressedOptimizer(
            model.parameters(), torch.optim.AdamW, feedback=tk.EF21(tk.TopK(ratio=0.01)), lr=1e-6, **fused
        ),
    }
    rows = []
    for name, make in variants.items():
        opt = make()
        step = functools.partial(_step_on_fresh_gradients, opt, params, pool)
        step()  # the first step: state, buffers (and the EF21 family's dense round)
        rows.append(_profiled({"method": name, "what": "optimizer step", "d": None}, step, calls, dev, top, log))
        del opt
    return rows


def _step_on_fresh_gradients(opt, params, pool) -> None:
    """One step on the next of two gradient sets, copied into the parameters' gradients (one foreach copy, timed
    with the step: the wrapper leaves each ``p.grad`` a view of its estimate, which a step on the same tensors
    would take as its input)."""
    pool.append(pool.pop(0))
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        for p, g in zip(params, pool[0]):
            p.grad = g.clone()
    else:
        torch._foreach_copy_(grads, pool[0])
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--d", type=float, default=4e6)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--wrapper", action="store_true", help="also one CompressedOptimizer step on GPT-2 small")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    dev = bench.resolve_device(args.device)
    ops.build_extension(cuda=dev.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            rows = measure(int(args.d), args.calls, dev, args.top)
            if args.wrapper:
                rows += measure_wrapper(max(5, args.calls // 5), dev, args.top)
        finally:
            dist.destroy_process_group()
    result = {"device": bench.device_name(dev), "torch": torch.__version__, "commit": bench._git_commit(), "rows": rows}
    folder = save_result(result, f"{args.out}/{device_slug(result['device'])}", "profile_host", None)
    print(f"device: {result['device']}; wrote {folder}/profile_host.json")


if __name__ == "__main__":
    main()
