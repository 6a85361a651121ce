"""LocalSGD on 3 Gloo ranks, in one spawn: equal to simulate_local for every method, H=1 + Identity + averaging equal
to synchronous data parallelism (and to CompressedOptimizer), resume with both schedulers, non-finite gradients on
one rank, GradScaler, the anchor taken from rank 0, and ranks configured differently (last: they raise)."""

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist
from tests.test_local_sgd import (
    FEEDBACKS,
    INNER,
    NESTEROV,
    SIZES,
    _averaged_momentum_sgd,
    _drive,
    _flat,
    _params,
    _problem,
    _set_grads,
)
from torchkit.sim import simulate_local

pytestmark = pytest.mark.dist
WORLD, H, STEPS = 3, 3, 12


def _equal_sim(rank):
    a, b = _problem(WORLD)
    out = {}
    for name, make in FEEDBACKS.items():
        ps = _params()
        opt = tk.LocalSGD(
            ps, torch.optim.SGD, **INNER.keywords, feedback=make(WORLD), sync_every=H, outer_optimizer=NESTEROV
        )
        assert opt.world_size == WORLD and opt.rank == rank
        _drive(opt, ps, a[rank], b[rank], STEPS)
        out[name] = (_flat(ps), opt.rounds, opt.bytes_sent)
    return out


def _h1(rank):
    a, b = _problem(WORLD)
    out = {}
    for label, cls in (("local", tk.LocalSGD), ("compressed", tk.CompressedOptimizer)):
        ps = _params()
        kw = {"sync_every": 1} if cls is tk.LocalSGD else {}
        opt = cls(ps, torch.optim.SGD, lr=0.05, momentum=0.9, feedback=tk.EF14(tk.Identity()), **kw)
        _drive(opt, ps, a[rank], b[rank], 10)
        out[label] = _flat(ps)
    return out


def _resume(rank, path):
    a, b = _problem(WORLD)

    def build(ps):
        opt = tk.LocalSGD(
            ps, torch.optim.AdamW, lr=0.02, feedback=tk.EF21(tk.TopK(4)), sync_every=4, outer_optimizer=NESTEROV
        )
        inner = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.95**t)
        outer = torch.optim.lr_scheduler.CosineAnnealingLR(opt.outer, T_max=5)
        return opt, inner, outer

    ps = _params()
    opt, inner, outer = build(ps)
    _drive(opt, ps, a[rank], b[rank], 18, inner, outer)
    want = _flat(ps)
    ps = _params()
    opt, inner, outer = build(ps)
    _drive(opt, ps, a[rank], b[rank], 9, inner, outer)
    torch.save(
        {"p": _flat(ps), "opt": opt.state_dict(), "inner": inner.state_dict(), "outer": outer.state_dict()},
        f"{path}/{rank}.pt",
    )
    saved = torch.load(f"{path}/{rank}.pt", weights_only=False)
    ps = _params()
    with torch.no_grad():
        off = 0
        for p in ps:
            p.copy_(saved["p"][off : off + p.numel()].reshape(p.shape))
            off += p.numel()
    opt, inner, outer = build(ps)
    opt.load_state_dict(saved["opt"])
    inner.load_state_dict(saved["inner"])
    outer.load_state_dict(saved["outer"])
    _drive(opt, ps, a[rank], b[rank], 9, inner, outer)
    try:
        other = torch.load(f"{path}/{(rank + 1) % WORLD}.pt", weights_only=False)["opt"]
        opt.load_state_dict(other)
        wrong_rank = "loaded"
    except ValueError as exc:
        wrong_rank = str(exc)
    return torch.equal(_flat(ps), want), wrong_rank


def _set_flat(ps, flat):
    with torch.no_grad():
        off = 0
        for p in ps:
            p.copy_(flat[off : off + p.numel()].reshape(p.shape))
            off += p.numel()


