"""What production use does to replicas, on 3 Gloo ranks in one spawn: parameters with gradients on some ranks,
a rank without gradients, GradScaler (wrapper and hook), hook checkpoints across wrappers and bad files, fp16
wires, resume with a scheduler, and ranks configured differently (last: they raise)."""

import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkit as tk
from tests.dist_utils import run_dist

pytestmark = pytest.mark.dist
WORLD = 3


def _grad_data(rank, t, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * rank + t))


# ------------------------------------------------------------------- parameters with gradients on some ranks
def _moe_run(rank, feedback, explicit_zeros):
    """Three 'experts': a on every rank, b on rank 0 only, c on ranks 0 and 1; d on no rank at all."""
    ps = [torch.nn.Parameter(torch.full((n,), float(i))) for i, n in enumerate((7, 5, 6, 4))]
    opt = tk.CompressedOptimizer(ps, torch.optim.SGD, lr=0.1, feedback=feedback())
    for t in range(6):
        opt.zero_grad()
        owners = ({0, 1, 2}, {0}, {0, 1}, set())
        no_grad_step = rank == 2 and t == 2  # this rank's batch was empty: no backward at all
        for p, who in zip(ps, owners):
            if rank in who and not no_grad_step:
                p.grad = _grad_data(rank, t, p.shape)
            elif explicit_zeros and any(who):
                p.grad = torch.zeros_like(p)
        opt.step()
    return [p.detach().clone() for p in ps], ps[3].grad is None


def _moe(rank):
    out = {}
    for name, fb in {
        "ef14": lambda: tk.EF14(tk.TopK(ratio=0.3)),
        "ef21": lambda: tk.EF21(tk.TopK(ratio=0.3)),
        "econtrol_tensor": lambda: tk.EControl(tk.TopK(ratio=0.3), eta=0.2, granularity="tensor"),
    }.items():
        missing, unused_none = _moe_run(rank, fb, explicit_zeros=False)
        zeros, _ = _moe_run(rank, fb, explicit_zeros=True)
        out[name] = (missing, zeros, unused_none)
    return out


