"""Issue 22 item 2: node-aware compression (dense inside a node, compressed between nodes).

The simulator's ``local_size`` against a float64 reference written here (numpy: node means, then each method with a
TopK per shard, one node at a time); ``CompressedOptimizer(node_group=...)`` on 4 Gloo ranks arranged as 2 nodes x
2 against the simulator, every method, with the bytes that cross the node boundary counted; its checkpoint and the
misconfigurations users make."""

import numpy as np
import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist
from tests.methods import METHODS, make, reference_kwargs
from tests.refs import logreg_problem, run_reference, topk_np
from torchkit.node import shard_index, shard_pieces, shard_span
from torchkit.sim import LogisticRegression, simulate

WORKERS, LOCAL, STEPS, LR = 4, 2, 6, 0.5
NODES = WORKERS // LOCAL
SIZES = (12, 8)  # two parameters: each rank of a node holds half of each
D = sum(SIZES)


def _problem():
    A, y, grad_np = logreg_problem(m=80, d=D, n=WORKERS)
    return LogisticRegression(torch.tensor(A), torch.tensor(y), WORKERS), grad_np


def _blockwise(k):
    """TopK with k entries per shard (shard r: the r-th half of each parameter), written out with numpy indices:
    what each local rank's TopK of its shard makes of the whole vector."""

    def comp(v):
        out = np.zeros_like(v)
        for r in range(LOCAL):
            idx = np.concatenate([start + np.arange(r * n // LOCAL, (r + 1) * n // LOCAL)
                                  for start, n in zip(np.cumsum((0,) + SIZES[:-1]), SIZES)])  # fmt: skip
            out[idx] = topk_np(v[idx], k)
        return out

    return comp


def test_shards_cut_every_tensor_into_pieces():
    assert [shard_span(20, 2, i) for i in range(2)] == [(0, 10), (10, 20)]
    assert [shard_span(5, 4, i) for i in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]  # the last one empty
    assert shard_pieces(("a", "b"), (12, 3), 2, 1) == (("a", "b"), (6, 1))
    assert shard_pieces(("a", "b"), (12, 1), 2, 1) == (("a",), (6,))
    assert shard_index((4, 3), 2, 1).tolist() == [2, 3, 6]
    assert sorted(torch.cat([shard_index((5, 3, 7), 3, r) for r in range(3)]).tolist()) == list(range(15))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_simulate_local_size_matches_the_float64_reference(name):
    prob, grad_np = _problem()
    x0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def node_grads(x):
        return grad_np(x).reshape(NODES, LOCAL, D).mean(1)

    xs = run_reference(
        METHODS[name].reference, node_grads, x0.numpy(), n=NODES, steps=STEPS, lr=LR, k=2, comp=_blockwise(2),
        **reference_kwargs(name, NODES),
    )  # fmt: skip
    res = simulate(make(name, tk.TopK(2), n_workers=NODES), prob.grad_fn, x0, n_workers=WORKERS, steps=STEPS,
                   lr=LR, local_size=LOCAL, segments=SIZES)  # fmt: skip
    np.testing.assert_allclose(res.x.numpy(), xs[-1], rtol=1e-10, atol=1e-12)


def test_simulate_local_size_counts_bits_per_rank_and_checks_its_arguments():
    prob, _ = _problem()
    x0 = torch.zeros(D, dtype=torch.float64)
    res = simulate(tk.EF14(tk.TopK(2)), prob.grad_fn, x0, n_workers=WORKERS, steps=3, lr=LR, local_size=LOCAL)
    assert res.bits.tolist() == [0, 64, 128, 192]  # each rank: 2 fp32 values of its shard per round
    with pytest.raises(ValueError, match="local_size"):
        simulate(tk.EF14(tk.TopK(2)), prob.grad_fn, x0, n_workers=WORKERS, steps=1, lr=LR, local_size=3)
    with pytest.raises(ValueError, match="segments"):
        simulate(tk.EF14(tk.TopK(2)), prob.grad_fn, x0, n_workers=WORKERS, steps=1, lr=LR, segments=(3, 4))


# ----------------------------------------------------------------------------------------- 2 nodes x 2 ranks
def _model():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in SIZES]


def _set_grads(params, grads):
    for p, g in zip(params, torch.split(grads, SIZES)):
        p.grad = g.clone()


