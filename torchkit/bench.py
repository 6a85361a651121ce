"""Kernel microbenchmarks: fused ops against the composed-torch baseline and the memory floor.

The floor of an op is the bytes a single fused pass must move (each input read once, each output
written once) over the device's measured copy bandwidth (``c = a + b``: 12 bytes per element).
Timing: CUDA events through ``triton.testing.do_bench`` on GPUs, ``time.perf_counter`` on CPUs; the
median and the 20th/80th percentiles of several repeats are reported, never asserted.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import ops
from ._results import save_result
from .ops import _reference

__all__ = ["device_name", "time_fn", "copy_bandwidth", "run_kernel_bench", "format_table", "plot_kernel_bench"]

# bytes per element a single fused pass must move, by op and gradient dtype size (state is fp32)
_FLOOR_BYTES = {
    "ef14": lambda gb: gb + 4 + 4,  # read g, e; write e
    "ef21": lambda gb: gb + 4,  # read g, h; sparse writes of h only
    "econtrol": lambda gb: gb + 4 + 4 + 4,  # read g, e, h; write e
    "topk": lambda gb: gb,  # read x
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(p20, p50, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        qs = triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats), quantiles=[0.2, 0.5, 0.8])
        return float(qs[0]), float(qs[1]), float(qs[2])
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def copy_bandwidth(device: torch.device, d: int, repeats: int = 5) -> float:
    """Measured bytes/s of ``torch.add(a, b, out=c)`` (read a and b, write c)."""
    a, b = torch.randn(d, device=device), torch.randn(d, device=device)
    c = torch.empty_like(a)
    _, p50, _ = time_fn(lambda: torch.add(a, b, out=c), device, repeats)
    return 12 * d / (p50 / 1e3)


def _baseline(op: str):
    return {
        "ef14": lambda g, e, h, k: _reference.ef14_step_(g, e, k),
        "ef21": lambda g, e, h, k: _reference.ef21_step_(g, h, k),
        "econtrol": lambda g, e, h, k: _reference.econtrol_step_(g, e, h, k, 0.1),
        "topk": lambda g, e, h, k: _reference.topk(g, k),
    }[op]


def _fused(op: str, impl: str, approx: bool):
    return {
        "ef14": lambda g, e, h, k: ops.ef14_step_(g, e, k, approx=approx, impl=impl),
        "ef21": lambda g, e, h, k: ops.ef21_step_(g, h, k, approx=approx, impl=impl),
        "econtrol": lambda g, e, h, k: ops.econtrol_step_(g, e, h, k, 0.1, approx=approx, impl=impl),
        "topk": lambda g, e, h, k: ops.topk(g, k, impl=impl),
    }[op]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_kernel_bench(
    device: str | torch.device = "auto",
    sizes: Sequence[int] = (10**6, 10**7, 10**8),
    ratios: Sequence[float] = (0.001, 0.01, 0.1),
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    op_names: Sequence[str] = ("ef14", "ef21", "econtrol", "topk"),
    workers: int = 8,
    repeats: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every op for every (d, k, dtype); returns the JSON-ready record."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    impl = "triton" if dev.type == "cuda" else ("cpp" if ops.build_extension() else "reference")
    bw = copy_bandwidth(dev, max(sizes))
    log(f"device: {device_name(dev)}; fused impl: {impl}; copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    for d in sizes:
        reps = repeats or (5 if d <= 10**7 or dev.type == "cuda" else 3)
        gen = torch.Generator(device="cpu").manual_seed(d)
        e0 = torch.randn(d, generator=gen).to(dev)
        h0 = torch.randn(d, generator=gen).to(dev)
        g32 = torch.randn(d, generator=gen).to(dev)
        for dt in dtypes:
            g = g32.to(getattr(torch, dt))
            for ratio in ratios:
                k = max(1, int(d * ratio))
                for op in op_names:
                    floor_s = _FLOOR_BYTES[op](g.element_size()) * d / bw
                    rec = {"op": op, "d": d, "k": k, "ratio": ratio, "grad_dtype": dt, "floor_ms": floor_s * 1e3}
                    e, h = e0.clone(), h0.clone()
                    variants = [("baseline", _baseline(op)), (impl, _fused(op, impl, False))]
                    if op != "topk" and impl != "reference":
                        variants.append((f"{impl}-approx", _fused(op, impl, True)))
                    times = {}
                    for name, fn in variants:
                        times[name] = time_fn(lambda fn=fn: fn(g, e, h, k), dev, reps)  # noqa: B023 (called at once)
                    base = times["baseline"][1]
                    for name, (p20, p50, p80) in times.items():
                        rows.append(
                            {
                                **rec,
                                "impl": name,
                                "ms_p20": p20,
                                "ms_p50": p50,
                                "ms_p80": p80,
                                "gb_per_s": _FLOOR_BYTES[op](g.element_size()) * d / (p50 / 1e3) / 1e9,
                                "x_floor": p50 / rec["floor_ms"],
                                "speedup_vs_baseline": base / p50,
                            }
                        )
                    log(
                        f"  d={d:.0e} k={ratio:.1%} {dt:8s} {op:8s} "
                        + "  ".join(f"{n} {t[1]:8.2f} ms" for n, t in times.items())
                    )
        # accumulate_: n workers' messages of k entries each into one dense vector
        for ratio in ratios:
            k = max(1, int(d * ratio))
            vals = torch.randn(workers, k, device=dev)
            idx = torch.stack([torch.randperm(d, device="cpu")[:k] for _ in range(workers)]).int().to(dev)
            out = torch.zeros(d, device=dev)
            floor_ms = workers * k * (4 + 4 + 8) / bw * 1e3  # value + index + read and write of out
            times = {
                name: time_fn(lambda i=i: ops.accumulate_(out, vals, idx, 1.0 / workers, impl=i), dev, reps)  # noqa: B023
                for name, i in (("baseline", "reference"), (impl, impl))
            }
            for name, (p20, p50, p80) in times.items():
                rows.append(
                    {
                        "op": "accumulate",
                        "d": d,
                        "k": k,
                        "ratio": ratio,
                        "grad_dtype": "float32",
                        "workers": workers,
                        "impl": name,
                        "ms_p20": p20,
                        "ms_p50": p50,
                        "ms_p80": p80,
                        "floor_ms": floor_ms,
                        "gb_per_s": workers * k * 16 / (p50 / 1e3) / 1e9,
                        "x_floor": p50 / floor_ms,
                        "speedup_vs_baseline": times["baseline"][1] / p50,
                    }
                )
            log(
                f"  d={d:.0e} k={ratio:.1%} accumulate x{workers} "
                + "  ".join(f"{n} {t[1]:8.2f} ms" for n, t in times.items())
            )
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "fused_impl": impl,
        "copy_bandwidth_gb_per_s": bw / 1e9,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "note": "baseline = torchkit.ops._reference (torch.topk + elementwise ops, the composed torch step); "
        "floor = single-pass bytes / measured copy bandwidth",
        "rows": rows,
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def format_table(result: dict) -> str:
    fused = result["fused_impl"]
    lines = [
        f"device: {result['device']}  (copy {result['copy_bandwidth_gb_per_s']:.1f} GB/s, fused = {fused})",
        f"{'op':10s} {'d':>6s} {'k':>6s} {'dtype':9s} {'baseline ms':>12s} {fused + ' ms':>12s} "
        f"{'speedup':>8s} {'x floor':>8s}",
    ]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["op"], r["d"], r["ratio"], r["grad_dtype"]), {})[r["impl"]] = r
    for (op, d, ratio, dt), rs in by.items():
        if "baseline" not in rs or fused not in rs:
            continue
        f = rs[fused]
        lines.append(
            f"{op:10s} {d:6.0e} {ratio:6.1%} {dt:9s} {rs['baseline']['ms_p50']:12.2f} {f['ms_p50']:12.2f} "
            f"{f['speedup_vs_baseline']:7.1f}x {f['x_floor']:7.1f}x"
        )
    return "\n".join(lines)


def plot_kernel_bench(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = result["fused_impl"]
    ops_ = ["ef14", "ef21", "econtrol", "topk", "accumulate"]
    fig, axes = plt.subplots(1, len(ops_), figsize=(4 * len(ops_), 3.6), sharey=False)
    for ax, op in zip(axes, ops_):
        for impl, style in (("baseline", "o--"), (fused, "s-"), (f"{fused}-approx", "^:")):
            pts = sorted(
                (r["d"], r["ms_p50"])
                for r in result["rows"]
                if r["op"] == op and r["impl"] == impl and r["ratio"] == 0.01 and r["grad_dtype"] == "float32"
            )
            if pts:
                ax.loglog(*zip(*pts), style, label=impl)
        floor = sorted(
            {
                (r["d"], r["floor_ms"])
                for r in result["rows"]
                if r["op"] == op and r["ratio"] == 0.01 and r["grad_dtype"] == "float32"
            }
        )
        if floor:
            ax.loglog(*zip(*floor), "k-", lw=0.8, label="memory floor")
        ax.set_title(f"{op} (k = 1%, fp32)")
        ax.set_xlabel("d")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per call (ms, median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"torchkit kernels on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: dict, folder: str | Path, stem: str = "kernels") -> Path:
    return save_result(result, folder, stem, plot_kernel_bench)
