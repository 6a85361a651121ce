"""Kernel microbenchmarks: d in {1e6, 1e7, 1e8}, k in {0.1%, 1%, 10%}, fp32 and bf16 gradients.

    python benchmarks/bench_kernels.py [--device cuda] [--sizes 1e6 1e7] [--extra 1e9:bfloat16:0.01] [--passes]
                                       [--out DIR]

--passes also times each GPU implementation's other sequence (the one pass against two passes).

Writes <out>/<device-slug>/kernels.json and kernels.png and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from torchkit._results import device_slug
from torchkit.apps import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--extra", nargs="*", default=[], help="single cases d:dtype:ratio, e.g. 1e9:bfloat16:0.01")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--passes", action="store_true", help="also time the one pass against two passes")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    extra = [(int(float(d)), dt, float(r)) for d, dt, r in (x.split(":") for x in args.extra)]
    result = bench.run_kernel_bench(
        args.device, [int(s) for s in args.sizes], args.ratios, args.dtypes, repeats=args.repeats, extra=extra,
        passes=args.passes,
    )  # fmt: skip
    slug = device_slug(result["device"])
    folder = bench.save(result, Path(args.out) / slug)
    print(bench.format_table(result))
    print(f"saved {folder}/kernels.json and kernels.png")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
