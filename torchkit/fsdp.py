"""Plain FSDP over slow links: FSDP2's gradient reduce-scatter as a feedback round.

With FSDP2 on one mesh dimension (no replicas), every rank's gradient of a ``fully_shard``-ed module is reduced
onto each rank's shard by one reduce-scatter. :class:`CompressedReduceScatter` (installed on every such module by
:func:`compress_reduce_scatter`, through ``FSDPModule.set_custom_reduce_scatter``) replaces it by the feedback
method's round: each rank runs the method's worker step on its whole reduce-scatter input (the n shards' pieces
laid end to end, n = the group size), compressing each shard's piece on its own (per-segment granularity, ``k`` per
piece); an all-to-all hands shard j's piece of every rank's message to rank j, which decodes the n messages in rank
order into its shard (EF21 family: into its shard of the server estimate). The result is the method's estimate of
the mean (``ReduceOp.AVG``, FSDP's choice for fp32/bf16) or n times it (``ReduceOp.SUM``).

What it costs, and when it pays (``benchmarks/bench_fsdp_rs.py``): the worker state is a vector as
long as the *unsharded* gradient on every rank (EF14's error, the EF21 family's shift; the server estimate is
sharded), which is the memory FSDP exists to save: with n ranks, n times the sharded gradient. And only the
reduce-scatter is compressed: FSDP's parameter all-gathers (one per forward, another per backward unless
``reshard_after_forward=False``) stay dense, so even a free reduce-scatter leaves at least half of the bytes. Where
the slow link is between nodes and the model fits a node's memory, HSDP with the compressed replica exchange
(``CompressedOptimizer`` over the replicate group, README "FSDP2 and hybrid sharding") compresses all of the slow
traffic and shards the state; this is for a model that needs sharding across the slow link itself.

A non-finite gradient entry on any rank is agreed on first (one 1-element all-reduce per call, before anything
changes, read on the host: a synchronisation per module on a GPU): ``nonfinite="raise"`` raises
:class:`~torchkit.comm.NonFiniteGradientError` on every rank with the state unchanged; ``"skip"`` (with a
GradScaler, which sees the NaN) writes NaN into every shard and leaves the state unchanged.

Measured on 2 shared CPU cores (``benchmarks/results/amd-epyc-2-threads/fsdp_rs.md``): at 100 Mbit EF14 with TopK
1% takes 0.52-0.53x FSDP's step time, the bound of a free reduce-scatter being 0.51-0.52x; at 1 Gbit 0.71-0.91x
(bound 0.63x). Gloo's reduce-scatter moves an all-reduce's bytes, so there it is half of FSDP's traffic (a third
with NCCL's).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import NonFiniteGradientError, nonfinite_flag
from .compress import DenseMessage, SparseMessage
from .feedback import Feedback
from .frontend import RESUME_HINTS, agree
from .metrics import CommMetrics
from .process_group import destroy_at_exit
from .state import checkpoint_count

__all__ = ["CompressedReduceScatter", "compress_reduce_scatter"]


def _reduce_scatter_base():
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    return ReduceScatter


class CompressedReduceScatter(_reduce_scatter_base()):
    """One ``fully_shard``-ed module's reduce-scatter as a round of ``feedback`` (its own state: one object per
    module, which :func:`compress_reduce_scatter` makes).

    Attributes: ``metrics`` (:class:`~torchkit.CommMetrics`, the counters every front end keeps, all rounds and
    the last; ``dense_bytes``: what the dense reduce-scatter would have sent), ``step`` (rounds run),
    ``bytes_sent`` and ``dense_bytes`` (the last round's, as ``metrics.last_bytes_sent`` and
    ``metrics.last_dense_bytes``), ``state`` (the method's worker vectors, unsharded length) and ``server`` (the EF21
    family's estimate of this rank's shard).
    """

    def __init__(self, feedback: Feedback, *, nonfinite: Literal["raise", "skip"] = "raise", name: str = ""):
        if not isinstance(feedback, Feedback):
            raise TypeError(
                f"feedback must be a torchkit feedback method (tk.EF14(...)), got {type(feedback).__name__}"
            )
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if feedback.compressor.shared_support:
            raise ValueError(
                "a shared-support compressor sums values across ranks; the reduce-scatter sends each shard its "
                "own messages"
            )
        self.feedback, self.nonfinite, self.name = feedback, nonfinite, name
        self.step = 0
        self.state: dict[str, Tensor] | None = None
        self.server: Tensor | None = None
        self.bytes_sent = self.dense_bytes = 0
        self.metrics = CommMetrics()
        self._numel: int | None = None
        self._fingerprint: float | None = None  # of this rank's configuration, compared at every call
        self._where: tuple[int, int] | None = None  # (rank, size) in the group it runs on, once it has run
        self._loaded_where: tuple[int, int] | None = None  # what a loaded state was saved on, checked at the next call
        self._group_size: int | None = None  # the shard group's ranks, where compress_reduce_scatter installed it

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op, async_op: bool = False):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        shard = output_tensor.numel()
        scale = self._output_scale(op, n)
        if input_tensor.numel() != n * shard:
            raise ValueError(f"reduce-scatter input of {input_tensor.numel()} entries for {n} shards of {shard}")
        bad = self._agreed_nonfinite(input_tensor, group, n, rank)  # also: every rank's loaded state is its own
        self._bind(input_tensor, shard)
        self._where, self._loaded_where = (rank, n), None
        self.metrics.steps += 1
        if bad:
            if self.nonfinite == "raise":
                where = f" of {self.name}" if self.name else ""
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN or Inf) on at least one rank in the reduce-scatter{where}: the "
                    "feedback state is unchanged (pass nonfinite='skip' with a GradScaler to skip such steps)"
                )
            output_tensor.fill_(float("nan"))  # the scaler sees it on every rank and skips the step
            self.metrics.skipped_steps += 1
            self.metrics.skipped_rounds += 1
            return None
        fb = self.feedback
        grad = input_tensor.to(self.state[next(iter(self.state))].dtype) if self.state else input_tensor
        msg = fb.worker_step(self.state, grad, self.step, worker=rank, n_workers=n, segments=(shard,) * n)
        est = self.server if self.server is not None else output_tensor.new_zeros(shard, dtype=grad.dtype)
        if msg is not None:
            received = self._exchange(msg, shard, n, group)
            received.add_to_(est, fb.aggregation_weights(n))  # in rank order, dense or sparse
        self.dense_bytes = (n - 1) * shard * input_tensor.element_size()
        if msg is None:
            self.bytes_sent = 0
        self.metrics.record(self.bytes_sent, self.dense_bytes, input_tensor.numel(),
                            dense_rounds=int(isinstance(msg, DenseMessage)))  # fmt: skip
        self.step += 1
        output_tensor.copy_(est if scale == 1 else est * scale)
        return None

    # --------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _output_scale(op, n: int) -> float:
        kind = getattr(op, "op", op)  # a RedOpType or a ReduceOp
        if kind == dist.ReduceOp.AVG:
            return 1.0
        if kind == dist.ReduceOp.SUM:
            return float(n)
        raise ValueError(f"the compressed reduce-scatter takes ReduceOp.AVG or SUM, got {op} (gradient_divide_factor?)")

    def _agreed_nonfinite(self, x: Tensor, group, n: int, rank: int) -> bool:
        """Whether any rank's input holds NaN or Inf, agreed before anything changes, in one all-reduce (MAX) that
        also compares every rank's step and configuration (method, input size and dtype, policy): where they
        differ (another density on one rank, one rank resumed from another step), every rank raises ``ValueError``
        naming the difference, before messages of different sizes meet in the all-to-all, where Gloo fails
        without saying why, or not at all."""
        if self._fingerprint is None:  # the configuration cannot change after the first call (_bind): hashed once
            fixed = {k: v for k, v in self._configuration(x).items() if k != "step"}
            self._fingerprint = float(zlib.crc32(repr(fixed).encode()))
        foreign = self._loaded_where not in (None, (rank, n))
        probe = torch.tensor([0.0, self.step, -self.step, self._fingerprint, -self._fingerprint, foreign],
                             dtype=torch.float64)  # fmt: skip
        probe[0] = nonfinite_flag(x).to(torch.float64)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
        if probe[5] > 0:  # before anything runs on the loaded state, on every rank
            r, w = self._loaded_where or (rank, n)
            mine = f"saved by rank {r} of {w}, this is rank {rank} of {n}" if foreign else "loaded on another rank"
            raise ValueError(
                f"the feedback state of the compressed reduce-scatter{' of ' + self.name if self.name else ''} was "
                f"{mine}: error-feedback state is per rank and cannot be re-sharded (load each rank's own state)"
            )
        if probe[1] != -probe[2] or probe[3] != -probe[4]:  # every rank sees the same: every rank goes on here
            where = f" of {self.name}" if self.name else ""
            what = f"compressed reduce-scatter{where} (tk.fsdp.compress_reduce_scatter with one method on every rank)"
            agree(self._configuration(x), group=group, world_size=n, rank=rank, hints=RESUME_HINTS, what=what)
            raise ValueError(f"ranks are configured differently: every rank must build the same {what}")
        return bool(probe[0] > 0)

    def _configuration(self, x: Tensor) -> dict:
        return {
            "method": self.feedback.config(),  # ("feedback" would draw the resume hint: it names the shared state)
            "step": self.step,
            "reduce-scatter input": (x.numel(), str(x.dtype)),
            "nonfinite": self.nonfinite,
        }

    def _bind(self, x: Tensor, shard: int) -> None:
        if self._numel is None:
            destroy_at_exit()
            self._numel = x.numel()
            self.state = self.feedback.init_state(x.numel(), dtype=x.dtype, device=x.device)
            if self.feedback.server_state:
                self.server = torch.zeros(shard, dtype=self.feedback.state_dtype(x.dtype), device=x.device)
        elif x.numel() != self._numel:
            raise ValueError(
                f"the reduce-scatter{' of ' + self.name if self.name else ''} had {self._numel} entries and now "
                f"{x.numel()}: a parameter of the module got no gradient this step (frozen or unused: FSDP then leaves "
                "it out, and the feedback state would no longer line up with the parameters; every parameter of a "
                "compressed module must get a gradient at every step), or one CompressedReduceScatter serves two "
                "modules (compress_reduce_scatter makes one per fully_shard module)"
            )

    def _exchange(self, msg, shard: int, n: int, group):
        """Shard j's piece of this rank's message to rank j, every rank's piece of this shard back: the n
        messages of this shard, rows in rank order (sparse: indices within the shard)."""
        if isinstance(msg, DenseMessage):  # step 0 of init="full": the dense pieces
            send = msg.values.reshape(-1).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=group)
            self.bytes_sent = (n - 1) * shard * send.element_size()
            return DenseMessage(recv.reshape(n, shard))
        if not isinstance(msg, SparseMessage) or msg.q is not None:
            raise TypeError(f"the compressed reduce-scatter sends sparse messages, got {type(msg).__name__}")
        k = msg.values.shape[1] // n  # the same k for every piece: the pieces have one length
        values = msg.values.reshape(n, k).contiguous()
        offsets = torch.arange(n, dtype=torch.int64, device=values.device).unsqueeze(1) * shard
        indices = (msg.indices.reshape(n, k).to(torch.int64) - offsets).to(torch.int32)
        send = torch.cat([values.view(torch.uint8), indices.view(torch.uint8)], dim=1).reshape(-1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        recv = recv.reshape(n, -1)
        vb = k * values.element_size()
        self.bytes_sent = (n - 1) * send.numel() // n
        return SparseMessage(
            recv[:, :vb].contiguous().view(values.dtype), recv[:, vb:].contiguous().view(torch.int32), shard
        )

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """This rank's state (per rank: save it with the rank in the name, or as a DCP ``Stateful``)."""
        where = self._loaded_where or self._where  # a loaded state not yet run: where it was saved
        return {
            "method": self.feedback.config(),
            "step": self.step,
            "rank": None if where is None else where[0],  # in the group it runs on
            "world_size": None if where is None else where[1],
            "numel": self._numel,
            "state": {k: v.clone() for k, v in (self.state or {}).items()},
            "server": None if self.server is None else self.server.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """This rank's state back, checked whole before anything changes (a missing key, a NaN, a vector of another
        length, an EF21 state without its server estimate raise ``ValueError``; the configuration and the saving
        rank are compared at the next call, on every rank)."""
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        missing = [k for k in ("method", "step", "numel", "state", "server") if k not in sd]
        if missing:
            raise ValueError(f"not a CompressedReduceScatter state_dict: no {missing}")
        mine = self.feedback.config()
        if sd["method"] != mine:
            raise ValueError(f"feedback state of {sd['method']!r}, this reduce-scatter runs {mine!r}")
        numel = sd["numel"]
        if numel is not None and (isinstance(numel, bool) or not isinstance(numel, int) or numel < 1):
            raise ValueError(f"checkpoint numel must be an int >= 1 or None, got {numel!r}")
        if self._numel is not None and numel not in (None, self._numel):
            raise ValueError(f"feedback state for {numel} entries, this module's reduce-scatter has {self._numel}")
        step = checkpoint_count("step", sd["step"])
        state, server = sd["state"], sd["server"]
        saved = (sd.get("rank"), sd.get("world_size"))
        if numel is not None:
            want = set(self.feedback.state_names)
            if not isinstance(state, Mapping) or set(state) != want:
                have = sorted(state) if isinstance(state, Mapping) else type(state).__name__
                raise ValueError(f"checkpoint state must hold {sorted(want)}, has {have}")
            for k, t in state.items():
                _check_vector(f"state {k!r}", t, numel)
            if self.feedback.server_state and server is None:  # it would run without its estimate for good
                raise ValueError("checkpoint has no server estimate (the method keeps one): not this method's state")
        if server is not None:
            n = saved[1]
            shard = numel // n if numel is not None and isinstance(n, int) and n > 0 else None
            _check_vector("server", server, shard)
        if self._group_size == 1 and saved[1] not in (None, 1):  # no call will come to check it: one rank, no peer
            raise ValueError(
                f"feedback state saved by rank {saved[0]} of {saved[1]}, this module is sharded over one rank: "
                "error-feedback state is per rank and cannot be re-sharded"
            )
        # the saving rank is checked at the next call, on every rank at once (its probe): a rank raising here alone
        # would leave the others waiting in that collective. Checkpoints before 2026-12 did not record it.
        self._loaded_where = None if None in saved else saved
        self.step = step
        self._numel = numel
        self.state = {k: v.clone() for k, v in state.items()} if numel is not None else None
        self.server = None if server is None else server.clone()


def _check_vector(what: str, t: Any, numel: int | None) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1:
        raise ValueError(f"checkpoint {what} must be a 1-D floating-point tensor, got {_described(t)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"checkpoint {what} has {t.numel()} entries, where {numel} were saved")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"checkpoint {what} holds non-finite values")


def _described(t: Any) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def compress_reduce_scatter(
    model: torch.nn.Module, feedback: Feedback, *, nonfinite: Literal["raise", "skip"] = "raise"
) -> dict[str, CompressedReduceScatter]:
    """Install a :class:`CompressedReduceScatter` of ``feedback`` (a fresh copy of its state per module) on every
    ``fully_shard``-ed module of ``model``; returns them by module name (their ``state_dict`` is this rank's).

    Every parameter of a compressed module must get a gradient at every step: FSDP leaves a parameter without one
    (frozen, or unused in that forward) out of the reduce-scatter's input, so the flat feedback state would no
    longer line up with the parameters. A change of the input's size raises; a change that keeps its size (two
    parameters of one size taking turns) cannot be seen here and would apply one's error to the other."""
    from torch.distributed.fsdp import FSDPModule

    comms = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            if _replicated(module):
                raise ValueError(
                    f"module {name or '<root>'} is sharded with replicas (HSDP): compress the replica exchange with "
                    "tk.CompressedOptimizer over the replicate group instead (README 'FSDP2 and hybrid sharding')"
                )
            comms[name] = CompressedReduceScatter(feedback, nonfinite=nonfinite, name=name or "<root>")
            comms[name]._group_size = _shard_size(module)
            module.set_custom_reduce_scatter(comms[name])
    if not comms:
        raise ValueError("model has no fully_shard-ed module: call torch.distributed.fsdp.fully_shard on it first")
    if {c._group_size for c in comms.values()} - {None} == {1}:  # (a module without parameters of its own: None)
        warnings.warn(
            "compress_reduce_scatter: the model is sharded over one rank, so FSDP runs no reduce-scatter and nothing "
            "is compressed (metrics stay at 0)",
            stacklevel=2,
        )
    return comms


def _shard_size(module) -> int | None:
    """The ranks of the module's shard group (``None`` where FSDP does not say)."""
    sizes = {getattr(pg.mesh_info, "shard_mesh_size", None) for pg in module._get_fsdp_state()._fsdp_param_groups}
    return sizes.pop() if len(sizes) == 1 else None


def _replicated(module) -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo

    return any(isinstance(pg.mesh_info, DDPMeshInfo) for pg in module._get_fsdp_state()._fsdp_param_groups)