def _per_rank_checkpoints(rank, path):
    """Issue 20: LocalSGD's per-rank state (feedback state, inner state, anchors, outer optimizer, the place in the
    period and, mid-period, this rank's parameters) kept in side files and in DCP. Saved in the middle of a period;
    resumed with rank 0's model and rank 0's optimizer state_dict handed to every rank afterwards, as Lightning,
    Accelerate and DCP's deduplicated model state do; every rank must continue bit for bit."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from torchkit.checkpoint import load_dcp, load_feedback, save_feedback

    a, b = _problem(WORLD)

    def build():
        ps = _params()
        opt = tk.LocalSGD(
            ps, torch.optim.AdamW, lr=0.02, feedback=tk.EF21(tk.TopK(4)), sync_every=4, outer_optimizer=NESTEROV
        )
        return ps, opt

    ps, opt = build()
    _drive(opt, ps, a[rank], b[rank], 9)  # local step 1 of 4: every rank's parameters and inner state its own
    save_feedback(f"{path}/side", opt)
    dcp.save({"feedback": opt.feedback_stateful()}, checkpoint_id=f"{path}/dcp")
    if rank == 0:  # a framework's checkpoint: rank 0's model and optimizer state
        torch.save({"model": _flat(ps), "opt": opt.state_dict()}, f"{path}/rank0.pt")
    _drive(opt, ps, a[rank], b[rank], 9)
    want = _flat(ps)
    dist.barrier()
    rank0 = torch.load(f"{path}/rank0.pt", weights_only=True)
    out = {}
    for how in ("side", "dcp"):
        ps, opt = build()
        if how == "side":
            load_feedback(f"{path}/side", opt)
        else:
            load_dcp({"feedback": opt.feedback_stateful()}, checkpoint_id=f"{path}/dcp")
        _set_flat(ps, rank0["model"])  # the framework loads rank 0's model ...
        opt.load_state_dict(rank0["opt"])  # ... and rank 0's optimizer state, on every rank
        _drive(opt, ps, a[rank], b[rank], 9)
        out[how] = torch.equal(_flat(ps), want)
    ps, opt = build()  # without this rank's own state, rank 0's is refused on the others
    try:
        opt.load_state_dict(rank0["opt"])
        out["rank0"] = "loaded"
    except ValueError as exc:
        out["rank0"] = str(exc)
    return out


def _nonfinite(rank, policy):
    a, b = _problem(WORLD)
    ps = _params()
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.05, feedback=tk.EF21(tk.TopK(4)), sync_every=H, nonfinite=policy)
    _drive(opt, ps, a[rank], b[rank], H)  # one round
    anchors = [t.clone() for t in opt.anchors]
    msg = None
    for t in range(H):
        opt.zero_grad()
        _set_grads(ps, a[rank], b[rank])
        if rank == 1 and t == 0:
            ps[0].grad[1, 2] = float("nan")
        try:
            opt.step()
        except ValueError as exc:
            msg = str(exc)
    back = all(torch.equal(x, y) for x, y in zip(anchors, opt.anchors))
    at_anchor = torch.equal(_flat(ps), torch.cat([x.reshape(-1) for x in anchors]))
    return {"msg": msg, "skipped": opt.skipped_steps, "rounds": opt.rounds, "anchor_kept": back, "at_anchor": at_anchor,
            "x": _flat(ps)}  # fmt: skip


def _scaler(rank):
    a, b = (t[rank].float() for t in _problem(WORLD))
    ps = _params(torch.float32)
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.05, feedback=tk.EF21(tk.TopK(4)), sync_every=H)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(2 * H):
        opt.zero_grad()
        loss = (0.5 * a * (torch.cat([p.reshape(-1) for p in ps]) - b) ** 2).sum()
        if rank == 1 and t == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return scaler.get_scale(), opt.skipped_steps, opt.rounds, _flat(ps)


def _broadcast(rank):
    torch.manual_seed(100 + rank)  # every rank starts elsewhere: the anchor is rank 0's
    ps = [torch.nn.Parameter(torch.randn(4))]
    first = ps[0].detach().clone()
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(2)), sync_every=2)
    ps[0].grad = torch.zeros(4)
    opt.step()
    return first, opt.anchors[0].clone(), ps[0].detach().clone()


def _outer_lr_on_one_rank(rank):
    """After a round, rank 1 alone halves its outer learning rate (a scheduler stepped on one rank)."""
    a, b = _problem(WORLD)
    ps = _params()
    fb = tk.EF21(tk.TopK(4))
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.05, feedback=fb, sync_every=2, outer_optimizer=NESTEROV)
    _drive(opt, ps, a[rank], b[rank], 2)
    if rank == 1:
        opt.outer.param_groups[0]["lr"] *= 0.5
    try:
        _drive(opt, ps, a[rank], b[rank], 2)
    except ValueError as exc:
        return str(exc), opt.rounds
    return "ran", opt.rounds


def _swapped(rank):
    """Rank 1 lists two parameters of one shape (and different values) the other way round."""
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    ps = [w2, w1] if rank == 1 else [w1, w2]
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.Identity()), sync_every=1)
    for p in ps:
        p.grad = torch.ones(3, 3)
    try:
        opt.step()
    except ValueError as exc:
        return str(exc)
    return "ran"


def _misconfigured(rank):
    ps = [torch.nn.Parameter(torch.zeros(4))]
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(2)), sync_every=3 if rank < 2 else 4)
    ps[0].grad = torch.ones(4)
    try:
        opt.step()
    except ValueError as exc:
        return str(exc)
    return "ran"


def _worker(rank, world, path):
    return {
        "sim": _equal_sim(rank),
        "h1": _h1(rank),
        "resume": _resume(rank, path),
        "per_rank": _per_rank_checkpoints(rank, path),
        "skip": _nonfinite(rank, "skip"),
        "raise": _nonfinite(rank, "raise"),
        "scaler": _scaler(rank),
        "broadcast": _broadcast(rank),
        "outer_lr": _outer_lr_on_one_rank(rank),  # (they raise together, at the same collective)
        "swapped": _swapped(rank),
        "misconfigured": _misconfigured(rank),  # last
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_dist(_worker, WORLD, str(tmp_path_factory.mktemp("ckpt")))


def test_three_ranks_equal_simulate_local_for_every_method(results):
    a, b = _problem(WORLD)
    x0 = _flat(_params())
    for name, make in FEEDBACKS.items():
        res = simulate_local(
            make(WORLD),
            lambda X: a * (X - b),
            x0,
            n_workers=WORLD,
            rounds=STEPS // H,
            sync_every=H,
            inner_optimizer=INNER,
            outer_optimizer=NESTEROV,
            segments=SIZES,
        )
        xs = [r["sim"][name][0] for r in results]
        for x in xs:
            torch.testing.assert_close(x, res.x, rtol=1e-12, atol=1e-13, msg=name)
            assert torch.equal(x, xs[0]), name  # replicas agree bit for bit
        assert [r["sim"][name][1] for r in results] == [STEPS // H] * WORLD
        assert all(r["sim"][name][2] > 0 for r in results)
    assert not torch.allclose(results[0]["sim"]["ef21"][0], results[0]["sim"]["identity"][0])


def test_h1_identity_averaging_equals_synchronous_data_parallel_and_the_optimizer_wrapper(results):
    a, b = _problem(WORLD)
    ref = _averaged_momentum_sgd(a, b, _flat(_params()), 10)
    for r in results:
        torch.testing.assert_close(r["h1"]["local"], ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(r["h1"]["local"], r["h1"]["compressed"], rtol=1e-12, atol=1e-13)


def test_resume_with_inner_and_outer_schedulers_on_three_ranks(results):
    for r in results:
        exact, wrong_rank = r["resume"]
        assert exact
        assert "cannot load LocalSGD state" in wrong_rank and "saved by rank" in wrong_rank


def test_side_files_and_dcp_resume_mid_period_bit_exactly_with_rank0_checkpoints(results):
    for r, res in enumerate(results):
        assert res["per_rank"]["side"], f"rank {r}: resume from side files is not bit-exact"
        assert res["per_rank"]["dcp"], f"rank {r}: resume from DCP is not bit-exact"
        if r == 0:
            assert res["per_rank"]["rank0"] == "loaded"
        else:
            assert "saved by rank 0, loaded on rank" in res["per_rank"]["rank0"]
            assert "torchkit.checkpoint.save_feedback" in res["per_rank"]["rank0"]


def test_nonfinite_on_one_rank(results):
    skip = [r["skip"] for r in results]
    assert [s["skipped"] for s in skip] == [0, 1, 0]  # only rank 1 left its step out
    assert all(s["msg"] is None and s["rounds"] == 2 and not s["anchor_kept"] for s in skip)
    assert all(torch.equal(s["x"], skip[0]["x"]) for s in skip)  # and the replicas agree after the round
    rais = [r["raise"] for r in results]
    for s in rais:  # every rank raised at the synchronisation, returned to the anchor, kept it
        assert "non-finite gradient or pseudo-gradient" in s["msg"]
        assert s["rounds"] == 1 and s["anchor_kept"] and s["at_anchor"]


def test_grad_scaler_each_rank_its_own_scale_replicas_agree(results):
    scales = [r["scaler"][0] for r in results]
    assert scales == [2.0**10, 2.0**9, 2.0**10]
    assert [r["scaler"][1] for r in results] == [0, 1, 0]
    assert all(r["scaler"][2] == 2 for r in results)
    assert all(torch.equal(r["scaler"][3], results[0]["scaler"][3]) for r in results)


def test_anchor_is_rank_zeros_parameters(results):
    first0 = results[0]["broadcast"][0]
    assert not torch.equal(results[1]["broadcast"][0], first0)
    for _, anchor, _ in (r["broadcast"] for r in results):
        assert torch.equal(anchor, first0)
    assert all(torch.equal(r["broadcast"][2], results[0]["broadcast"][2]) for r in results)


def test_ranks_configured_differently_all_raise(results):
    for r in results:
        assert "ranks are configured differently" in r["misconfigured"] and "sync_every" in r["misconfigured"]


def test_an_outer_learning_rate_changed_on_one_rank_raises_on_every_rank_at_the_sync(results):
    """The ranks drifted apart for good (0.05 after three rounds, found by an audit): the synchronisation's
    agreement carries the inner and outer groups' hyper-parameters, so every rank raises there."""
    for r in results:
        msg, rounds = r["outer_lr"]
        assert "outer parameter group 0's hyper-parameters (lr, momentum, ...) differ between ranks" in msg
        assert "the round was not run" in msg and rounds == 1


def test_the_same_parameters_in_another_order_raise_on_every_rank(results):
    """LocalSGD takes rank 0's values as the anchor position by position, so ranks may start apart; but the same
    tensors listed in another order would mix two layers of one shape for good."""
    for r in results:
        assert "rank 1 lists the same parameters as rank 0 in another order" in r["swapped"]