def _node_opt(name, params, groups, *, compressor=None, granularity="global", **kw):
    between, inside = groups
    feedback = make(name, compressor or tk.TopK(ratio=0.2), n_workers=NODES, granularity=granularity)
    return tk.CompressedOptimizer(params, torch.optim.SGD, lr=LR, feedback=feedback, process_group=between,
                                  node_group=inside, **kw)  # fmt: skip


def _node_ranks(rank, world):
    from torchkit.node import node_groups

    prob, _ = _problem()
    groups = node_groups(LOCAL)
    out = {"x": {}, "sent": {}, "node_bytes": {}, "state": {}}
    for name in METHODS:
        params = _model()
        opt = _node_opt(name, params, groups)
        for _ in range(STEPS):
            x = torch.cat([p.detach() for p in params])
            _set_grads(params, prob.grad_fn(x)[rank])
            opt.step()
        out["x"][name] = torch.cat([p.detach() for p in params])
        out["sent"][name] = opt.metrics.last_bytes_sent
        out["node_bytes"][name] = opt.metrics.last_node_bytes
        out["state"][name] = sum(t.numel() for b in opt.round.blocks.values() for t in b.state.values())
    # per tensor: pieces of the parameters are the segments
    params = _model()
    opt = _node_opt("ef21", params, groups, compressor=tk.TopK(ratio=0.25), granularity="tensor")
    for _ in range(STEPS):
        _set_grads(params, prob.grad_fn(torch.cat([p.detach() for p in params]))[rank])
        opt.step()
    out["tensor"] = torch.cat([p.detach() for p in params])
    out["hook"] = _hook(prob, rank, groups)
    out["resume"] = _resume(prob, rank, groups)
    out["nan"] = _nan_on_one_rank(prob, rank, groups)
    out["wrong_groups"] = _wrong_groups(rank)
    return out


class _Logreg(torch.nn.Module):
    """Worker ``rank``'s logistic regression with the nonconvex regulariser, as one parameter (one DDP bucket)."""

    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))

    def forward(self, A, y):
        return torch.nn.functional.softplus(-y * (A @ self.x)).mean() + 0.1 * (self.x**2 / (1 + self.x**2)).sum()


