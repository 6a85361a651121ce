"""Command line: ``torchkit demo | repro ef21 | repro ef21w | bench [network] | plan | build-ext``
(``python -m torchkit``)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TextIO

from . import _progress as progress
from . import netbench, plan
from ._paths import out_folder

__all__ = ["main"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Epilogs as written; ``(default: X)`` after every option's help except where the help says it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        if isinstance(action.default, list):  # as it is typed: 0 1 2, not [0, 1, 2]
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _progress(mode: str, stream: TextIO | None = None):
    """``total -> tqdm bar``: a live bar on a terminal, a line every ``LINE_INTERVAL_S`` otherwise."""
    if mode == "off":
        return None
    lines = {"lines": True, "auto": None}.get(mode, False)
    return lambda total: progress.bar(total, "progress", "round", lines=lines, stream=stream)


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


def _fmt_spread(st: dict, fmt: str, *, never: str = "never") -> str:
    if st["count"] == 0:
        return f"{never} (0/{st['of']})" if st["of"] > 1 else never
    if st["of"] == 1:
        return format(st["mean"], fmt)
    text = f"{format(st['mean'], fmt)} [{format(st['min'], fmt)}, {format(st['max'], fmt)}]"
    return text if st["count"] == st["of"] else f"{text} ({st['count']}/{st['of']})"


def _repro(args) -> int:
    from . import repro

    seeds = list(dict.fromkeys(args.seeds))
    if args.paper == "ef21":
        mult = {n: v for n, v in (("ef21", args.ef21_multiplier), ("ef14", args.ef14_multiplier)) if v is not None}
        kw = dict(k=args.k, multipliers=mult, bits=args.bits, n_workers=args.workers, seeds=seeds, tol=args.tol)
        settings = repro.ef21_settings(args.preset, **kw)
    else:
        kw = dict(
            k=args.k,
            n_workers=args.workers,
            max_scale=args.max_scale,
            multiplier=args.multiplier,
            steps=args.steps,
            tols=args.tols,
            seeds=seeds,
        )
        settings = repro.ef21w_settings(args.preset, **kw)
    print(repro.describe(settings, args.data), flush=True)
    if args.dry_run:
        return 0
    run = repro.repro_ef21 if args.paper == "ef21" else repro.repro_ef21w
    res = run(args.data, preset=args.preset, out=args.out, progress=_progress(args.progress), **kw)
    spread = f"mean [min, max] over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    if args.paper == "ef21":
        geo = " (geometric mean for ||grad f||^2)" if len(seeds) > 1 else ""
        print(
            f"\n{res['dataset']}: d={res['d']}, m={res['m']}, n={res['n_workers']}, Top-{res['k']}, "
            f"theory step {res['gamma_theory']:.4g}; {spread}{geo}"
        )
        print(f"{'run':18s} {'mult':>6s}  {'final ||grad f||^2':34s} bits/n to {res['tol']:g} (seeds that reach it)")
        for label, r in res["runs"].items():
            final = _fmt_spread(r["final_grad_norm_sq"], ".2e")
            print(f"{label:18s} {r['multiplier']:5g}x  {final:34s} {_fmt_spread(r['bits_to_tol'], ',.0f')}")
    else:
        print(
            f"\n{res['dataset']}: L_AM={res['L_AM']:.4g} L_QM={res['L_QM']:.4g} L_var={res['L_var']:.4g}; "
            f"predicted step ratio {res['gamma_ratio_predicted']:.3f}; {spread}"
        )
        for label, r in res["runs"].items():
            hits = "; ".join(f"<{t}: {_fmt_spread(v, '.0f')}" for t, v in r["rounds_to"].items())
            print(f"{label:20s} lr {r['lr']:.4g}  rounds to {hits}")
        saved = "; ".join(f"<{t}: {_fmt_spread(v, '.3f', never='n/a')}" for t, v in res["rounds_ratio"].items())
        print(f"rounds saved (EF21 rounds / EF21-W rounds): {saved}")
    print(f"wrote JSON and PNG to {args.out}")
    return 0


def _bench(args) -> int:
    from . import bench

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda: this machine has no CUDA device for torch {torch.__version__}")
    sizes = [s if isinstance(s, int) else _size(s) for s in args.sizes]  # the defaults come as text
    result = bench.run_kernel_bench(args.device, sizes, args.ratios, args.dtypes)
    print(bench.format_table(result))
    if args.out:
        bench.save(result, args.out)
        print(f"wrote {args.out}/kernels.json and kernels.png")
    return 0


def _build(args) -> int:
    from ..ops import _ext

    ok = _ext.build(verbose=args.verbose)
    print("csrc extension built and loaded" if ok else f"build failed: {_ext.error()}")
    return 0 if ok else 1


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _fraction(text: str) -> float:
    """A density k/d: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _size(text: str) -> int:
    """A vector length, ``1e6`` style accepted."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive length such as 1e6, got {text!r}") from None
    if not (1 <= value < math.inf and value == int(value)):  # (int(inf) raised OverflowError: a traceback)
        raise argparse.ArgumentTypeError(f"must be a positive length such as 1e6, got {text!r}")
    return int(value)


_BENCH_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def _presets_epilog(paper: str) -> str:
    from .repro import PRESETS

    if paper == "ef21":
        rows = [
            f"  {name:10s} d = {p['d']:<4g} Top-{p['k']:g}, EF21 {p['ef21']:g}x, EF14 {p['ef14']:g}x, "
            f"{p['bits']:g} bits/n"
            for name, p in PRESETS.items()
        ]
        head = "presets (--preset NAME; the EF21 poster's settings: Richtarik, Sokolov, Fatkhullin, NeurIPS 2021):"
    else:
        rows = [f"  {name:10s} d = {p['d']:<4g} Top-1" for name, p in PRESETS.items()]
        head = (
            "presets (--preset NAME): Top-1 as in the EF21-W paper, and a check of d; n, the scales and the\n"
            "multiplier are torchkit's choices (the paper's per-dataset settings are not public):"
        )
    return head + "\n" + "\n".join(rows) + "\nwithout --preset the settings are generic, whatever the file is called."


def _repro_parsers(sub) -> None:
    from .repro import PRESETS

    r = sub.add_parser(
        "repro",
        help="reproduce a paper's experiment on a LIBSVM file",
        description="Reproduce a paper's logistic-regression experiment; `torchkit repro PAPER --help` for options.",
        formatter_class=_Formatter,
    )
    papers = r.add_subparsers(dest="paper", required=True, metavar="PAPER")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, type=Path, metavar="FILE", help="LIBSVM file (required)")
    common.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the paper's settings for this dataset (listed below); default: none, generic settings",
    )
    common.add_argument("--k", type=_positive(int), default=None, help="TopK k (default: the preset's, else 1)")
    common.add_argument("--workers", type=_positive(int), default=20, help="number of simulated workers n")
    common.add_argument(
        "--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2], help="seeds of x0 ~ N(0, I); mean and range"
    )
    common.add_argument("--out", type=out_folder, default="torchkit-repro", help="folder for the JSON and PNG results")
    common.add_argument(
        "--progress",
        choices=["auto", "bar", "lines", "off"],
        default="auto",
        help=f"on stderr; auto: a bar on a terminal, else a line every {progress.LINE_INTERVAL_S:g} s",
    )
    common.add_argument("--dry-run", action="store_true", help="print the settings and exit without reading FILE")

    e = papers.add_parser(
        "ef21",
        parents=[common],
        help="EF21 against EF14, EControl and EF21-SGDM (EF21 poster)",
        description="||grad f||^2 against bits per worker for EF21, EF14, EControl and EF21-SGDM at multiples of the "
        "theoretical EF21 step size (the EF21 paper's logistic-regression experiments, NeurIPS 2021).",
        epilog=_presets_epilog("ef21"),
        formatter_class=_Formatter,
    )
    e.add_argument(
        "--bits", type=_positive(float), default=None, help="bits per worker (default: the preset's, else 2e5)"
    )
    e.add_argument(
        "--tol", type=_positive(float), default=1e-6, help="||grad f||^2 target of the bits-to-target column"
    )
    e.add_argument(
        "--ef21-multiplier",
        type=_positive(float),
        default=None,
        help="EF21's step multiple (default: the preset's, else 1); also EControl's and EF21-SGDM's",
    )
    e.add_argument(
        "--ef14-multiplier",
        type=_positive(float),
        default=None,
        help="EF14's step multiple (default: the preset's, else 1)",
    )
    e.set_defaults(fn=_repro)

    w = papers.add_parser(
        "ef21w",
        parents=[common],
        help="EF21 (L_QM step) against EF21-W (L_AM step) on a heterogeneous split",
        description="Rounds to ||grad f||^2 thresholds for EF21 with the quadratic-mean step and EF21-W with the "
        "arithmetic-mean one, worker i's rows scaled by s_i (Error Feedback Reloaded, ICLR 2024).",
        epilog=_presets_epilog("ef21w"),
        formatter_class=_Formatter,
    )
    w.add_argument("--steps", type=_positive(int), default=10000, help="maximum rounds")
    w.add_argument("--tols", type=_positive(float), nargs="+", default=[1.0, 0.1, 0.01], help="||grad f||^2 thresholds")
    w.add_argument(
        "--multiplier", type=_positive(float), default=64.0, help="multiple of each method's theoretical step"
    )
    w.add_argument("--max-scale", type=_positive(float), default=10.0, help="s_i log-spaced in [1, MAX_SCALE]")
    w.set_defaults(fn=_repro)


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .demo import choices

    methods = choices()  # read from the method registry now: a method registered before this call is offered

    p = argparse.ArgumentParser(
        prog="torchkit", description="communication-efficient training with error feedback", formatter_class=_Formatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="train on N worker processes: uncompressed vs error feedback vs PowerSGD",
        formatter_class=_Formatter,
    )
    d.add_argument("--workers", type=_positive(int), default=4, help="Gloo worker processes")
    d.add_argument("--steps", type=_positive(int), default=600, help="training steps per method")
    d.add_argument("--ratio", type=_fraction, default=0.01, help="TopK density per DDP bucket, in (0, 1]")
    d.add_argument("--methods", nargs="+", default=list(methods), choices=methods, help="methods to train, in order")
    d.add_argument(
        "--out", type=out_folder, default="torchkit-demo", help="folder for results.json, table.md and the PNG"
    )
    d.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the data and the model")
    d.add_argument("--batch", type=_positive(int), default=64, help="batch size per worker")
    d.add_argument(
        "--lr",
        type=_positive(float),
        default=None,
        help="one SGD learning rate for all methods (default: each one's tuned lr)",
    )
    d.add_argument("--powersgd-rank", type=_positive(int), default=1, help="rank of PyTorch's PowerSGD hook")
    d.add_argument("--noniid", action="store_true", help="label-sorted shards instead of interleaved ones")
    d.set_defaults(fn=_demo)

    _repro_parsers(sub)

    b = sub.add_parser("bench", help="kernel microbenchmarks on this machine's device", formatter_class=_Formatter)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    b.add_argument("--sizes", nargs="+", type=_size, default=["1e6", "1e7"], help="vector lengths d")
    b.add_argument("--ratios", nargs="+", type=_fraction, default=[0.001, 0.01, 0.1], help="TopK densities k/d")
    b.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=_BENCH_DTYPES, help="gradient dtypes"
    )
    b.add_argument(
        "--out", type=out_folder, default=None, help="folder for kernels.json and kernels.png (default: print only)"
    )
    b.set_defaults(fn=_bench)
    what = b.add_subparsers(dest="bench_what", metavar="{network}", help="another benchmark instead of the kernels'")
    n = what.add_parser(
        "network",
        help="time and bytes to a target loss on a shaped link (root: ip netns + tc), against DDP and PowerSGD",
        description=netbench.__doc__,
        formatter_class=_Formatter,
    )
    netbench.add_arguments(n)
    n.set_defaults(fn=netbench.run)

    pl = sub.add_parser(
        "plan",
        help="will compression help here? calibrate a cost model on this machine's ranks and link, predict each method",
        description=plan.__doc__,
        formatter_class=_Formatter,
    )
    plan.add_arguments(pl)
    pl.set_defaults(fn=plan.run)

    x = sub.add_parser(
        "build-ext",
        help="compile the csrc CPU kernels (just in time, against the installed torch)",
        formatter_class=_Formatter,
    )
    x.add_argument("--verbose", action="store_true", help="show the compiler's output")
    x.set_defaults(fn=_build)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        where = f"{args.command} {args.paper}" if args.command == "repro" else args.command
        print(f"torchkit {where}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
