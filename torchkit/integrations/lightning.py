"""Lightning: :class:`DDPStrategy`, Lightning's DDP strategy with torchkit's hook and per-rank feedback checkpoints.

Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` registers the hook only on CUDA (on CPU nothing happens, silently),
and ``Trainer.save_checkpoint`` writes rank 0's state only, which holds rank 0's error-feedback state. This strategy

- installs torchkit's hook (``feedback=``) or any ``ddp_comm_hook`` on CPU and GPU alike;
- writes every rank's feedback state (the hook's, and that of any :class:`torchkit.CompressedOptimizer` or
  :class:`torchkit.LocalSGD`) to
  ``<checkpoint without suffix>.rank<r>.pt`` next to each checkpoint (:func:`torchkit.checkpoint.save_feedback`),
  leaves rank 0's copy out of the checkpoint, and reads this rank's file back on ``fit(ckpt_path=...)``;
- removes the side files with the checkpoint (``ModelCheckpoint(save_top_k=...)``).

Example::

    import lightning as L
    import torchkit as tk
    from torchkit.integrations.lightning import DDPStrategy

    strategy = DDPStrategy(feedback=tk.EF21(tk.TopK(ratio=0.01)))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=2)
    trainer.fit(module, loader)                  # a plain optimizer in configure_optimizers: the hook compresses
    strategy.compression_state.bytes_sent        # the hook's counters, on every rank

Side files use ``torch.save`` on local paths (remote ``fsspec`` checkpoint paths are not supported).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.plugins.precision import MixedPrecision as _LightningMixedPrecision
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType

from .. import ddp as tk_ddp
from ..checkpoint import load_feedback, save_feedback, side_file, without_feedback
from ..feedback import Feedback
from ..frontend import FrontEnd

__all__ = ["DDPStrategy", "MixedPrecision", "CommMetrics", "side_file_name"]

_MARK = "torchkit_feedback"  # checkpoint key: the feedback state is in per-rank side files


def side_file_name(checkpoint_path: str | os.PathLike) -> str:
    """The ``name`` of a checkpoint's side files: its path without the suffix, a symbolic link resolved
    (``ModelCheckpoint(save_last="link")``); rank ``r``'s file is ``<name>.rank<r>.pt``."""
    path = os.fspath(checkpoint_path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    return os.path.splitext(path)[0]


class MixedPrecision(_LightningMixedPrecision):
    """Lightning's ``MixedPrecision`` that clips the gradients of torchkit's optimizers (``gradient_clip_val``).

    :class:`torchkit.CompressedOptimizer` and :class:`torchkit.LocalSGD` unscale GradScaler's gradients themselves
    (so that every rank skips a step alike), and Lightning refuses to clip for any such optimizer ("does not allow
    for gradient clipping ... a 'fused' optimizer?"), even under ``bf16-mixed``, which has no scaler. This plugin
    unscales first where there is a scaler (``scaler.unscale_(optimizer)``: the front ends take the unscaled
    gradients and GradScaler's ``found_inf``), then clips as Lightning clips any other optimizer. Other optimizers
    keep Lightning's behaviour. :class:`DDPStrategy` puts it in place of Lightning's own; one device::

        trainer = L.Trainer(plugins=[MixedPrecision("bf16-mixed", "cpu")], gradient_clip_val=1.0)
    """

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        if clip_val > 0 and isinstance(getattr(optimizer, "_optimizer", optimizer), FrontEnd):
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            return Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
        return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)


def _clipping(plugin):
    """Lightning's own ``MixedPrecision`` as :class:`MixedPrecision` (the same precision, device and scaler)."""
    if type(plugin) is _LightningMixedPrecision:
        return MixedPrecision(plugin.precision, plugin.device, plugin.scaler)
    return plugin


