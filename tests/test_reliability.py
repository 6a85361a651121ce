"""Faults and contracts a user hits on one process: resume with every LR scheduler, atomic loads and steps,
tampered checkpoints, pickling, LBFGS, complex and mixed-dtype parameters, clear errors for bad input."""

import copy
import io
import pickle

import pytest
import torch

import torchkit as tk
import torchkit.checkpoint

SCHEDULERS = {
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t),
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


def _model(dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 6, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)) for _ in range(n)]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _opt(model, feedback=None, cls=torch.optim.AdamW, **kw):
    return tk.CompressedOptimizer(
        model.parameters(), cls, lr=kw.pop("lr", 0.01), feedback=feedback or tk.EF21(tk.TopK(ratio=0.3)), **kw
    )


def _train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a constant metric: the plateau rule cuts the rate every step
        elif sched is not None:
            sched.step()


def _roundtrip(obj):
    blob = io.BytesIO()
    torch.save(obj, blob)
    blob.seek(0)
    return torch.load(blob, weights_only=False)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_resume_with_a_scheduler_is_bit_exact(name):
    batches = _batches(12)
    ref, ref_opt = _model(), None
    ref_opt = _opt(ref)
    _train(ref, ref_opt, batches, SCHEDULERS[name](ref_opt))

    model = _model()
    opt = _opt(model)
    sched = SCHEDULERS[name](opt)
    _train(model, opt, batches[:6], sched)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model2 = _model(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = _opt(model2)
    sched2 = SCHEDULERS[name](opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups is opt2.inner.param_groups and opt2.state is opt2.inner.state
    _train(model2, opt2, batches[6:], sched2)
    assert torch.equal(_flat(model2), _flat(ref))
    assert opt2.inner.param_groups[0]["lr"] == ref_opt.inner.param_groups[0]["lr"]


def test_failed_loads_change_nothing():
    model = _model()
    opt = _opt(model, tk.EControl(tk.TopK(ratio=0.3), eta=0.2))
    _train(model, opt, _batches(3))
    good = opt.state_dict()
    before = {k: v.clone() for k, v in opt.feedback_state().items()}
    lr_before = opt.param_groups[0]["lr"]

    def tampered(edit):
        sd = copy.deepcopy(good)
        edit(sd["torchkit"])
        return sd

    name = next(iter(good["torchkit"]["params"]))
    cases = {
        "one element": (lambda t: t["params"][name].update(error=torch.zeros(1)), "vectors of different lengths"),
        "nan": (lambda t: t["params"][name]["shift"].fill_(float("nan")), "non-finite values"),
        "negative step": (lambda t: t.update(step=-3), "step must be an int >= 0"),
        "missing key": (lambda t: t["params"][name].pop("error"), r"lacks \['error', 'shift'\]"),
        "no params": (lambda t: t.pop("params"), "no 'params' mapping"),
        "other names": (lambda t: t["params"].update(extra=t["params"].pop(name)), "names do not match"),
        "integer state": (lambda t: t["params"][name].update(error=torch.zeros(5, dtype=torch.long)), "floating"),
        "newer format": (lambda t: t.update(format_version=99), "newer than this torchkit"),
        "rows": (  # the simulator's [rows, d] layout passed the checks, then failed half-loaded
            lambda t: t["params"][name].update({n: v.expand(2, -1).clone() for n, v in t["params"][name].items()}),
            r"has shape \(2, \d+\), not one vector",
        ),
    }
    for label, (edit, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            opt.load_state_dict(tampered(edit))
        for k, v in opt.feedback_state().items():
            assert torch.equal(v, before[k]), label
        assert opt.param_groups[0]["lr"] == lr_before
    # the inner optimizer's part fails after the feedback state was checked: still nothing changes
    broken = copy.deepcopy(good)
    broken["param_groups"] = broken["param_groups"] + broken["param_groups"]
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    for k, v in opt.feedback_state().items():
        assert torch.equal(v, before[k])
    for counter in (-5, "x", True):
        sd = copy.deepcopy(good)
        sd["torchkit"]["skipped_steps"] = counter
        with pytest.raises(ValueError, match="skipped_steps must be an int >= 0"):
            opt.load_state_dict(sd)
    local = tk.LocalSGD(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EControl(tk.TopK(ratio=0.3), eta=0.2),
                        sync_every=2)  # fmt: skip
    with pytest.raises(ValueError, match="a LocalSGD state_dict, not a CompressedOptimizer's"):
        opt.load_state_dict(local.state_dict())  # its error state is of pseudo-gradients
    for k, v in opt.feedback_state().items():
        assert torch.equal(v, before[k])


def test_a_learning_rate_that_is_not_finite_is_named_not_taken_for_ranks_that_differ():
    """A NaN learning rate (a schedule that divided by zero) compared unequal to itself in the ranks' agreement,
    and a single process was told its ranks were configured differently."""
    model = _model()
    opt = _opt(model, tk.EF14(tk.TopK(ratio=0.3)))
    _train(model, opt, _batches(1))
    params = _flat(model).clone()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"parameter group 0 has a hyper-parameter that is NaN \(here: lr\)"):
        _train(model, opt, _batches(1))
    assert torch.equal(_flat(model), params)
    opt.param_groups[0]["lr"] = 0.1
    opt.param_groups[0]["max_norm"] = float("inf")  # "no limit": a value like any other (the review's case)
    _train(model, opt, _batches(1))
    assert not torch.equal(_flat(model), params)


@pytest.mark.parametrize("front", ["wrapper", "local_sgd"])
def test_parameters_without_elements_step_as_torch_steps_them(front):
    """A group whose parameters hold no element (``torch.empty(0)`` placeholders) crashed the step in ``aminmax``
    (found by an audit; torch's SGD steps it): they have nothing to send and are left out of the rounds; the other
    parameters train as without them, and a checkpoint round trip works."""
    torch.manual_seed(0)
    w, empty, wide = (
        torch.nn.Parameter(torch.randn(6)),
        torch.nn.Parameter(torch.empty(0)),
        torch.nn.Parameter(torch.empty(3, 0)),
    )
    alone = torch.nn.Parameter(w.detach().clone())

    def make(groups):
        if front == "wrapper":
            return tk.CompressedOptimizer(groups, torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(2)))
        return tk.LocalSGD(groups, torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(2)), sync_every=2)

    opt, ref = make([{"params": [w, empty]}, {"params": [wide]}]), make([alone])
    for t in range(4):
        w.grad, alone.grad = torch.full((6,), float(t + 1)), torch.full((6,), float(t + 1))
        empty.grad, wide.grad = torch.empty(0), torch.empty(3, 0)
        opt.step()
        ref.step()
    assert torch.equal(w, alone)
    again = make([{"params": [w, empty]}, {"params": [wide]}])
    again.load_state_dict(opt.state_dict())
    assert sorted(opt.state_dict()["torchkit"]["params"]) == ["0.0"]


