"""The fused steps and the decode on the gradients training produces, with the feedback state carried from step to
step (issue 21 item 4), against the same calls from a fresh state (the protocol of ``bench_kernels.py``, which
restores the state before every call).

    python benchmarks/bench_steady.py [--steps 300] [--warm 100] [--width 256] [--layers 4] [--ratio 0.01]
                                      [--workers 8] [--device auto] [--two-passes] [--out benchmarks/results]

``--two-passes`` turns the one pass off (the C++ kernel's and the shared GPU driver's) and writes ``steady_2p.json``;
on the CPU the record counts the one pass's hits and misses per method over the untimed steps, where each call
continues from the last (``one_pass_trajectory``: the hint predicting each step's threshold from the last one's on
a real training trajectory; the cold first call counts as neither).

1. Trains the char_lm transformer (one worker, AdamW) for ``--steps`` steps. At every step each method (EF14,
   EF21, EControl, TopK at ``--ratio``) runs its fused step on that step's flat fp32 gradient with its own state,
   carried from step to step ("steady"); after ``--warm`` steps each call is timed, and beside it, interleaved in
   a random order, the same call on the same gradient from the method's initial state ("fresh": zero state, as
   a benchmark that restores its state sees it). The state after a call is what the next step continues from.
2. ``accumulate_``: the last ``--workers`` steady EF14 messages stand for that many workers' messages of one
   round, decoded in one call into a zeroed vector (``zero=True``), in the order the kernel emits them and
   sorted by index; on a GPU each also with the decode tiled over the output (``TORCHKIT_GPU_TILED_DECODE``,
   two launches: torchkit/ops/_triton/decode.py) beside the per-row one (a launch per worker). Floor: the bytes
   the decode must move, values and indices read once plus every touched line of the output read and written
   once (64-byte cache lines on the CPU, 32-byte sectors on a GPU), over the measured copy bandwidth; and the
   plain floor without the line granularity (``n k (4 + 4 + 8)`` bytes).

Timers: the device time of each call (``torchkit.apps.bench.time_once``: CUDA events on a GPU, ``perf_counter`` on
the CPU, where the call is synchronous) and, on a GPU, the host time, the wall time until the call returns without
a synchronisation (the launches and Python; on the CPU the two are one). Writes ``<out>/<device>/steady.json``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import torchkit as tk
from torchkit import ops
from torchkit._results import device_slug, save_result
from torchkit.apps import bench, tasks

STEPS = {
    "ef14": (lambda st, g, k: ops.ef14_step_(g, st["error"], k), ("error",)),
    "ef21": (lambda st, g, k: ops.ef21_step_(g, st["shift"], k), ("shift",)),
    "econtrol": (lambda st, g, k: ops.econtrol_step_(g, st["error"], st["shift"], k, 0.1), ("error", "shift")),
}


def _host_ms(fn, dev: torch.device) -> float:
    """Wall time until ``fn`` returns, without waiting for the device (after it has drained)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _steady_and_fresh(step, st, names, g, k, dev, rng, times) -> tuple:
    """Time the call from the carried state and from a fresh one (random order), then the carried call again for
    its host time; the state goes on from that call, whose message is returned."""
    fresh = {n: torch.zeros_like(st[n]) for n in names}
    saved = {n: st[n].clone() for n in names}
    order = ["steady", "fresh"]
    rng.shuffle(order)
    for kind in order:
        s = st if kind == "steady" else fresh
        times[kind].append(bench.time_once(lambda s=s: step(s, g, k), dev))
    for n in names:
        st[n].copy_(saved[n])
    box = []
    times["steady_host"].append(_host_ms(lambda: box.append(step(st, g, k)), dev))
    return box[0]


def _one_pass_counts() -> list[int] | None:
    """The C++ kernel's one-pass (hits, misses) so far; None where it is not the kernel that runs."""
    from torchkit.ops import _ext

    return list(_ext._module.one_pass_counts()) if _ext.available() and _ext.ONE_PASS else None


def _quantiles(ts: list[float]) -> dict[str, float]:
    _, p20, p50, p80 = bench._quantiles(ts)
    return {"p20": p20, "p50": p50, "p80": p80, "n": len(ts)}


