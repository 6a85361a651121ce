"""Command line: ``torchkit demo | repro ef21 | repro ef21w | bench | build-ext`` (also ``python -m torchkit``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _demo(args) -> int:
    from .demo import format_table, run_demo

    result = run_demo(
        args.workers,
        args.steps,
        args.ratio,
        args.methods,
        args.out,
        seed=args.seed,
        batch=args.batch,
        lr=args.lr,
        powersgd_rank=args.powersgd_rank,
        noniid=args.noniid,
    )
    print(format_table(result))
    print(f"\nwrote {args.out}/results.json, table.md and loss_vs_bytes.png")
    return 0


def _repro(args) -> int:
    from .repro import repro_ef21, repro_ef21w

    if args.paper == "ef21":
        res = repro_ef21(args.data, k=args.k, bits=args.bits, n_workers=args.workers, seed=args.seed, out=args.out)
        print(
            f"{res['dataset']}: d={res['d']}, n={res['n_workers']}, Top-{res['k']}, "
            f"theory step {res['gamma_theory']:.4g}"
        )
        print(f"{'run':12s} {'mult':>6s} {'final ||grad||^2':>17s} {'bits/n to ' + format(res['tol'], 'g'):>16s}")
        for label, r in res["runs"].items():
            hit = "never" if r["bits_to_tol"] is None else str(r["bits_to_tol"])
            print(f"{label:12s} {r['multiplier']:6g} {r['final_grad_norm_sq']:17.3e} {hit:>16s}")
    else:
        res = repro_ef21w(
            args.data,
            k=args.k or 1,
            n_workers=args.workers,
            max_scale=args.max_scale,
            multiplier=args.multiplier,
            steps=args.steps,
            tols=args.tols,
            seed=args.seed,
            out=args.out,
        )
        print(
            f"{res['dataset']}: L_AM={res['L_AM']:.4g} L_QM={res['L_QM']:.4g} L_var={res['L_var']:.4g}; "
            f"predicted step ratio {res['gamma_ratio_predicted']:.3f}"
        )
        for label, r in res["runs"].items():
            hits = ", ".join(f"<{t}: {n}" for t, n in r["rounds_to"].items())
            print(f"{label:22s} lr {r['lr']:.4g}  rounds to {hits}")
        print(
            "rounds saved (EF21 rounds / EF21-W rounds): "
            + ", ".join(f"<{t}: {v:.3f}x" for t, v in res["rounds_ratio"].items())
        )
    print(f"wrote JSON and PNG to {args.out}")
    return 0


def _bench(args) -> int:
    from . import bench

    result = bench.run_kernel_bench(args.device, [int(float(s)) for s in args.sizes], args.ratios, args.dtypes)
    print(bench.format_table(result))
    if args.out:
        bench.save(result, args.out)
        print(f"wrote {args.out}/kernels.json and kernels.png")
    return 0


def _build(args) -> int:
    from .ops import _ext

    ok = _ext.build(verbose=args.verbose)
    print("csrc extension built and loaded" if ok else f"build failed: {_ext.error()}")
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    from .demo import METHODS

    p = argparse.ArgumentParser(prog="torchkit", description="communication-efficient training with error feedback")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train on N worker processes: uncompressed vs error feedback vs PowerSGD")
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--ratio", type=float, default=0.01, help="TopK density")
    d.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    d.add_argument("--out", default="torchkit-demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--lr", type=float, default=None, help="one lr for all methods (default: each one's tuned lr)")
    d.add_argument("--powersgd-rank", type=int, default=1)
    d.add_argument("--noniid", action="store_true", help="label-sorted shards instead of interleaved ones")
    d.set_defaults(fn=_demo)

    r = sub.add_parser("repro", help="reproduce a paper's experiment on a LIBSVM file")
    r.add_argument("paper", choices=["ef21", "ef21w"])
    r.add_argument("--data", required=True, type=Path, help="LIBSVM file (e.g. ../shared/data/mushrooms.txt)")
    r.add_argument("--k", type=int, default=None, help="TopK k (default: the paper's for known datasets)")
    r.add_argument("--workers", type=int, default=20)
    r.add_argument("--bits", type=float, default=None, help="bits per worker to run for (ef21)")
    r.add_argument("--steps", type=int, default=10000, help="maximum rounds (ef21w)")
    r.add_argument("--tols", type=float, nargs="+", default=[1.0, 0.1, 0.01], help="||grad f||^2 thresholds (ef21w)")
    r.add_argument("--multiplier", type=float, default=64.0, help="multiple of each method's theoretical step (ef21w)")
    r.add_argument("--max-scale", type=float, default=10.0, help="largest row scale of the heterogeneous split (ef21w)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="torchkit-repro")
    r.set_defaults(fn=_repro)

    b = sub.add_parser("bench", help="kernel microbenchmarks on this machine's device")
    b.add_argument("--device", default="auto")
    b.add_argument("--sizes", nargs="+", default=["1e6", "1e7"])
    b.add_argument("--ratios", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    b.add_argument("--out", default=None)
    b.set_defaults(fn=_bench)

    x = sub.add_parser("build-ext", help="compile the csrc CPU kernels (just in time, against the installed torch)")
    x.add_argument("--verbose", action="store_true")
    x.set_defaults(fn=_build)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"torchkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
