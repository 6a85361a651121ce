"""One metrics object, the same names in every front end (issue 28): the wrapper, LocalSGD and the hook count the
same bytes for the same rounds, dense rounds and skipped steps are counted, and the counters reach TensorBoard's
writer and Lightning's loggers."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import torchkit as tk
from tests.dist_utils import _free_port


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Tanh(), torch.nn.Linear(20, 5))


def _batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(8, 30, generator=g), torch.randn(8, 5, generator=g)


def _wrapper_run(rank, world):
    model = _net()
    opt = tk.CompressedOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, nonfinite="skip", feedback=tk.EF21(tk.TopK(ratio=0.1))
    )
    for t in range(4):
        opt.zero_grad()
        x, y = _batch(10 * rank + t)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss * float("nan") if t == 2 and rank == 1 else loss).backward()
        opt.step()
    return opt.metrics


@pytest.mark.dist
def test_the_wrapper_counts_rounds_bytes_dense_rounds_and_skips():
    from tests.dist_utils import run_dist

    d = sum(p.numel() for p in _net().parameters())
    for m in run_dist(_wrapper_run, 2):
        assert (m.steps, m.rounds, m.skipped_steps, m.skipped_rounds) == (4, 3, 1, 1)
        assert m.dense_rounds == 1  # EF21's first round is dense (init="full"), the others compressed
        assert m.dense_bytes == 3 * d * 4  # fp32 gradients, three rounds
        assert m.last_dense_bytes == d * 4 and 0 < m.last_bytes_sent < d * 4 / 4
        assert m.compression == pytest.approx(m.dense_bytes / m.bytes_sent)
        assert (m.numel, m.last_numel) == (3 * d, d) and m.last_bits_per_parameter == 8 * m.last_bytes_sent / d
        assert m.bits_per_parameter == pytest.approx(32 / m.compression)  # fp32 gradients: 32 bits dense
        as_dict = m.as_dict()
        assert as_dict["torchkit/rounds"] == 3.0 and set(as_dict) >= {"torchkit/compression", "torchkit/bytes_sent"}


def test_one_process_sends_nothing_and_says_so():
    model = _net()
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.1)))
    model(_batch(0)[0]).sum().backward()
    opt.step()
    assert (opt.metrics.rounds, opt.metrics.bytes_sent, opt.metrics.compression) == (1, 0, 0.0)


def test_local_sgd_counts_its_rounds_with_the_same_names():
    model = _net()
    opt = tk.LocalSGD(model.parameters(), torch.optim.SGD, lr=0.1, sync_every=3, feedback=tk.EF14(tk.TopK(ratio=0.1)))
    for t in range(7):
        opt.zero_grad()
        x, y = _batch(t)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    m = opt.metrics
    assert (m.steps, m.rounds, m.dense_rounds) == (7, 2, 0)
    assert m.bytes_sent == opt.bytes_sent and m.dense_bytes == opt.dense_bytes  # the older counters agree


def test_the_hook_counts_warm_up_and_compressed_iterations_and_equals_the_wrapper():
    """One process: with granularity="tensor" the hook's rounds are the wrapper's, so are their bytes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = DDP(_net())
        d = sum(p.numel() for p in model.parameters())
        state = tk.ddp.register(model, tk.EF14(tk.TopK(ratio=0.1), granularity="tensor"), start_iter=1,
                                min_compression_rate=0)  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for t in range(3):
            opt.zero_grad()
            x, y = _batch(t)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        m = state.metrics
        assert (m.steps, m.rounds) == (3, 3)
        assert m.dense_bytes == 3 * d * 4 and m.last_dense_bytes == d * 4
        assert m.last_bytes_sent == state.bytes_sent  # the older last-iteration counter agrees
        wrapped = _net()
        w = tk.CompressedOptimizer(wrapped.parameters(), torch.optim.SGD, lr=0.1,
                                   feedback=tk.EF14(tk.TopK(ratio=0.1), granularity="tensor"))  # fmt: skip
        for t in range(3):
            w.zero_grad()
            x, y = _batch(t)
            torch.nn.functional.mse_loss(wrapped(x), y).backward()
            w.step()
        # the hook's first iteration was a dense warm-up all-reduce; from then on both compress alike
        assert m.last_bytes_sent == w.metrics.last_bytes_sent
        assert m.dense_rounds >= 1 and w.metrics.dense_rounds == 0
    finally:
        dist.destroy_process_group()


class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_metrics_reach_a_tensorboard_writer(tmp_path):
    m = tk.CommMetrics()
    m.record_round([])  # an empty round counts as a round of nothing
    writer = _Writer()
    m.log_to(writer, 7)
    assert ("torchkit/rounds", 1.0, 7) in writer.scalars and all(step == 7 for _, _, step in writer.scalars)
    with pytest.raises(TypeError, match="writer must have add_scalar"):
        m.log_to(object(), 1)
    tb = pytest.importorskip("torch.utils.tensorboard", reason="TensorBoard is not installed")
    m.log_to(tb.SummaryWriter(log_dir=str(tmp_path)), 1)


def test_lightning_callback_logs_the_counters(tmp_path):
    L = pytest.importorskip("lightning", reason="Lightning is in the integrations extra")
    from torchkit.integrations.lightning import CommMetrics

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return tk.CompressedOptimizer(
                self.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.1))
            )

    x, y = _batch(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.repeat(4, 1), y.repeat(4, 1)), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[CommMetrics()], default_root_dir=tmp_path)  # fmt: skip
    module = Module()
    trainer.fit(module, loader)
    logged = trainer.callback_metrics
    assert float(logged["torchkit/rounds"]) == 4.0 and float(logged["torchkit/steps"]) == 4.0
    assert float(logged["torchkit/dense_bytes"]) == 4 * 4 * sum(p.numel() for p in module.parameters())
    assert float(logged["torchkit/bytes_sent"]) == 0.0  # one process: nothing goes on a wire


def _handed_over(rank, world):
    """Each step's growth of the wrapper's bytes_sent against the bytes this rank handed to collectives in it
    (all_gather's input, all_reduce's tensor), after the first step (whose setup agreement is not a round's)."""
    model = _net()
    opt = tk.CompressedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, feedback=tk.EF14(tk.TopK(ratio=0.1)))
    handed = [0]
    gather, reduce = dist.all_gather, dist.all_reduce

    def counting_gather(outs, t, *a, **kw):
        handed[0] += t.numel() * t.element_size()
        return gather(outs, t, *a, **kw)

    def counting_reduce(t, *a, **kw):
        handed[0] += t.numel() * t.element_size()
        return reduce(t, *a, **kw)

    rows = []
    for t in range(4):
        if t == 1:
            dist.all_gather, dist.all_reduce = counting_gather, counting_reduce
        before, handed[0] = opt.metrics.bytes_sent, 0
        opt.zero_grad()
        x, y = _batch(10 * rank + t)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if t >= 1:
            rows.append((opt.metrics.bytes_sent - before, opt.metrics.last_bytes_sent, handed[0]))
    dist.all_gather, dist.all_reduce = gather, reduce
    return rows


@pytest.mark.dist
def test_the_wrapper_counts_every_byte_it_hands_to_a_collective():
    """The per-step agreement (an all_reduce of the non-finite flag, which parameters have a gradient, and the
    hyper-parameters' digest) went uncounted: 56 bytes a step beside a message of a few hundred."""
    from tests.dist_utils import run_dist

    for rows in run_dist(_handed_over, 2):
        assert all(grew == last == handed > 0 for grew, last, handed in rows), rows
