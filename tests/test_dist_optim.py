"""CompressedOptimizer on 3 Gloo processes equals simulate() with the same per-worker gradients."""

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist
from tests.methods import factories
from torchkit.sim import simulate

D, STEPS, LR = 19, 8, 0.2

FEEDBACKS = {
    **factories(lambda: tk.TopK(3), n_workers=3),
    "econtrol_sign": lambda: tk.EControl(tk.ScaledSign(), eta=0.3),
    "ef21_randk": lambda: tk.EF21(tk.RandK(4, seed=5)),
}


def _problem(n):
    g = torch.Generator().manual_seed(11)
    a = torch.rand(n, D, generator=g, dtype=torch.float64) * 3 + 0.1
    b = torch.randn(n, D, generator=g, dtype=torch.float64)
    return a, b


def _worker(rank, world):
    return {name: _run(rank, world, name) for name in sorted(FEEDBACKS)}


def _run(rank, world, name):
    a, b = _problem(world)
    p = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=LR, feedback=FEEDBACKS[name]())
    assert opt.world_size == world and opt.rank == rank
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (a[rank] * (p - b[rank]) ** 2).sum()).backward()
        opt.step()
    return p.detach().clone()


@pytest.mark.dist
def test_three_ranks_equal_simulate():
    per_rank = run_dist(_worker, 3)
    a, b = _problem(3)
    for name, make in FEEDBACKS.items():
        res = simulate(
            make(), lambda x: a * (x - b), torch.zeros(D, dtype=torch.float64), n_workers=3, steps=STEPS, lr=LR
        )
        for r in per_rank:
            torch.testing.assert_close(r[name], res.x, rtol=1e-12, atol=1e-13, msg=name)
        assert torch.equal(per_rank[0][name], per_rank[1][name]) and torch.equal(per_rank[1][name], per_rank[2][name])


def _nonfinite_worker(rank, world):
    p = torch.nn.Parameter(torch.zeros(5))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, nonfinite="skip", feedback=tk.EF21(tk.TopK(2)))
    for step in range(3):
        opt.zero_grad()
        p.grad = torch.full((5,), float(rank + 1))
        if step == 1 and rank == 2:
            p.grad[3] = float("inf")
        opt.step()
    return opt.skipped_steps, p.detach().clone()


@pytest.mark.dist
def test_nonfinite_on_one_rank_skips_everywhere():
    out = run_dist(_nonfinite_worker, 3)
    assert [s for s, _ in out] == [1, 1, 1]
    assert all(torch.equal(out[0][1], x) for _, x in out)


def _resume_worker(rank, world, path):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(1)))
    p.grad = torch.ones(4)
    opt.step()
    if world == 2:
        torch.save(opt.state_dict(), f"{path}/{rank}.pt")
        return "saved"
    try:
        opt.load_state_dict(torch.load(f"{path}/0.pt"))
    except ValueError as exc:
        return str(exc)
    return "loaded"


@pytest.mark.dist
def test_resume_on_a_different_world_size_raises(tmp_path):
    assert run_dist(_resume_worker, 2, str(tmp_path)) == ["saved", "saved"]
    msgs = run_dist(_resume_worker, 3, str(tmp_path))
    assert all("saved with world_size=2, this run has world_size=3" in m for m in msgs)