def test_step_is_atomic_across_parameter_groups():
    model = _model()
    opt = tk.CompressedOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
        torch.optim.SGD,
        lr=0.1,
        feedback=tk.EF14(tk.TopK(ratio=0.3)),
    )
    _train(model, opt, _batches(2))
    before = [{k: v.clone() for k, v in opt.feedback_state(g).items()} for g in (0, 1)]
    params_before = _flat(model).clone()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(_batches(1)[0][0]), _batches(1)[0][1]).backward()
    model[2].bias.grad = model[2].bias.grad.to_sparse()  # group 1 fails validation
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step()
    for g in (0, 1):
        for k, v in opt.feedback_state(g).items():
            assert torch.equal(v, before[g][k])
    assert torch.equal(_flat(model), params_before)


def test_pickle_and_deepcopy_round_trip():
    batches = _batches(8)
    model = _model()
    opt = _opt(model, tk.EF14(tk.TopK(ratio=0.3)))
    _train(model, opt, batches[:3])
    model_c, opt_c = copy.deepcopy((model, opt))
    model_p, opt_p = pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), (model_c, opt_c), (model_p, opt_p)):
        _train(m, o, batches[3:])
    assert torch.equal(_flat(model_c), _flat(model)) and torch.equal(_flat(model_p), _flat(model))
    assert opt_c.inner is not opt.inner and opt_c.param_groups[0]["params"][0] is next(model_c.parameters())


def test_optimizers_that_need_a_closure_or_sparse_gradients_are_refused():
    with pytest.raises(TypeError, match="LBFGS.step needs a closure"):
        _opt(_model(), cls=torch.optim.LBFGS)
    with pytest.raises(TypeError, match="optimizer_class SparseAdam steps on sparse gradients"):
        _opt(_model(), cls=torch.optim.SparseAdam)  # it was refused at the first step, by the parameter's name
    with pytest.raises(TypeError, match="optimizer_class SparseAdam steps on sparse gradients"):
        tk.LocalSGD(_model().parameters(), torch.optim.SparseAdam, feedback=tk.EF14(tk.TopK(1)), sync_every=2)


