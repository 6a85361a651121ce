"""Kernel microbenchmarks: fused ops against the composed-torch baseline and the memory floor.

The floor of an op is the bytes a single fused pass must move (each input read once, each output
written once) over the device's measured copy bandwidth (``c = a + b``: 12 bytes per element).
Timing: CUDA events through ``triton.testing.do_bench`` on GPUs, ``time.perf_counter`` on CPUs; the
median and the 20th/80th percentiles of several repeats are reported, never asserted.
"""

from __future__ import annotations

import datetime
import functools
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import ops
from .._results import save_result
from ..ops import _reference

__all__ = [
    "OneBucket", "device_name", "resolve_device", "time_fn", "copy_bandwidth", "run_kernel_bench", "format_table",
    "plot_kernel_bench",
]  # fmt: skip

# bytes per element a single fused pass must move, by op and gradient dtype size (state is fp32)
_FLOOR_BYTES = {
    "ef14": lambda gb: gb + 4 + 4,  # read g, e; write e
    "ef21": lambda gb: gb + 4,  # read g, h; sparse writes of h only
    "econtrol": lambda gb: gb + 4 + 4 + 4,  # read g, e, h; write e
    "topk": lambda gb: gb,  # read x
}


class OneBucket:
    """What :func:`torchkit.ddp.compression_hook` reads of a ``dist.GradBucket``: one bucket holding one parameter,
    to drive the hook outside DDP (``benchmarks/bench_hook.py``, the launch count in ``tests/test_custom_ops.py``)."""

    def __init__(self, buf: torch.Tensor, param: torch.Tensor):
        self._buf, self._params = buf, [param]

    def buffer(self) -> torch.Tensor:
        return self._buf

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


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


def time_once(fn: Callable[[], object], device: torch.device, setup: Callable[[], object] | None = None) -> float:
    """Milliseconds of one call of ``fn`` after an untimed ``setup`` (CUDA events on GPUs)."""
    if setup is not None:
        setup()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _quantiles(times: list[float]) -> tuple[float, float, float, float]:
    """(min, p20, p50, p80)."""
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return times[0], pick(0.2), pick(0.5), pick(0.8)


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    setup: Callable[[], object] | None = None,
    seed: int = 0,
) -> dict[str, tuple[float, float, float, float]]:
    """Time each variant ``repeats`` times, the variants interleaved in a fresh random order every round and
    ``setup`` (restoring the state) run untimed before every call; returns (min, p20, p50, p80) per variant."""
    import random

    rng = random.Random(seed)
    for fn in variants.values():  # warm-up: compilation, allocator, caches
        time_once(fn, device, setup)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            times[name].append(time_once(variants[name], device, setup))
    return {name: _quantiles(ts) for name, ts in times.items()}


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(p20, p50, p80) in milliseconds."""
    _, p20, p50, p80 = time_interleaved({"fn": fn}, device, repeats)["fn"]
    return p20, p50, p80


def copy_bandwidth(device: torch.device, d: int, repeats: int = 5) -> float:
    """Measured bytes/s of ``torch.add(a, b, out=c)`` (read a and b, write c)."""
    a, b = torch.randn(d, device=device), torch.randn(d, device=device)
    c = torch.empty_like(a)
    _, p50, _ = time_fn(lambda: torch.add(a, b, out=c), device, repeats)
    return 12 * d / (p50 / 1e3)


def _rows(case: dict, times: dict, floor_ms: float, floor_bytes: float) -> list[dict]:
    """One JSON row per variant: quantiles, achieved bandwidth on the floor's bytes, ratios."""
    base = times["baseline"][2]
    return [
        {
            **case,
            "impl": name,
            "ms_min": tmin,
            "ms_p20": p20,
            "ms_p50": p50,
            "ms_p80": p80,
            "floor_ms": floor_ms,
            "gb_per_s": floor_bytes / (p50 / 1e3) / 1e9,
            "x_floor": p50 / floor_ms,
            "speedup_vs_baseline": base / p50,
        }
        for name, (tmin, p20, p50, p80) in times.items()
    ]


