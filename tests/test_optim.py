"""CompressedOptimizer alone: torch conventions, checkpoint resume, AMP, bad input."""

import io

import pytest
import torch

import torchkit as tk
from tests.methods import factories
from torchkit.sim import simulate

FEEDBACKS = {
    **factories(lambda: tk.TopK(ratio=0.2)),
    "econtrol_sign": lambda: tk.EControl(tk.ScaledSign(), eta=0.2),
    "ef21_randk_tensor": lambda: tk.EF21(tk.RandK(ratio=0.3, seed=2), granularity="tensor"),
}


def _model(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 6, generator=g, dtype=dtype), torch.randn(8, 3, generator=g, dtype=dtype)) for _ in range(n)
    ]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", sorted(FEEDBACKS))
def test_checkpoint_resume_is_bit_exact(name):
    batches = _batches(10)
    ref_model = _model()
    ref_opt = tk.CompressedOptimizer(ref_model.parameters(), torch.optim.AdamW, lr=0.01, feedback=FEEDBACKS[name]())
    _train(ref_model, ref_opt, batches)

    model = _model()
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01, feedback=FEEDBACKS[name]())
    _train(model, opt, batches[:5])
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = tk.CompressedOptimizer(model2.parameters(), torch.optim.AdamW, lr=0.01, feedback=FEEDBACKS[name]())
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, batches[5:])
    assert torch.equal(_params(model2), _params(ref_model))
    for k, v in ref_opt.feedback_state().items():
        assert torch.equal(opt2.feedback_state()[k], v)


def test_single_worker_optimizer_equals_simulate():
    """SGD on the estimate is the simulator's server step with one worker."""
    torch.manual_seed(0)
    d = 23
    target = torch.randn(d, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    fb = tk.EControl(tk.TopK(4), eta=0.3)
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.3, feedback=fb)
    for _ in range(12):
        opt.zero_grad()
        (0.5 * ((p - target) ** 2 * torch.arange(1, d + 1)).sum()).backward()
        opt.step()
    res = simulate(
        fb,
        lambda x: ((x - target) * torch.arange(1, d + 1))[None],
        torch.zeros(d, dtype=torch.float64),
        n_workers=1,
        steps=12,
        lr=0.3,
    )
    assert torch.equal(p.detach(), res.x)


def test_lr_scheduler_closure_and_param_groups():
    model = _model()
    opt = tk.CompressedOptimizer(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],
        torch.optim.SGD,
        lr=0.01,
        momentum=0.9,
        feedback=tk.EF21(tk.TopK(ratio=0.5)),
    )
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert "momentum_buffer" in opt.state[model[0].weight]
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.inner.param_groups[1]["lr"] == pytest.approx(0.005)
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra]})
    assert len(opt.inner.param_groups) == 3 and opt.inner.param_groups[2]["momentum"] == 0.9


def test_parameters_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(7))
    opt = tk.CompressedOptimizer(
        [a, b], torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.5), granularity="tensor")
    )
    before = b.detach().clone()
    (a**2).sum().backward()
    opt.step()
    assert b.grad is None and torch.equal(b.detach(), before)
    err = opt.feedback_state()["error"]
    assert torch.count_nonzero(err[5:]) == 0 and torch.count_nonzero(err[:5]) == 2  # 3 of 5 sent
    opt.zero_grad()
    (b**2).sum().backward()
    opt.step()
    assert torch.count_nonzero(opt.feedback_state()["error"][:5]) == 2  # a's residual kept


def test_bf16_params_keep_fp32_state_across_reload():
    model = _model(torch.bfloat16)
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.05, feedback=tk.EF14(tk.TopK(ratio=0.1)))
    _train(model, opt, _batches(3, torch.bfloat16))
    state = opt.feedback_state()["error"]
    assert state.dtype == torch.float32
    sd = opt.state_dict()
    model2 = _model(torch.bfloat16)
    opt2 = tk.CompressedOptimizer(model2.parameters(), torch.optim.SGD, lr=0.05, feedback=tk.EF14(tk.TopK(ratio=0.1)))
    opt2.load_state_dict(sd)
    assert opt2.feedback_state()["error"].dtype == torch.float32
    assert torch.equal(opt2.feedback_state()["error"], state)
    # the fp32 residual holds information bf16 cannot represent
    assert not torch.equal(state, state.bfloat16().float())


def test_grad_scaler_unscales_and_skips_on_inf():
    model = _model()
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(ratio=0.3)))
    ref_model = _model()
    ref = tk.CompressedOptimizer(ref_model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(ratio=0.3)))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in _batches(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()
    torch.testing.assert_close(_params(model), _params(ref_model), rtol=1e-6, atol=1e-7)
    before = {k: v.clone() for k, v in opt.feedback_state().items()}
    params_before = _params(model).clone()
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.skipped_steps == 1 and scaler.get_scale() == 512.0
    assert torch.equal(_params(model), params_before)
    for k, v in opt.feedback_state().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_leaves_state_untouched(policy):
    model = _model()
    opt = tk.CompressedOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, nonfinite=policy, feedback=tk.EControl(tk.TopK(ratio=0.3))
    )
    _train(model, opt, _batches(2))
    before = {k: v.clone() for k, v in opt.feedback_state().items()}
    params_before = _params(model).clone()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(_batches(1)[0][0]), _batches(1)[0][1]).backward()
    model[0].weight.grad[0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(ValueError, match="non-finite gradient"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    assert torch.equal(_params(model), params_before)
    for k, v in opt.feedback_state().items():
        assert torch.equal(v, before[k])


def test_bad_input_and_mismatched_state_dict():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match="feedback must be a torchkit feedback method"):
        tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.TopK(1))
    with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer subclass"):
        tk.CompressedOptimizer([p], "sgd", lr=0.1, feedback=tk.EF21(tk.TopK(1)))
    with pytest.raises(ValueError, match="nonfinite must be"):
        tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, nonfinite="ignore", feedback=tk.EF21(tk.TopK(1)))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(1)))
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step()
    p.grad = torch.randn(4)
    opt.step()
    sd = opt.state_dict()
    other = tk.CompressedOptimizer(
        [torch.nn.Parameter(torch.randn(5))], torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(1))
    )
    with pytest.raises(ValueError, match="checkpoint state 'shift' of parameter '0.0' has 4 elements, the parameter 5"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="saved with world_size=3, this run has world_size=1"):
        opt.load_state_dict({**sd, "torchkit": {**sd["torchkit"], "world_size": 3}})
    with pytest.raises(ValueError, match=r"saved with feedback EF21\(compressor="):
        tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(1))).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a CompressedOptimizer or torch.optim state_dict"):
        opt.load_state_dict({"weights": 1})
    with pytest.warns(UserWarning, match="plain optimizer state_dict: it holds no error-feedback state"):
        opt.load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())
    assert opt.round.step == 0 and opt.feedback_state() == {}


