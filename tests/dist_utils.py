"""Spawn real Gloo process groups on CPU for the distributed tests."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchkit.apps.links import free_port as _free_port  # the tests' name for it


def _entry(rank, world_size, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears down while a peer still has traffic in flight
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()
    # The result is saved and the group destroyed: leave without interpreter finalization, where objects still
    # holding Gloo work can abort the process ("terminate called without an active exception"; see
    # test_the_hook_state_does_not_keep_the_model_alive for the cycle of ours that did this).
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_dist(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` Gloo ranks; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.spawn(_entry, args=(world_size, _free_port(), outdir, fn, args), nprocs=world_size, join=True)
        except Exception:
            for r in range(world_size):
                path = os.path.join(outdir, f"{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        raise AssertionError(f"rank {r} failed:\n{rec['error']}") from None
            raise
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)["result"] for r in range(world_size)]


def _fault_entry(rank, world_size, port, outdir, fn, args, pg_timeout):
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        rec = {"ok": True, "result": fn(rank, world_size, *args)}
    except BaseException:
        rec = {"ok": False, "error": traceback.format_exc()}
    tmp = os.path.join(outdir, f"{rank}.tmp")
    torch.save(rec, tmp)
    os.replace(tmp, os.path.join(outdir, f"{rank}.pt"))
    os._exit(0)  # a peer may be dead or stopped: no barrier, no teardown


def run_dist_faults(fn, world_size: int, *args, report: set[int], pg_timeout: float = 5.0, wait: float = 120.0):
    """Run ``fn`` on Gloo ranks where faults are injected (a rank exits or stops itself). Waits until the ranks
    in ``report`` have written their results (or ``wait`` seconds), kills every rank still alive, and returns
    ``{rank: result}`` for the ranks that reported."""
    import signal
    import time

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [
            ctx.Process(target=_fault_entry, args=(r, world_size, port, outdir, fn, args, pg_timeout))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if all(os.path.exists(os.path.join(outdir, f"{r}.pt")) for r in report):
                break
            time.sleep(0.1)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()
        out = {}
        for r in range(world_size):
            path = os.path.join(outdir, f"{r}.pt")
            if os.path.exists(path):
                rec = torch.load(path, weights_only=False)
                if not rec["ok"]:
                    raise AssertionError(f"rank {r} failed:\n{rec['error']}")
                out[r] = rec["result"]
        return out
