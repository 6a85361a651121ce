"""The simulator's data path: LIBSVM readers and the logistic-regression gradient, before and after.

Readers: the pure-Python reader torchkit shipped before (copied here), today's Python fallback and
scikit-learn's ``load_svmlight_file``, on the shared LIBSVM files. Gradient: the ``[m, d]`` product summed by
``index_add_`` (before) against one ``A_i^T s_i`` per worker (now), on the shared files and on random
problems of a9a's and w8a's shapes and densities (those files are not on this machine). Medians with 20th and
80th percentiles of repeated runs; writes ``results/repro/sim_speed.json``.

    python benchmarks/bench_sim.py [--data ../shared/data] [--out benchmarks/results/repro]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_sim_speedups import _old_grad_fn, _old_load_libsvm  # noqa: E402  (the "before" code, verbatim)
from torchkit.sim import LogisticRegression, load_libsvm  # noqa: E402


def _times(fn, repeats: int) -> dict:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    q = statistics.quantiles(ts, n=10) if len(ts) > 2 else [min(ts)] * 9
    return {"p50_s": statistics.median(ts), "p20_s": q[1], "p80_s": q[7], "repeats": repeats}


def _synthetic(m: int, d: int, density: float, seed: int = 0) -> LogisticRegression:
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(m, d, generator=g) < density).double()  # binary features, as a9a and w8a
    y = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0).double()
    return LogisticRegression(A, y, 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder of the LIBSVM files")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "repro", help="results folder")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per reader")
    args = p.parse_args()
    readers, grads = [], []
    problems = {}
    for name in ("mushrooms", "phishing"):
        path = args.data / f"{name}.txt"
        row = {"dataset": name}
        for label, fn in (
            ("old_python", partial(_old_load_libsvm, path)),
            ("python", partial(load_libsvm, path, impl="python")),
            ("sklearn", partial(load_libsvm, path, impl="sklearn")),
        ):
            row[label] = _times(fn, args.repeats)
        row["speedup_sklearn_vs_old"] = row["old_python"]["p50_s"] / row["sklearn"]["p50_s"]
        readers.append(row)
        A, y = load_libsvm(path)
        problems[name] = LogisticRegression(A, y, 20)
    problems["a9a-shaped (32561 x 123, 11% ones)"] = _synthetic(32561, 123, 0.113)
    problems["w8a-shaped (49749 x 300, 4% ones)"] = _synthetic(49749, 300, 0.039)
    for name, prob in problems.items():
        x = torch.randn(prob.d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        new, old = prob.grad_fn(x), _old_grad_fn(prob, x)
        row = {
            "problem": name,
            "bit_identical": bool(torch.equal(new.view(torch.int64), old.view(torch.int64))),
            "index_add": _times(partial(_old_grad_fn, prob, x), 50),
            "per_worker": _times(partial(prob.grad_fn, x), 50),
        }
        row["speedup"] = row["index_add"]["p50_s"] / row["per_worker"]["p50_s"]
        grads.append(row)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    import sklearn

    result = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "readers": readers,
        "gradient": grads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_speed.json").write_text(json.dumps(result, indent=1))
    for r in readers:
        print(
            f"{r['dataset']:10s} reader p50: old {r['old_python']['p50_s']:.3f} s, "
            f"python {r['python']['p50_s']:.3f} s, sklearn {r['sklearn']['p50_s']:.3f} s "
            f"({r['speedup_sklearn_vs_old']:.1f}x the old one)"
        )
    for r in grads:
        print(
            f"{r['problem']:36s} gradient p50: index_add {r['index_add']['p50_s'] * 1e3:.2f} ms, per worker "
            f"{r['per_worker']['p50_s'] * 1e3:.2f} ms ({r['speedup']:.1f}x), bit-identical {r['bit_identical']}"
        )
    print(f"wrote {args.out / 'sim_speed.json'}")


if __name__ == "__main__":
    main()