def test_compiled_model_with_the_wrapper():
    """torch.compile(model) with CompressedOptimizer: the wrapper only reads .grad, steps run eagerly."""
    batches = _batches(3)
    eager_model, compiled_model = _model(), _model()
    compiled = torch.compile(compiled_model)
    for model, fwd in ((eager_model, eager_model), (compiled_model, compiled)):
        opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF21(tk.TopK(ratio=0.2)))
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(fwd(x), y).backward()
            opt.step()
    torch.testing.assert_close(_params(compiled_model), _params(eager_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ef14", "ef21", "econtrol"])
def test_padded_flat_buffers_feed_the_kernels(monkeypatch, method):
    """The wrapper's flat feedback state and flat gradient own padding to a multiple of 16 elements (53 parameters:
    11 entries), so the Triton kernels (interpreter) launch over the padded length with both padded; the trajectory
    equals the reference's, and the checkpoint and a pickled copy hold 53 entries per vector as before."""
    import pickle

    pytest.importorskip("triton")
    from torchkit import ops
    from torchkit.ops._triton import ef

    if not ops._triton_usable(torch.device("cpu")):
        pytest.skip("Triton cannot run CPU tensors here (TRITON_INTERPRET=1 not set before triton was imported)")
    make = FEEDBACKS[method]
    pads = []
    real_hist = ef._Launcher.hist
    monkeypatch.setattr(ef._Launcher, "hist", lambda self, scal, p: (pads.append(p.pad), real_hist(self, scal, p)))
    runs = {}
    for impl in ("reference", "triton"):
        monkeypatch.setattr(ops, "_choose", lambda _impl, x, rows, impl=impl: "reference" if rows else impl)
        model = _model()
        opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=make())
        _train(model, opt, _batches(4))
        runs[impl] = (_params(model), opt)
    assert torch.equal(runs["reference"][0], runs["triton"][0])
    assert (True, True) in pads and all(p in ((True, True), (False, False)) for p in pads)  # candidates: unpadded
    opt = runs["triton"][1]
    for o in (opt, pickle.loads(pickle.dumps(opt))):
        (blk,) = o.round.blocks.values()
        assert blk.numel == 53 and all(ops.owns_padding(v) and v.numel() == 53 for v in blk.state.values())
        assert all(v._base.numel() == 64 for v in blk.state.values())
    ((_, buf, _),) = opt._flat._bufs.values()  # the flat gradient buffer the estimate lands in
    assert ops.owns_padding(buf) and buf.numel() == 53
    sd = opt.state_dict()["torchkit"]["params"]
    assert sum(v[next(iter(v))].numel() for v in sd.values()) == 53


def test_inner_state_of_another_shape_is_refused_at_load():
    """Issue 28: an inner-optimizer state of the wrong shape loaded silently and failed at the next step."""
    a = torch.nn.Linear(4, 3)
    opt = tk.CompressedOptimizer(a.parameters(), torch.optim.AdamW, lr=0.1, feedback=tk.EF14(tk.TopK(2)))
    a(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    b = torch.nn.Linear(3, 4)  # same number of tensors, other shapes
    other = tk.CompressedOptimizer(b.parameters(), torch.optim.AdamW, lr=0.1, feedback=tk.EF14(tk.TopK(2)))
    with pytest.raises(
        ValueError, match=r"optimizer state 'exp_avg' of parameter 0 has shape \(3, 4\), the parameter \(4, 3\)"
    ):
        other.load_state_dict(tk.checkpoint.without_feedback(sd))
    assert len(other.state) == 0 and other.round.step == 0  # nothing loaded


def test_a_parameter_listed_twice_in_a_group_is_refused():
    """torch only warns; the parameter would be stepped twice, its feedback state kept twice and its bytes sent
    twice (found by an audit). Two groups sharing one was refused already (torch's own error)."""
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    fb = tk.EF14(tk.TopK(1))
    with pytest.raises(ValueError, match=r"parameter group 0 lists a parameter twice \(positions 0 and 2\)"):
        tk.CompressedOptimizer([p, q, p], torch.optim.SGD, lr=0.1, feedback=fb)
    with pytest.raises(ValueError, match=r"parameter group 0 lists a parameter twice"):
        tk.LocalSGD(iter([p, p]), torch.optim.SGD, lr=0.1, feedback=fb, sync_every=2)
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=fb)
    with pytest.raises(ValueError, match=r"parameter group 1 lists a parameter twice \(positions 0 and 1\)"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1
