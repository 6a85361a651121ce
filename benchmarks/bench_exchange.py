"""Bytes a rank receives per round, by exchange and number of ranks: the model against the loopback's counters.

Each exchange is torchkit's own round (:func:`torchkit.comm.start_round` over a :class:`~torchkit.comm.DistExchanger`,
EF14, d values, 1% density, fp32 values):

- ``dense``: the Identity round, an ``all_reduce`` of d values;
- ``allgather``: TopK, every rank's k (value, index) pairs all-gathered;
- ``cyclic``: :class:`~torchkit.CyclicTopK`, the leader's k indices broadcast, then an ``all_reduce`` of k values;
- ``shared_randk``: ``RandK(shared=True)``, an ``all_reduce`` of k values, no index on the wire.

The model (:func:`torchkit.comm.received_bytes`: ring all-reduce ``2 (n-1)/n m``, ring all-gather ``(n-1) m``,
broadcast ``(n-1)/n m`` per rank on average) is checked against what the ranks really put on the wire: n Gloo ranks
in a network namespace of their own (needs root), whose loopback counts every byte (payload and TCP/IP headers;
Gloo keeps no byte counters of its own), divided by n, at n = 2, 4, 8 (8 oversubscribes the 2 cores; only bytes
are measured). The model then extrapolates to n = 64 at d = 1e8.

    sudo python benchmarks/bench_exchange.py [--ranks 2 4 8] [--d 1000000] [--rounds 5]

Writes benchmarks/results/<device-slug>/exchange_bytes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchkit as tk  # noqa: E402
from torchkit._results import device_slug  # noqa: E402
from torchkit.apps import bench, links  # noqa: E402
from torchkit.comm import received_bytes  # noqa: E402

EXCHANGES = {
    "dense": lambda: tk.EF14(tk.Identity()),
    "allgather": lambda: tk.EF14(tk.TopK(ratio=0.01)),
    "cyclic": lambda: tk.EF14(tk.CyclicTopK(ratio=0.01)),
    "shared_randk": lambda: tk.EF14(tk.RandK(ratio=0.01, shared=True)),
}


def _worker(rank: int, world: int, port: int, d: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    from torchkit.comm import DistExchanger, start_round
    from torchkit.state import Block

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ex = DistExchanger()
    grad = torch.randn(d, generator=torch.Generator().manual_seed(rank))

    def count(fn) -> int:
        """Loopback bytes of ``rounds`` calls, less those of the barriers around them."""
        fn()  # warm: connections, first-call allocations
        marks = []
        for _ in range(2):
            dist.barrier()
            marks.append(links.sent_bytes(None, "lo"))  # this process's namespace: transmitted = received on lo
        dist.barrier()
        for _ in range(rounds):
            fn()
        dist.barrier()
        marks.append(links.sent_bytes(None, "lo"))
        barrier = marks[1] - marks[0]  # one barrier's bytes
        return marks[2] - marks[1] - barrier

    def rounds_of(fb):
        block = Block(fb, ("x",), (d,), state=fb.init_state(d), server=None, segments=(d,))
        step = iter(range(1, 10**6))
        return lambda: start_round(fb, ex, block, grad.clone(), next(step)).wait()

    rows = {name: count(rounds_of(make())) / rounds for name, make in EXCHANGES.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def model(name: str, n: int, d: int, density: float = 0.01) -> float:
    """Bytes a rank receives in one round of ``name`` (fp32 values, int32 indices; the non-finite check included:
    the all-gathered message runs on to a multiple of 8 bytes, then its 8-byte float64 check)."""
    k = tk.TopK(ratio=density).k_for(d)
    if name == "dense":
        return received_bytes("all_reduce", n, 4 * (d + 1))
    if name == "allgather":
        return received_bytes("all_gather", n, 8 * k + 8)
    reduce = received_bytes("all_reduce", n, 4 * (k + 1))
    return reduce + (received_bytes("broadcast", n, 4 * k) if name == "cyclic" else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (a network namespace of its own, whose loopback counts only these ranks' bytes)")
        return 2
    measured = {}
    for n in args.ranks:
        ns = links.shaped_namespace("unshaped")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                f = os.path.join(tmp, "r.json")
                code = (
                    "import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); "
                    "from benchmarks.bench_exchange import _worker; "
                    "mp.spawn(_worker, args=tuple(int(a) for a in sys.argv[2:6]) + (sys.argv[6],), "
                    "nprocs=int(sys.argv[2]), join=True)"
                )
                cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", code, str(ROOT), str(n),
                       str(links.free_port()), str(args.d), str(args.rounds), f]  # fmt: skip
                subprocess.run(cmd, check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
                measured[n] = {k: v / n for k, v in json.loads(Path(f).read_text()).items()}  # per rank
        finally:
            links.delete_namespace(ns)
    rows = []
    print(f"bytes received per rank per round, d = {args.d:.0e}, TopK 1%, fp32 values (measured / model)")
    for n in args.ranks:
        for name in EXCHANGES:
            m, got = model(name, n, args.d), measured[n][name]
            rows.append({"ranks": n, "exchange": name, "measured": got, "model": m, "measured_over_model": got / m})
            print(f"  n={n:3d} {name:13s} {got:12.0f} / {m:12.0f} = {got / m:.3f}")
    big = 10**8
    extrapolated = {
        name: {str(n): model(name, n, big) for n in (2, 4, 8, 16, 32, 64, 128, 256, 1024)} for name in EXCHANGES
    }
    print("model at d = 1e8: n=64 over n=8 (the issue's target: at most 1.3 for the scalable exchange)")
    for name, by_n in extrapolated.items():
        n8, n64 = by_n["8"], by_n["64"]
        print(f"  {name:13s} n=8 {n8 / 1e6:9.2f} MB  n=64 {n64 / 1e6:9.2f} MB  x{n64 / n8:.2f}")
    result = {
        "device": bench.device_name(torch.device("cpu")),
        "backend": "gloo",
        "torch": torch.__version__,
        "d_measured": args.d,
        "rounds": args.rounds,
        "density": 0.01,
        "counter": "loopback bytes of a private network namespace (payload and TCP/IP headers) / ranks",
        "rows": rows,
        "model_d1e8": extrapolated,
        "n64_over_n8": {name: by_n["64"] / by_n["8"] for name, by_n in extrapolated.items()},
    }
    folder = Path(args.out) / device_slug(result["device"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exchange_bytes.json").write_text(json.dumps(result, indent=1))
    print(f"saved {folder}/exchange_bytes.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