def test_complex_parameters_are_compressed_as_real_pairs():
    """A complex parameter equals the real parameter holding its (re, im) pairs, step for step."""
    torch.manual_seed(3)
    target = torch.randn(6, dtype=torch.complex64)
    zc = torch.nn.Parameter(torch.zeros(6, dtype=torch.complex64))
    zr = torch.nn.Parameter(torch.zeros(6, 2))
    opt_c = tk.CompressedOptimizer([zc], torch.optim.SGD, lr=0.2, feedback=tk.EF21(tk.TopK(3)))
    opt_r = tk.CompressedOptimizer([zr], torch.optim.SGD, lr=0.2, feedback=tk.EF21(tk.TopK(3)))
    for _ in range(5):
        for o, loss in (
            (opt_c, lambda: (zc - target).abs().pow(2).sum()),
            (opt_r, lambda: (zr - torch.view_as_real(target)).pow(2).sum()),
        ):
            o.zero_grad()
            loss().backward()
            o.step()
    # the two losses' gradients round differently in the last bit; dropping the imaginary part would be far off
    torch.testing.assert_close(torch.view_as_real(zc.detach()), zr.detach(), rtol=1e-6, atol=1e-7)
    assert torch.view_as_real(zc.detach())[:, 1].abs().sum() > 0.5


def test_float64_parameter_in_a_float32_group_keeps_its_precision():
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    alone = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    grad = torch.tensor([1e-12, 1.0 + 1e-12, -3.0], dtype=torch.float64)
    mixed = tk.CompressedOptimizer([a, b], torch.optim.SGD, lr=1.0, feedback=tk.EF21(tk.TopK(ratio=1.0)))
    single = tk.CompressedOptimizer([alone], torch.optim.SGD, lr=1.0, feedback=tk.EF21(tk.TopK(ratio=1.0)))
    a.grad, b.grad, alone.grad = torch.ones(4), grad.clone(), grad.clone()
    mixed.step()
    single.step()
    assert torch.equal(b.detach(), alone.detach())
    assert b.detach()[1] != -1.0  # an fp32 round trip would have lost the 1e-12


