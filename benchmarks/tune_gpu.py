"""GPU tuning experiments in one call: CUDA kernel build variants side by side, a per-kernel breakdown of the
chosen build, what the Triton histogram costs against its bin count, and the Triton level-1 ladder against it.

    python benchmarks/tune_gpu.py [--d 1e8] [--out benchmarks/results]     # on an H100/H200
    python benchmarks/tune_gpu.py --ncu-target                              # one step per op, for ncu

Writes <out>/<gpu>/tune.json and prints a table. Every call starts from the same state (restored untimed);
variants are interleaved; medians of the repeats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

import torchkit.ops as ops
from torchkit._results import device_slug
from torchkit.apps import bench
from torchkit.ops import _cuda

VARIANTS = {
    "items8-serial": {"TK_ITEMS": 8, "TK_WARP_LOOKBACK": 0},  # the second H200 run's select kernel
    "items16-serial": {"TK_ITEMS": 16, "TK_WARP_LOOKBACK": 0},
    "items8-warp": {"TK_ITEMS": 8, "TK_WARP_LOOKBACK": 1},
    "items16-warp": {"TK_ITEMS": 16, "TK_WARP_LOOKBACK": 1},  # the source's default
    "items32-warp": {"TK_ITEMS": 32, "TK_WARP_LOOKBACK": 1},
}


def verify(libs: dict, d: int = 10_000_019) -> dict:
    """Each build against the reference (exact EF14 and EControl, d = 1e7): same set, values and state."""
    from torchkit.ops import _reference

    gen = torch.Generator(device="cuda").manual_seed(3)
    g, e0, h0 = (torch.randn(d, generator=gen, device="cuda") for _ in range(3))
    k = d // 100
    ok = {}
    for name, lib in libs.items():
        _cuda._lib = lib
        e1, h1, e2, h2 = e0.clone(), h0.clone(), e0.clone(), h0.clone()
        v, i = ops.econtrol_step_(g, e1, h1, k, 0.3, impl="cuda")
        rv, ri = _reference.econtrol_step_(g, e2, h2, k, 0.3)
        o, ro = i.long().argsort(), ri.argsort()
        same = torch.equal(i.long()[o], ri[ro]) and torch.equal(v[o], rv[ro]) and torch.equal(e1, e2)
        e1, e2 = e0.clone(), e0.clone()
        v, i = ops.ef14_step_(g, e1, k, impl="cuda")
        rv, ri = _reference.ef14_step_(g, e2, k)
        o, ro = i.long().argsort(), ri.argsort()
        ok[name] = bool(same and torch.equal(i.long()[o], ri[ro]) and torch.equal(e1, e2) and torch.equal(h1, h2))
        print(f"verify {name}: {'ok' if ok[name] else 'MISMATCH'}")
    return ok


def build_variants(folder: Path) -> dict:
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    procs = {
        n: subprocess.Popen(_cuda.nvcc_command(folder / f"{n}.so", arch, defs), stderr=subprocess.PIPE, text=True)
        for n, defs in VARIANTS.items()
    }
    libs = {}
    for name, proc in procs.items():
        _, err = proc.communicate()
        if proc.returncode:
            print(f"build {name} failed: {err[-500:]}")
            continue
        libs[name] = _cuda.open_library(folder / f"{name}.so")
    return libs


def _op(name: str, g, e, h, k, approx):
    return {
        "ef14": lambda: ops.ef14_step_(g, e, k, approx=approx, impl="cuda"),
        "ef21": lambda: ops.ef21_step_(g, h, k, approx=approx, impl="cuda"),
        "econtrol": lambda: ops.econtrol_step_(g, e, h, k, 0.1, approx=approx, impl="cuda"),
        "topk": lambda: ops.topk(g, k, impl="cuda"),
    }[name]


def compare_variants(libs: dict, d: int, ratio: float, reps: int, log=print) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    e0, h0, g32 = (torch.randn(d, generator=gen, device=dev) for _ in range(3))
    e, h = e0.clone(), h0.clone()
    k = int(d * ratio)
    bw = bench.copy_bandwidth(dev, d)

    def restore():
        e.copy_(e0)
        h.copy_(h0)

    rows = []
    for dt in (torch.float32, torch.bfloat16):
        g = g32.to(dt)
        for op in ("ef14", "ef21", "econtrol", "topk"):
            for approx in (False, True) if op != "topk" else (False,):
                fn = _op(op, g, e, h, k, approx)

                def run(lib=None, fn=fn):
                    _cuda._lib = lib
                    fn()

                variants = {n: (lambda lib=lib: run(lib)) for n, lib in libs.items()}
                times = bench.time_interleaved(variants, dev, reps, setup=restore)
                floor_ms = bench._FLOOR_BYTES[op](g.element_size()) * d / bw * 1e3
                for n, (tmin, p20, p50, p80) in times.items():
                    rows.append(
                        dict(
                            op=op,
                            approx=approx,
                            grad_dtype=str(dt)[6:],
                            d=d,
                            k=k,
                            variant=n,
                            ms_min=tmin,
                            ms_p20=p20,
                            ms_p50=p50,
                            ms_p80=p80,
                            floor_ms=floor_ms,
                            x_floor=p50 / floor_ms,
                        )
                    )
                log(
                    f"{op:9s} {'approx' if approx else 'exact ':6s} {str(dt)[6:]:9s} floor {floor_ms:6.3f} ms  "
                    + "  ".join(f"{n} {t[2]:.3f}" for n, t in times.items())
                )
    return rows


def breakdown(lib, d: int, ratio: float) -> list[dict]:
    """Device time per kernel (torch.profiler), 5 calls each, state restored outside the profiled region."""
    from torch.profiler import ProfilerActivity, profile

    _cuda._lib = lib
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    e0, h0, g = (torch.randn(d, generator=gen, device=dev) for _ in range(3))
    k = int(d * ratio)
    out = []
    for op in ("ef14", "ef21", "econtrol", "topk"):
        for approx in (False, True) if op != "topk" else (False,):
            e, h = e0.clone(), h0.clone()
            fn = _op(op, g, e, h, k, approx)
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    e.copy_(e0)
                    h.copy_(h0)
                    fn()
                torch.cuda.synchronize()
            kernels = sorted(
                (
                    (ev.key[:60], ev.device_time_total / 5 / 1e3, ev.count // 5)
                    for ev in prof.key_averages()
                    if ev.device_time_total > 0 and "copy" not in ev.key.lower()
                ),  # the restores are not the op's
                key=lambda r: -r[1],
            )
            out.append(dict(op=op, approx=approx, d=d, k=k, kernels_ms=kernels, total_ms=sum(r[1] for r in kernels)))
            print(
                f"{op} {'approx' if approx else 'exact'}: total {out[-1]['total_ms']:.3f} ms = "
                + "; ".join(f"{n} {t:.3f} x{c}" for n, t, c in kernels[:6])
            )
    return out


@triton.jit
def _hist_only(x_ptr, hist_ptr, n, BLOCK: tl.constexpr, NB: tl.constexpr):
    acc = tl.zeros([NB], dtype=tl.int32)
    lane = tl.arange(0, BLOCK)
    for blk in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = blk * BLOCK + lane
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        acc += tl.histogram((key >> 20) & (NB - 1), NB)
    tl.atomic_add(hist_ptr + tl.arange(0, NB), acc, mask=acc != 0, sem="relaxed")


@triton.jit
def _read_only(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    lane = tl.arange(0, BLOCK)
    for blk in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = blk * BLOCK + lane
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(acc, axis=0))


def triton_histogram_cost(d: int, ratio: float, reps: int, dev: torch.device | None = None) -> list[dict]:
    """Triton's tl.histogram over d fp32 keys, by bin count, against a kernel that only reads the same bytes, and
    the Triton path's level 1 on the same keys (top-k of ``ratio``): the ladder (prediction, streaming count, window
    check, and the full pass it switches on only on a miss) against the full 2048-bin histogram pass it replaced.
    ``miss``: whether the ladder's window missed on these keys (then its row includes the full pass)."""
    from torchkit.ops import _select
    from torchkit.ops._triton import ef

    dev = dev or torch.device("cuda")
    x = torch.randn(d, device=dev)
    grid = (4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1,)
    hist = torch.zeros(2048, dtype=torch.int32, device=dev)
    out = torch.zeros(1, device=dev)
    variants = {"read only": lambda: _read_only[grid](x, out, d, BLOCK=2048, num_warps=8)}
    for nb in (2048, 512, 256, 64):
        variants[f"histogram {nb} bins"] = lambda nb=nb: _hist_only[grid](x, hist, d, BLOCK=2048, NB=nb, num_warps=8)
    ws = torch.zeros(3 * _select.NBINS + _select.N_SCALARS, dtype=torch.int32, device=dev)
    scal = ws[3 * _select.NBINS :]
    level1 = _select.level1(ws[: _select.NBINS], _select.TOPK, d)
    launcher = ef._Launcher(x, x, x, max(1, int(d * ratio)), 0.0)
    variants["level 1: ladder"] = lambda: launcher.hist(scal, level1)
    variants["level 1: full histogram"] = lambda: launcher._hist(scal, level1)
    times = bench.time_interleaved(variants, dev, reps, setup=ws.zero_)  # the level-1 passes accumulate
    ws.zero_()
    launcher.hist(scal, level1)
    miss = bool(scal[_select.S_MISS])
    rows = [dict(kernel=n, d=d, ms_p50=t[2], gb_per_s=4 * d / (t[2] / 1e3) / 1e9) for n, t in times.items()]
    rows[-2]["miss"] = miss
    for r in rows:
        note = " (the window missed)" if r.get("miss") else ""
        print(f"triton {r['kernel']:24s} {r['ms_p50']:.3f} ms  {r['gb_per_s']:.0f} GB/s{note}")
    return rows


