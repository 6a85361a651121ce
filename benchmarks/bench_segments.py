"""A bucket of many tensors compressed tensor by tensor (``granularity="tensor"``): one ``segments_step_`` call
against one fused op per tensor (issue 21 item 3).

    python benchmarks/bench_segments.py [--tensors 150] [--size 1000] [--repeats 15] [--out benchmarks/results]

The worker step (``Feedback.worker_step``) of EF14, EF21 and EControl, TopK 1%, over ``--tensors`` segments of
``--size`` entries (plus one of 50k), on the CPU's C++ kernel (or the GPU's kernels with ``--device cuda``): the
two paths interleaved in a random order (on the CPU a third: one call with the C++ kernel's small-vector path
off, every segment through the two passes), each call from the state the last one left, medians and 20th/80th
percentiles of the wall time per call (``time.perf_counter``, with a device synchronisation on a GPU). Both paths
give the same messages and state (tests/test_custom_ops.py). Writes ``<out>/<device>/segments.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import torchkit as tk
from torchkit import feedback as F
from torchkit._results import device_slug, save_result
from torchkit.apps import bench

METHODS = {
    "ef14": lambda: tk.EF14(tk.TopK(ratio=0.01), granularity="tensor"),
    "ef21": lambda: tk.EF21(tk.TopK(ratio=0.01), granularity="tensor"),
    "econtrol": lambda: tk.EControl(tk.TopK(ratio=0.01), granularity="tensor"),
}


def _timed(fb, state, g, segments, dev, variant: str) -> float:
    saved = dict(F._SEGMENTED)
    if variant == "one_op_per_tensor":
        F._SEGMENTED.clear()  # the per-tensor path: one fused op per segment
    small = _small_limit(0) if variant == "one_call_no_small_path" else None
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fb.worker_step(state, g, 5, worker=0, n_workers=1, segments=segments)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        F._SEGMENTED.update(saved)
        if small is not None:
            _small_limit(small)


def _small_limit(n: int) -> int:
    """The C++ kernel's small-vector limit (0: every segment takes the two passes); returns the old one."""
    from torchkit.ops import _ext

    return _ext._module.set_small_limit(n)


def _quantiles(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=5)
    return {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * q[0], "p80_ms": 1e3 * q[3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, default=150)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    dev = bench.resolve_device(args.device)
    tk.ops.build_extension(cuda=dev.type == "cuda")
    sizes = [args.size] * args.tensors + [50_000]
    d = sum(sizes)
    rows = []
    for name, make in METHODS.items():
        fb = make()
        state = fb.init_state(d, device=dev)
        segments = fb.segments_for(sizes)
        g = torch.randn(d, device=dev)
        variants = ["one_call", "one_op_per_tensor"] + (["one_call_no_small_path"] if dev.type == "cpu" else [])
        times = {v: [] for v in variants}
        for r in range(args.repeats + 2):
            for variant in random.Random(r).sample(variants, len(variants)):
                t = _timed(fb, state, g, segments, dev, variant)
                if r >= 2:  # two warm-up rounds each
                    times[variant].append(t)
        row = {"method": name, "segments": len(segments), "d": d}
        row.update({v: _quantiles(ts) for v, ts in times.items()})
        row["speedup"] = row["one_op_per_tensor"]["median_ms"] / row["one_call"]["median_ms"]
        rows.append(row)
        no_small = row.get("one_call_no_small_path", {}).get("median_ms")
        print(f"{name:9s} {len(segments)} segments: one call {row['one_call']['median_ms']:7.2f} ms, one op per "
              f"tensor {row['one_op_per_tensor']['median_ms']:7.2f} ms ({row['speedup']:.1f}x)"
              + (f", one call without the small-vector path {no_small:7.2f} ms" if no_small else ""))  # fmt: skip
    result = {
        "device": bench.device_name(dev),
        "torch": torch.__version__,
        "commit": bench._git_commit(),
        "setup": f"{args.tensors} tensors of {args.size} + one of 50000, TopK 1% per tensor, median of {args.repeats}",
        "rows": rows,
    }
    folder = save_result(result, f"{args.out}/{device_slug(result['device'])}", "segments", None)
    print(f"device: {result['device']}; wrote {folder}/segments.json")


if __name__ == "__main__":
    main()
