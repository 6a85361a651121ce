"""What a front end has communicated on this rank, with the same names in every front end.

:class:`CommMetrics` is ``.metrics`` of :class:`torchkit.CompressedOptimizer`, :class:`torchkit.LocalSGD`, the
DDP hook's :class:`torchkit.ddp.CompressionState` and each FSDP module's
:class:`torchkit.fsdp.CompressedReduceScatter` (whose ``dense_bytes`` is the dense reduce-scatter's). A *step* is
what the front end is called for (an optimizer step, a hook iteration, a LocalSGD call, a reduce-scatter); a
*round* is one exchange (the wrapper's and the hook's every step, LocalSGD's every ``sync_every`` steps).
Counters run from the object's construction in this process (checkpoints do not carry them); ``last_*`` describe
the last step that ran a round.

Log them where you look::

    writer = torch.utils.tensorboard.SummaryWriter()       # TensorBoard
    opt.metrics.log_to(writer, step)
    self.log_dict(opt.metrics.as_dict())                    # Lightning (or torchkit.integrations.lightning.CommMetrics)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["CommMetrics"]


@dataclass
class CommMetrics:
    """Communication counters of one front end on this rank.

    Attributes:
        steps: steps the front end ran (skipped ones included).
        rounds: exchanges run.
        skipped_steps: steps this rank did not take for a non-finite gradient.
        skipped_rounds: rounds no rank ran for a non-finite gradient (a wrapper or hook step skipped under
            GradScaler or ``nonfinite="skip"`` counts in both).
        dense_rounds: block or bucket rounds sent dense: the method's dense first round, or the Identity fallback
            where compressing would not pay (``min_compression_rate``).
        bytes_sent: payload bytes this rank put on the wire (values, indices, flags), all rounds.
        dense_bytes: what a plain dense all-reduce of the same gradients would have sent, all rounds.
        last_bytes_sent, last_dense_bytes: the same for the last step that ran a round.
        numel, last_numel: gradient (or pseudo-gradient) entries the rounds exchanged: :attr:`bits_per_parameter`
            is ``8 * bytes_sent / numel``, the bits per parameter per round (per sync, for LocalSGD).
        node_bytes, last_node_bytes: node-aware compression (``node_group=``): the dense bytes this rank sent
            inside its node (reduce-scatter and all-gather, ring); ``bytes_sent`` then counts what crossed the
            node boundary, for this rank's shard (whose entries ``numel`` counts), and the optimizer wrapper's
            per-step agreement (a few float64 flags, all-reduced over every rank).
    """

    steps: int = 0
    rounds: int = 0
    skipped_steps: int = 0
    skipped_rounds: int = 0
    dense_rounds: int = 0
    bytes_sent: int = 0
    dense_bytes: int = 0
    last_bytes_sent: int = 0
    last_dense_bytes: int = 0
    numel: int = 0
    last_numel: int = 0
    node_bytes: int = 0
    last_node_bytes: int = 0

    @property
    def compression(self) -> float:
        """``dense_bytes / bytes_sent`` over all rounds (``0.0`` while nothing was sent: before the first round, and
        on one process, which sends nothing)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else 0.0

    @property
    def last_compression(self) -> float:
        return self.last_dense_bytes / self.last_bytes_sent if self.last_bytes_sent else 0.0

    @property
    def bits_per_parameter(self) -> float:
        """Bits this rank sent per parameter per round, over all rounds (``0.0`` before the first)."""
        return 8 * self.bytes_sent / self.numel if self.numel else 0.0

    @property
    def last_bits_per_parameter(self) -> float:
        return 8 * self.last_bytes_sent / self.last_numel if self.last_numel else 0.0

    def record_round(self, results: list[Any]) -> None:
        """Count one step's round from its :class:`torchkit.comm.RoundResult` objects (one per block or bucket)."""
        self.record(
            sum(r.sent_bytes for r in results),
            sum(r.dense_bytes for r in results),
            sum(r.estimate.shape[-1] for r in results),
            dense_rounds=sum(1 for r in results if r.dense),
        )

    def record(self, sent: int, dense: int, numel: int, *, dense_rounds: int = 0) -> None:
        """Count one round: ``sent`` bytes where a dense all-reduce would have sent ``dense``, over ``numel``
        entries, ``dense_rounds`` of its blocks sent dense."""
        self.rounds += 1
        self.dense_rounds += dense_rounds
        self.bytes_sent += sent
        self.dense_bytes += dense
        self.last_bytes_sent, self.last_dense_bytes = sent, dense
        self.last_numel = numel
        self.numel += numel

    def record_node(self, nbytes: int) -> None:
        """Count the dense bytes one step sent inside the node (node-aware compression)."""
        self.node_bytes += nbytes
        self.last_node_bytes = nbytes

    def as_dict(self, prefix: str = "torchkit/") -> dict[str, float]:
        """Every counter and the ratios as floats, keyed ``<prefix><name>`` (for ``log_dict`` and loggers)."""
        out = {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in fields(self)}
        for name in ("compression", "last_compression", "bits_per_parameter", "last_bits_per_parameter"):
            out[f"{prefix}{name}"] = getattr(self, name)
        return out

    def log_to(self, writer: Any, step: int, prefix: str = "torchkit/") -> None:
        """Write :meth:`as_dict` to a TensorBoard ``SummaryWriter`` (anything with ``add_scalar``) at ``step``."""
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar (torch.utils.tensorboard.SummaryWriter), got {writer!r}")
        for key, value in self.as_dict(prefix).items():
            writer.add_scalar(key, value, step)
