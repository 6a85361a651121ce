"""LocalSGD with overlapped rounds (issue 26, item 2): the round of period t runs while period t+1's inner steps
do, and the anchor takes it one period late. The trajectory equals simulate_local(overlap=True) on one process and
on 2 Gloo ranks for every method, a checkpoint taken with a round in flight resumes bit-exactly, and a peer that
dies while a round is in flight makes the survivor raise in its own loop, bounded in time."""

import copy
import os
import time

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist, run_dist_faults
from tests.test_local_sgd import FEEDBACKS, INNER, NESTEROV, SIZES, _drive, _flat, _params, _problem, _set_grads
from torchkit.sim import simulate_local

H, STEPS = 3, 12


def _build(ps, make, n, **kw):
    return tk.LocalSGD(ps, torch.optim.SGD, **INNER.keywords, feedback=make(n), sync_every=H, outer_optimizer=NESTEROV,
                       overlap=True, **kw)  # fmt: skip


def _sim(make, n, a, b, steps=STEPS, overlap=True, **kw):
    return simulate_local(make(n), lambda X: a * (X - b), _flat(_params()), n_workers=n, rounds=steps // H,
                          sync_every=H, inner_optimizer=INNER, outer_optimizer=NESTEROV, segments=SIZES,
                          overlap=overlap, **kw)  # fmt: skip


@pytest.mark.parametrize("name", sorted(FEEDBACKS))
def test_one_worker_equals_simulate_local_with_overlap(name):
    a, b = _problem(1)
    ps = _params()
    opt = _build(ps, FEEDBACKS[name], 1)
    _drive(opt, ps, a[0], b[0], STEPS)
    assert opt.rounds == STEPS // H and opt._in_flight is not None  # the last round is still in flight
    opt.flush()
    res = _sim(FEEDBACKS[name], 1, a, b)
    torch.testing.assert_close(_flat(ps), res.x, rtol=1e-12, atol=1e-13)
    assert torch.equal(_flat(ps), torch.cat([t.reshape(-1) for t in opt.anchors]))  # flushed: at the anchor
    assert not torch.allclose(res.x, _sim(FEEDBACKS[name], 1, a, b, overlap=False).x)  # a different trajectory


def test_a_worker_goes_on_from_the_anchor_minus_its_own_progress():
    """At a synchronisation with a round in flight, the worker's parameters become the anchor (stepped on the
    round of the period before) minus this period's pseudo-gradient, and the next pseudo-gradient is measured from
    there."""
    a, b = _problem(1)
    ps = _params()
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.05, feedback=tk.EF14(tk.Identity()), sync_every=2, overlap=True)
    x0 = _flat(ps).clone()
    _drive(opt, ps, a[0], b[0], 2)  # period 0: the round starts; the anchor has not moved
    first = x0 - _flat(ps)  # its pseudo-gradient
    assert torch.equal(torch.cat([t.reshape(-1) for t in opt.anchors]), x0)
    start = _flat(ps).clone()
    _drive(opt, ps, a[0], b[0], 2)  # period 1: the anchor takes round 0 (averaging: anchor - first)
    anchor = torch.cat([t.reshape(-1) for t in opt.anchors])
    torch.testing.assert_close(anchor, x0 - first, rtol=0, atol=1e-15)
    # the worker: the new anchor minus period 1's own progress
    progress = start - _period_end(a[0], b[0], start, 2)
    torch.testing.assert_close(_flat(ps), anchor - progress, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_overlap_mix_moves_the_start_by_its_share_of_what_the_round_held_back(mix):
    """EF14 with TopK on one worker: the first round sends TopK(delta) and its error keeps delta - TopK(delta);
    the worker goes on from x0 - delta + mix * (delta - TopK(delta)) (1: from x0 - its own message, as eager
    updates; 0: from its own whole progress), and the next pseudo-gradient is measured from there."""
    a, b = _problem(1)
    ps = _params()
    opt = tk.LocalSGD(ps, torch.optim.SGD, lr=0.05, feedback=tk.EF14(tk.TopK(3)), sync_every=2, overlap=True,
                      overlap_mix=mix)  # fmt: skip
    x0 = _flat(ps).clone()
    _drive(opt, ps, a[0], b[0], 2)
    delta = x0 - _period_end(a[0], b[0], x0, 2)
    top = _top3(delta)
    start = x0 - delta + mix * (delta - top)
    torch.testing.assert_close(_flat(ps), start, rtol=0, atol=1e-15)
    assert torch.equal(torch.cat([t.reshape(-1) for t in opt.anchors]), x0)  # the round is still in flight
    _drive(opt, ps, a[0], b[0], 2)  # the anchor takes round 0; this rank goes on from its start's progress
    progress = start - _period_end(a[0], b[0], start, 2)
    held = delta - top + progress  # the error after round 1 took its TopK
    torch.testing.assert_close(opt.feedback_state()["error"], held - _top3(held), rtol=0, atol=1e-14)


def _top3(v):
    out = torch.zeros_like(v)
    keep = v.abs().argsort(descending=True)[:3]
    out[keep] = v[keep]
    return out


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                        ("0.5", TypeError), (True, TypeError)])  # fmt: skip
def test_a_bad_overlap_mix_is_refused_by_name(bad, error):
    with pytest.raises(error, match="overlap_mix"):
        tk.LocalSGD(_params(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(3)), sync_every=2, overlap=True,
                    overlap_mix=bad)  # fmt: skip
    with pytest.raises(error, match="overlap_mix"):
        _sim(FEEDBACKS["ef14"], 1, *_problem(1), overlap_mix=bad)


