"""CompressedOptimizer against the optimizer it wraps: step time and extra memory, one process.

    python benchmarks/bench_wrapper.py [--device cpu|cuda] [--repeats 7] [--out benchmarks/results]

Models: a 26M-parameter transformer language model and a ResNet-18-sized CNN (11.7M). For each, the inner
AdamW's step alone, the wrapper's step (EF14 and EF21, TopK 1%) and the fused kernel alone on a vector of all
the parameters, every step from the same gradients and state (restored untimed), interleaved. Memory: what the
wrapper holds beyond AdamW (feedback state and its flat gradient buffer) and its peak during a step, in bytes
per parameter (CUDA: the allocator's peak; CPU: the profiler's allocation events). Target (issue 10): step
overhead at most the kernel (+ the collective, none on one process) + 10%; peak extra memory at most the
method's state plus one gradient-sized buffer. Writes ``<out>/<device>/wrapper.json``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

import torchkit as tk
from torchkit import ops
from torchkit._results import device_slug, save_result
from torchkit.apps import bench


def transformer(vocab=8192, dim=512, layers=7, heads=8) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, batch_first=True, norm_first=True)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.TransformerEncoder(layer, layers),
                               torch.nn.Linear(dim, vocab))  # fmt: skip


class _Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.skip = (
            torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else torch.nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet18(classes=1000) -> torch.nn.Module:
    """ResNet-18's layout (11.7M parameters), written here: no torchvision needed."""
    blocks, cin = [], 64
    for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        blocks.append(_Block(cin, cout, stride))
        cin = cout
    return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(3, 2, 1), *blocks, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(512, classes))  # fmt: skip


MODELS = {"transformer_26M": transformer, "resnet18": resnet18}
METHODS = {"ef14": lambda: tk.EF14(tk.TopK(ratio=0.01)), "ef21": lambda: tk.EF21(tk.TopK(ratio=0.01))}


def _restore(params, grads, saved_params, opt_states):
    for p, g, s in zip(params, grads, saved_params):
        p.data.copy_(s)
        if p.grad is None or p.grad.data_ptr() != g.data_ptr():
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
    for live, saved in opt_states:
        live.copy_(saved)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _peak_bytes(fn, dev) -> int:
    """Peak of the bytes allocated during ``fn`` above what was allocated before it."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        if ev.name == "[memory]":
            level += ev.cpu_memory_usage
            peak = max(peak, level)
    return peak


def measure(model_name: str, dev: torch.device, repeats: int, log=print) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[model_name]().to(dev)
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    saved = [p.detach().clone() for p in params]
    rows = []
    opts = {"adamw": torch.optim.AdamW(params, lr=1e-4)}
    for name, make in METHODS.items():
        opts[f"wrapper {name}"] = tk.CompressedOptimizer(params, torch.optim.AdamW, feedback=make(), lr=1e-4)
    first = [torch.randn_like(p) * 1e-2 for p in params]
    for opt in opts.values():  # state exists before timing (AdamW's moments, the feedback state), from other
        _restore(params, first, saved, [])  # gradients than the timed ones: an EF21 shift equal to the timed
        opt.step()  # gradient would make every timed input zero
    flat = torch.cat([g.reshape(-1) for g in grads])
    kstate = {"ef14": torch.randn(n, device=dev), "ef21": torch.randn(n, device=dev)}
    ksaved = {k: v.clone() for k, v in kstate.items()}
    k = max(1, n // 100)
    kernels = {
        "kernel ef14": functools.partial(ops.ef14_step_, flat, kstate["ef14"], k),
        "kernel ef21": functools.partial(ops.ef21_step_, flat, kstate["ef21"], k),
    }
    opt_states = [(t, t.clone()) for o in opts.values() for t in _tensors(dict(o.state)) if t.numel() > 1]
    opt_states += [(t, t.clone()) for o in opts.values() if hasattr(o, "round") for b in o.round.blocks.values()
                   for t in b.state.values()]  # fmt: skip
    opt_states += [(kstate[m], ksaved[m]) for m in kstate]
    restore = functools.partial(_restore, params, grads, saved, opt_states)
    variants = {name: opt.step for name, opt in opts.items()} | kernels
    times = bench.time_interleaved(variants, dev, repeats, setup=restore)
    adam = times["adamw"][2]
    for name in METHODS:
        opt = opts[f"wrapper {name}"]
        held = sum(t.numel() * t.element_size() for b in opt.round.blocks.values() for t in b.vectors().values())
        held += sum(buf.numel() * buf.element_size() for _, buf, _ in opt._flat._bufs.values())  # flat gradients
        held += sum(t.numel() * t.element_size() for b in opt.round.blocks.values() for t in b.scratch.values())
        restore()
        peak_wrapper = _peak_bytes(opt.step, dev)
        restore()
        peak_adam = _peak_bytes(opts["adamw"].step, dev)
        state_bytes = sum(t.numel() * t.element_size() for b in opt.round.blocks.values() for t in b.state.values())
        rec = {
            "model": model_name,
            "params": n,
            "method": name,
            "adamw_ms": adam,
            "wrapper_ms": times[f"wrapper {name}"][2],
            "kernel_ms": times[f"kernel {name}"][2],
            "overhead_ms": times[f"wrapper {name}"][2] - adam,
            "held_extra_bytes_per_param": held / n,
            "state_bytes_per_param": state_bytes / n,
            "peak_step_bytes_per_param_wrapper": peak_wrapper / n,
            "peak_step_bytes_per_param_adamw": peak_adam / n,
        }
        rec["overhead_over_kernel"] = rec["overhead_ms"] / rec["kernel_ms"]
        rec["peak_extra_bytes_per_param"] = rec["held_extra_bytes_per_param"] + max(
            0.0, rec["peak_step_bytes_per_param_wrapper"] - rec["peak_step_bytes_per_param_adamw"]
        )
        rows.append(rec)
        log(
            f"{model_name:16s} {name}: AdamW {adam:7.1f} ms, wrapper {rec['wrapper_ms']:7.1f} ms (overhead "
            f"{rec['overhead_ms']:6.1f} ms = {rec['overhead_over_kernel']:.2f}x the kernel's "
            f"{rec['kernel_ms']:.1f} ms); "
            f"extra held {rec['held_extra_bytes_per_param']:.1f} B/param (state {rec['state_bytes_per_param']:.1f}), "
            f"peak extra {rec['peak_extra_bytes_per_param']:.1f} B/param"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cpu":
        ops.build_extension()
    rows = [r for m in args.models for r in measure(m, dev, args.repeats)]
    result = {
        "device": bench.device_name(dev),
        "torch": torch.__version__,
        "commit": bench._git_commit(),
        "setup": f"one process, AdamW lr 1e-4, TopK 1%, median of {args.repeats} interleaved steps from the same "
        "gradients and state; kernel = the fused op on one vector of all parameters",
        "rows": rows,
    }
    slug = device_slug(result["device"])
    save_result(result, Path(args.out) / slug, "wrapper", None)
    print(f"saved {Path(args.out) / slug / 'wrapper.json'}")


if __name__ == "__main__":
    main()
