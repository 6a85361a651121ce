"""The training tasks of torchkit.apps.tasks: the tabular one (an MLP on any binary LIBSVM file by path)."""

from __future__ import annotations

import pytest
import torch

from torchkit.apps.tasks import libsvm_mlp


def _write_libsvm(path, m=400, d=6, seed=0):
    """Rows of a linearly separable problem, labels {1, 2}, one-based sparse features (zeros omitted)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, generator=g) * torch.arange(1, d + 1)  # features on different scales
    a[a.abs() < 0.3] = 0.0
    y = torch.where(a @ torch.linspace(-1, 1, d) > 0, 2, 1)
    lines = [f"{int(yi)} " + " ".join(f"{j + 1}:{float(v):.6g}" for j, v in enumerate(row) if v != 0)
             for row, yi in zip(a, y)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return a, y


def test_the_tabular_task_splits_standardises_and_trains(tmp_path):
    path = tmp_path / "toy.txt"
    a, y = _write_libsvm(path)
    iid, skewed = libsvm_mlp(path, 4, "iid", batch=16), libsvm_mlp(path, 4, "noniid", batch=16)
    assert iid.info["train"] + iid.info["test"] == 400 and iid.info["test"] == 50  # every 8th row held out
    xs, ys = iid.batches(3)
    assert xs.shape == (4, 16, 6) and ys.shape == (4, 16) and set(ys.unique().tolist()) <= {0, 1}
    assert torch.equal(iid.batches(3)[0], xs) and not torch.equal(iid.batches(4)[0], xs)  # a function of the step
    # the features are standardised with the training rows' statistics only
    x_test, _ = iid.test
    train_rows = torch.cat([iid.batches(s)[0].reshape(-1, 6) for s in range(200)])
    assert train_rows.mean(0).abs().max() < 0.15 and (train_rows.std(0) - 1).abs().max() < 0.15
    assert x_test.shape == (50, 6)
    # label skew: sorted by label, so the first worker holds only the smaller label and the last only the larger
    shares = skewed.info["positive_share_per_worker"]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and iid.info["positive_share_per_worker"][0] not in (0.0, 1.0)
    # a few dozen steps of SGD on the mean of the workers' losses fit the separable problem
    model = iid.model(0)
    assert torch.equal(next(iid.model(0).parameters()), next(model.parameters()))  # the seed fixes the weights
    before = iid.evaluate(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(100):
        xs, ys = iid.batches(step)
        opt.zero_grad()
        sum(iid.loss(model(x), t) for x, t in zip(xs, ys)).div(4).backward()
        opt.step()
    after = iid.evaluate(model)
    assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [({"split": "other"}, "split"), ({"n_workers": 0}, "n_workers"), ({"batch": 0}, "batch"),
     ({"hidden": 1.5}, "hidden"), ({"n_workers": 40, "batch": 16}, "training rows")],
)  # fmt: skip
def test_the_tabular_task_refuses_bad_arguments(tmp_path, kwargs, match):
    path = tmp_path / "toy.txt"
    _write_libsvm(path)
    with pytest.raises(ValueError, match=match):
        libsvm_mlp(path, **kwargs)
    with pytest.raises(ValueError, match="toy_missing"):
        libsvm_mlp(tmp_path / "toy_missing.txt")
