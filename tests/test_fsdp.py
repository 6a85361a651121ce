"""Issue 23: HSDP with a compressed replica exchange, and LocalSGD over FSDP2, on 4 Gloo ranks as a 2 x 2 mesh (2
replicas x 2 shards).

Parameters are sharded inside each replica by FSDP2 (``fully_shard`` over the mesh's ``shard`` dimension: the
reduce-scatter averages the replica's gradient onto each rank's shard); ``tk.CompressedOptimizer`` over the mesh's
``replicate`` group runs the feedback method's round on each rank's local shard. With a TopK whose chunks tile the
shards (``TopK(chunk=...)`` per tensor), that is the same selection as on the full parameters, so the trajectory
must equal the replicated reference (the wrapper on full parameters, one worker per replica, each with its replica's
gradient) to floating-point tolerance, for every registered method; the feedback state per rank is the full model's
divided by the shard count; a DCP restart on the same mesh resumes bit-exactly, another mesh shape raises."""

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist

pytestmark = pytest.mark.dist
REPLICAS, SHARDS, STEPS = 2, 2, 4


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).double()


def _data(replica, shard, t):
    g = torch.Generator().manual_seed(100 * replica + 10 * shard + t)
    return torch.randn(5, 8, generator=g).double(), torch.randn(5, 8, generator=g).double()


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _feedback(name):
    from tests.methods import make

    return make(name, tk.TopK(ratio=0.5, chunk=4), n_workers=REPLICAS, granularity="tensor")  # chunks tile shards


def _sharded(mesh):
    from torch.distributed.fsdp import fully_shard

    net = _net()
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(net, mesh=mesh["shard"])
    return net


def _state_numel(opt):
    return sum(t.numel() for blk in opt.round.blocks.values() for t in blk.vectors().values())


