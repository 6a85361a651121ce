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
    """Default policy: the bad iteration's estimate is NaN everywhere at once; every rank raises at the next
    forward; the state_dict of a bad last iteration raises; the user reloads and goes on in the same process."""

    def make():
        model = DDP(_net(), bucket_cap_mb=0.0002)
        state = tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.3)), min_compression_rate=0)
        return model, state, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def iteration(model, opt, t, bad):
        opt.zero_grad()
        loss = model(_grad_data(rank, t, (6, 5))).pow(2).mean()
        (loss * float("inf") if bad and rank == 1 else loss).backward()
        opt.step()

    model, state, opt = make()
    out = {}
    saved = None
    for t in range(5):
        try:
            iteration(model, opt, t, bad=t == 2)
        except tk.NonFiniteGradientError as exc:
            out["raised_at"], out["error"] = t, str(exc)
            # catch, reload, go on: the same DDP model, in this process
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            state.load_state_dict(saved["hook"])
            for u in range(2, 5):
                iteration(model, opt, u, bad=False)
            break
        out[f"grad_nan_{t}"] = all(torch.isnan(p.grad).all() for p in model.parameters())
        if t == 1:
            saved = copy.deepcopy(
                {"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}
            )
        if t == 2:  # the bad iteration was the last before a checkpoint: saving it raises
            with pytest.raises(tk.NonFiniteGradientError, match="non-finite gradient"):
                state.state_dict()
    resumed = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    clean, _, clean_opt = make()
    for t in range(5):
        iteration(clean, clean_opt, t, bad=False)
    out["resumed_equals_clean"] = torch.equal(resumed, torch.cat([p.detach().reshape(-1) for p in clean.parameters()]))
    return out


def _hook_raise_in_warm_up_and_join(rank):
    """The default policy where it did not hold (found by an audit): a NaN during the ``start_iter`` warm-up went
    unflagged (NaN parameters for the rest of the warm-up, its checkpoints saved without a word), and inside
    ``join()`` only the rank still training raised, in its forward, while the joined rank waited for it until the
    process group's timeout. Both raise on every rank now."""
    out = {}
    model = DDP(_net(), bucket_cap_mb=0.0002)
    tk.ddp.register(model, tk.EF14(tk.TopK(ratio=0.3)), start_iter=3, min_compression_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(3):  # all warm-up: the NaN at iteration 0 raises at the forward of iteration 1
        try:
            opt.zero_grad()
            loss = model(_grad_data(rank, t, (6, 5))).pow(2).mean()
            (loss * float("nan") if t == 0 and rank == 1 else loss).backward()
            opt.step()
        except tk.NonFiniteGradientError:
            out["warm_up_raised_at"] = t
            break
    model = DDP(_net(), bucket_cap_mb=0.0002)
    tk.ddp.register(model, tk.EF14(tk.TopK(ratio=0.3)), min_compression_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = 2 if rank == 0 else 5  # rank 0 joins after two; rank 1's fourth is NaN
    try:
        with model.join():
            for t in range(batches):
                opt.zero_grad()
                loss = model(_grad_data(rank, t, (6, 5))).pow(2).mean()
                (loss * float("nan") if t == 3 and rank == 1 else loss).backward()
                opt.step()
        out["join"] = "finished"
    except tk.NonFiniteGradientError as exc:
        out["join"] = str(exc)
    return out


# ------------------------------------------------------------------------------------ configured differently
def _raises(fn) -> str:
    try:
        fn()
        return "ran"
    except ValueError as exc:
        return str(exc)


def _wrapper_step(rank, params, opt, t=0):
    opt.zero_grad()
    for p in params:
        p.grad = _grad_data(rank, t, p.shape)
    opt.step()


def _misconfigured(rank):
    """Each fault the way it was found; every rank raises (ValueError naming the difference), none hangs or drifts."""
    out = {}
    p = torch.nn.Parameter(torch.zeros(6))
    k = 2 if rank == 1 else 3
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(k)))
    out["wrapper"] = _raises(lambda: _wrapper_step(rank, [p], opt))

    # a different learning rate on one rank
    p = torch.nn.Parameter(torch.zeros(6))
    lr = 0.2 if rank == 1 else 0.1
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=lr, momentum=0.9, feedback=tk.EF14(tk.TopK(2)))
    out["lr"] = _raises(lambda: _wrapper_step(rank, [p], opt))

    # same-shaped parameters in another order on one rank
    a, b = torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.ones(6))
    order = [b, a] if rank == 2 else [a, b]
    opt = tk.CompressedOptimizer(order, torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(2)))
    out["order"] = _raises(lambda: _wrapper_step(rank, order, opt))

    # a scheduler stepped differently on one rank, after the first step: the per-step check, nothing changed
    p = torch.nn.Parameter(torch.zeros(6))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(2)))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5 if rank == 0 else 1.0)
    _wrapper_step(rank, [p], opt, 0)
    sched.step()
    before = (p.detach().clone(), opt.round.step, {k: v.clone() for k, v in opt.feedback_state().items()})
    out["schedule"] = _raises(lambda: _wrapper_step(rank, [p], opt, 1))
    after = (p.detach(), opt.round.step, opt.feedback_state())
    out["schedule_untouched"] = (
        torch.equal(before[0], after[0])
        and before[1] == after[1]
        and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    )

    # the hook: a different method, start_iter, min_compression_rate, nonfinite on one rank; each raises at the forward
    for label, kwargs in {
        "hook": {"feedback": tk.EF14(tk.TopK(ratio=0.3)) if rank == 2 else tk.EF21(tk.TopK(ratio=0.3))},
        "start_iter": {"start_iter": 2 if rank == 1 else 0},
        "min_compression_rate": {"min_compression_rate": 0.0 if rank == 0 else 2.0},
        "nonfinite": {"grad_scaler": torch.amp.GradScaler("cpu")} if rank == 1 else {},
    }.items():
        model = DDP(_net())
        tk.ddp.register(model, kwargs.pop("feedback", tk.EF21(tk.TopK(ratio=0.3))), **kwargs)
        out[label] = _raises(lambda m=model: m(torch.randn(2, 5)).sum().backward())

    # the hook over a float64 model on one rank: Gloo aborted the process (as with plain DDP)
    net = _net().double() if rank == 1 else _net()
    model = DDP(net)
    tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.3)))
    x = torch.randn(2, 5, dtype=torch.float64 if rank == 1 else torch.float32)
    out["dtype"] = _raises(lambda: model(x).sum().backward())
    return out


