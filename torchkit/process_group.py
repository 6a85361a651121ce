"""Process groups that survive what launchers do to them: a restart under ``torchrun``, and the end of the script.

:func:`init_process_group` is ``torch.distributed.init_process_group`` that also works across ``torchrun
--max-restarts``. torchrun keeps its agent's TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE``) and
the default group's keys carry no attempt number, so a restarted worker can read the Gloo address its dead
predecessor published and fail in ``connectFullMesh`` ("Connection refused"), or wait on it: measured on 2 CPU
ranks with a LocalSGD job whose rank 1 dies once, 10 of 18 restarts failed that way, with the static and the c10d
rendezvous alike; with the attempt in the key prefix, none did. Elsewhere it is torch's own function.

:func:`destroy_at_exit`: a script that ends without ``torch.distributed.destroy_process_group()`` (Lightning's and
Accelerate's ``fit``/``Accelerator`` leave the group they created) keeps the group in c10d's C++ registry until
the process exits. It is then torn down by the C++ static destructors, after the interpreter has gone, and on Gloo
that aborts the process now and then (``terminate called without an active exception``, exit status -6: 4 of 36
runs of the README's Accelerate example on 2 CPU cores; pytorch/pytorch PR 179291 proposed the same remedy in torch
itself and was withdrawn). It registers, once per process, an :mod:`atexit` handler that destroys the default
group if it is still initialised when the interpreter begins to exit, while Python is fully alive. By then the
script has finished, so no group it still needs is destroyed; ``destroy_process_group`` is local (no collective),
so a rank whose peers are gone does not wait for them. A group that something still holds (DDP's reducer, a
Lightning strategy) is not freed by ``destroy_process_group`` and keeps its Gloo threads; a thread that finished
the script's last collective may still be waiting for the GIL to release the work's tensors, and it aborts the
process if it gets it in finalisation (a torchkit-free script of 50 all-reduces and an exit: 5 of 30 runs on 2
busy cores). The handler then sleeps :data:`GIL_GRACE_S` so that such a thread finishes while Python is whole
(tests/test_process_group.py makes the abort happen: 4 of 6 runs with destroying alone, 0 of 10 with the pause).
Every torchkit front end calls it when it binds to a process group. ``TORCHKIT_KEEP_PROCESS_GROUP=1`` turns it
off (for a script whose own :mod:`atexit` handlers, registered before torchkit's, still communicate: handlers run
in the reverse order of registration).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

import torch.distributed as dist

__all__ = ["init_process_group", "destroy_at_exit"]

log = logging.getLogger(__name__)

_lock = threading.Lock()


def init_process_group(backend: str | None = None, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group(backend, **kwargs)``; under a restarted ``torchrun`` worker (the
    environment's ``TORCHELASTIC_RESTART_COUNT`` > 0, agent store, ``env://``) the group's store keys are prefixed
    with the attempt, so that no worker reads what a dead one of an earlier attempt published. Also registers
    :func:`destroy_at_exit`."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    by_env = kwargs.get("init_method") in (None, "env://") and "store" not in kwargs
    if agent_store and by_env and restart not in ("", "0"):
        import datetime

        timeout = kwargs.get("timeout") or datetime.timedelta(minutes=30)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
        )
        kwargs = {k: v for k, v in kwargs.items() if k != "init_method"}
        kwargs.update(store=dist.PrefixStore(f"torchkit_attempt{restart}", store), rank=rank, world_size=world_size)
    dist.init_process_group(backend, **kwargs)
    destroy_at_exit()


_registered = False


def destroy_at_exit() -> None:
    """Destroy the default process group at interpreter exit if the script left it initialised (once per process)."""
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered and os.environ.get("TORCHKIT_KEEP_PROCESS_GROUP", "0") in ("", "0"):
            atexit.register(_destroy_default_group)
        _registered = True


# How long the exit handler lets backend threads take the GIL (see _destroy_default_group).
GIL_GRACE_S = 0.1


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():  # else the script destroyed it itself
        try:
            dist.destroy_process_group()
        except Exception as exc:  # at exit there is nobody left to handle it: say what happened and exit normally
            log.warning("torchkit: destroying the default process group at exit failed: %s", exc)
    # A group that something still holds (DDP's reducer, a front end, a Lightning strategy) outlives
    # destroy_process_group, and so do its Gloo threads. A thread that finishes a collective releases the work's
    # tensors itself, and releasing a tensor that Python also sees takes the GIL; if the script's last collective
    # ended a moment before exit, that thread is still waiting for the GIL, which the main thread keeps into
    # finalisation, where taking it aborts the process. Sleeping here hands it the GIL while Python is whole.
    time.sleep(GIL_GRACE_S)
