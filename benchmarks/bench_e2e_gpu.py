"""End to end on one GPU: a GPT-2-small-sized model (124M parameters, bf16 autocast, 8 x 1024 tokens).

    python benchmarks/bench_e2e_gpu.py [--steps 20] [--out benchmarks/results]

1. Backward time of DDP over a one-rank NCCL group with the default all-reduce against torchkit's hook
   (EF14, EF21 and EControl, TopK 1%): the hook's share of backward time is (t_hook - t_allreduce) / t_hook.
2. Optimizer step: fused AdamW against CompressedOptimizer wrapping fused AdamW (same methods).
Medians over timed steps after warm-up (CUDA events), peak memory per configuration. Writes
<out>/<gpu>/e2e.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkit as tk
from torchkit._results import device_slug, save_result
from torchkit.apps import bench


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc, self.out = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    """GPT-2 small: 12 layers, width 768, 12 heads, 50257 tokens, 1024 positions, tied embeddings."""

    def __init__(self, vocab=50257, ctx=1024, dim=768, layers=12, heads=12):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(ctx, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(dim)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def run(steps: int, warmup: int, batch: int, ctx: int, log=print) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    data = [torch.randint(0, 50257, (batch, ctx + 1), device=dev) for _ in range(4)]
    methods = {
        "ef14": lambda: tk.EF14(tk.TopK(ratio=0.01)),
        "ef21": lambda: tk.EF21(tk.TopK(ratio=0.01)),
        "econtrol": lambda: tk.EControl(tk.TopK(ratio=0.01)),
    }
    configs = [("allreduce", None)] + [(f"hook {m}", f) for m, f in methods.items()]
    records = []

    def loss_of(model, i):
        x = data[i % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    # 1. backward with DDP's all-reduce against the hook (one-rank NCCL group)
    for name, make in configs:
        torch.manual_seed(0)
        model = DDP(GPT(ctx=ctx).to(dev), device_ids=[0])
        n_params = sum(p.numel() for p in model.parameters())
        state = tk.ddp.register(model, make()) if make else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd, bwd, losses = [], [], []
        torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + steps):
            (s0, s1), (b0, b1) = _events(), _events()
            s0.record()
            loss = loss_of(model, i)
            s1.record()
            b0.record()
            loss.backward()
            b1.record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= warmup:
                fwd.append(s0.elapsed_time(s1))
                bwd.append(b0.elapsed_time(b1))
            losses.append(loss.item())
        rec = {
            "part": "backward",
            "config": name,
            "params": n_params,
            "forward_ms": statistics.median(fwd),
            "backward_ms": statistics.median(bwd),
            "backward_ms_spread": [min(bwd), max(bwd)],
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "loss_first_last": [losses[0], losses[-1]],
            "bytes_sent_per_step": state.bytes_sent if state else None,
            "dense_bytes_per_step": state.dense_bytes if state else None,
        }
        records.append(rec)
        log(
            f"{name:14s} fwd {rec['forward_ms']:7.2f} ms  bwd {rec['backward_ms']:7.2f} ms  "
            f"peak {rec['peak_mem_gb']:.1f} GB  loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
        del model, opt, state
        torch.cuda.empty_cache()
    base = records[0]["backward_ms"]
    for rec in records[1:]:
        rec["hook_share_of_backward"] = (rec["backward_ms"] - base) / rec["backward_ms"]

    # 2. optimizer step: fused AdamW against the wrapper around fused AdamW
    torch.manual_seed(0)
    model = GPT(ctx=ctx).to(dev)
    loss = loss_of(model, 0)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for name, make in [("adamw fused", None)] + [(f"wrapper {m}", f) for m, f in methods.items()]:
        if make is None:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        else:
            opt = tk.CompressedOptimizer(model.parameters(), torch.optim.AdamW, feedback=make(), lr=1e-4, fused=True)
        times = []
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for i in range(warmup + steps):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            s0, s1 = _events()
            s0.record()
            opt.step()
            s1.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(s0.elapsed_time(s1))
        rec = {
            "part": "optimizer_step",
            "config": name,
            "step_ms": statistics.median(times),
            "step_ms_spread": [min(times), max(times)],
            "extra_state_bytes_per_param": (torch.cuda.memory_allocated() - before) / sum(g.numel() for g in grads),
            "peak_extra_bytes_per_param": (torch.cuda.max_memory_allocated() - before) / sum(g.numel() for g in grads),
        }
        records.append(rec)
        log(
            f"{name:14s} step {rec['step_ms']:7.2f} ms  state {rec['extra_state_bytes_per_param']:.1f} B/param  "
            f"peak {rec['peak_extra_bytes_per_param']:.1f} B/param"
        )
        del opt
        torch.cuda.empty_cache()
    adam = next(r for r in records if r["config"] == "adamw fused")["step_ms"]
    for rec in records:
        if rec["config"].startswith("wrapper"):
            rec["overhead_over_fused_adamw"] = rec["step_ms"] / adam - 1
    return {
        "device": bench.device_name(dev),
        "torch": torch.__version__,
        "triton": bench._triton_version(),
        "commit": bench._git_commit(),
        "setup": f"GPT-2 small, batch {batch} x {ctx} tokens, bf16 autocast, TopK 1%, one-rank NCCL group; "
        f"medians of {steps} steps after {warmup} warm-up steps",
        "records": records,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            result = run(args.steps, args.warmup, args.batch, args.ctx)
        finally:
            dist.destroy_process_group()
    slug = device_slug(result["device"])
    save_result(result, Path(args.out) / slug, "e2e", None)


if __name__ == "__main__":
    main()