def _mixed_resume(rank, path):
    """One rank restores its feedback state, another restarts the method: every rank raises at the next step."""
    out = {}
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))

    def make():
        return tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(2), init="compressed"))

    opt = make()
    for t in range(3):
        _wrapper_step(rank, [p], opt, t)
    sd = opt.state_dict()
    opt = make()
    opt.load_state_dict(tk.checkpoint.without_feedback(sd) if rank == 1 else sd)
    out["wrapper"] = _raises(lambda: _wrapper_step(rank, [p], opt, 3))

    model = DDP(_net())
    state = tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.3), init="full"), min_compression_rate=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(3):
        sgd.zero_grad()
        model(_grad_data(rank, t, (6, 5))).pow(2).mean().backward()
        sgd.step()
    saved = state.state_dict()
    model = DDP(_net())
    state = tk.ddp.register(model, tk.EF21(tk.TopK(ratio=0.3), init="full"), min_compression_rate=0)
    if rank != 1:  # rank 1 restarts the method
        state.load_state_dict(saved)
    out["hook"] = _raises(lambda: model(_grad_data(rank, 3, (6, 5))).pow(2).mean().backward())
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
        "raise_warm_up_join": _hook_raise_in_warm_up_and_join(rank),
        "misconfigured": _misconfigured(rank),
        "mixed_resume": _mixed_resume(rank, path),
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


def test_a_non_finite_gradient_raises_at_the_next_forward_and_the_run_goes_on_after_a_reload(results):
    for r in results:
        h = r["raise"]
        assert not h["grad_nan_0"] and not h["grad_nan_1"] and h["grad_nan_2"]  # NaN everywhere at once
        assert h["raised_at"] == 3 and "non-finite gradient" in h["error"] and "grad_scaler=scaler" in h["error"]
        assert h["resumed_equals_clean"]  # caught, reloaded, trained on in the same process: DDP still works


def test_ranks_configured_differently_all_raise(results):
    for r in results:
        m = r["misconfigured"]
        assert "ranks are configured differently" in m["wrapper"] and "method['compressor']['k']" in m["wrapper"]
        assert "ranks are configured differently" in m["hook"] and "method" in m["hook"]
        assert "options[0]['lr'] 0.2" in m["lr"] or "options[0]['lr'] 0.1" in m["lr"]
        assert "parameters[0][0]" in m["order"] and "Replicas must start identical" in m["order"]
        assert "parameter group 0's hyper-parameters" in m["schedule"] and "step 1" in m["schedule"]
        assert m["schedule_untouched"]
        for setting in ("start_iter", "min_compression_rate", "nonfinite"):
            assert "ranks are configured differently" in m[setting] and setting in m[setting], m[setting]
        assert "parameters[2][0]" in m["dtype"] and "torch.float64" in m["dtype"], m["dtype"]


def test_a_mixed_resume_raises_on_every_rank_saying_what_to_do(results):
    for r in results:
        for front_end in ("wrapper", "hook"):
            msg = r["mixed_resume"][front_end]
            assert "ranks are configured differently" in msg and "feedback" in msg, msg
            assert "restore every rank's own state" in msg


def test_a_nan_in_the_warm_up_or_inside_join_raises_on_every_rank(results):
    for r in results:
        out = r["raise_warm_up_join"]
        assert out.get("warm_up_raised_at") == 1, out
        assert "non-finite gradient" in out["join"], out  # every rank, the joined ones too, and none waits
