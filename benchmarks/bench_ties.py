"""Selection on tied input against random input (issue 21 item 1): the EF21 step, exact and approximate, at TopK 1%:
the C++ kernel on the CPU (d = 2^24), or with ``--device cuda`` the CUDA kernels (d = 2^26 unless ``--log2d``).

Inputs: random normal (the reference), g - h = 0 everywhere (a bucket of experts that got no token, a gradient
that did not change), all equal, mostly zero (0.5% nonzero: fewer nonzeros than k), bf16-rounded normal. Each
input is timed 7 times, interleaved with the others; the medians (wall clock, ``time.perf_counter`` around one
call; the call returns when the kernel has finished; on CUDA, CUDA events around the call) and the ranges are printed
and written to ``benchmarks/results/<device>/ties.json``.

    python benchmarks/bench_ties.py [--threads 2] [--device cpu|cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torchkit import ops
from torchkit._results import device_slug, save_result
from torchkit.apps import bench


def inputs(d: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(d, generator=g)
    mostly_zero = torch.zeros(d)
    picked = torch.randperm(d, generator=g)[: d // 200]
    mostly_zero[picked] = r[picked]
    xs = {
        "random": r,
        "g - h = 0": torch.zeros(d),
        "all equal": torch.full((d,), 0.75),
        "mostly zero (0.5% nonzero)": mostly_zero,
        "bf16-rounded": r.bfloat16().float(),
    }
    return {name: x.to(device) for name, x in xs.items()}


def timed(x: torch.Tensor, k: int, approx: bool, impl: str) -> float:
    """Seconds for one ``ef21_step_`` on a zero estimate (CUDA events on a GPU, the wall clock on the CPU)."""
    h = torch.zeros_like(x)
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        ops.ef21_step_(x, h, k, approx=approx, impl=impl)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    ops.ef21_step_(x, h, k, approx=approx, impl=impl)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--log2d", type=int, default=None, help="log2 of d (default 24 on the CPU, 26 on CUDA)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    impl = "cuda" if args.device == "cuda" else "cpp"
    if not ops.build_extension(cuda=impl == "cuda") and impl not in ops.available_impls(args.device):
        raise SystemExit(f"the {impl} kernels are not available")
    d = 1 << (args.log2d or (26 if args.device == "cuda" else 24))
    k = d // 100
    xs = inputs(d, args.device)
    device = torch.device(args.device)
    result = {"device": bench.device_name(device), "impl": impl, "d": d, "k": k, "runs": {}}
    if impl == "cpp":
        result["threads"] = args.threads
    for approx in (False, True):
        times: dict[str, list[float]] = {n: [] for n in xs}
        for x in xs.values():  # a warm-up call (the CUDA kernels' first launch loads them)
            timed(x, k, approx, impl)
        for _ in range(args.repeats):
            for name, x in xs.items():
                times[name].append(timed(x, k, approx, impl))
        base = statistics.median(times["random"])
        mode = "approximate" if approx else "exact"
        for name, ts in times.items():
            med = statistics.median(ts)
            result["runs"][f"{mode}/{name}"] = {
                "median_ms": 1e3 * med,
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "x_random": med / base,
            }
            print(f"{mode:11s} {name:28s} {1e3 * med:7.1f} ms  {med / base:4.2f}x random  "
                  f"[{1e3 * min(ts):.1f}, {1e3 * max(ts):.1f}]")  # fmt: skip
    folder = save_result(result, f"{args.out}/{device_slug(result['device'])}", "ties", None)
    print(f"device: {result['device']}; wrote {folder}/ties.json")


if __name__ == "__main__":
    main()