def measure(args, dev: torch.device, log=print) -> dict:
    task = tasks.char_lm(n_workers=1, width=args.width, layers=args.layers)
    model = task.model(0).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    k = max(1, int(d * args.ratio))
    opt = torch.optim.AdamW(params, lr=3e-3)
    states = {m: {n: ops.padded_zeros(d, device=dev) for n in names} for m, (_, names) in STEPS.items()}
    times = {m: {"steady": [], "fresh": [], "steady_host": []} for m in STEPS}
    messages, losses = [], []
    trajectory = {m: [0, 0] for m in STEPS}  # the one pass's hits and misses over the untimed steps
    rng = random.Random(0)
    log(f"char_lm width {args.width} layers {args.layers}: d = {d}, k = {k}, {args.steps} steps ({args.warm} untimed)")
    for t in range(args.steps):
        x, y = (b[0].to(dev) for b in task.batches(t))
        opt.zero_grad(set_to_none=False)
        loss = task.loss(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        g = torch.cat([p.grad.reshape(-1) for p in params])
        for m, (step, names) in STEPS.items():
            if t < args.warm:
                before = _one_pass_counts()
                out = step(states[m], g, k)
                if before is not None:  # the plain trajectory: did the last step's hint predict this one?
                    trajectory[m] = [a + b - c for a, b, c in zip(trajectory[m], _one_pass_counts(), before)]
            else:
                out = _steady_and_fresh(step, states[m], names, g, k, dev, rng, times[m])
            if m == "ef14" and t >= args.steps - args.workers:
                messages.append(out)
        opt.step()
        if t % 50 == 0 or t == args.steps - 1:
            log(f"  step {t}: loss {losses[-1]:.3f}")
    rows = []
    for m in STEPS:
        tm = times[m]
        row = {"method": m, "d": d, "k": k, "steady_ms": _quantiles(tm["steady"]), "fresh_ms": _quantiles(tm["fresh"])}
        if dev.type == "cuda":
            row["steady_host_ms"] = _quantiles(tm["steady_host"])
        row["steady_over_fresh"] = row["steady_ms"]["p50"] / row["fresh_ms"]["p50"]
        rows.append(row)
        log(f"{m:9s} steady {row['steady_ms']['p50']:.3f} ms  fresh {row['fresh_ms']['p50']:.3f} ms  "
            f"steady/fresh {row['steady_over_fresh']:.2f}x")  # fmt: skip
    if _one_pass_counts() is not None:
        log("one pass over the untimed steps (hits, misses): " + ", ".join(f"{m} {hm}" for m, hm in trajectory.items()))
    return {"d": d, "k": k, "losses": losses[:: max(1, len(losses) // 20)], "fused": rows,
            "one_pass_trajectory": trajectory, "accumulate": _decode(messages, d, dev, args.repeats, log)}  # fmt: skip


def _tiled(call):
    """``call`` with the tiled decode on (``TORCHKIT_GPU_TILED_DECODE``), whatever the environment says."""
    from torchkit.ops import _select

    def run():
        was, _select.GPU_TILED_DECODE = _select.GPU_TILED_DECODE, True
        try:
            return call()
        finally:
            _select.GPU_TILED_DECODE = was

    return run


def _decode(messages, d: int, dev: torch.device, repeats: int, log) -> dict:
    values = torch.stack([v for v, _ in messages])
    indices = torch.stack([i for _, i in messages])
    order = indices.long().argsort(dim=1)
    sorted_v, sorted_i = values.gather(1, order), indices.gather(1, order)
    n, k = values.shape
    out = torch.empty(d, device=dev)
    scales = [1.0 / n] * n
    variants = {
        "emitted": lambda: ops.accumulate_(out, values, indices, scales, zero=True),
        "sorted": lambda: ops.accumulate_(out, sorted_v, sorted_i, scales, zero=True),
    }
    if dev.type == "cuda" and "triton" in ops.available_impls(dev):  # the decode tiled over out, two launches
        variants["emitted tiled"] = _tiled(lambda: ops.accumulate_(out, values, indices, scales, zero=True))
        variants["sorted tiled"] = _tiled(lambda: ops.accumulate_(out, sorted_v, sorted_i, scales, zero=True))
    timed = bench.time_interleaved(variants, dev, repeats)
    bw = bench.copy_bandwidth(dev, max(d, 1 << 22))
    line = 32 if dev.type == "cuda" else 64
    lines = indices.long().div(line // 4, rounding_mode="floor").unique().numel()
    plain = n * k * (4 + 4) + d * 4  # values and indices read once, out written once (the zero)
    sector = n * k * (4 + 4) + max(d * 4, 2 * lines * line)
    res = {"workers": n, "k": k, "copy_bandwidth_GBps": bw / 1e9, "line_bytes": line, "touched_lines": lines,
           "floor_ms": plain / bw * 1e3, "line_floor_ms": sector / bw * 1e3}  # fmt: skip
    for name, (_, p20, p50, p80) in timed.items():
        res[name] = {"p20": p20, "p50": p50, "p80": p80, "x_line_floor": p50 / res["line_floor_ms"]}
        log(f"accumulate_ {n} workers, {name:13s} {p50:.3f} ms ({p50 / res['line_floor_ms']:.1f}x its line floor)")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warm", type=int, default=100)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--device", default="auto")
    p.add_argument("--two-passes", action="store_true", help="the one pass off: the kernels' two passes")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if not 0 < args.warm < args.steps or args.workers > args.steps - args.warm:
        raise SystemExit("need 0 < --warm < --steps and --workers <= --steps - --warm")
    dev = bench.resolve_device(args.device)
    if dev.type == "cpu":
        ops.build_extension()
    torch.manual_seed(0)
    from torchkit.ops import _ext, _select

    if args.two_passes:
        _ext.ONE_PASS = _select.ONE_PASS = _select.GPU_ONE_PASS = False
    res = measure(args, dev)
    result = {
        "device": bench.device_name(dev),
        "torch": torch.__version__,
        "torchkit_commit": bench._git_commit(),
        "impl": ops._choose("auto", torch.empty(res["d"], device=dev), False),
        "setup": vars(args) | {"device": str(dev)},
        "timer": "device time per call: CUDA events on a GPU, perf_counter on the CPU (synchronous there); "
        "host time (GPU only): wall time until the call returns, device drained before",
        **res,
        "version": tk.__version__,
    }
    stem = "steady_2p" if args.two_passes else "steady"
    save_result(result, Path(args.out) / device_slug(result["device"]), stem, None)
    print(f"saved {Path(args.out) / device_slug(result['device']) / stem}.json")


if __name__ == "__main__":
    main()
