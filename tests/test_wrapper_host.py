"""CompressedOptimizer's per-step host work: the work items kept while the parameter layout is unchanged
(:class:`torchkit._wrapped.WorkCache`) give the same trajectory as building them on every step."""

import pytest
import torch

import torchkit as tk
import torchkit._wrapped as wrapped


class _Rebuilt(wrapped.WorkCache):
    """Builds the work items on every call: the reference the kept ones must equal."""

    def works(self, param_groups):
        self._key = None
        return super().works(param_groups)


def _snapshot(opt, params):
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "state": {k: v.clone() for g in range(len(opt.param_groups)) for k, v in opt.feedback_state(g).items()},
    }


def _trajectory(rebuilt: bool) -> list[dict]:
    """A run whose layout and gradients change between steps: views accumulated into, fresh tensors, missing
    gradients, a group added, a parameter replaced, frozen, and moved to another dtype, a state_dict loaded."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4), (4,), (3, 3), (5,)]]
    opt = tk.CompressedOptimizer(params, torch.optim.SGD, lr=0.1, momentum=0.9, feedback=tk.EF14(tk.TopK(ratio=0.2)))
    if rebuilt:
        opt._layout = _Rebuilt()
    gen = torch.Generator().manual_seed(1)
    out = []

    def grad(p):
        return torch.randn(p.shape, generator=gen, dtype=p.dtype)

    def step(*fresh, accumulate=(), none=()):
        for i in fresh:
            params[i].grad = grad(params[i])
        for i in accumulate:  # zero_grad(set_to_none=False) and backward: into the view the last step left
            assert params[i].grad._base is not None
            params[i].grad.mul_(0).add_(grad(params[i]))
        for i in none:
            params[i].grad = None
        opt.step()
        out.append(_snapshot(opt, params))

    step(0, 1, 2, 3)
    step(2, accumulate=(0, 1), none=(3,))
    step(3, accumulate=(0,), none=(1, 2))
    params.append(torch.nn.Parameter(torch.randn(7)))
    opt.add_param_group({"params": [params[-1]], "lr": 0.05})
    step(0, 1, 2, 3, 4)
    opt.state.pop(params[1])  # torch's state_dict below wants state of the group's parameters only
    params[1] = torch.nn.Parameter(torch.randn(4))
    opt.param_groups[0]["params"][1] = params[1]
    step(1, 4, accumulate=(0, 2, 3))
    params[2].requires_grad_(False)
    step(0, 1, 3, 4, none=(2,))
    params[3].data = params[3].data.double()
    step(0, 1, 3, 4)
    params[2].requires_grad_(True)
    opt.load_state_dict(opt.state_dict())
    step(2, 3, accumulate=(0, 1, 4))
    return out


def test_kept_work_items_follow_layout_changes():
    ref, got = _trajectory(rebuilt=True), _trajectory(rebuilt=False)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        for what in ("params", "grads"):
            for x, y in zip(a[what], b[what]):
                assert (x is None) == (y is None), (i, what)
                assert x is None or (x.dtype == y.dtype and torch.equal(x, y)), (i, what)
        assert a["state"].keys() == b["state"].keys() and all(
            torch.equal(a["state"][k], b["state"][k]) for k in a["state"]
        )


def test_work_items_are_built_once_per_layout(monkeypatch):
    calls = []
    build = wrapped._works_of
    monkeypatch.setattr(wrapped, "_works_of", lambda *a, **k: calls.append(1) or build(*a, **k))
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = tk.CompressedOptimizer(params, torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.5)))
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(calls) == 1
    params[0].requires_grad_(False)
    opt.step()
    assert len(calls) == 2


def test_kept_work_items_still_check_gradients():
    p = torch.nn.Parameter(torch.randn(4, 2))
    opt = tk.CompressedOptimizer([p], torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.5)))
    p.grad = torch.ones(4, 2)
    opt.step()
    p.grad = torch.ones(4, 2)
    p.grad.data = torch.ones(8)  # torch checks the shape when .grad is set, not afterwards
    with pytest.raises(ValueError, match=r"parameter 0\.0 has a gradient of shape \(8,\)"):
        opt.step()
    p.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()


def test_work_item_after_one_without_gradients_runs_its_round():
    """A group's parameters of a second dtype step on their estimate when the first dtype's have no gradient, also
    when some of them have none either."""

    def run(with_other: bool):
        b, c = (
            torch.nn.Parameter(torch.ones(4, dtype=torch.float64)),
            torch.nn.Parameter(torch.ones(2, dtype=torch.float64)),
        )
        a = torch.nn.Parameter(torch.ones(3))
        opt = tk.CompressedOptimizer(
            [a, b, c] if with_other else [b, c], torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.25))
        )
        for step in range(4):
            b.grad = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
            c.grad = None if step % 2 else torch.tensor([5.0, -6.0], dtype=torch.float64)
            opt.step()
        return torch.cat([b.detach(), c.detach()])

    assert torch.equal(run(with_other=True), run(with_other=False))