def _hook(prob, rank, groups):
    """The DDP hook, node-aware (DDP over every rank; the hook's round between nodes): its trajectory for every
    method, its counters, and a NaN on one rank raising at every rank's next forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    a, b = prob.bounds[rank]
    data = prob.A[a:b], prob.y[a:b]
    out = {}
    for name in [*METHODS, "nan"]:
        model = DDP(_Logreg())
        feedback = make("ef14" if name == "nan" else name, tk.TopK(ratio=0.2), n_workers=NODES)
        state = tk.ddp.register(model, feedback, process_group=groups[0], node_group=groups[1], min_compression_rate=0)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        try:
            for t in range(STEPS):
                opt.zero_grad()
                hook = None
                if name == "nan" and rank == 3 and t == 1:  # one entry, in shard 0: ranks 1 and 3 compress shard 1
                    hook = model.module.x.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
                model(*data).backward()
                if hook is not None:
                    hook.remove()
                opt.step()
            out[name] = (model.module.x.detach().clone(), state.metrics.last_bytes_sent, state.metrics.last_node_bytes)
            if name == "ef21":  # its state_dict holds this rank's pieces and loads into a fresh node-aware state
                sd = state.state_dict()
                fresh = tk.ddp.CompressionState(feedback, process_group=groups[0], node_group=groups[1])
                fresh.bind(DDP(_Logreg()).module)
                fresh.load_state_dict(sd)
                flat = tk.ddp.CompressionState(feedback, process_group=groups[0]).bind(DDP(_Logreg()).module)
                try:
                    flat.load_state_dict(sd)
                    refused = "loaded"
                except ValueError as exc:
                    refused = str(exc)
                out["checkpoint"] = (
                    sorted((k, v.numel()) for k, v in fresh.state_dict()["params"]["x"].items()), refused,
                )  # fmt: skip
        except ValueError as exc:
            out[name] = (type(exc).__name__, t)
    return out


def _resume(prob, rank, groups):
    """A state_dict taken mid-run, loaded into a fresh optimizer: the rest of the run is bit-exact."""
    import copy

    def run(params, opt, steps):
        for _ in range(steps):
            _set_grads(params, prob.grad_fn(torch.cat([p.detach() for p in params]))[rank])
            opt.step()

    params = _model()
    opt = _node_opt("ef21sgdm", params, groups)
    run(params, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in params]
    run(params, opt, 3)
    fresh = _model()
    with torch.no_grad():
        for p, s in zip(fresh, saved):
            p.copy_(s)
    ropt = _node_opt("ef21sgdm", fresh, groups)
    ropt.load_state_dict(sd)
    run(fresh, ropt, 3)
    plain = tk.CompressedOptimizer(_model(), torch.optim.SGD, lr=LR, feedback=make("ef21sgdm", tk.TopK(ratio=0.2)),
                                   process_group=groups[0])  # fmt: skip
    try:
        plain.load_state_dict(sd)
        other = "loaded"
    except ValueError as exc:
        other = str(exc)
    return all(torch.equal(a, b) for a, b in zip(params, fresh)), other


def _nan_on_one_rank(prob, rank, groups):
    params = _model()
    opt = _node_opt("ef14", params, groups)
    grads = prob.grad_fn(torch.zeros(D, dtype=torch.float64))[rank]
    if rank == 3:
        grads[0] = float("nan")
    _set_grads(params, grads)
    try:
        opt.step()
        return "stepped"
    except ValueError as exc:
        return type(exc).__name__, all(torch.equal(p, torch.zeros_like(p)) for p in params)


def _wrong_groups(rank):
    """The world as process_group (not the peers on the other nodes): every rank raises at the first step."""
    import torch.distributed as dist

    inside = dist.new_group([0, 1]), dist.new_group([2, 3])
    crossed = dist.new_group([0, 3]), dist.new_group([1, 2])  # peers that hold different shards
    params = _model()
    peers = crossed[0 if rank in (0, 3) else 1]
    opt = tk.CompressedOptimizer(params, torch.optim.SGD, lr=LR, feedback=tk.EF14(tk.TopK(ratio=0.2)),
                                 process_group=peers, node_group=inside[rank // 2])  # fmt: skip
    _set_grads(params, torch.ones(D, dtype=torch.float64))
    try:
        opt.step()
        misrouted = "stepped"
    except ValueError as exc:
        misrouted = str(exc)
    try:
        tk.CompressedOptimizer(params, torch.optim.SGD, lr=LR, feedback=tk.EF14(tk.TopK(2)),
                               process_group=dist.group.WORLD, node_group=inside[rank // 2])  # fmt: skip
        absolute = "built"
    except ValueError as exc:
        absolute = str(exc)
    build = dict(lr=LR, feedback=tk.EF14(tk.TopK(ratio=0.2)), node_group=inside[rank // 2])
    try:
        tk.CompressedOptimizer(params, torch.optim.SGD, **build)
        alone = "built"
    except ValueError as exc:
        alone = str(exc)
    opt = tk.CompressedOptimizer(params, torch.optim.SGD, process_group=dist.group.WORLD, **build)
    _set_grads(params, torch.ones(D, dtype=torch.float64))
    try:
        opt.step()
        return "stepped", alone, misrouted, absolute
    except ValueError as exc:
        return str(exc), alone, misrouted, absolute


@pytest.fixture(scope="module")
def two_nodes():
    return run_dist(_node_ranks, WORKERS)


def _simulated(name, compressor=None, granularity="global", **kw):
    """The simulator's node-aware run of ``name`` on the test's problem, from zero."""
    prob, _ = _problem()
    feedback = make(name, compressor or tk.TopK(ratio=0.2), n_workers=NODES, granularity=granularity)
    x0 = torch.zeros(D, dtype=torch.float64)
    return simulate(feedback, prob.grad_fn, x0, n_workers=WORKERS, steps=STEPS, lr=LR, local_size=LOCAL, **kw).x


@pytest.mark.dist
def test_two_nodes_of_two_ranks_follow_the_simulator_for_every_method(two_nodes):
    for name in METHODS:
        want = _simulated(name, segments=SIZES)
        for out in two_nodes:
            torch.testing.assert_close(out["x"][name], want, rtol=1e-12, atol=1e-14, msg=name)
    want = _simulated("ef21", tk.TopK(ratio=0.25), "tensor", segments=SIZES)
    for out in two_nodes:
        torch.testing.assert_close(out["tensor"], want, rtol=1e-12, atol=1e-14)


@pytest.mark.dist
def test_the_ddp_hook_on_two_nodes_follows_the_simulator_for_every_method(two_nodes):
    for name in METHODS:
        want = _simulated(name)  # one parameter: one piece of it per rank
        for out in two_nodes:
            x, sent, node_bytes = out["hook"][name]
            torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-12, msg=name)  # autograd's gradient, not grad_fn's
            if name == "ef14":
                assert sent == 2 * (8 + 4) + 8 and node_bytes == 2 * (LOCAL - 1) * (D // LOCAL) * 8
    for out in two_nodes:
        pieces, refused = out["hook"]["checkpoint"]
        assert pieces == [("server", D // LOCAL), ("shift", D // LOCAL)]  # EF21: this rank's piece of g and of g_i
        assert "2 nodes x 2 ranks per node" in refused and "unsharded" in refused
    # rank 3's NaN at step 1 reaches one shard's round; the node's gather carries the flag to every rank
    assert [out["hook"]["nan"] for out in two_nodes] == [("NonFiniteGradientError", 2)] * WORKERS


@pytest.mark.dist
def test_each_rank_sends_its_shard_compressed_between_nodes_and_holds_its_shards_state(two_nodes):
    shard = D // LOCAL  # 6 + 4 entries; TopK 20%: 2 entries of fp64 values and int32 indices
    full = make("ef14", tk.TopK(ratio=0.2), n_workers=NODES).wire_bytes((D,), 1, value_dtype=torch.float64)
    agreement = 8 * (1 + len(SIZES) + 2)  # the step's float64 flags: non-finite, a gradient per parameter, digest
    for out in two_nodes:
        message = out["sent"]["ef14"] - agreement
        assert message == 2 * (8 + 4) + 8  # d/L x density entries, and the float64 non-finite check
        assert 2 * (message - 8) == full  # the node's two ranks send what one rank of it would
        assert out["node_bytes"]["ef14"] == 2 * (LOCAL - 1) * shard * 8  # reduce-scatter and all-gather, dense
        assert out["state"]["ef14"] == shard  # EF14's error, this rank's shard only


@pytest.mark.dist
def test_node_aware_state_resumes_bit_exactly_and_refuses_another_layout(two_nodes):
    for out in two_nodes:
        exact, other = out["resume"]
        assert exact
        assert "2 nodes x 2 ranks per node" in other and "unsharded" in other


@pytest.mark.dist
def test_a_nan_on_one_rank_raises_on_every_rank_with_nothing_changed(two_nodes):
    assert [out["nan"] for out in two_nodes] == [("NonFiniteGradientError", True)] * WORKERS


@pytest.mark.dist
def test_groups_that_do_not_cut_the_world_into_nodes_raise_on_every_rank(two_nodes):
    for out in two_nodes:
        raised, alone, misrouted, absolute = out["wrong_groups"]
        assert "do not split the 4 ranks" in raised and "do not split the 4 ranks" in misrouted
        assert "node_group needs process_group" in alone
        assert "given by ratio, not k" in absolute


def test_node_group_needs_process_group_and_a_group():
    with pytest.raises(TypeError, match="node_group"):
        tk.CompressedOptimizer(_model(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(2)), node_group=2)


def _one_node_scaler(rank, world):
    """One node of two ranks (the group between nodes is each rank alone) under GradScaler, rank 1's gradient
    infinite at step 1: every rank's loss scale after each step."""
    from torchkit.node import node_groups

    between, inside = node_groups(2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=1)
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.5)),
                                 process_group=between, node_group=inside, grad_scaler=scaler)  # fmt: skip
    scales = []
    for step in range(4):
        opt.zero_grad()
        loss = model(torch.randn(2, 4, generator=torch.Generator().manual_seed(step))).square().mean()
        if rank == 1 and step == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, opt.skipped_steps


@pytest.mark.dist
def test_one_node_keeps_the_ranks_loss_scales_equal():
    """The ranks' GradScalers record the agreed found_inf: with one node the group between nodes is each rank alone,
    and the wrapper skipped that (rank 0's scale grew on, 512 1024 2048 4096, while rank 1's halved)."""
    (a, skipped_a), (b, skipped_b) = run_dist(_one_node_scaler, 2)
    assert a == b == [1024.0, 512.0, 1024.0, 2048.0] and skipped_a == skipped_b == 1