@pytest.mark.parametrize("overlap, method", [(False, "ef14"), (True, "ef21"), (True, "econtrol")])
def test_an_overlap_mix_that_would_be_ignored_is_refused(overlap, method):
    with pytest.raises(ValueError, match="overlap_mix=0.5 has no effect"):
        tk.LocalSGD(_params(), torch.optim.SGD, lr=0.1, feedback=FEEDBACKS[method](1), sync_every=2,
                    overlap=overlap, overlap_mix=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="overlap_mix=0.5 has no effect"):
        _sim(FEEDBACKS[method], 1, *_problem(1), overlap=overlap, overlap_mix=0.5)
    opt = tk.LocalSGD(_params(), torch.optim.SGD, lr=0.1, feedback=FEEDBACKS[method](1), sync_every=2,
                      overlap=overlap)  # fmt: skip
    assert opt.overlap_mix == 0.0  # the default: nothing to mix


def test_a_checkpoint_of_another_overlap_mix_is_refused():
    a, b = _problem(1)
    ps = _params()
    opt = _build(ps, FEEDBACKS["ef14"], 1, overlap_mix=0.25)
    _drive(opt, ps, a[0], b[0], 4)
    other = _build(_params(), FEEDBACKS["ef14"], 1)
    with pytest.raises(ValueError, match="overlap_mix=0.25, this run has 0.5"):
        other.load_state_dict(opt.state_dict())


def _period_end(a, b, x, steps, lr=0.05):
    x = x.clone()
    for _ in range(steps):
        x -= lr * a * (x - b)
    return x