def test_parameter_frozen_after_the_first_step():
    model = _model()
    opt = _opt(model, tk.EF14(tk.TopK(ratio=0.3)), cls=torch.optim.SGD, lr=0.1)
    _train(model, opt, _batches(2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    _train(model, opt, _batches(2))
    assert torch.equal(model[0].weight.detach(), frozen)
    model[0].weight.requires_grad_(True)  # and back: its state was kept
    _train(model, opt, _batches(1))
    assert not torch.equal(model[0].weight.detach(), frozen)


class _Freezing:
    """Training where the first layer's weight trains at step i when ``trains(i)``: a run over some steps, and the
    uninterrupted run's parameters."""

    def __init__(self, steps: int, trains):
        self.batches, self.trains, self.steps = _batches(steps), trains, steps

    def __call__(self, model, opt, steps):
        for i in steps:
            model[0].weight.requires_grad_(self.trains(i))
            _train(model, opt, self.batches[i : i + 1])

    @staticmethod
    def fresh():
        model = _model()
        return model, _opt(model, tk.EF14(tk.TopK(ratio=0.2)), cls=torch.optim.SGD, lr=0.1)

    def straight(self):
        model, opt = self.fresh()
        self(model, opt, range(self.steps))
        return _flat(model)


@pytest.mark.parametrize("via", ["state_dict", "dcp"])
def test_a_checkpoint_taken_while_a_parameter_is_frozen_resumes_bit_exactly(tmp_path, via):
    """Gradual freezing: a parameter trains, is frozen, the run is saved, resumed in a fresh model and optimizer
    (frozen alike) and unfrozen: its error state was saved and loaded (state_dict; DCP through load_dcp, whose
    template names it from the checkpoint's metadata), so the run is the uninterrupted one, bit for bit."""
    import torch.distributed.checkpoint as dcp

    run = _Freezing(8, lambda i: not 2 <= i < 5)  # frozen for steps 2-4
    fresh = _Freezing.fresh
    straight, (model, opt) = run.straight(), fresh()
    run(model, opt, range(3))
    assert opt.feedback_state_dict()["params"]["0.0"]["error"].abs().sum() > 0  # the frozen one holds error
    model2, opt2 = fresh()
    model2[0].weight.requires_grad_(False)
    if via == "state_dict":
        saved = torch.load(_saved(tmp_path, {"model": model.state_dict(), "opt": opt.state_dict()}), weights_only=True)
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
    else:
        dcp.save({"model": model.state_dict(), "fb": opt.feedback_stateful()}, checkpoint_id=tmp_path / "ck")
        sd = {"model": model2.state_dict(), "fb": opt2.feedback_stateful()}
        torchkit.checkpoint.load_dcp(sd, checkpoint_id=tmp_path / "ck")
        model2.load_state_dict(sd["model"])
        opt2.inner.load_state_dict(opt.inner.state_dict())
    run(model2, opt2, range(3, 8))
    assert torch.equal(_flat(model2), straight)


def test_a_parameter_frozen_from_the_start_can_train_after_a_resume(tmp_path):
    """A backbone frozen from the start (no state: it never trained), saved, and unfrozen in the resumed run: the
    checkpoint names it as frozen without state, so the load starts it fresh, as the uninterrupted run does."""
    run = _Freezing(6, lambda i: i >= 3)  # unfrozen from step 3
    fresh = _Freezing.fresh
    straight, (model, opt) = run.straight(), fresh()
    run(model, opt, range(3))
    saved = torch.load(_saved(tmp_path, {"model": model.state_dict(), "opt": opt.state_dict()}), weights_only=True)
    assert saved["opt"]["torchkit"]["frozen"] == ["0.0"] and "0.0" not in saved["opt"]["torchkit"]["params"]
    model2, opt2 = fresh()  # trainable when loaded
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    run(model2, opt2, range(3, 6))
    assert torch.equal(_flat(model2), straight)


def _saved(tmp_path, obj) -> str:
    path = str(tmp_path / "ck.pt")
    torch.save(obj, path)
    return path


def test_state_dict_hooks_run_as_torch_optims_do():
    """The four state_dict hooks of torch.optim, registered on the wrapper: each runs once, a post hook's
    returned dict is what state_dict returns, and a load pre hook's replacement is what loads."""
    model = _model()
    opt = _opt(model, tk.EF14(tk.TopK(ratio=0.3)), cls=torch.optim.SGD, lr=0.1)
    _train(model, opt, _batches(1))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "mine": 1})
    loaded = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: loaded.append(sd.pop("mine")) or {**sd, "torchkit": None})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    sd = opt.state_dict()
    assert sd["mine"] == 1 and calls == ["pre"] and opt.feedback_state_dict()["step"] == 1
    opt.load_state_dict(sd)  # the pre hook's replacement loads: without_feedback's, a restart
    assert loaded == [1] and calls == ["pre", "post"] and opt.feedback_state_dict()["step"] == 0