def _hsdp(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh

    from tests.methods import METHODS

    mesh = init_device_mesh("cpu", (REPLICAS, SHARDS), mesh_dim_names=("replicate", "shard"))
    replica, shard = mesh["replicate"].get_local_rank(), mesh["shard"].get_local_rank()
    replicas = mesh.get_group("replicate")
    out = {"replica": replica, "shard": shard}
    for name in METHODS:
        net = _sharded(mesh)
        opt = tk.CompressedOptimizer(
            net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, feedback=_feedback(name), process_group=replicas
        )
        for t in range(STEPS):
            opt.zero_grad()
            _loss(net, *_data(replica, shard, t)).backward()
            opt.step()
        full = torch.cat([p.full_tensor().reshape(-1) for p in net.parameters()])
        ref = None
        if shard == 0:  # the replicated reference: full parameters, one worker per replica, over the same group
            model = _net()
            ropt = tk.CompressedOptimizer(
                model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, feedback=_feedback(name),
                process_group=replicas,
            )  # fmt: skip
            for t in range(STEPS):
                ropt.zero_grad()
                for s in range(SHARDS):  # the replica's gradient: the mean over its shards' micro-batches
                    (_loss(model, *_data(replica, s, t)) / SHARDS).backward()
                ropt.step()
            ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            out.setdefault("ref_state", {})[name] = _state_numel(ropt)
        out.setdefault("full", {})[name] = full
        out.setdefault("ref", {})[name] = ref
        out.setdefault("state", {})[name] = _state_numel(opt)
    out["local"] = _local_sgd(mesh, replica, shard)
    out["dcp"] = _dcp_restart(mesh, replica, shard, path)
    out["local_dcp"] = _local_dcp_restart(mesh, replica, shard, path)
    out["errors"] = _bad_input(mesh)
    out["misconfigured"] = _one_rank_differs(mesh, replica, shard)
    return out


def _one_rank_differs(mesh, replica, shard):
    """A NaN in one rank's gradient, and a learning rate set differently on one rank: under HSDP the reduce-scatter
    carries the NaN into one shard only, so one replicate group alone would see it; every rank must raise (the
    flags are agreed over every rank that holds the model), none may step or hang. Each case returns what this rank
    raised, before any further collective."""
    out = {}
    for case in ("nan", "lr"):
        net = _sharded(mesh)
        lr = 0.2 if case == "lr" and (replica, shard) == (1, 1) else 0.1
        opt = tk.CompressedOptimizer(net.parameters(), torch.optim.SGD, lr=lr, feedback=_feedback("ef14"),
                                     process_group=mesh.get_group("replicate"))  # fmt: skip
        opt.zero_grad()
        x, y = _data(replica, shard, 0)
        if case == "nan" and (replica, shard) == (0, 1):
            x[0, 0] = float("nan")
        before = [p.to_local().clone() for p in net.parameters()]
        _loss(net, x, y).backward()
        try:
            opt.step()
            out[case] = "stepped"
        except ValueError as exc:
            unchanged = all(torch.equal(p.to_local(), b) for p, b in zip(net.parameters(), before))
            out[case] = (type(exc).__name__, str(exc)[:120], unchanged)
    return out


def _local_sgd(mesh, replica, shard):
    """LocalSGD over FSDP2: inner steps on each replica's sharded model, every H steps the compressed outer round
    on the local shards of the pseudo-gradient, the anchors sharded too; against LocalSGD on full parameters with
    one worker per replica (its inner gradient the mean over the replica's shards' micro-batches)."""
    from tests.methods import METHODS

    replicas, out = mesh.get_group("replicate"), {}
    nesterov = {"outer_optimizer": lambda groups: torch.optim.SGD(groups, lr=0.7, momentum=0.9, nesterov=True)}
    for name in METHODS:
        net = _sharded(mesh)
        opt = tk.LocalSGD(net.parameters(), torch.optim.AdamW, lr=0.02, feedback=_feedback(name), sync_every=2,
                          process_group=replicas, **nesterov)  # fmt: skip
        for t in range(5):  # two rounds, then one local step
            opt.zero_grad()
            _loss(net, *_data(replica, shard, t)).backward()
            opt.step()
        full = torch.cat([p.full_tensor().reshape(-1) for p in net.parameters()])
        ref = None
        if shard == 0:
            model = _net()
            ropt = tk.LocalSGD(model.parameters(), torch.optim.AdamW, lr=0.02, feedback=_feedback(name), sync_every=2,
                               process_group=replicas, **nesterov)  # fmt: skip
            for t in range(5):
                ropt.zero_grad()
                for s in range(SHARDS):
                    (_loss(model, *_data(replica, s, t)) / SHARDS).backward()
                ropt.step()
            ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        out[name] = (full, ref, opt.rounds)
    return out


def _dcp_entries(net, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(net, opt)
    return {"model": model_sd, "optim": optim_sd, "feedback": opt.feedback_stateful()}


def _resumes_bit_exactly(build, replica, shard, where, saved_after, resumed_steps):
    """Train ``saved_after`` steps, save model, optimizer and feedback state with DCP, train on; then a fresh
    ``build()`` loads the checkpoint (``load_dcp`` and ``set_state_dict``) and trains the same steps: whether every
    rank's shards end bit-equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from torchkit.checkpoint import load_dcp

    def train(net, opt, steps):
        for t in steps:
            opt.zero_grad()
            _loss(net, *_data(replica, shard, t)).backward()
            opt.step()

    net, opt = build()
    train(net, opt, range(saved_after))
    dcp.save(_dcp_entries(net, opt), checkpoint_id=where)
    train(net, opt, resumed_steps)
    want = [p.to_local().clone() for p in net.parameters()]
    net, opt = build()
    sd = _dcp_entries(net, opt)
    load_dcp(sd, checkpoint_id=where)
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(net, opt, resumed_steps)
    return all(torch.equal(p.to_local(), w) for p, w in zip(net.parameters(), want))


def _local_dcp_restart(mesh, replica, shard, path):
    """LocalSGD over FSDP2 saved with DCP in the middle of a period (every rank's parameters its own; DCP keeps
    one replica's model shards), restarted: bit-exact on every rank."""

    def build():
        net = _sharded(mesh)
        opt = tk.LocalSGD(net.parameters(), torch.optim.AdamW, lr=0.02, feedback=_feedback("ef14"), sync_every=2,
                          process_group=mesh.get_group("replicate"))  # fmt: skip
        return net, opt

    return _resumes_bit_exactly(build, replica, shard, f"{path}/local-dcp", 3, range(3, 7))  # saved mid-period


def _dcp_restart(mesh, replica, shard, path):
    """Save model, optimizer and feedback state with DCP on the 2 x 2 mesh, restart into fresh objects, continue:
    bit-exact. The same checkpoint on a 4 x 1 mesh (the feedback state of other shards) raises, nothing loaded."""
    from torch.distributed.device_mesh import init_device_mesh

    from torchkit.checkpoint import load_dcp

    def build(m=mesh):
        net = _sharded(m)
        opt = tk.CompressedOptimizer(
            net.parameters(), torch.optim.AdamW, lr=0.01, feedback=_feedback("ef21sgdm"),
            process_group=m.get_group("replicate"),
        )  # fmt: skip
        return net, opt

    exact = _resumes_bit_exactly(build, replica, shard, f"{path}/dcp", 3, range(3, 6))
    other = init_device_mesh("cpu", (REPLICAS * SHARDS, 1), mesh_dim_names=("replicate", "shard"))
    net, opt = build(other)
    try:
        load_dcp(_dcp_entries(net, opt), checkpoint_id=f"{path}/dcp")
        wrong = "loaded"
    except ValueError as exc:
        wrong = str(exc)
    # the other way round: a checkpoint of an unsharded model (no mesh recorded) into the sharded run
    import torch.distributed.checkpoint as dcp

    plain = _net()
    popt = tk.CompressedOptimizer(plain.parameters(), torch.optim.AdamW, lr=0.01, feedback=_feedback("ef21sgdm"),
                                  process_group=mesh.get_group("replicate"))  # fmt: skip
    dcp.save({"feedback": popt.feedback_stateful()}, checkpoint_id=f"{path}/plain")
    net, opt = build()
    try:
        load_dcp({"feedback": opt.feedback_stateful()}, checkpoint_id=f"{path}/plain")
        unsharded = "loaded"
    except ValueError as exc:
        unsharded = str(exc)
    # a format-2 state_dict (before process identities) of a subgroup run recorded the exchange rank and size
    old = {**popt.feedback_state_dict(), "format_version": 2, "rank": popt.rank, "world_size": popt.world_size}
    fresh = tk.CompressedOptimizer(_net().parameters(), torch.optim.AdamW, lr=0.01, feedback=_feedback("ef21sgdm"),
                                   process_group=mesh.get_group("replicate"))  # fmt: skip
    fresh.load_feedback_state_dict(old)
    # a mesh of the same shape that maps the ranks otherwise: global ranks 1 and 2 swap their shards
    perm = init_device_mesh("cpu", (SHARDS, REPLICAS), mesh_dim_names=("shard", "replicate"))
    _, mine = build()
    _, theirs = build(perm)
    try:
        theirs.load_feedback_state_dict(mine.feedback_state_dict())
        permuted = "loaded"
    except ValueError as exc:
        permuted = str(exc)
    return exact, wrong, unsharded, fresh.round.step == popt.round.step, permuted


def _bad_input(mesh):
    """Parameters sharded and plain in one optimizer: a clear error naming the cause."""
    net = _sharded(mesh)
    plain = torch.nn.Linear(2, 2).double()
    try:
        tk.CompressedOptimizer(
            [*net.parameters(), *plain.parameters()], torch.optim.SGD, lr=0.1, feedback=_feedback("ef14"),
            process_group=mesh.get_group("replicate"),
        ).state_dict()  # fmt: skip
        mixed = "accepted"
    except TypeError as exc:
        mixed = str(exc)
    try:
        tk.LocalSGD([*net.parameters(), *plain.parameters()], torch.optim.SGD, lr=0.1, feedback=_feedback("ef14"),
                    sync_every=2)  # fmt: skip
        local = "accepted"
    except TypeError as exc:
        local = str(exc)
    # the whole world as process_group: it holds the other shards too (plain FSDP's layout; it raised "ranks are
    # configured differently ... build the model the same way", which it was)
    opt = tk.CompressedOptimizer(net.parameters(), torch.optim.SGD, lr=0.1, feedback=_feedback("ef14"))
    _loss(net, *_data(0, 0, 0)).backward()
    try:
        opt.step()
        overlap = "stepped"
    except ValueError as exc:
        overlap = str(exc)
    return mixed, local, overlap


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory):
    return run_dist(_hsdp, REPLICAS * SHARDS, str(tmp_path_factory.mktemp("hsdp")))


def test_hsdp_follows_the_replicated_reference_for_every_method(hsdp):
    from tests.methods import METHODS

    refs = {r["replica"]: r["ref"] for r in hsdp if r["shard"] == 0}
    for r in hsdp:
        for name in METHODS:
            torch.testing.assert_close(r["full"][name], refs[r["replica"]][name], rtol=1e-12, atol=1e-12, msg=name)
    for name in METHODS:  # the replicas agree
        assert torch.equal(hsdp[0]["full"][name], hsdp[-1]["full"][name]) or torch.allclose(
            hsdp[0]["full"][name], hsdp[-1]["full"][name], rtol=1e-12, atol=1e-12
        )


def test_dcp_restart_on_the_same_mesh_is_bit_exact_and_another_mesh_raises(hsdp):
    for r in hsdp:
        exact, wrong, unsharded, old_format, permuted = r["dcp"]
        assert exact, f"rank {r['replica']}.{r['shard']}: the DCP restart is not bit-exact"
        assert "saved 2 replicas x 2 shards, this run is unsharded" in wrong, wrong
        assert "saved unsharded, this run is 2 replicas x 2 shards" in unsharded, unsharded
        assert old_format
        if r["replica"] == r["shard"]:  # the same place in the permuted mesh: its own state
            assert permuted == "loaded", permuted
        else:
            want = f"saved at replica {r['replica']} and shard {r['shard']}, this rank is at replica {r['shard']}"
            assert want in permuted, permuted


def test_local_sgd_over_fsdp2_follows_its_replicated_reference_for_every_method(hsdp):
    from tests.methods import METHODS

    refs = {r["replica"]: r["local"] for r in hsdp if r["shard"] == 0}
    for r in hsdp:
        for name in METHODS:
            full, _, rounds = r["local"][name]
            assert rounds == 2
            torch.testing.assert_close(full, refs[r["replica"]][name][1], rtol=1e-12, atol=1e-12, msg=name)
    # ended mid-period: the replicas' parameters are their own
    assert not torch.equal(refs[0]["ef14"][1], refs[1]["ef14"][1])


def test_local_sgd_over_fsdp2_resumes_mid_period_from_dcp_bit_exactly(hsdp):
    assert all(r["local_dcp"] for r in hsdp)


def test_a_nan_or_a_setting_on_one_rank_raises_on_every_rank(hsdp):
    for r in hsdp:
        nan, lr = r["misconfigured"]["nan"], r["misconfigured"]["lr"]
        assert nan != "stepped" and nan[0] == "NonFiniteGradientError" and nan[2], (r["replica"], r["shard"], nan)
        assert lr != "stepped" and "configured differently" in lr[1] and lr[2], (r["replica"], r["shard"], lr)


def test_bad_input_gets_clear_errors(hsdp):
    for r in hsdp:
        mixed, local, overlap = r["errors"]
        assert "some parameters are DTensors (fully_shard) and others are not" in mixed
        assert "some parameters are DTensors (fully_shard) and others are not" in local
        assert "process_group holds ranks with other shards of the same parameters" in overlap, overlap


def test_feedback_state_per_rank_is_the_full_models_over_the_shards(hsdp):
    from tests.methods import METHODS

    for r in hsdp:
        for name in METHODS:
            full = next(x for x in hsdp if x["shard"] == 0)["ref_state"][name]
            # each rank's state: its shard of every parameter (padded vectors count their logical length)
            assert r["state"][name] * SHARDS == full, (name, r["state"][name], full)
