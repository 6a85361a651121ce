"""Lightning and Accelerate on 2 Gloo ranks (CPU): torchkit's hook installed, bytes on the wire, a checkpoint
saved the frameworks' way (rank 0 writes it, torchkit's per-rank side files next to it) and a resume that continues
bit-exactly, for the hook, the optimizer wrapper and LocalSGD (saved in the middle of a period, where every rank's
parameters and inner state are its own). Needs the integrations extra (pip install -e ".[test,integrations]");
skipped without it."""

import os
import warnings

import pytest
import torch

import torchkit as tk
from tests.dist_utils import run_dist

pytestmark = [pytest.mark.dist, pytest.mark.integrations]

N, BATCH, WORLD = 32, 4, 2  # 16 samples per rank: 4 steps per epoch


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(N, 5, generator=g).double(), torch.randn(N, 3, generator=g).double()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _fb():
    return tk.EF21SGDM(tk.TopK(ratio=0.3), eta=0.5)


# -------------------------------------------------------------------------------------------------- Lightning
def _lightning(rank, world, path):
    import lightning as L
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    from torchkit.integrations.lightning import DDPStrategy

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))  # processes started outside

    class Module(L.LightningModule):
        def __init__(self, wrapped):
            super().__init__()
            self.net, self.wrapped, self.sent = _net(), wrapped, []

        def training_step(self, batch, i):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def on_train_batch_end(self, *args):
            state = self.trainer.strategy.compression_state
            self.sent.append(state.bytes_sent if state is not None else None)

        def configure_optimizers(self):
            # the optimizer front ends communicate; DDP's noop_hook turns its all-reduce off
            if self.wrapped == "local":  # 4 steps per epoch: a checkpoint after one epoch is mid-period
                return tk.LocalSGD(
                    self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sync_every=3, feedback=_fb()
                )
            if self.wrapped:
                return tk.CompressedOptimizer(self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, feedback=_fb())
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH)

    def fit(wrapped, epochs, ckpt=None):
        if wrapped:
            strategy = DDPStrategy(ddp_comm_hook=noop_hook)
        else:
            strategy = DDPStrategy(feedback=_fb(), hook_options={"min_compression_rate": 0})
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=strategy,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = Module(wrapped)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, loader, ckpt_path=ckpt)
        twice = [str(w.message) for w in caught if "communicates twice" in str(w.message)]
        return trainer, module, twice

    out = {}
    for wrapped in (False, True, "local"):
        name = {False: "hook", True: "opt", "local": "local"}[wrapped]
        _, straight, twice = fit(wrapped, 2)
        trainer, _, _ = fit(wrapped, 1)
        ckpt = f"{path}/{name}.ckpt"
        trainer.save_checkpoint(ckpt)
        _, resumed, _ = fit(wrapped, 2, ckpt)
        saved = torch.load(ckpt, weights_only=False) if rank == 0 else None
        out[wrapped] = {
            "straight": _flat(straight.net),
            "resumed": _flat(resumed.net),
            "sent": straight.sent,
            "twice": twice,
            "side_file": os.path.exists(f"{path}/{name}.rank{rank}.pt"),
            "inline": None if saved is None else any(s.get("torchkit") is not None for s in saved["optimizer_states"]),
        }
    return out


