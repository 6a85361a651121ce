"""Issue 23 item 3's study: does compressing plain FSDP's reduce-scatter pay when every link is slow?

    sudo python benchmarks/bench_fsdp_rs.py [--rates 1gbit 100mbit] [--ranks 2 4] [--steps 20] [--repeats 3]

For each link rate a network namespace whose loopback is shaped by ``tc tbf`` (``torchkit.apps.links``'s
``shaped_namespace``), and in it N Gloo ranks under ``torchrun`` training the network benchmark's character
transformer (3.2M parameters: width 256, 4 layers), every block and the root ``fully_shard``-ed over the N ranks
(plain FSDP2, one mesh dimension), SGD with momentum. Three reduce-scatters, the configurations interleaved over
the repeats (seeds):

- ``fsdp``: FSDP2's own (dense fp32);
- ``fsdp+ef14@<rho>``: :func:`torchkit.fsdp.compress_reduce_scatter` with EF14 and TopK at density rho;
- ``fsdp+free``: a reduce-scatter that sends nothing and writes zeros: no training, the bound on what any
  compression of the reduce-scatter could gain (the parameter all-gathers are still dense).

Measured per run: the median step time (``perf_counter`` around zero_grad, forward, backward and step; the first 3
steps left out), the bytes on the loopback per step (the namespace's counters, protocol overhead included), and per
rank the sharded parameter bytes against the compressed reduce-scatter's worker state bytes (the memory it costs).
Writes ``<out>/<device>/fsdp_rs.json`` and ``fsdp_rs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchkit as tk
    from torchkit.apps import tasks

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    task = tasks.char_lm(n_workers=n, width=cfg["width"], layers=cfg["layers"])
    model = task.model(cfg["seed"])
    mesh = init_device_mesh("cpu", (n,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state_bytes = 0
    if cfg["variant"].startswith("fsdp+ef14"):
        rho = float(cfg["variant"].split("@")[1])
        comms = tk.fsdp.compress_reduce_scatter(model, tk.EF14(tk.TopK(ratio=rho)))
    elif cfg["variant"] == "fsdp+free":
        for m in model.modules():
            if hasattr(m, "set_custom_reduce_scatter"):
                m.set_custom_reduce_scatter(_Free())
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    times, losses = [], []
    for step in range(cfg["steps"]):
        xs, ys = task.batches(step)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = task.loss(model(xs[rank]), ys[rank])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    if cfg["variant"].startswith("fsdp+ef14"):
        state_bytes = sum(t.numel() * t.element_size() for c in comms.values() for t in (c.state or {}).values())
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    if rank == 0:
        Path(cfg["out"]).write_text(
            json.dumps(
                {
                    **cfg,
                    "step_ms_median": 1e3 * statistics.median(times[3:]),
                    "step_ms": [1e3 * t for t in times],
                    "losses": losses,
                    "param_shard_bytes": shard_bytes,
                    "feedback_state_bytes": state_bytes,
                    "parameters": sum(p.numel() for p in model.parameters()),
                }
            )
        )
    dist.barrier()
    os._exit(0)  # results are written: no teardown (see torchkit.process_group)


def _free_class():
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    class Free(ReduceScatter):
        """Sends nothing, writes zeros: the bound on any compression of the reduce-scatter."""

        def allocate(self, size, *, dtype, device):
            import torch

            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            output_tensor.zero_()

    return Free


def _Free():  # noqa: N802 - built lazily: the worker imports FSDP, the driver need not
    return _free_class()()


def run_one(ns: str, n: int, cfg: dict) -> dict:
    from torchkit.apps.links import free_port, sent_bytes

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**cfg, "out": os.path.join(tmp, "r.json")}
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
               json.dumps(cfg)]  # fmt: skip
        before = sent_bytes(ns, "lo")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        wire = sent_bytes(ns, "lo") - before
        if proc.returncode != 0 or not Path(cfg["out"]).exists():
            raise RuntimeError(f"{cfg['variant']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(Path(cfg["out"]).read_text())
    res["wire_bytes_per_step"] = wire / cfg["steps"]
    return res


def table(rows: list[dict]) -> str:
    out = [
        "| link | ranks | reduce-scatter | ms per step (median of seeds) [min-max] | x fsdp | MB on the wire per step "
        "| param shard MB per rank | feedback state MB per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["rate"], r["ranks"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for rate, n in keys:
        group = [r for r in rows if r["rate"] == rate and r["ranks"] == n]
        base = statistics.median(r["step_ms_median"] for r in group if r["variant"] == "fsdp")
        for variant in dict.fromkeys(r["variant"] for r in group):
            rs = [r for r in group if r["variant"] == variant]
            ms = [r["step_ms_median"] for r in rs]
            med = statistics.median(ms)
            wire = statistics.median(r["wire_bytes_per_step"] for r in rs) / 1e6
            out.append(
                f"| {rate} | {n} | `{variant}` | {med:.0f} [{min(ms):.0f}-{max(ms):.0f}] ({len(rs)} seeds) | "
                f"{med / base:.2f} | {wire:.2f} | {rs[0]['param_shard_bytes'] / 1e6:.2f} | "
                f"{rs[0]['feedback_state_bytes'] / 1e6:.2f} |"
            )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    from torchkit._results import device_slug, save_result
    from torchkit.apps import links

    variants = ["fsdp", f"fsdp+ef14@{args.density}", "fsdp+free"]
    rows = []
    try:
        for rate in args.rates:
            ns = links.shaped_namespace(rate)
            for n in args.ranks:
                for seed in range(args.repeats):
                    for variant in variants:  # interleaved over the seeds
                        cfg = dict(variant=variant, rate=rate, ranks=n, seed=seed, steps=args.steps, lr=args.lr,
                                   width=args.width, layers=args.layers)  # fmt: skip
                        r = run_one(ns, n, cfg)
                        rows.append(r)
                        print(f"{rate} n={n} seed={seed} {variant}: {r['step_ms_median']:.0f} ms/step, "
                              f"{r['wire_bytes_per_step'] / 1e6:.2f} MB/step", flush=True)  # fmt: skip
    finally:
        links.cleanup()
    device = "AMD EPYC (2 threads)" if "EPYC" in open("/proc/cpuinfo").read() else "CPU"
    result = {"device": device, "rows": [{k: v for k, v in r.items() if k != "out"} for r in rows]}
    folder = Path(args.out) / device_slug(device)
    save_result(result, folder, "fsdp_rs", None)
    (folder / "fsdp_rs.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
