"""Does ``torchkit plan`` predict the shaped-link benchmark's step times? (issue 25; root: ip netns + tc)

    sudo python benchmarks/validate_plan.py [--rates 10gbit 1gbit 100mbit] [--ranks 2 4] [--steps 20]

For each link rate and rank count, in this order: the plan's calibration (``torchkit.apps.plan.calibrate``, in a
namespace shaped to the rate), then a short run of every method of ``torchkit bench network`` in a namespace shaped
alike (``torchkit.apps.netbench.run_one``: the same workers, models and batches as the judge), then a second
calibration. The prediction is the mean of the two calibrations' (the machine's speed drifts: the 2 shared cores of
the development machine ran the same DDP step at 125 ms in one session and 178 ms in another, so a prediction is
compared with runs of the same hour only). Measured: the median step after the first 5, or for methods with a
round every H steps the mean (their median step has no round in it). Writes ``results/<device>/plan_validation.json``
and ``.md``: measured step time, predicted, and the error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from torchkit.apps import links, netbench, plan

HERE = Path(__file__).resolve().parent
METHODS = ["ddp", "ddp_bf16", "powersgd1", "powersgd4", "ef14@0.01", "ef14@0.001", "local8@0.03", "diloco8"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", nargs="+", default=["10gbit", "1gbit", "100mbit"])
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--steps", type=int, default=20, help="training steps per measured run (median of those after 5)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    device, out_dir = netbench._result_dir(Path(args.out))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.time()
    try:
        for rate in args.rates:
            for n in args.ranks:
                cfg = {"task": "char_lm", "task_kwargs": {"width": 256, "layers": 4}, "methods": args.methods,
                       "compute_steps": 15}  # fmt: skip
                cals = [plan.calibrate(n, rate, cfg)]
                link = links.open_link(rate, n)
                try:
                    measured = {}
                    for m in args.methods:
                        run = {"task": "char_lm", "split": "iid", "method": m, "steps": args.steps, "lr": 0.05,
                               "momentum": 0.9, "seed": 0, "task_kwargs": cfg["task_kwargs"], "rate": rate,
                               "ranks": n}  # fmt: skip
                        res = netbench.run_one(link, n, run, timeout=1800)
                        measured[m] = res["step_seconds"][5:]
                finally:
                    link.close()
                cals.append(plan.calibrate(n, rate, cfg))
                for m in args.methods:
                    preds = [plan.predict(c, m) for c in cals]
                    pred = statistics.fmean(preds)
                    # a round every H steps: the mean step (the median is a step without the round); else the median
                    every = plan.parse_method(m)["kind"] in ("local", "diloco")
                    got = (statistics.fmean if every else statistics.median)(measured[m])
                    row = {"rate": rate, "ranks": n, "method": m, "measured_ms": 1e3 * got,
                           "measured": "mean" if every else "median", "step_seconds": measured[m],
                           "predicted_ms": 1e3 * pred, "predicted_ms_each": [1e3 * x for x in preds],
                           "error": pred / got - 1}  # fmt: skip
                    rows.append(row)
                    print(f"{rate:>8} n={n} {m:<12} measured {row['measured_ms']:8.1f} ms  predicted "
                          f"{row['predicted_ms']:8.1f} ms  ({100 * row['error']:+.0f}%)", flush=True)  # fmt: skip
                keys = ("compute_s", "all_reduce", "all_gather", "broadcast")
                kept = [{k: c[k] for k in keys if k in c} for c in cals]
                rows[-len(args.methods) :] = [{**r, "calibrations": kept} for r in rows[-len(args.methods) :]]
    finally:
        links.cleanup()
    within = sum(abs(r["error"]) <= 0.2 for r in rows)
    result = {"device": device, "minutes": (time.time() - started) / 60, "steps": args.steps, "rows": rows,
              "within_20_percent": f"{within} of {len(rows)}"}  # fmt: skip
    (out_dir / "plan_validation.json").write_text(json.dumps(result, indent=1))
    lines = [f"# torchkit plan against measured step times ({device}, char_lm 3.2M parameters, {args.steps} steps "
             f"per run; {within} of {len(rows)} within 20%)", "",
             "| link | ranks | method | measured ms/step (median; local, diloco: mean) | predicted | error |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['rate']} | {r['ranks']} | {r['method']} | {r['measured_ms']:.0f} | {r['predicted_ms']:.0f} | "
              f"{100 * r['error']:+.0f}% |" for r in rows]  # fmt: skip
    (out_dir / "plan_validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