def test_lightning_strategy_installs_the_hook_and_resumes_exactly(tmp_path):
    pytest.importorskip("lightning", reason="Lightning is in the integrations extra: pip install -e '.[integrations]'")
    out = run_dist(_lightning, WORLD, str(tmp_path))
    for r in range(WORLD):
        for wrapped in (False, True, "local"):
            res = out[r][wrapped]
            assert torch.equal(res["straight"], res["resumed"]), f"rank {r}, wrapped={wrapped}: resume not exact"
            assert res["side_file"]
            assert res["twice"] == []  # the hook alone, or the wrapper with DDP's all-reduce off
        hook = out[r][False]
        assert len(hook["sent"]) == 8 and all(s > 0 for s in hook["sent"])  # installed on CPU: bytes on the wire
        assert out[r][True]["sent"] == [None] * 8
    assert all(out[0][w]["inline"] is False for w in (False, True, "local"))  # rank 0's copy is in its side file
    assert not torch.equal(out[0]["local"]["straight"], out[1]["local"]["straight"])  # ended mid-period: own params
    # the same method through the hook and through the wrapper (with DDP's all-reduce off): the same training
    torch.testing.assert_close(out[0][False]["straight"], out[0][True]["straight"], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------- Accelerate
def _accelerate(rank, world, path):
    from accelerate import Accelerator

    from torchkit.integrations.accelerate import keep_feedback_per_rank, register

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))

    def setup():
        accelerator = Accelerator(cpu=True)
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH)
        model, opt, loader = accelerator.prepare(net, opt, loader)
        state = register(accelerator, model, _fb(), min_compression_rate=0)
        return accelerator, model, opt, loader, state

    def epoch(accelerator, model, opt, loader, state, sent):
        for x, y in loader:
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            sent.append(state.bytes_sent)

    out = {"sent": []}
    run = setup()
    for _ in range(2):
        epoch(*run, out["sent"])
    out["straight"] = _flat(run[1].module)

    run = setup()
    epoch(*run, [])
    run[0].save_state(f"{path}/ckpt")
    run[0].wait_for_everyone()

    run = setup()
    run[0].load_state(f"{path}/ckpt")
    epoch(*run, [])
    out["resumed"] = _flat(run[1].module)

    # LocalSGD under Accelerate (DDP's all-reduce off), saved mid-period: every rank resumes its own parameters
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    def local_setup():
        accelerator = Accelerator(cpu=True)
        net = _net()
        opt = tk.LocalSGD(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sync_every=3, feedback=_fb())
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH)
        model, opt, loader = accelerator.prepare(net, opt, loader)
        model.register_comm_hook(None, noop_hook)
        keep_feedback_per_rank(accelerator, opt)
        return accelerator, model, opt, loader

    def local_epoch(accelerator, model, opt, loader):
        for x, y in loader:
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()

    run = local_setup()
    for _ in range(2):
        local_epoch(*run)
    out["local_straight"] = _flat(run[1].module)
    run = local_setup()
    local_epoch(*run)
    run[0].save_state(f"{path}/local")
    run[0].wait_for_everyone()
    run = local_setup()
    run[0].load_state(f"{path}/local")
    local_epoch(*run)
    out["local_resumed"] = _flat(run[1].module)

    # the optimizer wrapper under Accelerate's DDP: warned, once, about the double communication
    accelerator = Accelerator(cpu=True)
    net = _net()
    opt = tk.CompressedOptimizer(net.parameters(), torch.optim.SGD, lr=0.1, feedback=_fb())
    model, opt = accelerator.prepare(net, opt)
    keep_feedback_per_rank(accelerator, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH):
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
    out["twice"] = [str(w.message) for w in caught if "communicates twice" in str(w.message)]
    return out


def test_accelerate_register_resumes_exactly(tmp_path):
    reason = "Accelerate is in the integrations extra: pip install -e '.[integrations]'"
    pytest.importorskip("accelerate", reason=reason)
    out = run_dist(_accelerate, WORLD, str(tmp_path))
    for r in range(WORLD):
        assert torch.equal(out[r]["straight"], out[r]["resumed"]), f"rank {r}: resume not bit-exact"
        assert torch.equal(out[r]["local_straight"], out[r]["local_resumed"]), f"rank {r}: LocalSGD resume not exact"
        assert len(out[r]["sent"]) == 8 and all(s > 0 for s in out[r]["sent"])
        assert len(out[r]["twice"]) == 1
    assert not torch.equal(out[0]["local_straight"], out[1]["local_straight"])  # ended mid-period
    files = os.listdir(tmp_path / "ckpt")
    assert "torchkit_feedback.rank0.pt" in files and "torchkit_feedback.rank1.pt" in files