# --------------------------------------------------------------------------------- GradScaler, the wrapper
def _wrapper_scaler(rank):
    res = {}
    for label, pass_scaler in (("passed", True), ("not passed", False)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt = tk.CompressedOptimizer(
            model.parameters(),
            torch.optim.SGD,
            lr=0.1,
            feedback=tk.EF21(tk.TopK(ratio=0.5)),
            grad_scaler=scaler if pass_scaler else None,
        )
        with pytest.warns(UserWarning, match="pass grad_scaler=scaler") if not pass_scaler else _nothing():
            for t in range(3):
                opt.zero_grad()
                loss = model(_grad_data(rank, t, (5, 4))).pow(2).mean()
                if t == 1 and rank == 1:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        res[label] = (scaler.get_scale(), opt.skipped_steps, model.weight.detach().clone())
    return res


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------- GradScaler, the hook
def _net(dtype=torch.float32):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def _hook_scaler_run(rank, with_scaler):
    model = DDP(_net(), bucket_cap_mb=0.0002)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_factor=2.0, growth_interval=1)
    state = tk.ddp.register(
        model, tk.EF21(tk.TopK(ratio=0.3)), min_compression_rate=0, grad_scaler=scaler if with_scaler else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scales, kept = [], None
    for t in range(6):
        x = _grad_data(rank, t, (6, 5))
        if t == 3:  # one rank's loss overflows: the scaled run skips the step, the plain run never takes it
            if not with_scaler:
                continue
            before = copy.deepcopy(state.state_dict())
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if with_scaler:
            if t == 3 and rank == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            if t == 3:
                after = state.state_dict()
                kept = all(
                    torch.equal(after["params"][k][n], before["params"][k][n])
                    for k in before["params"]
                    for n in before["params"][k]
                )
        else:
            loss.backward()
            opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    st = state.state_dict()
    return params, {k: {n: v.clone() for n, v in d.items()} for k, d in st["params"].items()}, scales, kept


# --------------------------------------------------------------------- hook checkpoints: names and bad files
class _Compiled(torch.nn.Module):
    """Names as torch.compile gives them (``_orig_mod.`` in front)."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(x)


def _hook_checkpoints(rank):
    model = DDP(_net(), bucket_cap_mb=0.0002)
    state = tk.ddp.register(model, tk.EF14(tk.TopK(ratio=0.3)), min_compression_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(3):
        opt.zero_grad()
        model(_grad_data(rank, t, (6, 5))).pow(2).mean().backward()
        opt.step()
    saved = state.state_dict()
    out = {}
    wrapped = DDP(_Compiled(_net()), bucket_cap_mb=0.0002)
    st2 = tk.ddp.register(wrapped, tk.EF14(tk.TopK(ratio=0.3)), min_compression_rate=0)
    out["renamed"] = st2.load_state_dict(saved)
    out["renamed_equal"] = all(
        torch.equal(st2.round._pending[k]["error"], saved["params"][k]["error"]) for k in saved["params"]
    )
    bigger = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3), torch.nn.Linear(3, 2))
    st3 = tk.ddp.register(DDP(bigger), tk.EF14(tk.TopK(ratio=0.3)))
    try:
        st3.load_state_dict(saved)
        out["mismatch"] = "loaded"
    except ValueError as exc:
        out["mismatch"] = str(exc)
    out["non_strict"] = st3.load_state_dict(saved, strict=False)
    # the first checkpoint format (the method as its repr, no step) still loads
    v1 = {k: v for k, v in saved.items() if k not in ("method", "step")}
    v1.update(format_version=1, feedback=repr(tk.EF14(tk.TopK(ratio=0.3))))
    st4 = tk.ddp.register(DDP(_net(), bucket_cap_mb=0.0002), tk.EF14(tk.TopK(ratio=0.3)), min_compression_rate=0)
    out["v1"] = (st4.load_state_dict(v1), st4.round.step == saved["step"])
    # a bad file changes nothing
    bad = copy.deepcopy(saved)
    name = next(iter(bad["params"]))
    bad["params"][name]["error"][0] = float("nan")
    before = state.state_dict()
    try:
        state.load_state_dict(bad)
        out["bad"] = "loaded"
    except ValueError as exc:
        out["bad"] = str(exc)
    after = state.state_dict()
    out["bad_unchanged"] = all(
        torch.equal(after["params"][k]["error"], before["params"][k]["error"]) for k in before["params"]
    ) and (after["iter"], after["step"]) == (before["iter"], before["step"])
    return out


# ----------------------------------------------------------------------------------------- fp16 on the wire
def _fp16_wire(rank):
    """fp16 buckets whose error grows beyond fp16's range: the wire clamps, the state keeps the rest."""
    model = DDP(torch.nn.Linear(8, 1, bias=False).half(), bucket_cap_mb=25)
    state = tk.ddp.register(model, tk.EF14(tk.TopK(1)), min_compression_rate=0)
    for _ in range(4):
        for p in model.parameters():
            p.grad = None
        model(torch.full((1, 8), 1.0, dtype=torch.float16)).sum().mul(6e4).backward()
    views = next(iter(state._params.values()))
    return bool(torch.isfinite(views["error"]).all()), float(views["error"].abs().max())


# --------------------------------------------------------------------------------- resume with a scheduler
def _sched_resume(rank, path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        opt = tk.CompressedOptimizer(
            model.parameters(), torch.optim.AdamW, lr=0.01, feedback=tk.EF21(tk.TopK(ratio=0.25))
        )
        return model, opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)

    def train(model, opt, sched, steps):
        for t in steps:
            opt.zero_grad()
            model(_grad_data(rank, t, (5, 6))).pow(2).mean().backward()
            opt.step()
            sched.step()

    model, opt, sched = make()
    train(model, opt, sched, range(10))
    straight = model.weight.detach().clone()
    model, opt, sched = make()
    train(model, opt, sched, range(5))
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, f"{path}/{rank}.pt")
    model, opt, sched = make()
    saved = torch.load(f"{path}/{rank}.pt", weights_only=False)
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    sched.load_state_dict(saved["s"])
    train(model, opt, sched, range(5, 10))
    return torch.equal(model.weight.detach(), straight)


# --------------------------------------------------------------------------- a non-finite gradient, raised
def _hook_raise(rank):
    """Default policy: the bad iteration's estimate is NaN everywhere at once; every rank raises at the next one."""
    model = DDP(_net(), bucket_cap_mb=0.0002)
    tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.3)), min_compression_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {}
    for t in range(4):
        opt.zero_grad()
        loss = model(_grad_data(rank, t, (6, 5))).pow(2).mean()
        if t == 2 and rank == 1:
            loss = loss * float("inf")
        try:
            loss.backward()
        except Exception as exc:
            out["raised_at"], out["error"] = t, str(exc)
            break
        out[f"grad_nan_{t}"] = all(torch.isnan(p.grad).all() for p in model.parameters())
        opt.step()
    return out