class DDPStrategy(_LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` that installs torchkit's hook on CPU and GPU and checkpoints per-rank feedback.

    Args:
        feedback: the error-feedback method of the DDP hook (:func:`torchkit.ddp.register`); ``None`` installs
            ``ddp_comm_hook`` if one is given (on CPU too) and otherwise leaves DDP's all-reduce.
        hook_options: keyword arguments of :class:`torchkit.ddp.CompressionState` (``min_compression_rate``,
            ``wire_dtype``, ...).
        **kwargs: Lightning's ``DDPStrategy`` arguments (``ddp_comm_hook``, ``find_unused_parameters``, ...).

    After setup, :attr:`compression_state` is the hook's :class:`torchkit.ddp.CompressionState`. Under
    ``precision="16-mixed"`` the hook is given Lightning's GradScaler (``grad_scaler=``, unless ``hook_options`` sets
    one): without it the error-feedback state would hold loss-scaled values, and an overflow would raise instead of
    skipping the step. Lightning's ``MixedPrecision`` is replaced by :class:`MixedPrecision` (clipping works with
    torchkit's optimizers).
    """

    def __init__(self, feedback: Feedback | None = None, *, hook_options: dict[str, Any] | None = None, **kwargs):
        if feedback is not None and not isinstance(feedback, Feedback):
            raise TypeError(f"feedback must be a torchkit feedback method (EF21, ...), got {type(feedback).__name__}")
        if feedback is not None and kwargs.get("ddp_comm_hook") is not None:
            raise ValueError("give feedback= (torchkit's hook) or ddp_comm_hook=, not both")
        if hook_options is not None and feedback is None:
            raise ValueError("hook_options= configures torchkit's hook: give feedback= too")
        if feedback is not None:
            _check_hook_options(feedback, hook_options)
        super().__init__(**kwargs)
        self.feedback = feedback
        self.hook_options = dict(hook_options or {})
        self.compression_state: tk_ddp.CompressionState | None = None
        self._pending_feedback: str | None = None

    # ------------------------------------------------------------------------------------------- the hook
    @property
    def precision_plugin(self):
        return _LightningDDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        _LightningDDPStrategy.precision_plugin.fset(self, _clipping(plugin))

    def _register_ddp_hooks(self) -> None:
        if self.feedback is not None:
            options = dict(self.hook_options)
            scaler = getattr(self.precision_plugin, "scaler", None)
            if "grad_scaler" not in options and scaler is not None:
                options["grad_scaler"] = scaler  # Lightning's own (16-mixed): made inside fit, out of the user's reach
            self.compression_state = tk_ddp.register(self.model, self.feedback, **options)
        elif self._ddp_comm_hook is not None:  # Lightning registers it on CUDA only
            _register_ddp_comm_hook(
                model=self.model,
                ddp_comm_state=self._ddp_comm_state,
                ddp_comm_hook=self._ddp_comm_hook,
                ddp_comm_wrapper=self._ddp_comm_wrapper,
            )

    # ------------------------------------------------------------------------------------------ checkpoints
    def _feedback_objects(self) -> list:
        objs = [getattr(o, "_optimizer", o) for o in self.optimizers]
        objs = [o for o in objs if isinstance(o, FrontEnd)]  # CompressedOptimizer, LocalSGD
        if self.compression_state is not None:
            objs.append(self.compression_state)
        return objs

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        objs = self._feedback_objects()
        if objs:
            save_feedback(side_file_name(filepath), *objs)  # every rank: Lightning writes rank 0's checkpoint only
            checkpoint = dict(checkpoint)
            checkpoint[_MARK] = {"side_files": True, "kinds": [type(o).__name__ for o in objs]}
            if "optimizer_states" in checkpoint:  # rank 0's copy is in rank 0's side file
                checkpoint["optimizer_states"] = [
                    without_feedback(s) if isinstance(s, dict) else s for s in checkpoint["optimizer_states"]
                ]
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        if checkpoint.get(_MARK):
            self._pending_feedback = side_file_name(checkpoint_path)  # restored once the objects exist
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        self._restore_feedback()  # before the optimizers load rank 0's state: this rank's own state is kept
        super().load_optimizer_state_dict(checkpoint)

    def on_train_start(self) -> None:
        self._restore_feedback()
        super().on_train_start()

    def _restore_feedback(self) -> None:
        if self._pending_feedback is None:
            return
        name, self._pending_feedback = self._pending_feedback, None
        load_feedback(name, *self._feedback_objects())

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        path = side_file(side_file_name(filepath), self.global_rank)
        if os.path.exists(path):
            os.remove(path)


class CommMetrics(Callback):
    """Log torchkit's communication counters (:class:`torchkit.CommMetrics`) through ``LightningModule.log_dict``
    after every training batch, so they appear in whatever logger the Trainer has (TensorBoard, CSV, W&B, ...).

    It finds the hook's state (this module's :class:`DDPStrategy`) and every :class:`torchkit.CompressedOptimizer`
    or :class:`torchkit.LocalSGD` among the Trainer's optimizers. One source logs as ``torchkit/<name>``; several as
    ``torchkit/hook/<name>``, ``torchkit/optimizer<i>/<name>``. Values are this rank's (``sync_dist=False``).

    Example::

        trainer = L.Trainer(strategy=DDPStrategy(feedback=tk.EF14(tk.TopK(ratio=0.01))), callbacks=[CommMetrics()])
    """

    def __init__(self, prefix: str = "torchkit/"):
        super().__init__()
        self.prefix = prefix

    def sources(self, trainer) -> dict[str, Any]:
        found = {}
        state = getattr(trainer.strategy, "compression_state", None)
        if state is not None:
            found["hook"] = state.metrics
        for i, opt in enumerate(trainer.optimizers):
            inner = getattr(opt, "_optimizer", opt)
            if hasattr(inner, "metrics") and hasattr(inner, "feedback"):
                found[f"optimizer{i}"] = inner.metrics
        return found

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        found = self.sources(trainer)
        for name, metrics in found.items():
            prefix = self.prefix if len(found) == 1 else f"{self.prefix}{name}/"
            pl_module.log_dict(metrics.as_dict(prefix), on_step=True, on_epoch=False, sync_dist=False)


def _check_hook_options(feedback: Feedback, options: Any) -> None:
    """``hook_options`` checked when the strategy is made, by a trial :class:`~torchkit.ddp.CompressionState`: a typo
    (``min_compresion_rate``) or a bad value failed only in ``fit``, on every rank, without naming the argument."""
    if options is None:
        return
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"hook_options must be a dict of CompressionState's keyword arguments, got {options!r}")
    try:
        tk_ddp.CompressionState(feedback, **options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"hook_options: {exc}") from exc