def test_the_integrations_check_their_arguments_when_called():
    """A typo in Lightning's hook_options and a non-torchkit object given to Accelerate's keep_feedback_per_rank
    were accepted and failed later: in fit on every rank without naming hook_options, and at the first
    save_state with nothing written."""
    pytest.importorskip("lightning", reason="Lightning is in the integrations extra: pip install -e '.[integrations]'")
    pytest.importorskip("accelerate", reason="Accelerate is in the integrations extra")
    import accelerate

    from torchkit.integrations.accelerate import keep_feedback_per_rank
    from torchkit.integrations.lightning import DDPStrategy

    fb = tk.EF14(tk.TopK(ratio=0.1))
    with pytest.raises(TypeError, match="hook_options: .*unexpected keyword argument 'min_compresion_rate'"):
        DDPStrategy(feedback=fb, hook_options={"min_compresion_rate": 0})
    with pytest.raises(ValueError, match="hook_options: .*min_compression_rate"):
        DDPStrategy(feedback=fb, hook_options={"min_compression_rate": -1})
    with pytest.raises(TypeError, match="hook_options must be a dict"):
        DDPStrategy(feedback=fb, hook_options=[("min_compression_rate", 0)])
    DDPStrategy(feedback=fb, hook_options={"min_compression_rate": 0})  # a good one is taken
    accelerator = accelerate.Accelerator(cpu=True)
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    for bad in (plain, "opt"):
        with pytest.raises(TypeError, match="keep_feedback_per_rank: argument 0 is a .*, not a torchkit front end"):
            keep_feedback_per_rank(accelerator, bad)


def test_lightning_clips_the_gradients_of_torchkits_optimizers_under_mixed_precision():
    """Lightning refused ``gradient_clip_val`` under any "-mixed" precision for torchkit's optimizers (they unscale
    GradScaler's gradients themselves: "Are you using a 'fused' optimizer?"), bf16 included, which has no scaler
    (found by an audit). torchkit's ``MixedPrecision`` plugin clips them, and the Identity wrapper then trains as
    plain AdamW does, bit for bit; ``DDPStrategy`` puts the plugin in place of Lightning's own."""
    L = pytest.importorskip("lightning", reason="Lightning is in the integrations extra")
    from lightning.pytorch.plugins.precision import MixedPrecision as LightningMixedPrecision

    from torchkit.integrations.lightning import DDPStrategy, MixedPrecision

    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)

    class Module(L.LightningModule):
        def __init__(self, wrapped):
            super().__init__()
            torch.manual_seed(0)
            self.net, self.wrapped = torch.nn.Linear(20, 1), wrapped

        def training_step(self, batch, i):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            if self.wrapped:
                fb = tk.EF14(tk.Identity())
                return tk.CompressedOptimizer(self.parameters(), torch.optim.AdamW, lr=1e-2, feedback=fb)
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    weights = []
    for wrapped in (False, True):
        module = Module(wrapped)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, plugins=[MixedPrecision("bf16-mixed", "cpu")],
                            gradient_clip_val=0.05, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        trainer.fit(module, loader)
        weights.append(module.net.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    strategy = DDPStrategy(feedback=tk.EF14(tk.TopK(ratio=0.1)))
    scaler = torch.amp.GradScaler("cpu")
    strategy.precision_plugin = LightningMixedPrecision("16-mixed", "cpu", scaler=scaler)
    assert isinstance(strategy.precision_plugin, MixedPrecision) and strategy.precision_plugin.scaler is scaler


def test_the_frameworks_grad_scaler_is_given_to_the_hook(tmp_path):
    """Accelerate's ``fp16`` (and Lightning's ``16-mixed``) make the GradScaler inside the framework; the hook was
    not given it, so its error-feedback state held loss-scaled values (0.14 off after a scale that grew from 1 to
    1024) and an overflow raised instead of skipping the step (found by an audit)."""
    pytest.importorskip("accelerate", reason="Accelerate is in the integrations extra")
    import accelerate
    import torch.distributed as dist

    from torchkit.integrations.accelerate import register

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        accelerator = accelerate.Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu")  # as fp16 makes it on a GPU
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        state = register(accelerator, model, tk.EF14(tk.TopK(ratio=0.5)))
        assert state.grad_scaler is accelerator.scaler
    finally:
        dist.destroy_process_group()