def ncu_target(d: int) -> None:
    """One exact and one approximate call per op with the default build (the process ncu profiles)."""
    assert ops.build_extension(cuda=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    e, h, g = (torch.randn(d, generator=gen, device="cuda") for _ in range(3))
    for op in ("ef14", "econtrol"):
        for approx in (False, True):
            _op(op, g, e, h, d // 100, approx)()
    torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=float, default=1e8)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ncu-target", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    d = int(args.d)
    if args.ncu_target:
        return ncu_target(d)
    with tempfile.TemporaryDirectory() as tmp:
        libs = build_variants(Path(tmp))
        checked = verify(libs)
        libs = {n: lib for n, lib in libs.items() if checked[n]}
        rows = compare_variants(libs, d, args.ratio, args.repeats)
        best = min(libs, key=lambda n: sum(r["ms_p50"] for r in rows if r["variant"] == n))
        print(f"fastest build over all rows: {best}")
        parts = breakdown(libs[best], d, args.ratio)
    hist = triton_histogram_cost(d, args.ratio, args.repeats)
    result = {
        "device": bench.device_name(torch.device("cuda")),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": bench._git_commit(),
        "variants": VARIANTS,
        "verified": checked,
        "fastest": best,
        "rows": rows,
        "breakdown": parts,
        "triton_histogram": hist,
    }
    slug = device_slug(result["device"])
    folder = Path(args.out) / slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tune.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {folder / 'tune.json'}")


if __name__ == "__main__":
    main()
