"""The cost model of ``torchkit plan`` extrapolated to clusters nobody here has: a model's table, not measurements.

    python benchmarks/plan_clusters.py      # writes results/nvidia-h200/plan_clusters.json and .md

Inputs, each stated in the output:

- compute per step: GPT-2 small's forward and backward on one H200 (bf16 autocast, 8 x 1024 tokens per GPU),
  measured (``results/nvidia-h200/e2e.json``, DDP's all-reduce over a one-rank group); the 1B and 7B models
  scaled by their parameter counts (the same tokens per GPU; a 7B model needs sharding to fit, which this table
  ignores);
- the DDP hook's own work per 25 MB bucket: what it adds to GPT-2 small's measured backward (EF14 against the
  all-reduce, ``e2e.json``: medians of 15 steps, each backward within 0.1 ms of its median, the same to 0.1 ms in
  two device calls) over GPT-2 small's buckets as this model counts them (DDP's smaller first bucket aside);
  decode 83 ps per entry (``accumulate_`` for 8 workers, ``kernels_run7.json``); LocalSGD's worker step 7 ps
  per element (the fused EF14 step at 1e8, 0.69 ms);
- PowerSGD's products: not measured on the H200; estimated as 6 d r flops at 30 TFLOP/s plus torchkit's hook's
  work for one bucket (PyTorch's hook's own host work was not measured there);
- links: a ring over every GPU at the link's rate (no node-aware layout, no NVLink inside nodes), with a per-hop
  latency of 5 us (400 Gbit InfiniBand), 20 us (25-100 Gbit Ethernet) and 10 ms (1 Gbit cross-site link); a
  broadcast pipelined along the ring (n - 1 hops, the link's rate);
- the hook's exchange per method as the library chooses it (:func:`torchkit.apps.plan.hook_exchange`: the
  all-gather, dense where it would not pay at ``min_compression_rate=2``, and with ``:auto`` a shared support).

Per step time of each method by :func:`torchkit.apps.plan.predict`; the winner per row, and its speed-up over the
better of dense fp32 and bf16 DDP. The steps factor is 1: a compressed method that needs more steps to the same
loss wins by less (the README's "Choosing a method" has the measured factors on the study's tasks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torchkit.apps.plan import parse_method, predict

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "nvidia-h200"
BUCKET_BYTES = 25 * 2**20
_E2E = {r["config"]: r for r in json.loads((OUT / "e2e.json").read_text())["records"]}
GPT2_COMPUTE_S = (_E2E["allreduce"]["forward_ms"] + _E2E["allreduce"]["backward_ms"]) / 1e3
GPT2_BUCKETS = math.ceil(4 * _E2E["allreduce"]["params"] / BUCKET_BYTES)
HOOK_S_PER_BUCKET = (_E2E["hook ef14"]["backward_ms"] - _E2E["allreduce"]["backward_ms"]) / 1e3 / GPT2_BUCKETS
_KERNELS = {(r["op"], r["impl"]): r for r in json.loads((OUT / "kernels_run7.json").read_text())["rows"]
            if r["d"] == 10**8}  # fmt: skip
DECODE_S_PER_ENTRY = _KERNELS[("accumulate", "cuda")]["ms_p50"] / 1e3 / 8e6  # 8 workers' 1% of 1e8
WORKER_STEP_S_PER_ELEMENT = _KERNELS[("ef14", "cuda")]["ms_p50"] / 1e3 / 1e8  # the fused EF14 step at 1e8
POWERSGD_FLOPS = 30e12
LINKS = {  # name: (bits per second, per-hop latency in seconds)
    "400 Gbit InfiniBand": (400e9, 5e-6),
    "100 Gbit Ethernet": (100e9, 20e-6),
    "25 Gbit Ethernet": (25e9, 20e-6),
    "1 Gbit cross-site": (1e9, 10e-3),
}
METHODS = ["ddp", "ddp_bf16", "powersgd4", "ef14@0.01", "ef14@0.01:auto", "ef14@0.001", "local32@0.03", "diloco32"]
GPUS = [8, 32, 64, 256]


def transformer_shapes(layers: int, width: int, vocab: int, context: int = 1024) -> list[list[int]]:
    """A GPT-2 style decoder's parameter shapes (tied embedding, biases, layer norms)."""
    shapes = [[vocab, width], [context, width]]
    for _ in range(layers):
        shapes += [[width], [width], [3 * width, width], [3 * width], [width, width], [width]]
        shapes += [[width], [width], [4 * width, width], [4 * width], [width, 4 * width], [width]]
    return shapes + [[width], [width]]


