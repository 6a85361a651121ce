"""The DDP hook's time per bucket against the fused kernel's on the same bucket.

    python benchmarks/bench_hook.py [--sizes 4e6 2.7e7] [--ratio 0.01] [--repeats 7] [--ranks 1] [--out ...]

One rank (Gloo on CPU, NCCL on a GPU; ``--ranks 2``: that many Gloo processes on the CPU, one thread each, all
timing the same calls in the same order, rank 0's times kept), one bucket of d fp32 elements, TopK at ``ratio``.
"kernel" is the fused op alone (``ef14_step_``/``ef21_step_``/``econtrol_step_``); "hook" is
:func:`torchkit.ddp.compression_hook` on that bucket until its future completes (worker step, non-finite
detection, exchange, estimate written into the bucket). Every call starts from the same gradient and feedback
state (restored untimed), the two interleaved. Times are wall-clock per call
(``torchkit.apps.bench.time_interleaved``: CUDA events on a GPU, ``perf_counter`` on the CPU); at small sizes
(``--sizes 4096 65536 --name hook_small``) the kernel is tiny and the difference hook - kernel is the host work
per bucket. Writes ``<out>/<device>/<name>.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchkit as tk
from torchkit import ops
from torchkit._results import device_slug, save_result
from torchkit.apps import bench

METHODS = {
    "ef14": (lambda c: tk.EF14(c), lambda g, st, k: ops.ef14_step_(g, st["error"], k)),
    "ef21": (lambda c: tk.EF21(c), lambda g, st, k: ops.ef21_step_(g, st["shift"], k)),
    "econtrol": (
        lambda c: tk.EControl(c, eta=0.1),
        lambda g, st, k: ops.econtrol_step_(g, st["error"], st["shift"], k, 0.1),
    ),
}


def _restore(pairs):
    for live, saved in pairs:
        live.copy_(saved)


def _hook_call(state, bucket):
    tk.ddp.compression_hook(state, bucket).wait()


def measure(d: int, ratio: float, repeats: int, dev: torch.device, log=print) -> list[dict]:
    rows = []
    gen = torch.Generator(device=dev).manual_seed(d)
    g0 = torch.randn(d, generator=gen, device=dev)
    k = max(1, int(d * ratio))
    for name, (make, kernel) in METHODS.items():
        fb = make(tk.TopK(ratio=ratio))
        param = torch.nn.Parameter(torch.zeros(d, device=dev))
        buf = g0.clone()
        state = tk.ddp.CompressionState(fb, min_compression_rate=0)
        bucket = bench.OneBucket(buf, param)
        for _ in range(2):  # step 0 (dense for the EF21 family) and one compressed round: state in place
            buf.copy_(g0 + torch.randn(d, generator=gen, device=dev))
            _hook_call(state, bucket)
        live = state.round.blocks[0].state
        saved = {n: t.clone() for n, t in live.items()}
        kstate = {n: t.clone() for n, t in saved.items()}
        restore = functools.partial(
            _restore, [(buf, g0)] + [(live[n], saved[n]) for n in live] + [(kstate[n], saved[n]) for n in kstate]
        )
        variants = {
            "kernel": functools.partial(kernel, g0, kstate, k),
            "hook": functools.partial(_hook_call, state, bucket),
        }
        times = bench.time_interleaved(variants, dev, repeats, setup=restore)
        rec = {
            "method": name,
            "d": d,
            "k": k,
            "kernel_ms": times["kernel"][2],
            "hook_ms": times["hook"][2],
            "kernel_ms_p20_p80": [times["kernel"][1], times["kernel"][3]],
            "hook_ms_p20_p80": [times["hook"][1], times["hook"][3]],
        }
        rec["hook_over_kernel"] = rec["hook_ms"] / rec["kernel_ms"]
        rows.append(rec)
        log(
            f"d={d:.1e} {name:9s} kernel {rec['kernel_ms']:8.2f} ms  hook {rec['hook_ms']:8.2f} ms  "
            f"hook/kernel {rec['hook_over_kernel']:.2f}x"
        )
    return rows


def _rank(rank: int, ranks: int, store: str, args, out: str) -> None:
    torch.set_num_threads(1)
    ops.build_extension()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    try:
        rows = [r for d in args.sizes for r in measure(int(d), args.ratio, args.repeats, torch.device("cpu"),
                                                       log=print if rank == 0 else lambda *a: None)]  # fmt: skip
        if rank == 0:
            torch.save(rows, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[4e6, 2.7e7])
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--ranks", type=int, default=1, help="Gloo processes on the CPU (an all-gather per round)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="hook", help="result file name (hook_small: the host time at small sizes)")
    args = p.parse_args()
    dev = bench.resolve_device(args.device)
    if dev.type == "cpu":
        ops.build_extension()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if args.ranks > 1 and dev.type != "cpu":
        raise SystemExit("--ranks runs Gloo processes on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if args.ranks > 1:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_rank, args=(args.ranks, store, args, out), nprocs=args.ranks, join=True)
            rows = torch.load(out)
        else:
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
            try:
                rows = [r for d in args.sizes for r in measure(int(d), args.ratio, args.repeats, dev)]
            finally:
                dist.destroy_process_group()
    result = {
        "device": bench.device_name(dev),
        "torch": torch.__version__,
        "commit": bench._git_commit(),
        "impl": ops._choose("auto", torch.empty(int(max(args.sizes)), device=dev), False),
        "setup": f"{args.ranks} rank(s) ({backend}), one fp32 bucket, TopK {args.ratio:.1%}, median of {args.repeats} "
        "interleaved calls from the same state; hook = compression_hook until its future completes",
        "rows": rows,
    }
    slug = device_slug(result["device"])
    save_result(result, Path(args.out) / slug, args.name, None)
    print(f"saved {Path(args.out) / slug / args.name}.json")


if __name__ == "__main__":
    main()