@pytest.mark.parametrize("method", ["ef21", "ef14"])  # ef14: the start moved by overlap_mix
@pytest.mark.parametrize("stop", [4, 5])  # right after a synchronisation, and in the middle of a period
def test_a_checkpoint_with_a_round_in_flight_resumes_bit_exactly(stop, method):
    a, b = _problem(1)
    make = FEEDBACKS[method]
    ps = _params()
    opt = _build(ps, make, 1)
    _drive(opt, ps, a[0], b[0], 10)
    opt.flush()
    want = _flat(ps)
    ps = _params()
    opt = _build(ps, make, 1)
    _drive(opt, ps, a[0], b[0], stop)
    assert opt._in_flight is not None
    sd, x = copy.deepcopy(opt.state_dict()), _flat(ps).clone()  # as a file would: torch's state_dict aliases
    assert opt._in_flight is None  # finished by the checkpoint, not dropped
    _drive(opt, ps, a[0], b[0], 10 - stop)
    opt.flush()
    assert torch.equal(_flat(ps), want)  # finishing the round early changed nothing
    ps = _params()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(x, ps)
    resumed = _build(ps, make, 1)
    resumed.load_state_dict(sd)
    _drive(resumed, ps, a[0], b[0], 10 - stop)
    resumed.flush()
    assert torch.equal(_flat(ps), want)


def test_a_non_finite_round_is_undone_at_the_synchronisation_that_finishes_it():
    """One process, nonfinite="skip": a NaN parameter in period 1 makes round 1's pseudo-gradient non-finite. The
    synchronisation that finishes the round skips it: the feedback state, the anchor and the round count as round 1
    found them, the rank at the anchor, and the run goes on finite."""
    a, b = _problem(1)
    ps = _params()
    opt = _build(ps, FEEDBACKS["ef21"], 1, nonfinite="skip")
    for t in range(5 * H):
        opt.zero_grad()
        _set_grads(ps, a[0], b[0])
        if t == H + 1:
            with torch.no_grad():
                ps[0][0, 0] = float("nan")
        opt.step()
        if t == 2 * H - 2:  # round 0 finished now (no effect on the trajectory): the state round 1 will find
            opt.finish_round()
            before = _kept(opt)
        if t == 3 * H - 1:
            assert opt.skipped_rounds == 1
            for got, kept in zip(_kept(opt), before, strict=True):
                assert torch.equal(got, kept)
            assert torch.equal(_flat(ps), torch.cat([t.reshape(-1) for t in opt.anchors]))
    opt.flush()
    assert torch.isfinite(_flat(ps)).all() and opt.rounds == 3


def test_a_plain_optimizer_load_drops_the_round_in_flight():
    """A torch.optim state_dict (DCP's set_optimizer_state_dict, without_feedback) restarts the method: the round
    started before the load must not step the new anchor."""
    a, b = _problem(1)
    plain = torch.optim.SGD(_params(), lr=0.05, momentum=0.9).state_dict()

    def after_load(opt, ps):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(_flat(_params()) + 1, ps)
        with pytest.warns(UserWarning):
            opt.load_state_dict(copy.deepcopy(plain))
        _drive(opt, ps, a[0], b[0], 2 * H)
        opt.flush()
        return _flat(ps)

    def build(ps, overlap=True):  # averaging: no outer state, which a plain load keeps
        return tk.LocalSGD(ps, torch.optim.SGD, **INNER.keywords, feedback=tk.EF14(tk.TopK(3)), sync_every=H,
                           overlap=overlap)  # fmt: skip

    for overlap in (False, True):
        ps = _params()
        used = build(ps, overlap)
        _drive(used, ps, a[0], b[0], 2 * H)
        assert (used._in_flight is not None) == overlap
        fresh_ps = _params()
        assert torch.equal(after_load(used, ps), after_load(build(fresh_ps, overlap), fresh_ps)), overlap


def test_overlap_is_checked_and_agreed():
    with pytest.raises(TypeError, match="overlap must be a bool"):
        tk.LocalSGD(_params(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(2)), sync_every=2, overlap=1)
    with pytest.raises(TypeError, match="overlap must be a bool"):
        simulate_local(tk.EF14(tk.TopK(2)), lambda X: X, torch.zeros(4), n_workers=1, rounds=1, sync_every=1,
                       inner_optimizer=0.1, overlap="yes")  # fmt: skip
    a, b = _problem(1)
    ps = _params()
    blocking = tk.LocalSGD(ps, torch.optim.SGD, lr=0.05, feedback=tk.EF14(tk.TopK(3)), sync_every=2)
    _drive(blocking, ps, a[0], b[0], 3)
    with pytest.raises(ValueError, match="overlap=False, this run has True"):
        _build(_params(), FEEDBACKS["ef14"], 1).load_state_dict(blocking.state_dict())