# ------------------------------------------------------------------------------------ configured differently
def _misconfigured(rank):
    out = {}
    p = torch.nn.Parameter(torch.zeros(6))
    k = 2 if rank == 1 else 3
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(k)))
    p.grad = torch.ones(6)
    try:
        opt.step()
        out["wrapper"] = "stepped"
    except ValueError as exc:
        out["wrapper"] = str(exc)
    model = DDP(_net())
    fb = tk.EF14(tk.TopK(ratio=0.3)) if rank == 2 else tk.EF21(tk.TopK(ratio=0.3))
    tk.ddp.register(model, fb, min_compression_rate=0)
    try:
        model(torch.randn(2, 5)).sum().backward()
        out["hook"] = "ran"
    except Exception as exc:
        out["hook"] = str(exc)
    return out


def _worker(rank, world, path):
    return {
        "moe": _moe(rank),
        "wrapper_scaler": _wrapper_scaler(rank),
        "hook_scaler": (_hook_scaler_run(rank, True), _hook_scaler_run(rank, False)),
        "checkpoints": _hook_checkpoints(rank),
        "fp16": _fp16_wire(rank),
        "sched": _sched_resume(rank, path),
        "raise": _hook_raise(rank),
        "misconfigured": _misconfigured(rank),  # last: the hook's error leaves DDP mid-backward
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_dist(_worker, WORLD, str(tmp_path_factory.mktemp("ckpt")))


def test_gradients_on_some_ranks_count_as_zero_and_replicas_agree(results):
    for name in results[0]["moe"]:
        for r in results:
            missing, zeros, unused_none = r["moe"][name]
            assert all(torch.equal(a, b) for a, b in zip(missing, zeros)), name
            assert unused_none and torch.equal(missing[3], torch.full((4,), 3.0)), name  # no rank: left alone
            assert all(torch.equal(a, b) for a, b in zip(missing, results[0]["moe"][name][0])), name


def test_wrapper_ranks_agree_on_found_inf_when_given_the_scaler(results):
    scales = [r["wrapper_scaler"]["passed"][0] for r in results]
    assert scales == [scales[0]] * WORLD and scales[0] == 2.0**9
    assert [r["wrapper_scaler"]["passed"][1] for r in results] == [1] * WORLD
    weights = [r["wrapper_scaler"]["passed"][2] for r in results]
    assert all(torch.equal(w, weights[0]) for w in weights)
    # without the scaler the local GradScaler bookkeeping is what torch gives (rank 1 alone saw the inf)
    unshared = [r["wrapper_scaler"]["not passed"][0] for r in results]
    assert unshared[1] == 2.0**9 and unshared[0] == 2.0**10


def test_hook_with_grad_scaler_equals_the_unscaled_run_and_skips_exactly(results):
    for r in results:
        (p_scaled, st_scaled, scales, kept), (p_plain, st_plain, _, _) = r["hook_scaler"]
        assert scales == [32.0, 64.0, 128.0, 64.0, 128.0, 256.0]  # grows every step, halves on the inf
        assert kept  # the skipped step left every bucket's state as it was
        assert torch.equal(p_scaled, p_plain)
        for k in st_plain:
            for n in st_plain[k]:
                assert torch.equal(st_scaled[k][n], st_plain[k][n]), (k, n)


def test_hook_checkpoints_across_wrappers_and_bad_files(results):
    for r in results:
        c = r["checkpoints"]
        assert c["renamed"] == ([], []) and c["renamed_equal"]
        assert c["v1"] == (([], []), True)
        assert "checkpoint parameter names do not match" in c["mismatch"]
        missing, unexpected = c["non_strict"]
        assert missing == ["3.bias", "3.weight"] and unexpected == []
        assert "holds non-finite values" in c["bad"] and c["bad_unchanged"]


def test_fp16_wire_state_stays_finite(results):
    for r in results:
        finite, largest = r["fp16"]
        assert finite and largest > 65504  # the state holds what the fp16 wire could not carry


def test_resume_with_a_scheduler_on_three_ranks(results):
    assert [r["sched"] for r in results] == [True] * WORLD


def test_a_non_finite_gradient_raises_on_every_rank_one_iteration_later(results):
    for r in results:
        h = r["raise"]
        assert not h["grad_nan_0"] and not h["grad_nan_1"] and h["grad_nan_2"]  # NaN everywhere at once
        assert h["raised_at"] == 3 and "non-finite gradient" in h["error"]


def test_ranks_configured_differently_all_raise(results):
    for r in results:
        m = r["misconfigured"]
        assert "ranks are configured differently" in m["wrapper"] and "TopK" in m["wrapper"]
        assert "ranks are configured differently" in m["hook"] and "method" in m["hook"]
