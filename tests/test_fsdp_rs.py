"""Issue 23 item 3: plain FSDP2 (one mesh dimension, every link slow) with its gradient reduce-scatter replaced by
a feedback round (torchkit.fsdp), on 2 and 4 Gloo ranks.

Every call of every module's reduce-scatter is recorded on every rank (FSDP's own input, the shard written); the
test then gathers all ranks' inputs and recomputes each call: against a float64 EF14 written here (each shard's
piece compressed on its own, the mean of the pieces' messages), and for every registered method against the
simulator's round (``run_round`` over the n ranks' inputs as rows, the same segments). With the Identity
compressor the training trajectory equals FSDP's own reduce-scatter. A NaN on one rank raises on every rank with
the state unchanged, or (``nonfinite="skip"``) writes NaN into every shard with the state unchanged; the state is
as long as the unsharded gradient (the memory it costs), the bytes sent are (n-1) k (4 + 4)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import torchkit as tk
from tests.dist_utils import run_dist

pytestmark = pytest.mark.dist
STEPS = 3


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()


def _sharded(net):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _train(model, rank, steps=STEPS, poison_at=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(steps):
        g = torch.Generator().manual_seed(100 * rank + t)
        x, y = torch.randn(4, 6, generator=g).double(), torch.randn(4, 3, generator=g).double()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if poison_at == t and rank == 1:
            loss = loss * float("nan")
        loss.backward()
        opt.step()


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


class _Recording:
    """Wraps a module's comm: every call's input and output, in order."""

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def allocate(self, size, *, dtype, device):
        return self.comm.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        x = input_tensor.clone()
        res = self.comm(output_tensor, input_tensor, group, op, async_op)
        self.calls.append((x, output_tensor.clone(), getattr(op, "op", op)))
        return res


def _rounds(rank, world, names):
    from tests.methods import make

    out = {}
    for name in names:
        model = _sharded(_net())
        comms = tk.fsdp.compress_reduce_scatter(model, make(name, tk.TopK(ratio=0.3), n_workers=world))
        recorders = {}
        for mod_name, module in model.named_modules():
            if mod_name in comms:
                recorders[mod_name] = _Recording(comms[mod_name])
                module.set_custom_reduce_scatter(recorders[mod_name])
        _train(model, rank)
        used = [n for n, c in comms.items() if c.state is not None]  # the root holds no parameter of its own here
        numel = {n: comms[n].state[next(iter(comms[n].state))].numel() for n in used}
        sent = {n: (comms[n].bytes_sent, comms[n].dense_bytes, comms[n].metrics) for n in used}
        out[name] = ({n: recorders[n].calls for n in used}, numel, sent)
    if world == 4:  # HSDP (2 replicas x 2 shards) is refused: its slow exchange is the replicas', not this one
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        try:
            tk.fsdp.compress_reduce_scatter(fully_shard(_net(), mesh=mesh), tk.EF14(tk.TopK(ratio=0.3)))
            out["hsdp"] = None
        except ValueError as exc:
            out["hsdp"] = str(exc)
    return out


def _ef14_reference(inputs: list[np.ndarray], n: int, ratio: float) -> list[list[np.ndarray]]:
    """Float64 EF14 over a module's calls: per rank e += x; each shard piece's top-k of |e| is sent and zeroed;
    shard j is the mean over ranks of their pieces' messages. ``inputs[t][i]``: rank i's input at call t."""
    shard = inputs[0][0].size // n
    k = int(np.ceil(ratio * shard))
    errors = [np.zeros(n * shard) for _ in range(n)]
    outs = []
    for xs in inputs:
        est = np.zeros((n, shard))
        for i in range(n):
            e = errors[i]
            e += xs[i]
            for j in range(n):
                piece = e[j * shard : (j + 1) * shard]
                top = np.argsort(-np.abs(piece), kind="stable")[:k]
                est[j, top] += piece[top] / n
                piece[top] = 0.0
        outs.append(est)
    return outs


def _check_rounds(world, names):
    every = run_dist(_rounds, world, names)
    for name in names:
        _check_method(world, name, [r[name] for r in every])
    return every


def _check_method(world, name, results):
    calls = [r[0] for r in results]
    assert len(calls[0]) == 2  # the two Linear layers
    for mod in calls[0]:
        count = len(calls[0][mod])
        assert count == STEPS and all(len(c[mod]) == count for c in calls)
        inputs = [[calls[i][mod][t][0] for i in range(world)] for t in range(count)]
        ops = {calls[0][mod][t][2] for t in range(count)}
        assert ops <= {dist.ReduceOp.AVG, dist.ReduceOp.SUM} and len(ops) == 1, ops
        scale = world if ops == {dist.ReduceOp.SUM} else 1  # fp64: FSDP pre-divides and asks for the sum
        shard = calls[0][mod][0][1].numel()
        if name == "ef14":
            ref = _ef14_reference([[x.numpy() for x in xs] for xs in inputs], world, 0.3)
            for t in range(count):
                for j in range(world):
                    np.testing.assert_allclose(calls[j][mod][t][1].numpy(), scale * ref[t][j], rtol=1e-12, atol=1e-14)
        # the simulator's round over the ranks' inputs as rows, the same pieces: every method
        from tests.methods import make
        from torchkit.comm import LocalExchanger, run_round

        fb = make(name, tk.TopK(ratio=0.3), n_workers=world)
        state = fb.init_state(world * shard, rows=world, dtype=torch.float64)
        server = torch.zeros(world * shard, dtype=torch.float64)
        for t in range(count):
            est, _ = run_round(fb, LocalExchanger(world), state, server, torch.stack(inputs[t]), t,
                               segments=(shard,) * world)  # fmt: skip
            for j in range(world):
                want = scale * est[j * shard : (j + 1) * shard]
                torch.testing.assert_close(calls[j][mod][t][1], want, rtol=1e-12, atol=1e-14)
    # the memory it costs: the worker state is as long as the unsharded gradient (the module's padded input)
    for mod, numel in results[0][1].items():
        assert numel == calls[0][mod][0][0].numel()


@pytest.mark.parametrize("world", [2, 4])
def test_the_compressed_reduce_scatter_is_ef14_on_each_shards_piece(world):
    every = _check_rounds(world, ["ef14"])
    results = [r["ef14"] for r in every]
    for mod, (sent, dense, m) in results[0][2].items():
        shard = results[0][0][mod][0][1].numel()
        k = int(np.ceil(0.3 * shard))
        assert sent == (world - 1) * k * (8 + 4), (mod, sent)  # fp64 values and int32 indices to n - 1 ranks
        # .metrics, as every front end keeps them: every round and the last one
        assert (m.steps, m.rounds, m.skipped_steps, m.dense_rounds) == (STEPS, STEPS, 0, 0)
        assert (m.last_bytes_sent, m.bytes_sent) == (sent, STEPS * sent) and m.last_dense_bytes == dense
        assert m.dense_bytes == STEPS * (world - 1) * shard * 8 and m.numel == STEPS * world * shard
    if world == 4:
        assert all("HSDP" in r["hsdp"] for r in every), [r["hsdp"] for r in every]


def test_every_method_equals_the_simulators_round_on_2_ranks():
    from tests.methods import METHODS

    _check_rounds(2, list(METHODS))


def _identity(rank, world):
    plain = _sharded(_net())
    _train(plain, rank)
    model = _sharded(_net())
    tk.fsdp.compress_reduce_scatter(model, tk.EF14(tk.Identity()))
    _train(model, rank)
    return _full(plain), _full(model)


def test_with_the_identity_compressor_the_trajectory_is_fsdps_own():
    for plain, compressed in run_dist(_identity, 2):
        for a, b in zip(plain, compressed):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def _nonfinite(rank, world, policy):
    model = _sharded(_net())
    comms = tk.fsdp.compress_reduce_scatter(model, tk.EF14(tk.TopK(ratio=0.3)), nonfinite=policy)
    _train(model, rank, steps=2)
    before = {n: c.state_dict() for n, c in comms.items()}
    try:
        _train(model, rank, steps=1, poison_at=0)
        raised = None
    except tk.comm.NonFiniteGradientError as exc:
        raised = str(exc)
    grads_nan = [bool(torch.isnan(p.grad.to_local()).all()) for p in model.parameters() if p.grad is not None]
    after = {n: c.state_dict() for n, c in comms.items()}
    unchanged = all(
        before[n]["step"] == after[n]["step"]
        and all(torch.equal(before[n]["state"][k], after[n]["state"][k]) for k in before[n]["state"])
        for n in before
    )
    counts = {(c.metrics.steps, c.metrics.rounds, c.metrics.skipped_steps, c.metrics.skipped_rounds)
              for c in comms.values() if c.state is not None}  # fmt: skip
    return raised, grads_nan, unchanged, counts


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_on_one_rank_raises_or_skips_on_every_rank_with_the_state_unchanged(policy):
    for raised, grads_nan, unchanged, counts in run_dist(_nonfinite, 2, policy):
        assert unchanged
        if policy == "skip":  # .metrics: every module counts the skipped step
            assert counts == {(3, 2, 1, 1)}, counts
        else:  # the first module that meets the NaN raises: the backward stops there
            assert {c[1:] for c in counts} == {(2, 0, 0)} and (3, 2, 0, 0) in counts, counts
        if policy == "raise":
            assert raised is not None and "feedback state is unchanged" in raised
        else:
            assert raised is None and grads_nan and all(grads_nan)


def _configured_differently(rank, world, what):
    model = _sharded(_net())
    ratio = 0.3 if what != "density" or rank == 0 else 0.2
    comms = tk.fsdp.compress_reduce_scatter(model, tk.EF14(tk.TopK(ratio=ratio)))
    if what == "resume":  # rank 1 restores a state one step behind
        _train(model, rank, steps=2)
        saved = {n: c.state_dict() for n, c in comms.items()}
        _train(model, rank, steps=1)
        if rank == 1:
            for n, c in comms.items():
                c.load_state_dict(saved[n])
    return _next_step_error(model, rank)


def _next_step_error(model, rank) -> str | None:
    """The ValueError one more training step raises, or None."""
    try:
        _train(model, rank, steps=1)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("what", ["density", "resume"])
def test_ranks_configured_differently_raise_a_clear_error_on_every_rank(what):
    """Another density on one rank (its messages would have another size in the all-to-all), or one rank resumed
    from another step: every rank raises ValueError naming the difference, before any message is sent."""
    for err in run_dist(_configured_differently, 2, what):
        assert err is not None and "configured differently" in err
        assert ("ratio" in err or "TopK" in err) if what == "density" else "step" in err


def _loaded_from_another_rank(rank, world, who):
    """Each rank saves its state; fresh modules load a state saved by another rank (``who``: every rank, or only
    rank 1; the other loads its own); the next step raises."""
    model = _sharded(_net())
    comms = tk.fsdp.compress_reduce_scatter(model, tk.EF21(tk.TopK(ratio=0.3)))
    _train(model, rank, steps=2)
    states = [None] * world
    dist.all_gather_object(states, {n: c.state_dict() for n, c in comms.items()})
    # every rank: into fresh modules; only rank 1: into the modules that ran (a load there is checked at the next
    # call as well, so that every rank raises, not rank 1 alone)
    fresh = tk.fsdp.compress_reduce_scatter(model, tk.EF21(tk.TopK(ratio=0.3))) if who == "every" else comms
    source = (rank + 1) % world if who == "every" or rank == 1 else rank
    for n, c in fresh.items():
        c.load_state_dict(states[source][n])
    return _next_step_error(model, rank)


@pytest.mark.parametrize("who", ["every", "one"])
def test_a_state_saved_by_another_rank_raises_on_every_rank(who):
    """Per-rank files swapped (or one rank given another's): the state records the rank and group size it ran on,
    and the first call after the load raises ValueError on every rank, before a round runs on it."""
    errs = run_dist(_loaded_from_another_rank, 2, who)
    for rank, err in enumerate(errs):
        assert err is not None and "per rank and cannot be re-sharded" in err
        if who == "every" or rank == 1:
            assert f"saved by rank {1 - rank} of 2, this is rank {rank} of 2" in err
        else:
            assert "loaded on another rank" in err


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="feedback"):
        tk.fsdp.CompressedReduceScatter(tk.TopK(ratio=0.1))
    with pytest.raises(ValueError, match="nonfinite"):
        tk.fsdp.CompressedReduceScatter(tk.EF14(tk.TopK(ratio=0.1)), nonfinite="sanitize")
    with pytest.raises(ValueError, match="fully_shard"):
        tk.fsdp.compress_reduce_scatter(_net(), tk.EF14(tk.TopK(ratio=0.1)))


def test_a_tampered_state_is_refused_whole_before_anything_changes():
    """A NaN, a vector of another length or shape, a missing vector or key, an EF21 state without its server
    estimate, or a bad step raised only at the next step (after the parameters were written with NaN on every rank),
    or half-way through the load, or not at all (found by two audits): each is refused at the load now, and the
    reduce-scatter keeps its state."""
    fb = tk.EF21(tk.TopK(ratio=0.1))
    comm = tk.fsdp.CompressedReduceScatter(fb)
    good = {"method": fb.config(), "step": 3, "rank": 0, "world_size": 2, "numel": 8,
            "state": {"shift": torch.randn(8)}, "server": torch.zeros(4)}  # fmt: skip
    comm.load_state_dict(good)
    kept = comm.state_dict()
    cases = {
        "nan": ({"state": {"shift": torch.full((8,), float("nan"))}}, "non-finite"),
        "short": ({"numel": 8, "state": {"shift": torch.zeros(4)}}, "has 4 entries"),
        "rows": ({"state": {"shift": torch.zeros(2, 8)}}, "1-D floating-point"),
        "missing": ({"state": {}}, r"must hold \['shift'\]"),
        "integer": ({"state": {"shift": torch.zeros(8, dtype=torch.long)}}, "floating-point"),
        "step": ({"step": -1}, "step must be an int >= 0"),
        "numel": ({"numel": 2.5}, "numel must be an int"),
        "server": ({"server": torch.tensor([0.0, float("inf"), 0.0, 0.0])}, "server holds non-finite"),
        "server length": ({"server": torch.zeros(5)}, "server has 5 entries, where 4 were saved"),
        "no server": ({"server": None}, "no server estimate"),  # EF21 then ran without it for good, silently
        "other numel": ({"numel": 16, "state": {"shift": torch.zeros(16)}}, "feedback state for 16 entries"),
    }
    for label, (change, words) in cases.items():
        with pytest.raises(ValueError, match=words):
            comm.load_state_dict({**good, **change})
        now = comm.state_dict()
        assert now["step"] == kept["step"] and torch.equal(now["state"]["shift"], kept["state"]["shift"]), label
    for key in ("numel", "step", "state", "server"):  # a KeyError after the step and the saving rank were set
        with pytest.raises(ValueError, match=rf"not a CompressedReduceScatter state_dict: no \['{key}'\]"):
            comm.load_state_dict({k: v for k, v in good.items() if k != key})
        assert comm.state_dict()["step"] == kept["step"]
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        comm.load_state_dict([good])


def test_one_rank_warns_that_nothing_is_compressed_and_refuses_another_worlds_state(tmp_path):
    """Sharded over one rank, FSDP runs no reduce-scatter: torchkit compressed nothing without a word, and a
    2-rank run's side file loaded (the check that compares the saving rank runs in the reduce-scatter that never
    comes) and was saved again as a 2-rank state (found by an audit)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fb = tk.EF14(tk.TopK(ratio=0.3))
        with pytest.warns(UserWarning, match="sharded over one rank, so FSDP runs no reduce-scatter"):
            comms = tk.fsdp.compress_reduce_scatter(_sharded(_net()), fb)
        comm = comms["0"]  # a layer's (the root holds no parameter of its own)
        other = {"method": fb.config(), "step": 3, "rank": 0, "world_size": 2, "numel": 8,
                 "state": {"error": torch.zeros(8)}, "server": None}  # fmt: skip
        with pytest.raises(ValueError, match="saved by rank 0 of 2, this module is sharded over one rank"):
            comm.load_state_dict(other)
        assert comm.state_dict()["step"] == 0
        comm.load_state_dict({**other, "world_size": 1})  # its own world's state loads
    finally:
        dist.destroy_process_group()