MODELS = {
    "GPT-2 small": transformer_shapes(12, 768, 50257),
    "1B": transformer_shapes(24, 1856, 50257),
    "7B": transformer_shapes(32, 4160, 50257),
}


def calibration(shapes: list[list[int]], compute_s: float, n: int, link: tuple[float, float]) -> dict:
    """A calibration as ``torchkit plan`` measures one, from the inputs above."""
    d = sum(math.prod(s) for s in shapes)
    bits, hop = link
    byte_s = bits / 8
    buckets = max(1, math.ceil(4 * d / BUCKET_BYTES))
    hook = {m: buckets * HOOK_S_PER_BUCKET for m in METHODS if parse_method(m)["kind"] == "ef"}
    for m in METHODS:
        spec = parse_method(m)
        if spec["kind"] == "powersgd":
            hook[m] = 6 * d * spec["rank"] / POWERSGD_FLOPS + HOOK_S_PER_BUCKET
    compress = {f"{parse_method(m)['ratio']:g}:int8": d * WORKER_STEP_S_PER_ELEMENT
                for m in METHODS if parse_method(m)["kind"] == "local"}  # fmt: skip
    return {
        "d": d, "ranks": n, "buckets": buckets, "shapes": shapes, "compute_s": compute_s, "hook_s": hook,
        "compress_s": compress, "decode_s_per_entry": DECODE_S_PER_ENTRY,
        # ring all-reduce: 2(n-1) hops of B/n; ring all-gather: n-1 hops of B (per rank)
        "all_reduce": {"latency_s": 2 * (n - 1) * hop, "bytes_per_s": byte_s * n / (2 * (n - 1))},
        "all_gather": {"latency_s": (n - 1) * hop, "bytes_per_s": byte_s / (n - 1)},
        "broadcast": {"latency_s": (n - 1) * hop, "bytes_per_s": byte_s},  # pipelined along the ring
    }  # fmt: skip


def main() -> int:
    gpt2 = sum(math.prod(s) for s in MODELS["GPT-2 small"])
    rows = []
    for model, shapes in MODELS.items():
        d = sum(math.prod(s) for s in shapes)
        compute = GPT2_COMPUTE_S * d / gpt2
        for link, spec in LINKS.items():
            for n in GPUS:
                cal = calibration(shapes, compute, n, spec)
                steps = {m: predict(cal, m) for m in METHODS}
                best = min(steps, key=steps.get)
                dense = min(steps["ddp"], steps["ddp_bf16"])
                rows.append({"model": model, "params": d, "link": link, "gpus": n, "step_ms": {m: 1e3 * s for m, s in
                             steps.items()}, "fastest": best, "speedup_over_dense": dense / steps[best]})  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "plan_clusters.json").write_text(json.dumps({"inputs": __doc__, "rows": rows}, indent=1))
    head = "| model | link | GPUs | " + " | ".join(METHODS) + " | fastest (x best dense DDP) |"
    lines = [
        "# torchkit plan's cost model, extrapolated (not measured): ms per step per method",
        "",
        "Inputs (benchmarks/plan_clusters.py): compute, hook and kernel times measured on one H200; links modelled "
        "as rings at the link's rate; PowerSGD's products estimated; steps factor 1.",
        "",
        head,
        "|" + "---|" * (len(METHODS) + 4),
    ]
    for r in rows:
        cells = " | ".join(f"{r['step_ms'][m]:,.0f}" for m in METHODS)
        lines.append(f"| {r['model']} | {r['link']} | {r['gpus']} | {cells} | {r['fastest']} "
                     f"({r['speedup_over_dense']:.2f}x) |")  # fmt: skip
    (OUT / "plan_clusters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
