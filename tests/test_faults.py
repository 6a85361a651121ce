"""Injected faults on 2 Gloo ranks: a peer that dies or hangs makes the survivor raise in its own training loop,
on every path of the DDP hook (dense warm-up, the Identity fallback, compressed rounds) and in the wrapper."""

import os
import signal
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkit as tk
from tests.dist_utils import run_dist_faults

pytestmark = pytest.mark.dist
FAULT_STEP, PG_TIMEOUT = 3, 3.0


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _step(model, opt, rank, t):
    g = torch.Generator().manual_seed(10 * rank + t)
    opt.zero_grad()
    model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
    opt.step()


def _until_fault(rank, world, front, fault):
    if front == "wrapper":
        model = _net()
        opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(ratio=0.2)))
    else:
        model = DDP(_net(), bucket_cap_mb=0.0003)
        kw = {"dense": dict(start_iter=100), "fallback": dict(min_compression_rate=1e9)}.get(front, {})
        tk.ddp.register(
            model, tk.EF21(tk.TopK(ratio=0.2)), min_compression_rate=kw.pop("min_compression_rate", 0), **kw
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(20):
        if rank == 1 and t == FAULT_STEP:
            if fault == "exit":
                os._exit(1)
            os.kill(os.getpid(), signal.SIGSTOP)
        start = time.monotonic()
        try:
            _step(model, opt, rank, t)
        except Exception as exc:
            return {"step": t, "error": f"{type(exc).__name__}: {exc}"[:400], "seconds": time.monotonic() - start}
    return {"step": None}


@pytest.mark.parametrize("front", ["compressed", "fallback", "dense", "wrapper"])
def test_a_dead_peer_raises_in_the_survivors_loop(front):
    out = run_dist_faults(_until_fault, 2, front, "exit", report={0}, pg_timeout=PG_TIMEOUT * 10)
    res = out[0]
    assert res["step"] == FAULT_STEP, res
    assert res["seconds"] < 20, res  # detected from the closed connection, not at the 30 s timeout
    # the first error, not nested once per future callback
    assert res["error"].count("Got the following error when running the callback") <= 1, res["error"]
    assert "Unable to cast" not in res["error"], res["error"]  # a failed future, not an exception object as a value


def test_a_hung_peer_raises_at_the_process_group_timeout():
    out = run_dist_faults(_until_fault, 2, "compressed", "stop", report={0}, pg_timeout=PG_TIMEOUT)
    res = out[0]
    assert res["step"] == FAULT_STEP, res
    assert PG_TIMEOUT * 0.8 <= res["seconds"] < PG_TIMEOUT + 20, res