def _restore(*pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    for live, saved in pairs:
        live.copy_(saved)


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


_OTHER_SEQUENCE = {"triton": "1p", "cuda": "1p", "cpp": "2p"}  # each kernel set's other sequence, by its label


def _toggled(impl: str, fn: Callable, *args) -> Callable[[], object]:
    """fn(*args) with the implementation's sequence flag turned around for the call: the GPU kernel sets' (off by
    default) or the C++ kernel's (on)."""
    from ..ops import _ext, _select

    mod, flag = (_ext, "ONE_PASS") if impl == "cpp" else (_select, "GPU_ONE_PASS")

    def call():
        was = getattr(mod, flag)
        setattr(mod, flag, not was)
        try:
            return fn(*args)
        finally:
            setattr(mod, flag, was)

    return call


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _gpu_impls(dev: torch.device) -> list[str]:
    if dev.type != "cuda":
        return ["cpp"] if ops.build_extension() else []
    from ..ops import _cuda

    _cuda.build()
    return [i for i in ("triton", "cuda") if i in ops.available_impls(dev)]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_kernel_bench(
    device: str | torch.device = "auto",
    sizes: Sequence[int] = (10**6, 10**7, 10**8),
    ratios: Sequence[float] = (0.001, 0.01, 0.1),
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    op_names: Sequence[str] = ("ef14", "ef21", "econtrol", "topk"),
    workers: int = 8,
    repeats: int | None = None,
    log: Callable[[str], None] = print,
    extra: Sequence[tuple[int, str, float]] = (),
    passes: bool = False,
) -> dict:
    """Time every op for every (d, k, dtype), the variants interleaved and the state restored before every call;
    ``extra`` adds single (d, dtype, ratio) cases (d = 1e9 in bf16); ``passes`` adds each kernel set's other
    sequence for top-k, EF14 and EF21 (``triton-1p``, ``cuda-1p``: the one pass; ``cpp-2p``: two passes). Returns
    the JSON-ready record."""
    dev = resolve_device(device)
    impls = _gpu_impls(dev)
    impl = impls[0] if impls else "reference"
    bw = copy_bandwidth(dev, max(sizes))
    log(f"device: {device_name(dev)}; fused impls: {impls}; copy bandwidth {bw / 1e9:.1f} GB/s")
    cases = [(d, dt, r) for d in sizes for dt in dtypes for r in ratios] + list(extra)
    rows = []
    state: dict = {}
    for d, dt, ratio in cases:
        reps = repeats or (15 if dev.type == "cuda" else (5 if d <= 10**7 else 3))
        if state.get("d") != d:
            state.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            gen = torch.Generator(device=dev).manual_seed(d)
            state.update({n: torch.randn(d, generator=gen, device=dev) for n in ("e0", "h0", "g32")}, d=d)
            state.update(e=state["e0"].clone(), h=state["h0"].clone())
        e0, h0, e, h = state["e0"], state["h0"], state["e"], state["h"]
        g = state["g32"].to(getattr(torch, dt))
        k = max(1, int(d * ratio))

        restore = functools.partial(_restore, (e, e0), (h, h0))
        for op in op_names:
            floor_ms = _FLOOR_BYTES[op](g.element_size()) * d / bw * 1e3
            variants = {"baseline": functools.partial(_baseline(op), g, e, h, k)}
            for name in impls:
                variants[name] = functools.partial(_fused(op, name, False), g, e, h, k)
                if op != "topk":
                    variants[f"{name}-approx"] = functools.partial(_fused(op, name, True), g, e, h, k)
                if passes and name in _OTHER_SEQUENCE and op != "econtrol":
                    for approx in (False, True) if op != "topk" else (False,):
                        label = f"{name}-{_OTHER_SEQUENCE[name]}" + ("-approx" if approx else "")
                        variants[label] = _toggled(name, _fused(op, name, approx), g, e, h, k)
            if op == "topk":
                variants["torch.topk"] = functools.partial(torch.topk, g.float().abs(), k, sorted=False)
            times = time_interleaved(variants, dev, reps, setup=restore)
            case = {"op": op, "d": d, "k": k, "ratio": ratio, "grad_dtype": dt}
            rows += _rows(case, times, floor_ms, _FLOOR_BYTES[op](g.element_size()) * d)
            log(
                f"  d={d:.0e} k={ratio:.1%} {dt:8s} {op:8s} "
                + "  ".join(f"{n} {t[2]:8.3f} ms" for n, t in times.items())
            )
        if dt != dtypes[0]:
            continue
        # accumulate_: n workers' messages of k entries each into one dense vector
        vals = torch.randn(workers, k, device=dev)
        idx = torch.stack([torch.randperm(d, device=dev)[:k] for _ in range(workers)]).int()
        out = torch.zeros(d, device=dev)
        floor_ms = workers * k * (4 + 4 + 8) / bw * 1e3  # value + index + read and write of out
        variants = {
            n: functools.partial(ops.accumulate_, out, vals, idx, 1.0 / workers, impl=i)
            for n, i in [("baseline", "reference")] + [(i, i) for i in impls]
        }
        times = time_interleaved(variants, dev, reps)
        case = {"op": "accumulate", "d": d, "k": k, "ratio": ratio, "grad_dtype": "float32", "workers": workers}
        rows += _rows(case, times, floor_ms, workers * k * 16)
        log(
            f"  d={d:.0e} k={ratio:.1%} accumulate x{workers} "
            + "  ".join(f"{n} {t[2]:8.3f} ms" for n, t in times.items())
        )
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "fused_impl": impl,
        "fused_impls": impls,
        "copy_bandwidth_gb_per_s": bw / 1e9,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "note": "baseline = torchkit.ops._reference (torch.topk + elementwise ops, the composed torch step, as GRACE "
        "and DGC do); torch.topk = torch.topk(|v|, sorted=False) alone on a precomputed fp32 |v|; floor = single-pass "
        "bytes / measured copy bandwidth (torch.add(a, b, out=c)); every call starts from the same state (restored "
        "untimed), variants interleaved in random order, quantiles over the repeats",
        "rows": rows,
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def format_table(result: dict) -> str:
    """Median ms per variant, and the best fused variant's multiple of the floor and speed-up over the baseline."""
    by: dict = {}
    for r in result["rows"]:
        by.setdefault((r["op"], r["d"], r["ratio"], r["grad_dtype"]), {})[r["impl"]] = r
    names = [n for n in ("baseline", "torch.topk") if any(n in rs for rs in by.values())]
    for i in result.get("fused_impls", [result["fused_impl"]]):
        other = f"{i}-{_OTHER_SEQUENCE.get(i)}"
        names += [i, f"{i}-approx", other, f"{other}-approx"]
    names = [n for n in names if any(n in rs for rs in by.values())]
    lines = [
        f"device: {result['device']}  (copy {result['copy_bandwidth_gb_per_s']:.1f} GB/s); median ms per call",
        f"{'op':10s} {'d':>6s} {'k':>6s} {'dtype':9s} " + " ".join(f"{n:>14s}" for n in names) + "  floor x  speedup",
    ]
    for (op, d, ratio, dt), rs in by.items():
        cells = " ".join(f"{rs[n]['ms_p50']:14.3f}" if n in rs else f"{'-':>14s}" for n in names)
        fused = [r for n, r in rs.items() if n not in ("baseline", "torch.topk") and not n.endswith("-approx")]
        best = min(fused, key=lambda r: r["ms_p50"]) if fused else rs["baseline"]
        lines.append(
            f"{op:10s} {d:6.0e} {ratio:6.1%} {dt:9s} {cells}  "
            f"{best['x_floor']:6.2f}x {best['speedup_vs_baseline']:6.1f}x"
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
