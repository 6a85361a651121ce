"""Accelerate: torchkit's DDP hook after ``accelerator.prepare``, per-rank feedback state in ``save_state``.

Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` accepts only its own hook types, and ``save_state``
writes the optimizer and registered objects from the main process only. :func:`register` installs torchkit's hook
on the prepared model; :func:`keep_feedback_per_rank` makes ``save_state`` write every process's feedback state to
``<output_dir>/torchkit_feedback.rank<r>.pt`` and ``load_state`` read it back first.

Example (``accelerate launch --num_processes 2 train.py``)::

    from accelerate import Accelerator
    import torchkit as tk
    from torchkit.integrations.accelerate import register

    accelerator = Accelerator()
    model, opt, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    state = register(accelerator, model, tk.EF21(tk.TopK(ratio=0.01)))
    ...
    accelerator.save_state("ckpt")     # every process writes ckpt/torchkit_feedback.rank<r>.pt
    accelerator.load_state("ckpt")     # every process reads its own back
"""

from __future__ import annotations

import os
from typing import Any

import accelerate
from torch.nn.parallel import DistributedDataParallel

from .. import ddp as tk_ddp
from ..checkpoint import _owners, load_feedback, save_feedback
from ..feedback import Feedback

__all__ = ["register", "keep_feedback_per_rank"]


def register(
    accelerator: accelerate.Accelerator,
    model: Any,
    feedback: Feedback,
    *,
    name: str = "torchkit_feedback",
    **hook_options: Any,
) -> tk_ddp.CompressionState:
    """Install torchkit's hook on ``model`` (what ``accelerator.prepare`` returned) and keep its state per rank in
    ``save_state``/``load_state``; returns the hook's :class:`torchkit.ddp.CompressionState`. Under
    ``mixed_precision="fp16"`` the hook is given the accelerator's GradScaler (``grad_scaler=``, unless given)."""
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"model must be the DistributedDataParallel model accelerator.prepare returns on several processes, got "
            f"{type(model).__name__} (one process has nothing to compress; launch with accelerate launch "
            "--num_processes N, or use tk.CompressedOptimizer)"
        )
    if "grad_scaler" not in hook_options and getattr(accelerator, "scaler", None) is not None:
        hook_options["grad_scaler"] = accelerator.scaler  # fp16: else the state holds loss-scaled values
    state = tk_ddp.register(model, feedback, **hook_options)
    keep_feedback_per_rank(accelerator, state, name=name)
    return state


def keep_feedback_per_rank(accelerator: accelerate.Accelerator, *objects: Any, name: str = "torchkit_feedback"):
    """Make ``accelerator.save_state(dir)`` write ``dir/<name>.rank<r>.pt`` on every process with the feedback
    state of ``objects`` (``CompressedOptimizer``, prepared or not, and hook states), and ``load_state(dir)`` read
    this process's file back before the optimizers load the main process's state. Returns the two hook handles."""
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    if not objects:
        raise TypeError("keep_feedback_per_rank needs at least one CompressedOptimizer or CompressionState")
    _owners(objects, "keep_feedback_per_rank")  # checked now: a wrong object failed at the first save_state
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")

    def save(models, weights, output_dir):
        save_feedback(os.path.join(output_dir, name), *objects)

    def load(models, input_dir):
        load_feedback(os.path.join(input_dir, name), *objects)

    return accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)