def test_global_step_hooks_see_one_step_per_step():
    """torch.optim's global step hooks (profilers, step counters) fire once per wrapper step, not once more for the
    inner optimizer; a hook set on the inner optimizer itself still runs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__))),
    ]
    try:
        model = _model()
        opt = _opt(model, tk.EF14(tk.TopK(ratio=0.3)), cls=torch.optim.SGD, lr=0.1)
        _train(model, opt, _batches(2))
        assert seen == [("pre", "CompressedOptimizer"), ("post", "CompressedOptimizer")] * 2
        mine = []
        opt.inner.register_step_post_hook(lambda o, a, k: mine.append(1))
        _train(model, opt, _batches(1))
        assert mine == [1]
    finally:
        for h in handles:
            h.remove()


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="x must be a vector"):
        tk.TopK(1).compress(torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least one entry"):
        tk.ScaledSign().compress(torch.empty(0))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        tk.RandK(1).compress(torch.arange(4))
    with pytest.raises(ValueError, match="d must be >= 1, got 0"):
        tk.TopK(ratio=0.5).alpha(0)
    with pytest.raises(ValueError, match="d must be >= 1, got 0"):
        tk.ScaledSign().alpha(0)
    with pytest.raises(ValueError, match="smoothness constants must be positive and finite"):
        tk.EF21W.from_smoothness(tk.TopK(1), [0.0, 0.0])
    with pytest.raises(TypeError, match="approx must be a bool"):
        tk.TopK(1, approx="no")
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None, got int"):
        tk.CompressedOptimizer(_model().parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(1)),
                               process_group=1)  # fmt: skip
    with pytest.raises(TypeError, match="node_group must be a torch.distributed.ProcessGroup"):
        tk.ddp.CompressionState(tk.EF14(tk.TopK(1)), node_group="node")
    with pytest.raises(TypeError, match=r"betas must be a pair \(beta1, beta2\), got 0.9"):
        tk.LocalAdam(tk.EF14(tk.TopK(1)), betas=0.9)
    with pytest.raises(TypeError, match="unbiased must be a bool, got str"):
        tk.RandK(3, unbiased="False")
    with pytest.raises(TypeError, match="nesterov must be a bool, got str"):
        tk.LocalMomentum(tk.EF14(tk.TopK(1)), 0.9, nesterov="no")
    with pytest.raises(ValueError, match="eps must be positive and finite, got inf"):
        tk.LocalAdam(tk.EF14(tk.TopK(1)), eps=float("inf"))
    with pytest.raises(TypeError, match="eps must be a float, got str"):
        tk.LocalAdam(tk.EF14(tk.TopK(1)), eps="x")
    for weights in (0.5, torch.ones(2, 2) / 4):
        with pytest.raises(TypeError, match="weights must be a sequence of floats"):
            tk.EF21W(tk.TopK(1), weights)
    with pytest.raises(TypeError, match="beta2 must be a float, got str"):
        tk.recommended("ef14", tk.TopK(ratio=0.1), torch.optim.AdamW, beta2="x")
    with pytest.raises(ValueError, match="beta2 must be in"):
        tk.recommended("ef14", tk.TopK(ratio=0.1), torch.optim.AdamW, beta2=1.0)
    with pytest.raises(TypeError, match="needs a DistributedDataParallel model"):
        tk.ddp.register(torch.nn.Linear(2, 2), tk.EF21(tk.TopK(1)))
    state = tk.ddp.CompressionState(tk.EF21(tk.TopK(1)))
    first = torch.nn.Linear(2, 2)
    state.bind(first).bind(first)  # binding the same model again is fine
    with pytest.raises(ValueError, match="already registered on another model"):
        state.bind(torch.nn.Linear(2, 2))
    del first  # the state holds its model weakly: once that model is gone, it may serve another
    state.bind(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="complex parameters are not supported by the DDP hook"):
        tk.ddp.CompressionState(tk.EF21(tk.TopK(1))).bind(torch.nn.Linear(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="sparse gradients are not supported by the DDP hook"):
        tk.ddp.CompressionState(tk.EF21(tk.TopK(1))).bind(torch.nn.Embedding(5, 2, sparse=True))
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        tk.ddp.CompressionState(tk.EF21(tk.TopK(1)), grad_scaler=object())
    with pytest.raises(ValueError, match="nonfinite must be 'raise', 'skip' or 'sanitize'"):
        tk.ddp.CompressionState(tk.EF21(tk.TopK(1)), nonfinite="ignore")


def test_fp16_wire_keeps_the_overflow_in_the_state():
    """Finite values beyond fp16's range go out as +-65504; the rest stays in the error, which stays finite."""
    fb = tk.EF14(tk.TopK(2))
    state = fb.init_state(5)
    state["error"] += torch.tensor([7e4, -9e4, 1.0, 2.0, 3.0])
    msg = fb.worker_step(state, torch.zeros(5), 1)
    sent = fb.round_values_(state, msg, torch.float16)
    assert sent.values.dtype == torch.float16 and torch.isfinite(sent.values).all()
    assert sorted(sent.values[0].float().tolist()) == [-65504.0, 65504.0]
    assert torch.isfinite(state["error"]).all()
    assert state["error"][:2].tolist() == [7e4 - 65504.0, -9e4 + 65504.0]


def test_a_state_dict_of_state_not_yet_placed_is_a_copy():
    """Loaded state waits, unplaced, for its block (the hook until its first bucket); its state_dict must not hand
    out the live tensors: DCP loads into the template in place, and a rejected checkpoint would have changed the
    state (issue 20 review)."""
    from torchkit.state import RoundState

    fb = tk.EF14(tk.TopK(ratio=0.5))
    rs = RoundState(fb)
    rs.apply(rs.check({"method": fb.config(), "step": 3, "params": {"w": {"error": torch.ones(4)}}}))
    sd = rs.state_dict()
    sd["params"]["w"]["error"].fill_(float("nan"))
    assert torch.equal(rs.state_dict()["params"]["w"]["error"], torch.ones(4))