# ------------------------------------------------------------------------------------------------ 2 Gloo ranks
WORLD = 2


def _ranks(rank, world, path):
    a, b = _problem(WORLD)
    out = {}
    for name in ("ef14", "ef21", "econtrol"):
        ps = _params()
        opt = _build(ps, FEEDBACKS[name], WORLD)
        _drive(opt, ps, a[rank], b[rank], STEPS)
        opt.flush()
        out[name] = _flat(ps)
    ps = _params()  # a checkpoint in the middle of a period with a round in flight, each rank its own
    opt = _build(ps, FEEDBACKS["ef21"], WORLD)
    _drive(opt, ps, a[rank], b[rank], 7)
    torch.save({"opt": opt.state_dict(), "x": _flat(ps)}, os.path.join(path, f"{rank}.pt"))
    _drive(opt, ps, a[rank], b[rank], 5)
    opt.flush()
    saved = torch.load(os.path.join(path, f"{rank}.pt"), weights_only=False)
    ps = _params()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(saved["x"], ps)
    resumed = _build(ps, FEEDBACKS["ef21"], WORLD)
    resumed.load_state_dict(saved["opt"])
    _drive(resumed, ps, a[rank], b[rank], 5)
    resumed.flush()
    out["resumed"] = (_flat(ps), out["ef21"])
    return out


@pytest.mark.dist
def test_two_ranks_equal_simulate_local_with_overlap_and_resume_mid_round(tmp_path):
    results = run_dist(_ranks, WORLD, str(tmp_path))
    a, b = _problem(WORLD)
    for name in ("ef14", "ef21", "econtrol"):
        res = _sim(FEEDBACKS[name], WORLD, a, b)
        for r in results:
            torch.testing.assert_close(r[name], res.x, rtol=1e-12, atol=1e-13, msg=name)
            assert torch.equal(r[name], results[0][name]), name  # replicas agree bit for bit
    for r in results:
        assert torch.equal(*r["resumed"])


def _misuse(rank, world, method):
    """A NaN gradient on rank 1 only, in period 1: rank 1's round 1 carries a non-finite check, and every rank
    raises when that round finishes (the synchronisation after), at the same step, with the feedback state, the
    anchor and the round count as round 1 found them and every rank at the anchor (with EF14, rank 0 had moved its
    start by overlap_mix meanwhile); the run goes on with equal replicas. Then rank 1 configured without overlap,
    and (EF14) with another overlap_mix: every rank raises."""
    a, b = _problem(world)
    ps = _params()
    opt = _build(ps, FEEDBACKS[method], world)
    raised, before, after = [], None, None
    for t in range(5 * H):
        opt.zero_grad()
        _set_grads(ps, a[rank], b[rank])
        if rank == 1 and t == H + 1:
            ps[0].grad[0, 0] = float("nan")
        try:
            opt.step()
        except ValueError as exc:
            raised.append((t, type(exc).__name__))
            after = _kept(opt) + [_flat(ps)]
        if t == 2 * H - 2:  # round 0 finished now (no effect on the trajectory): the state round 1 will find
            opt.finish_round()
            before = _kept(opt)
        if t == 2 * H + 1:  # round 1 in flight, poisoned: each rank's checkpoint finishes and undoes it
            saved = copy.deepcopy(opt.state_dict()), _flat(ps).clone()
    opt.flush()
    out = {"raised": raised, "x": _flat(ps), "before": before, "after": after, "rounds": opt.rounds}
    ps = _params()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(saved[1], ps)
    resumed = _build(ps, FEEDBACKS[method], world)
    resumed.load_state_dict(saved[0])
    for t in range(2 * H + 2, 5 * H):
        resumed.zero_grad()
        _set_grads(ps, a[rank], b[rank])
        try:
            resumed.step()
        except ValueError as exc:
            raised.append((t, type(exc).__name__))
    resumed.flush()
    out["resumed"] = _flat(ps)
    ps = _params()
    others = {"misconfigured": {"overlap": rank == 0}}
    if method == "ef14":
        others["mix"] = {"overlap": True, "overlap_mix": 0.5 if rank == 0 else 0.25}
    for name, kw in others.items():
        other = tk.LocalSGD(_params(), torch.optim.SGD, **INNER.keywords, feedback=FEEDBACKS[method](world),
                            sync_every=H, outer_optimizer=NESTEROV, **kw)  # fmt: skip
        other.zero_grad()
        _set_grads(other.param_groups[0]["params"], a[rank], b[rank])
        try:
            other.step()
            out[name] = "stepped"
        except ValueError as exc:
            out[name] = str(exc)
    return out


