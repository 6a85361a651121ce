"""One round, one state: every front end runs ``torchkit.comm.start_round`` over a ``RoundState``, and the
extension points (message packing, fused-kernel routing) are declared, not sniffed."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import torchkit as tk
from torchkit import comm
from torchkit.compress import SparseMessage, pack_message, unpack_message
from torchkit.sim import simulate


def test_every_front_end_runs_the_one_round(monkeypatch):
    assert tk.optim.start_round is comm.start_round and tk.ddp.start_round is comm.start_round
    seen = []
    real = comm._exchange

    def counting(*args, **kwargs):
        seen.append(front)
        return real(*args, **kwargs)

    monkeypatch.setattr(comm, "_exchange", counting)
    front = "simulator"
    simulate(tk.EF21(tk.TopK(2)), lambda x: torch.stack([x, 2 * x]), torch.ones(6), n_workers=2, steps=2, lr=0.1)
    front = "optimizer"
    p = torch.nn.Parameter(torch.ones(6))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(2)))
    p.grad = torch.ones(6)
    opt.step()
    front = "hook"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
            tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.5)), min_compression_rate=0)
            model(torch.randn(3, 4)).sum().backward()
        finally:
            dist.destroy_process_group()
    assert seen.count("simulator") == 2 and seen.count("optimizer") == 1 and seen.count("hook") >= 1


def test_message_types_own_their_packing():
    msg = SparseMessage(torch.tensor([[1.5, -2.0]]), torch.tensor([[3, 0]], dtype=torch.int32), 5)
    buf, layout = pack_message(msg, torch.bfloat16)
    back = unpack_message(buf[None], layout)
    assert torch.equal(back.values.float(), msg.values) and torch.equal(back.indices, msg.indices)

    class Unregistered(SparseMessage):
        pass

    with pytest.raises(TypeError, match="cannot pack Unregistered: not a registered message type"):
        pack_message(Unregistered(msg.values, msg.indices, 5))
    with pytest.raises(TypeError, match="cannot unpack message kind 'nope'"):
        unpack_message(buf[None], type(layout)("nope", 5, 2, torch.float32, None))


def test_a_topk_subclass_that_selects_differently_is_not_sent_to_the_fused_kernel():
    class SmallestK(tk.TopK):
        def compress(self, x, *, worker=0, step=0):
            x2 = x if x.dim() == 2 else x[None]
            idx = torch.topk(-x2.abs(), self.k_for(x2.shape[1]), dim=1).indices
            return SparseMessage(x2.gather(1, idx), idx.int(), x2.shape[1])

    assert tk.TopK(2).fused_topk and not SmallestK(2).fused_topk
    fb = tk.EF14(SmallestK(2))
    state = fb.init_state(5)
    msg = fb.worker_step(state, torch.tensor([5.0, -0.1, 3.0, 0.2, -4.0]), 0)
    assert sorted(msg.indices[0].tolist()) == [1, 3]  # the two smallest, not the kernel's two largest


def test_checkpoints_name_the_method_by_its_config():
    fb = tk.EControl(tk.TopK(ratio=0.1, approx=True), eta=0.2, granularity="tensor")
    assert fb.config() == {
        "method": "EControl",
        "compressor": {"type": "TopK", "k": None, "ratio": 0.1, "approx": True},
        "granularity": "tensor",
        "eta": 0.2,
        "init": "full",
    }


def test_format_1_checkpoints_still_load():
    """A CompressedOptimizer checkpoint in the first format (one flat vector per group) loads into today's."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    fb = tk.EF21(tk.TopK(ratio=0.5))
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=fb)
    sizes = [p.numel() for p in model.parameters()]
    shift = torch.randn(sum(sizes))
    v1 = {
        "format_version": 1,
        "world_size": 1,
        "rank": 0,
        "feedback": repr(fb),
        "inner": opt.inner.state_dict(),
        "groups": {0: {"sizes": sizes, "step": 4, "state": {"shift": shift}, "server": torch.zeros(sum(sizes))}},
        "skipped_steps": 1,
    }
    opt.load_state_dict(v1)
    assert torch.equal(opt.feedback_state()["shift"], shift)
    assert opt.round.step == 4 and opt.skipped_steps == 1
    with pytest.raises(ValueError, match=r"saved with feedback EF21\(TopK\(ratio=0.5\)\), this run has EF14"):
        tk.CompressedOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(1))
        ).load_state_dict(v1)


def test_documented_submodules_are_reachable_from_the_package():
    """``import torchkit as tk; tk.checkpoint.without_feedback(...)``, as the README and the error messages say,
    works in a fresh process (the submodules are imported on first use)."""
    import subprocess
    import sys

    code = (
        "import sys; import torchkit as tk\n"
        "assert 'torchkit.checkpoint' not in sys.modules and 'torchkit.apps' not in sys.modules\n"
        "print(tk.checkpoint.without_feedback.__name__, tk.ddp.register.__name__, tk.integrations.__name__)\n"
        "try:\n    tk.nope\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[0] == "without_feedback register torchkit.integrations"
    assert "has no attribute 'nope'" in res.stdout