def test_a_method_set_on_a_front_end_after_it_was_built_is_refused(tmp_path):
    """``opt.feedback = ...`` / ``state.feedback = ...`` after construction: the state is laid out for the first
    method, so the hook raised a KeyError from inside the backward (and, set on one rank only, aborted the others
    in a mismatched collective); every front end now refuses it with ValueError before anything changes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _batches(1)[0]
    model = _model()
    for front in (_opt(model), tk.LocalSGD(model.parameters(), torch.optim.SGD, feedback=tk.EF14(tk.TopK(2)),
                                           sync_every=2, lr=0.1)):  # fmt: skip
        front.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        front.step()
        front.feedback = tk.EF14(tk.TopK(ratio=0.5))
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=f"the {front.kind}'s feedback was replaced after it was built"):
            front.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(_model())
        state = tk.ddp.register(ddp, tk.EF21(tk.TopK(ratio=0.3)), min_compression_rate=0)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        state.feedback = tk.EF14(tk.TopK(ratio=0.3))
        with pytest.raises(ValueError, match="the CompressionState's feedback was replaced after it was built"):
            ddp(x)  # at the forward, before DDP prepares its backward
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("set_to_none", [False, True])
def test_channels_last_parameters_keep_their_gradient_layout(set_to_none):
    """A channels_last conv weight's gradient keeps the parameter's strides after a step, as autograd lays it out:
    with a contiguous view of the flat buffer torch warned ("grad and param do not obey the gradient layout
    contract") at the next backward with ``zero_grad(set_to_none=False)``, and ``clip_grad_norm_`` summed in another
    order than torch's (3 of 10 steps' norms differed). EF14 with Identity equals torch's SGD bit for bit, norms
    included."""
    import warnings

    def run(wrapped):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
        m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if wrapped:
            opt = tk.CompressedOptimizer(m.parameters(), torch.optim.SGD, feedback=tk.EF14(tk.Identity()), lr=0.1)
        g, norms = torch.Generator().manual_seed(1), []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the layout contract's warning fails the test
            for _ in range(6):
                opt.zero_grad(set_to_none=set_to_none)
                x = torch.randn(2, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
                m(x).square().mean().backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)))
                opt.step()
        return [p.detach() for p in m.parameters()], norms, [p.grad.stride() for p in m.parameters()]

    (mine, my_norms, my_strides), (want, norms, strides) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(mine, want)) and my_norms == norms and my_strides == strides


def test_the_hook_takes_a_disabled_grad_scaler_as_none():
    """``GradScaler(enabled=use_amp)`` with ``use_amp=False``, the common idiom: the hook refused it ("nonfinite='skip'
    needs an enabled GradScaler", a policy the user never chose), where plain DDP and the wrapper take it."""
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert tk.ddp.CompressionState(tk.EF14(tk.TopK(1)), grad_scaler=off).nonfinite == "raise"
    on = torch.amp.GradScaler("cpu")
    assert tk.ddp.CompressionState(tk.EF14(tk.TopK(1)), grad_scaler=on).nonfinite == "skip"
    with pytest.raises(ValueError, match="nonfinite='skip' needs an enabled GradScaler"):
        tk.ddp.CompressionState(tk.EF14(tk.TopK(1)), grad_scaler=off, nonfinite="skip")


def test_the_feedback_state_follows_a_model_converted_to_another_dtype():
    """After ``model.double()`` the state moves to a block of the new dtype, by parameter name; the old block stayed
    behind (memory held, and ``feedback_state(0)`` showed its frozen values)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(6, 3)
    opt = tk.CompressedOptimizer(m.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.2)))
    for dtype in (torch.float32, torch.float32, torch.float64, torch.float64):
        if dtype == torch.float64:
            m.double()
        opt.zero_grad()
        m(torch.randn(5, 6, dtype=dtype)).square().sum().backward()
        opt.step()
    assert [k[1] for k in opt.round.blocks] == ["torch.float64"]
    live = opt.state_dict()["torchkit"]["params"]
    shown = opt.feedback_state(0)["error"]
    assert shown.dtype == torch.float64 and torch.equal(shown, torch.cat([live[n]["error"] for n in ("0.0", "0.1")]))


def test_the_repr_names_the_inner_optimizer_and_the_method():
    """torch's listing of the groups, headed by what runs: it said only 'CompressedOptimizer ('."""
    opt = _opt(_model(), tk.EF14(tk.TopK(ratio=0.5)))
    text = repr(opt)
    assert text.startswith("CompressedOptimizer(AdamW, feedback=EF14(TopK(ratio=0.5))) (\nParameter Group 0\n")
    assert "    lr: 0.01" in text