def _kept(opt) -> list[torch.Tensor]:
    """The feedback state (every vector), the anchors and the round count, copied."""
    blocks = opt.round.blocks.values()
    state = [t.clone() for blk in blocks for t in (*blk.state.values(), blk.server) if t is not None]
    return state + [torch.cat([t.reshape(-1) for t in opt.anchors]), torch.tensor(opt.rounds)]


@pytest.mark.dist
@pytest.mark.parametrize("method", ["ef21", "ef14"])  # ef14: rank 0 moves its start (overlap_mix) meanwhile
def test_a_nan_on_one_rank_and_a_rank_without_overlap_raise_on_every_rank(method):
    results = run_dist(_misuse, WORLD, method)
    assert results[0]["raised"] == results[1]["raised"] == [(3 * H - 1, "NonFiniteGradientError")] * 2
    for r in results:
        *state, x = r["after"]
        # EF21: its shift and the server estimate; EF14: its error; then the anchors and the round count
        assert len(state) == len(r["before"]) == {"ef21": 4, "ef14": 3}[method]
        for got, want in zip(state, r["before"]):
            assert torch.equal(got, want)  # round 1 undone: as it found them, bit for bit
        assert torch.equal(x, state[-2])  # every rank at the anchor
        assert r["rounds"] == 3  # rounds 0, 2 and 3 (flushed); round 1 not counted
    assert torch.isfinite(results[0]["x"]).all() and torch.equal(results[0]["x"], results[1]["x"])
    for r in results:  # the checkpoint taken with the poisoned round in flight: the same raise, the same end
        assert torch.equal(r["resumed"], r["x"])
    for r in results:
        assert "overlap" in r["misconfigured"], r["misconfigured"]
        if method == "ef14":
            assert "overlap_mix" in r["mix"], r["mix"]


FAULT_STEP = 5  # the round of the synchronisation at step 3 is in flight


def _until_fault(rank, world):
    a, b = _problem(world)
    ps = _params()
    opt = _build(ps, FEEDBACKS["ef21"], world)
    for t in range(12):
        if rank == 1 and t == FAULT_STEP:
            os._exit(1)
        start = time.monotonic()
        try:
            opt.zero_grad()
            _set_grads(ps, a[rank], b[rank])
            opt.step()
        except Exception as exc:
            return {"step": t, "error": f"{type(exc).__name__}: {exc}"[:300], "seconds": time.monotonic() - start}
    return {"step": None}


@pytest.mark.dist
def test_a_peer_dying_with_a_round_in_flight_raises_at_the_next_synchronisation():
    out = run_dist_faults(_until_fault, 2, report={0}, pg_timeout=30.0)
    res = out[0]
    # the next synchronisation after the fault, where the new round meets the closed connection, or (when the
    # peer's death is noticed only after that round started) the one after it, which waits for that round
    assert res["step"] in (2 * H - 1, 3 * H - 1), res
    assert res["seconds"] < 20, res  # from the closed connection, not the 30 s timeout
