"""When does a sparse all-gather beat a dense all-reduce?

For n ranks and a vector of d fp32 values, time (a) ``all_reduce`` of the dense vector and (b) the
path torchkit takes: ``all_gather`` of k packed entries (fp32 value + int32 index = 8 bytes) per rank
and the scatter-add decode of the n messages. Theory for a ring all-reduce: each rank moves about
2(n-1)/n * 4d bytes against (n-1) * 8k for the gather, so sparse wins below a density of about 1/n.

    python benchmarks/bench_collectives.py [--workers 2 4] [--d 4000000] [--backend gloo]

Writes benchmarks/results/<device-slug>/collectives.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchkit import ops
from torchkit._results import device_slug
from torchkit.apps import bench
from torchkit.compress import SparseMessage, pack_message, unpack_message

DENSITIES = [0.001, 0.01, 0.05, 0.1, 0.2, 0.35, 0.5]


def _median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def _worker(rank, world, port, d, reps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(d)
    rows = [{"density": 1.0, "kind": "dense all_reduce", "ms": _median_ms(lambda: dist.all_reduce(x), reps)}]
    for p in DENSITIES:
        k = max(1, int(p * d))
        msg = SparseMessage(torch.randn(1, k), torch.randperm(d)[:k].int()[None], d)
        buf, layout = pack_message(msg)
        gathered = buf.new_empty(world, buf.numel())
        acc = torch.zeros(d)

        def sparse(buf=buf, gathered=gathered, layout=layout, acc=acc):
            dist.all_gather(list(gathered.unbind(0)), buf)
            m = unpack_message(gathered, layout)
            acc.zero_()
            ops.accumulate_(acc, m.values, m.indices, 1.0 / world)

        rows.append({"density": p, "kind": "sparse all_gather + decode", "ms": _median_ms(sparse, reps)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--d", type=int, default=4_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    ops.build_extension()
    result = {
        "device": bench.device_name(torch.device("cpu")),
        "backend": "gloo",
        "d": args.d,
        "value_bytes": 4,
        "index_bytes": 4,
        "torch": torch.__version__,
        "runs": {},
    }
    for n in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            f = os.path.join(tmp, "r.json")
            mp.spawn(_worker, args=(n, _port(), args.d, args.reps, f), nprocs=n, join=True)
            rows = json.loads(Path(f).read_text())
        dense = rows[0]["ms"]
        cross = next((r["density"] for r in rows[1:] if r["ms"] > dense), None)
        result["runs"][str(n)] = {
            "rows": rows,
            "dense_ms": dense,
            "first_density_slower_than_dense": cross,
            "theory_crossover_density": 1.0 / n,
        }
        print(f"n={n}: dense all_reduce {dense:.2f} ms")
        for r in rows[1:]:
            print(f"   density {r['density']:6.1%}: sparse {r['ms']:8.2f} ms  ({dense / r['ms']:.2f}x dense speed)")
    slug = device_slug(result["device"])
    folder = Path(args.out) / slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "collectives.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for n, run in result["runs"].items():
            pts = [(r["density"], r["ms"]) for r in run["rows"][1:]]
            line = ax.loglog(*zip(*pts), "o-", label=f"sparse all_gather, n={n}")[0]
            ax.axhline(run["dense_ms"], color=line.get_color(), ls="--", lw=1, label=f"dense all_reduce, n={n}")
            ax.axvline(1 / int(n), color=line.get_color(), ls=":", lw=0.8)
        ax.set_xlabel("density k/d (dotted: 1/n)")
        ax.set_ylabel("ms per exchange (median)")
        ax.set_title(f"Gloo on {result['device']}, d={args.d:.0e} fp32", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "collectives.png", dpi=110)
    except ImportError:
        pass
    print(f"saved {folder}/collectives.json")


if __name__ == "__main__":
    main()
