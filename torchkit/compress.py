"""Compressors and the messages they produce.

Every compressor works on a ``[d]`` vector or a ``[rows, d]`` batch (one independent vector per row)
and knows its contraction factor ``alpha`` (``E||C(x) - x||^2 <= (1 - alpha) ||x||^2``), the values it
sends in the papers' convention (32 bits per value, indices free) and its exact wire size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from . import ops
from ._validation import check_bool, check_dense_float, check_int, check_ratio, check_segments, resolve_k

__all__ = [
    "Compressor",
    "TopK",
    "RandK",
    "CyclicTopK",
    "DensityWarmup",
    "SupportExchange",
    "support_exchange",
    "ScaledSign",
    "Identity",
    "Message",
    "SparseMessage",
    "DenseMessage",
    "SignMessage",
    "WireLayout",
    "pack_message",
    "unpack_message",
    "register_message",
    "quantize",
    "dequantize",
    "quantize_2bit",
    "dequantize_2bit",
]

_VALUE_BITS = 32  # the EF21 papers count 32 bits per sent value and nothing for indices


# ----------------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class WireLayout:
    """What one row of a packed message holds, so the receiver can unpack it."""

    kind: str  # the message type's ``kind``
    numel: int
    k: int  # values per row (sparse) or bytes of bits (sign)
    value_dtype: torch.dtype
    index_dtype: torch.dtype | None
    segments: tuple[int, ...] = ()
    groups: tuple[tuple[int, int], ...] | None = None  # sparse: (start, count) per chunk or segment
    scaled: bool = False  # sparse: int8 values with one fp32 scale per group, or 2-bit codes with two
    index_bits: int | None = None  # sparse: offsets packed at this width (12), else whole ``index_dtype`` items


_MESSAGE_KINDS: dict[str, type] = {}


def register_message(cls: type) -> type:
    """Make a message type packable: it defines ``kind``, ``pack(value_dtype)`` and ``unpack(buf, layout)``."""
    _MESSAGE_KINDS[cls.kind] = cls
    return cls


def _bytes_part(buf: Tensor, a: int, b: int | None, dtype: torch.dtype) -> Tensor:
    """Bytes ``a:b`` of every row of ``buf`` as ``dtype``: a view where they are aligned for it (the part's first
    byte in every row: its offset in the storage, whose start the allocator aligns, and the row length), else an
    aligned copy (a view of unaligned bytes would read them with misaligned loads, or fail)."""
    part = buf[:, a:b]
    size = dtype.itemsize
    if not torch.compiler.is_compiling():  # (a traced graph copies: the storage offset is not traceable)
        aligned = part.storage_offset() % size == 0 and part.stride(0) % size == 0
        if aligned and part.shape[1] % size == 0:
            return part.view(dtype)
    return part.clone(memory_format=torch.contiguous_format).view(dtype)


_PAD: dict[torch.device, Tensor] = {}


def _joined(parts: list[Tensor], trailer: Tensor | None) -> Tensor:
    """One row of bytes: ``parts``, then ``trailer`` at the next multiple of 8 bytes (zeros between), so that a
    receiver reads an 8-byte trailer, and every 4-byte part of the rows it gathers, in place."""
    if trailer is not None:
        pad = -sum(p.numel() for p in parts) % 8
        if pad:
            zeros = _PAD.get(trailer.device)
            if zeros is None:
                zeros = _PAD[trailer.device] = torch.zeros(8, dtype=torch.uint8, device=trailer.device)
            parts = [*parts, zeros[:pad]]
        parts = [*parts, trailer]
    return torch.cat(parts)


@dataclass
class SparseMessage:
    """``rows`` sparse vectors of length ``numel``: k values and k indices each (indices unique per row).

    ``groups`` lists ``(start, count)`` per group of entries, in order: the chunks of a chunked TopK (whose
    indices then travel as offsets from the chunk's start: 16 bits, or ``offset_bits = 12`` packed for chunks of
    at most 4096 entries), or the segments of a per-tensor message. After rounding to int8
    (:meth:`torchkit.feedback.Feedback.round_values_`), ``q`` holds the int8 values and ``scales`` one fp32 step
    per group, and ``values`` is what every receiver decodes: ``q * step``. After rounding to 2 bits
    (``torch.int2``: :func:`quantize_2bit`), ``q`` holds uint8 codes (bit 0 the sign, bit 1 the larger magnitude)
    and ``scales`` two fp32 magnitudes per group (the smaller, then the larger).
    """

    values: Tensor  # [rows, k]
    indices: Tensor  # [rows, k], int32 while numel < 2**31
    numel: int
    groups: tuple[tuple[int, int], ...] | None = None
    local_indices: bool = False  # the groups are chunks of at most 65536 entries
    q: Tensor | None = None  # [rows, k] int8 values, or uint8 2-bit codes
    scales: Tensor | None = None  # [rows, n_groups] fp32 steps, or [rows, 2 * n_groups] magnitudes (2-bit)
    #: every worker's message of this round has the same indices (a shared support): the values can be summed by
    #: ``all_reduce`` instead of gathered. ``leader``: the worker whose indices they are (``None``: a shared seed).
    shared: bool = False
    leader: int | None = None
    offset_bits: int = 16  # local indices: the width of an offset on the wire (12: chunks of <= 4096 entries)

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        out = self.values.new_zeros(self.rows, self.numel, dtype=dtype or self.values.dtype)
        return out.scatter_(1, self.indices.long(), self.values.to(out.dtype))

    def add_to_(self, out: Tensor, scale: float | Tensor = 1.0, *, zero: bool = False, poison=None) -> Tensor:
        return ops.accumulate_(out, self.values, self.indices, scale, zero=zero, poison=poison)

    def wire_bytes(self) -> int:
        """Bytes one row puts on the wire (a shared support's: its values, and its indices where a leader chose
        them)."""
        if self.shared:
            ibytes = 0 if self.leader is None else self.indices.element_size()
            return self.values.shape[1] * (summed_value_bytes(self.values.dtype) + ibytes)
        buf, _ = self.pack()
        return buf.numel()

    def value_bits(self) -> int:
        return self.values.shape[1] * _VALUE_BITS

    def nonfinite(self) -> Tensor:
        return ops.nonfinite_check(self.values)

    def group_bases(self, device=None) -> Tensor:
        """Each entry's group start (the base of its 16-bit offset)."""
        device = device if device is not None else self.indices.device
        starts = torch.tensor([a for a, _ in self.groups], dtype=torch.int32, device=device)
        counts = torch.tensor([c for _, c in self.groups], device=device)
        return torch.repeat_interleave(starts, counts)

    kind = "sparse"

    def pack(self, value_dtype: torch.dtype | None = None, trailer: Tensor | None = None) -> tuple[Tensor, WireLayout]:
        """Row 0 as bytes: values (int8 or 2-bit codes with their scales when quantised, else in ``value_dtype``),
        then indices (12- or 16-bit offsets within their chunk, or int32), then ``trailer`` (bytes the caller
        adds)."""
        if self.q is not None:
            two_bit = self.q.dtype == torch.uint8
            codes = _pack_uint(self.q[:1], 2)[0] if two_bit else self.q[0].contiguous().view(torch.uint8)
            parts = [codes, self.scales[0].float().contiguous().view(torch.uint8)]
            vdtype = INT2 if two_bit else torch.int8
        else:
            vals = self.values[0].to(value_dtype or self.values.dtype).contiguous()
            parts, vdtype = [vals.view(torch.uint8)], vals.dtype
        idx, index_bits = self.indices[0], None
        if self.local_indices:
            idx = (idx - self.group_bases()).to(torch.uint16)
        if self.local_indices and self.offset_bits == 12:
            parts.append(_pack_uint(idx[None], 12)[0])
            index_bits = 12
        else:
            parts.append(idx.contiguous().view(torch.uint8))
        layout = WireLayout(
            self.kind, self.numel, self.values.shape[1], vdtype, idx.dtype, (), self.groups, self.q is not None,
            index_bits,
        )  # fmt: skip
        return _joined(parts, trailer), layout

    @staticmethod
    def unpack(buf: Tensor, layout: WireLayout) -> SparseMessage:
        rows, k = buf.shape[0], layout.k
        n_groups = len(layout.groups) if layout.groups else 1
        two_bit = layout.scaled and layout.value_dtype == INT2
        code_bytes = (2 * k + 7) // 8 if two_bit else k * layout.value_dtype.itemsize
        vbytes = code_bytes + (4 * n_groups * (2 if two_bit else 1) if layout.scaled else 0)
        local = layout.index_dtype == torch.uint16
        msg = SparseMessage(None, None, layout.numel, layout.groups, local, offset_bits=layout.index_bits or 16)
        if layout.index_bits:
            idx = _unpack_uint(buf[:, vbytes : vbytes + (layout.index_bits * k + 7) // 8], layout.index_bits, k)
        else:
            end = vbytes + k * layout.index_dtype.itemsize  # (zeros may follow: a trailer's alignment)
            idx = _bytes_part(buf, vbytes, end, layout.index_dtype).reshape(rows, k)
        msg.indices = idx.to(torch.int32) + msg.group_bases(idx.device) if local else idx
        if two_bit:
            msg.q = _unpack_uint(buf[:, :code_bytes], 2, k).to(torch.uint8)
            msg.scales = _bytes_part(buf, code_bytes, vbytes, torch.float32).reshape(rows, 2 * n_groups)
            msg.values = dequantize_2bit(msg.q, msg.scales, layout.groups, k)
        elif layout.scaled:
            msg.q = _bytes_part(buf, 0, k, torch.int8).reshape(rows, k)
            msg.scales = _bytes_part(buf, k, vbytes, torch.float32).reshape(rows, n_groups)
            msg.values = dequantize(msg.q, msg.scales, layout.groups, k)
        else:
            msg.values = _bytes_part(buf, 0, vbytes, layout.value_dtype).reshape(rows, k)
        return msg


def quantize(values: Tensor, groups: tuple[tuple[int, int], ...] | None) -> tuple[Tensor, Tensor, Tensor]:
    """int8 values with one fp32 step per group (absmax / 127): ``(q, steps, dequantized)``."""
    rows, k = values.shape
    counts = [c for _, c in groups] if groups else [k]
    steps = torch.stack(
        [g.abs().amax(dim=1).float() / 127.0 for g in values.float().split(counts, dim=1)], dim=1
    )  # [rows, n_groups]
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))
    per_entry = torch.repeat_interleave(safe, torch.tensor(counts, device=values.device), dim=1)
    q = torch.round(values.float() / per_entry).clamp_(-127, 127).to(torch.int8)
    return q, steps, dequantize(q, steps, groups, k)


def dequantize(q: Tensor, steps: Tensor, groups: tuple[tuple[int, int], ...] | None, k: int) -> Tensor:
    return q.to(torch.float32) * steps[:, _group_ids(groups, k, q.device)[0]]


#: the wire dtype of 2-bit values (``wire_dtype=torch.int2``; a torch without the dtype has no 2-bit wire)
INT2: torch.dtype | None = getattr(torch, "int2", None)


def _group_ids(groups: tuple[tuple[int, int], ...] | None, k: int, device) -> tuple[Tensor, int]:
    """Each entry's group number, and the number of groups."""
    counts = torch.tensor([c for _, c in groups] if groups else [k], device=device)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts), counts.numel()


def quantize_2bit(values: Tensor, groups: tuple[tuple[int, int], ...] | None) -> tuple[Tensor, Tensor, Tensor]:
    """2-bit codes with two fp32 magnitudes per group: ``(codes, scales, dequantized)``.

    A code's bit 0 is the sign, bit 1 whether the entry takes the group's larger magnitude. A group's magnitudes
    are split at their mean, and each level is the mean of the magnitudes on its side: one step of Lloyd's
    algorithm from the mean, so the squared error is at most that of one magnitude per group (scaled sign on the
    kept entries), and every entry keeps its sign. ``scales`` is ``[rows, 2 * groups]``: the smaller, then the
    larger magnitude of each group (equal where a group's magnitudes are)."""
    rows, k = values.shape
    gid, n_groups = _group_ids(groups, k, values.device)
    m = values.float().abs()

    def group_sum(x: Tensor) -> Tensor:
        return m.new_zeros(rows, n_groups).index_add_(1, gid, x)

    count = group_sum(torch.ones_like(m))
    mean = group_sum(m) / count
    large = m >= mean[:, gid]
    n_large = group_sum(large.float())
    levels = []
    for side, n_side in ((~large, count - n_large), (large, n_large)):
        levels.append(torch.where(n_side > 0, group_sum(m * side) / n_side.clamp_min(1), mean))
    scales = torch.stack(levels, dim=2).reshape(rows, 2 * n_groups)
    codes = (values < 0).to(torch.uint8) | (large.to(torch.uint8) << 1)
    return codes, scales, dequantize_2bit(codes, scales, groups, k)


def dequantize_2bit(codes: Tensor, scales: Tensor, groups: tuple[tuple[int, int], ...] | None, k: int) -> Tensor:
    """What every receiver decodes from 2-bit ``codes`` and their groups' two magnitudes (:func:`quantize_2bit`)."""
    gid, n_groups = _group_ids(groups, k, codes.device)
    levels = scales.reshape(-1, n_groups, 2)
    large = (codes >> 1).bool()
    magnitude = torch.where(large, levels[:, gid, 1], levels[:, gid, 0])
    return torch.where((codes & 1).bool(), -magnitude, magnitude)


@dataclass
class DenseMessage:
    values: Tensor  # [rows, numel]

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def numel(self) -> int:
        return self.values.shape[1]

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.values.to(dtype or self.values.dtype)

    def add_to_(self, out: Tensor, scale: float | Tensor = 1.0, *, zero: bool = False, poison=None) -> Tensor:
        ops.prepare_(out, zero=zero, poison=poison)
        scales = _scale_list(scale, self.rows)
        for w in range(self.rows):
            out.add_(self.values[w].to(out.dtype) * scales[w])
        return out

    def wire_bytes(self) -> int:
        return self.numel * self.values.element_size()

    def value_bits(self) -> int:
        return self.numel * _VALUE_BITS

    def nonfinite(self) -> Tensor:
        return ops.nonfinite_check(self.values)


@dataclass
class SignMessage:
    """Scaled sign: one bit per entry (packed, sign(0) := +1) and one fp32 scale per segment."""

    bits: Tensor  # [rows, nbytes] uint8, each segment padded to whole bytes
    scales: Tensor  # [rows, n_segments] float32
    segments: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.bits.shape[0]

    @property
    def numel(self) -> int:
        return sum(self.segments)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or torch.float32
        parts, byte0 = [], 0
        for s, n in enumerate(self.segments):
            nb = (n + 7) // 8
            signs = _unpack_bits(self.bits[:, byte0 : byte0 + nb], n).to(dtype) * 2 - 1
            parts.append(signs * self.scales[:, s : s + 1].to(dtype))
            byte0 += nb
        return torch.cat(parts, dim=1)

    def add_to_(self, out: Tensor, scale: float | Tensor = 1.0, *, zero: bool = False, poison=None) -> Tensor:
        return DenseMessage(self.to_dense(out.dtype)).add_to_(out, scale, zero=zero, poison=poison)

    def wire_bytes(self) -> int:
        return self.bits.shape[1] + self.scales.element_size() * len(self.segments)

    def value_bits(self) -> int:
        return self.numel + _VALUE_BITS * len(self.segments)

    def nonfinite(self) -> Tensor:
        return ops.nonfinite_check(self.scales)

    kind = "sign"

    def pack(self, value_dtype: torch.dtype | None = None, trailer: Tensor | None = None) -> tuple[Tensor, WireLayout]:
        """Row 0 as bytes: the packed bits, then the fp32 scales (``value_dtype`` does not apply), then ``trailer``."""
        scales = self.scales[0].contiguous()
        layout = WireLayout(self.kind, self.numel, self.bits.shape[1], scales.dtype, None, self.segments)
        parts = [self.bits[0], scales.view(torch.uint8)]
        return _joined(parts, trailer), layout

    @staticmethod
    def unpack(buf: Tensor, layout: WireLayout) -> SignMessage:
        bits = buf[:, : layout.k].contiguous()
        end = layout.k + layout.value_dtype.itemsize * len(layout.segments)
        scales = _bytes_part(buf, layout.k, end, layout.value_dtype).reshape(buf.shape[0], len(layout.segments))
        return SignMessage(bits, scales, layout.segments)


Message = SparseMessage | DenseMessage | SignMessage
register_message(SparseMessage)
register_message(SignMessage)

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(mask: Tensor) -> Tensor:
    rows, n = mask.shape
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    return (m * _BIT_WEIGHTS.to(m.device)).sum(dim=2, dtype=torch.uint8)


def _unpack_bits(bits: Tensor, n: int) -> Tensor:
    w = _BIT_WEIGHTS.to(bits.device)
    return (bits.unsqueeze(-1) & w).ne(0).reshape(bits.shape[0], -1)[:, :n]


_BITS = {n: torch.arange(n, dtype=torch.int32) for n in (2, 12)}


def _pack_uint(x: Tensor, bits: int) -> Tensor:
    """``[rows, k]`` unsigned integers below ``2**bits`` as ``[rows, ceil(k * bits / 8)]`` bytes, little-endian."""
    shifts = _BITS[bits].to(x.device)
    mask = (x.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return _pack_bits(mask.reshape(x.shape[0], -1))


def _unpack_uint(buf: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`_pack_uint`: ``[rows, k]`` int32."""
    shifts = _BITS[bits].to(buf.device)
    mask = _unpack_bits(buf, k * bits).reshape(buf.shape[0], k, bits).to(torch.int32)
    return (mask << shifts).sum(dim=2, dtype=torch.int32)


def summed_value_bytes(dtype: torch.dtype) -> int:
    """Bytes of one value that ``all_reduce`` sums (a shared support): the aggregate's dtype, fp32 at least, as
    :meth:`torchkit.comm.DistExchanger` sends it (a sum in a narrower dtype would round the aggregate)."""
    return max(4, torch.empty((), dtype=dtype).element_size())


def _scale_list(scale: float | Tensor, n: int) -> list[float]:
    from .ops._reference import _scales

    return _scales(scale, n)


def _rows(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.unsqueeze(0)


def _input_rows(x: Tensor) -> Tensor:
    """A compressor's input as ``[rows, d]``: a dense floating vector or batch with at least one entry."""
    check_dense_float("x", x)
    if x.dim() not in (1, 2):
        raise ValueError(f"x must be a vector [d] or a batch [rows, d], got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one entry per row, got shape {tuple(x.shape)}")
    return _rows(x)


# ---------------------------------------------------------------------------------------------- compressors
class Compressor:
    """Base class. Subclasses implement :meth:`compress` and the accounting methods."""

    #: ``True`` for unbiased compressors Q; error feedback then uses ``Q/(omega+1)`` (:meth:`contractive`).
    unbiased: bool = False

    def alpha(self, d: int) -> float:
        raise NotImplementedError

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> Message:
        raise NotImplementedError

    def contractive(self) -> Compressor:
        """The contractive form used by error feedback (itself for biased compressors)."""
        return self

    def wire_bytes(self, d: int, value_dtype: torch.dtype = torch.float32) -> int:
        raise NotImplementedError

    def value_bits(self, d: int) -> int:
        raise NotImplementedError

    #: True when the fused top-k kernels of :mod:`torchkit.ops` compute exactly this compressor's selection
    fused_topk: bool = False
    #: True when a non-finite input entry always shows in the message (so the message reveals it)
    reveals_nonfinite: bool = True
    #: True when every worker's message of a round has the same indices (:attr:`SparseMessage.shared`), so that
    #: the exchange sums values with ``all_reduce``: the bytes a rank receives do not grow with the worker count
    shared_support: bool = False

    def config(self) -> dict:
        """The compressor's identity as plain data (checkpoints compare these, not ``repr``)."""
        return {"type": type(self).__name__}

    def at(self, step: int) -> Compressor:
        """The compressor of round ``step`` (itself; :class:`DensityWarmup` keeps more early on)."""
        return self

    def compress_segments(self, x: Tensor, segments: Sequence[int], *, worker: int = 0, step: int = 0) -> Message:
        """Compress each segment of the last dim on its own (per-tensor granularity) into one message."""
        check_segments(segments, x.shape[-1])
        if len(segments) == 1:
            return self.compress(x, worker=worker, step=step)
        x2 = _rows(x)
        msgs, off = [], 0
        for n in segments:
            msgs.append(self.compress(x2[:, off : off + n], worker=worker, step=step))
            off += n
        return concat_messages(msgs, segments)


class _Sparsifier(Compressor):
    def __init__(self, k: int | None, ratio: float | None):
        if (k is None) == (ratio is None):
            raise ValueError(f"give exactly one of k and ratio, got k={k!r}, ratio={ratio!r}")
        self.k = None if k is None else check_int("k", k)
        self.ratio = None if ratio is None else check_ratio("ratio", ratio)

    def k_for(self, d: int) -> int:
        """Values kept for a vector of length ``d``: ``k``, or all ``d`` when there are fewer (a group whose
        parameters did not all get a gradient, a small bucket), or ``ceil(ratio * d)``."""
        return resolve_k(self.k, self.ratio, d)

    def alpha(self, d: int) -> float:
        return self.k_for(check_int("d", d)) / d

    def wire_bytes(self, d: int, value_dtype: torch.dtype = torch.float32) -> int:
        """Exact bytes of a packed message (:func:`chunk_wire_bytes`: int8's scale and int2's packing included; they
        were left out for RandK, whose int2 count was 17% high and int8's 4 bytes low)."""
        return chunk_wire_bytes(self, [check_int("d", d)], value_dtype)

    def value_bytes(self, value_dtype: torch.dtype) -> int:
        """Bytes of one value on the wire: the wire dtype's, or for values summed by ``all_reduce`` (a shared
        support) the aggregate's, fp32 at least (a sum in a narrower dtype would round the aggregate)."""
        if self.shared_support:
            return summed_value_bytes(value_dtype)
        return torch.empty((), dtype=value_dtype).element_size()

    def value_bits(self, d: int) -> int:
        return self.k_for(check_int("d", d)) * _VALUE_BITS

    def index_bytes(self, d: int) -> int:
        """Bytes of one index on the wire for a vector of length ``d`` (0 where the indices travel not at all)."""
        return ops.index_dtype(d).itemsize

    def _arg(self) -> str:
        return f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"

    def config(self) -> dict:
        return {**super().config(), "k": self.k, "ratio": self.ratio}


class TopK(_Sparsifier):
    """Keep the k entries of largest magnitude in each row; ``alpha = k/d`` exactly.

    Args:
        k: entries kept per vector (1 <= k <= d).
        ratio: alternatively the kept fraction in (0, 1]; ``k = ceil(ratio * d)``.
        approx: let the fused kernels skip the exact resolve inside the threshold bin (still exactly k
            entries; error feedback keeps whatever is not sent).
        chunk: keep ``ceil(ratio * len)`` entries in every chunk of ``chunk`` consecutive entries (at most 65536),
            and send their indices as 16-bit offsets within the chunk (SparseLoCo's layout). Still contractive:
            ``alpha`` is the smallest chunk's ``k_c / len_c``, at least ``ratio``.
        exchange: ``"gather"`` (default): each worker's own support, all-gathered. ``"auto"``: chosen per block
            (bucket, parameter group) and group size by the round's byte model (:func:`torchkit.comm.plan_exchange`):
            the all-gather while it pays against a dense all-reduce, else the same k on a shared support
            (:class:`CyclicTopK`, summed by ``all_reduce``: bytes per rank that do not grow with the ranks) while
            that pays, else dense. A shared support can cost quality on skewed data (README, "Many ranks").
    """

    exchange = "gather"  # (a TopK pickled before the option existed)

    def __init__(
        self,
        k: int | None = None,
        *,
        ratio: float | None = None,
        approx: bool = False,
        chunk: int | None = None,
        exchange: str = "gather",
    ):
        super().__init__(k, ratio)
        if exchange not in ("gather", "auto"):
            raise ValueError(f"exchange must be 'gather' or 'auto', got {exchange!r}")
        self.exchange = exchange
        check_bool("approx", approx)
        if chunk is not None:
            check_int("chunk", chunk)
            if chunk > 65536:
                raise ValueError(f"chunk must be <= 65536 (16-bit offsets), got {chunk}")
            if ratio is None:
                raise ValueError("chunk needs a compressor given by ratio (k_c = ceil(ratio * chunk length)), not k")
        self.approx = approx
        self.chunk = chunk

    @property
    def fused_topk(self) -> bool:  # a subclass that selects differently overrides compress: no kernel then
        return type(self).compress is TopK.compress

    def chunks(self, d: int) -> list[tuple[int, int, int]]:
        """``(start, length, k)`` of every chunk of a vector of length ``d`` (one chunk without ``chunk``)."""
        if self.chunk is None:
            return [(0, d, self.k_for_whole(d))]
        return [(a, min(self.chunk, d - a), resolve_k(None, self.ratio, min(self.chunk, d - a)))
                for a in range(0, d, self.chunk)]  # fmt: skip

    def k_for_whole(self, d: int) -> int:
        return resolve_k(self.k, self.ratio, d)

    def k_for(self, d: int) -> int:
        return sum(k for _, _, k in self.chunks(d))

    def alpha(self, d: int) -> float:
        return min(k / n for _, n, k in self.chunks(check_int("d", d)))

    def config(self) -> dict:
        return {
            **super().config(),
            "approx": self.approx,
            **({"chunk": self.chunk} if self.chunk else {}),
            **({"exchange": self.exchange} if self.exchange != "gather" else {}),
        }

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> SparseMessage:
        x2 = _input_rows(x)
        d = x2.shape[1]
        if self.chunk is None:
            values, indices = ops.topk(x2.contiguous(), self.k_for(d))
            return SparseMessage(values, indices, d)
        vals, idxs, groups = [], [], []
        for a, n, k in self.chunks(d):
            v, i = ops.topk(x2[:, a : a + n].contiguous(), k)
            vals.append(v)
            idxs.append(i.to(torch.int32) + a)
            groups.append((a, k))
        return SparseMessage(
            torch.cat(vals, 1), torch.cat(idxs, 1), d, tuple(groups), True, offset_bits=self.offset_bits
        )

    @property
    def offset_bits(self) -> int:
        """Bits of a chunk offset on the wire: 12 for chunks of at most 4096 entries (two offsets in 3 bytes),
        else 16."""
        return 12 if self.chunk is not None and self.chunk <= 4096 else 16

    def __repr__(self) -> str:
        extra = (", approx=True" if self.approx else "") + (f", chunk={self.chunk}" if self.chunk else "")
        extra += ", exchange='auto'" if self.exchange != "gather" else ""
        return f"TopK({self._arg()}{extra})"


class RandK(_Sparsifier):
    """Keep k uniformly random coordinates per row; with ``unbiased=True`` scale them by d/k.

    The coordinates are drawn from a generator seeded with ``(seed, worker, step)``, so every front
    end (and a resumed run) draws the same ones. Unbiased: ``omega = d/k - 1``; error feedback uses the
    contractive form ``Q/(omega+1)``, i.e. the unscaled kept coordinates, with ``alpha = k/d``.

    ``shared=True``: every worker draws the same coordinates in a round (seeded with ``(seed, step)``), so the
    values are summed by ``all_reduce`` and no index travels (:attr:`Compressor.shared_support`). Each worker's
    compressor is still RandK, so ``alpha`` and ``omega`` hold for every worker as before.
    """

    def __init__(
        self,
        k: int | None = None,
        *,
        ratio: float | None = None,
        seed: int = 0,
        unbiased: bool = True,
        shared: bool = False,
    ):
        super().__init__(k, ratio)
        check_bool("shared", shared)
        self.seed = check_int("seed", seed, low=0)
        self.unbiased = check_bool("unbiased", unbiased)
        self.shared = shared

    reveals_nonfinite = False  # the random coordinates may miss a non-finite entry

    @property
    def shared_support(self) -> bool:  # type: ignore[override]
        return self.shared

    def omega(self, d: int) -> float:
        return check_int("d", d) / self.k_for(d) - 1.0

    def index_bytes(self, d: int) -> int:
        return 0 if self.shared else super().index_bytes(d)

    def config(self) -> dict:
        shared = {"shared": True} if self.shared else {}  # absent by default: older checkpoints compare equal
        return {**super().config(), "seed": self.seed, "unbiased": self.unbiased, **shared}

    def contractive(self) -> RandK:
        if not self.unbiased:
            return self
        return RandK(self.k, ratio=self.ratio, seed=self.seed, unbiased=False, shared=self.shared)

    def indices(self, d: int, rows: int, *, worker: int, step: int) -> Tensor:
        # ints only: a tensor hashes by identity and a float by value, and either would draw other indices than
        # the int the front ends pass (a shared support would then differ between workers)
        worker, step = check_int("worker", worker, low=0), check_int("step", step, low=0)
        k = self.k_for(d)
        out = torch.empty(rows, k, dtype=torch.int64)
        if self.shared:  # one draw for every worker: -1 is no worker's own stream
            g = torch.Generator().manual_seed(hash((self.seed, -1, step)) & 0x7FFF_FFFF_FFFF_FFFF)
            out[:] = torch.randperm(d, generator=g)[:k]
            return out
        for r in range(rows):
            g = torch.Generator().manual_seed(hash((self.seed, worker + r, step)) & 0x7FFF_FFFF_FFFF_FFFF)
            out[r] = torch.randperm(d, generator=g)[:k]
        return out

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> SparseMessage:
        x2 = _input_rows(x)
        d = x2.shape[1]
        idx = self.indices(d, x2.shape[0], worker=worker, step=step).to(x2.device)
        values = x2.gather(1, idx)
        if self.unbiased:
            values = values * (d / self.k_for(d))
        return SparseMessage(values, idx.to(ops.index_dtype(d)), d, shared=self.shared)

    def __repr__(self) -> str:
        shared = ", shared=True" if self.shared else ""
        return f"RandK({self._arg()}, seed={self.seed}, unbiased={self.unbiased}{shared})"


class SupportExchange(Protocol):
    """How the workers of a round agree on a shared support (the exchangers of :mod:`torchkit.comm`)."""

    n_workers: int
    first_worker: int

    def share_support(
        self, indices: Tensor | None, leader: int, k: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """The ``[k]`` indices worker ``leader`` chose (``indices`` where this process holds the leader, else
        ``None``), on every worker, on ``device``."""
        ...


_SUPPORT: ContextVar[SupportExchange | None] = ContextVar("torchkit_shared_support", default=None)


@contextmanager
def support_exchange(exchange: SupportExchange) -> Iterator[None]:
    """Within this block, compressors that agree on a support across workers (:class:`CyclicTopK`) do it through
    ``exchange``; the round (:func:`torchkit.comm.start_round`) installs its exchanger around the worker step, so
    the methods need not know. Outside of it, the rows of the compressed batch are all the workers."""
    token = _SUPPORT.set(exchange)
    try:
        yield
    finally:
        _SUPPORT.reset(token)


class CyclicTopK(_Sparsifier):
    """TopK on a support that every worker shares: in round ``t`` worker ``t mod n`` (the leader) picks the k
    entries of largest magnitude of its own vector, and every worker sends its values at those k indices
    (ScaleCom's cyclic local top-k, Chen et al., NeurIPS 2020).

    The workers' values are then summed by ``all_reduce``: a rank receives k values and the leader's k indices
    whatever the number of workers, where an all-gathered :class:`TopK` brings it ``(n - 1) k`` pairs.
    :meth:`wire_bytes` counts both for every worker (what each receives); what a rank sends, as the front ends count
    it, is the k values, plus the k indices in the rounds it leads.

    Contraction: the leader's compressor is its TopK (``alpha = k/d``, what :meth:`alpha` returns). Another
    worker keeps ``||x_S||^2`` of its ``||x||^2`` on the leader's support ``S``, which is no less than ``k/d`` of
    it only as far as the workers' vectors share their large entries (error feedback makes them alike; a worst
    case keeps nothing): the per-worker contraction the EF21 analyses assume is an assumption here, not a bound
    (``docs/algorithms.md`` §6.7).

    Args:
        k: entries kept per vector (1 <= k <= d).
        ratio: alternatively the kept fraction in (0, 1]; ``k = ceil(ratio * d)``.
    """

    shared_support = True
    reveals_nonfinite = False  # the leader's support may miss another worker's non-finite entry

    def __init__(self, k: int | None = None, *, ratio: float | None = None):
        super().__init__(k, ratio)

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> SparseMessage:
        return self.compress_segments(x, (x.shape[-1],), worker=worker, step=step)

    def compress_segments(self, x: Tensor, segments: Sequence[int], *, worker: int = 0, step: int = 0) -> SparseMessage:
        """Per segment, k_l = k_for(d_l) of the leader's entries; the leader's indices travel once for all."""
        x2 = _input_rows(x)
        rows, d = x2.shape
        segments = check_segments(segments, d)
        exchange = _SUPPORT.get()
        n = exchange.n_workers if exchange is not None else rows
        first = exchange.first_worker if exchange is not None else 0
        leader = step % n
        here = leader - first  # the leader's row in this batch, when this process holds it
        idt = ops.index_dtype(d)
        offs = [0, *itertools.accumulate(segments)][:-1]
        ks = [self.k_for(m) for m in segments]
        idx = None
        if 0 <= here < rows:
            parts = []
            for o, m, km in zip(offs, segments, ks):
                _, i = ops.topk(x2[here : here + 1, o : o + m].contiguous(), km)
                parts.append(i.to(idt).reshape(-1) + o)
            idx = torch.cat(parts)
        k = sum(ks)
        if exchange is not None and rows < n:
            idx = exchange.share_support(idx, leader, k, idt, x2.device)
        idx = idx.reshape(1, k).expand(rows, k).contiguous()
        groups = tuple(zip(offs, ks)) if len(segments) > 1 else None
        values = x2.gather(1, idx.long())
        return SparseMessage(values, idx, d, groups, shared=True, leader=leader)

    def __repr__(self) -> str:
        return f"CyclicTopK({self._arg()})"


class ScaledSign(Compressor):
    r""":math:`C(x) = (\|x\|_1/d)\,\mathrm{sign}(x)`; one bit per entry plus one fp32 scale.

    ``||C(x) - x||^2 = ||x||^2 - ||x||_1^2/d``, so ``alpha(x) = ||x||_1^2/(d ||x||^2) >= 1/d``;
    :meth:`alpha` returns that worst case. ``sign(0)`` is taken as +1 (the identity above still holds).
    """

    def alpha(self, d: int) -> float:
        return 1.0 / check_int("d", d)

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> SignMessage:
        x2 = _input_rows(x)
        scale = x2.abs().sum(dim=1, keepdim=True, dtype=torch.float64) / x2.shape[1]
        scale_dtype = torch.float64 if x2.dtype == torch.float64 else torch.float32  # fp32 on the wire
        return SignMessage(_pack_bits(x2 >= 0), scale.to(scale_dtype), (x2.shape[1],))

    def wire_bytes(self, d: int, value_dtype: torch.dtype = torch.float32) -> int:
        return (check_int("d", d) + 7) // 8 + 4

    def value_bits(self, d: int) -> int:
        return check_int("d", d) + _VALUE_BITS

    def __repr__(self) -> str:
        return "ScaledSign()"


class Identity(Compressor):
    """No compression: every method reduces to (stochastic) gradient descent."""

    def alpha(self, d: int) -> float:
        check_int("d", d)
        return 1.0

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> DenseMessage:
        return DenseMessage(_input_rows(x).clone())

    def wire_bytes(self, d: int, value_dtype: torch.dtype = torch.float32) -> int:
        return dense_wire_bytes(check_int("d", d), value_dtype)

    def value_bits(self, d: int) -> int:
        return check_int("d", d) * _VALUE_BITS

    def __repr__(self) -> str:
        return "Identity()"


def dense_wire_bytes(d: int, value_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense message of ``d`` values (Identity, a method's dense first round): every front end
    all-reduces it in the feedback state's dtype (fp32 for fp32, bf16 and fp16 gradients), so a narrower wire dtype
    (bf16, fp16, int8, int2) does not narrow it; a wider one (fp64) counts as itself."""
    return d * max(torch.empty((), dtype=value_dtype).element_size(), 4)


class DensityWarmup(Compressor):
    """Deep Gradient Compression's density warm-up (Lin et al., ICLR 2018): a sparsifier given by ratio keeps more
    in the first rounds, its density falling exponentially from ``start`` to its own ratio in ``stages`` equal
    stages over ``steps`` rounds (DGC: 25%, 6.25%, 1.5625%, 0.4% over the first four epochs, then 0.1%).

    Round ``t`` uses the sparsifier with ratio ``start * (ratio / start) ** (s / stages)``, ``s = min(stages,
    t * stages // steps)``: messages change size only between stages, every rank alike (the round's step is
    agreed), and a resumed run continues in its stage. ``alpha``, ``wire_bytes`` and ``value_bits`` are those after
    the warm-up (the smallest density, so ``alpha`` holds in every round); a method counts a round's bytes with
    :meth:`at` (:meth:`torchkit.feedback.Feedback.wire_bytes`).

    Args:
        compressor: :class:`TopK`, :class:`RandK` or :class:`CyclicTopK`, given by ``ratio``.
        start: the density of the first stage, in (ratio, 1].
        steps: rounds the warm-up takes.
        stages: the number of density steps down to ``ratio`` (4, DGC's).
    """

    def __init__(self, compressor: Compressor, *, start: float = 0.25, steps: int, stages: int = 4):
        if not isinstance(compressor, _Sparsifier) or isinstance(compressor, DensityWarmup):
            raise TypeError(f"compressor must be a TopK, RandK or CyclicTopK, got {type(compressor).__name__}")
        if compressor.ratio is None:
            raise ValueError("DensityWarmup needs a compressor given by ratio (its density falls to that ratio)")
        start = check_ratio("start", start)
        if start <= compressor.ratio:
            raise ValueError(f"start must be above the compressor's ratio {compressor.ratio}, got {start!r}")
        self.compressor = compressor
        self.start = start
        self.steps = check_int("steps", steps)
        self.stages = check_int("stages", stages)
        self._by_stage: dict[int, Compressor] = {}  # one compressor per stage: the round's plans key on it

    ratio = property(lambda self: self.compressor.ratio)
    k = None  # given by ratio, so per-tensor granularity (k_l = ceil(ratio * d_l)) applies
    reveals_nonfinite = property(lambda self: self.compressor.reveals_nonfinite)  # type: ignore[assignment]
    shared_support = property(lambda self: self.compressor.shared_support)  # type: ignore[assignment]

    def stage(self, step: int) -> int:
        return min(self.stages, step * self.stages // self.steps)

    def ratio_at(self, step: int) -> float:
        """The density of round ``step``."""
        s = self.stage(step)
        if s == self.stages:
            return self.compressor.ratio
        return self.start * (self.compressor.ratio / self.start) ** (s / self.stages)

    def at(self, step: int) -> Compressor:
        s = self.stage(step)
        if s not in self._by_stage:
            import copy

            comp = self.compressor if s == self.stages else copy.copy(self.compressor)
            comp.ratio = self.ratio_at(step)
            self._by_stage[s] = comp
        return self._by_stage[s]

    def compress(self, x: Tensor, *, worker: int = 0, step: int = 0) -> Message:
        return self.at(step).compress(x, worker=worker, step=step)

    def compress_segments(self, x, segments, *, worker=0, step=0) -> Message:
        return self.at(step).compress_segments(x, segments, worker=worker, step=step)

    def contractive(self) -> DensityWarmup:
        inner = self.compressor.contractive()
        if inner is self.compressor:
            return self
        return DensityWarmup(inner, start=self.start, steps=self.steps, stages=self.stages)

    def alpha(self, d: int) -> float:
        return self.compressor.alpha(d)

    def k_for(self, d: int) -> int:
        return self.compressor.k_for(d)

    def wire_bytes(self, d: int, value_dtype: torch.dtype = torch.float32) -> int:
        return self.compressor.wire_bytes(d, value_dtype)

    def value_bits(self, d: int) -> int:
        return self.compressor.value_bits(d)

    def config(self) -> dict:
        return {**super().config(), "compressor": self.compressor.config(), "start": self.start,
                "steps": self.steps, "stages": self.stages}  # fmt: skip

    def __getstate__(self):
        return {**self.__dict__, "_by_stage": {}}  # rebuilt on use; copies do not share a stage's compressor

    def __repr__(self) -> str:
        return f"DensityWarmup({self.compressor!r}, start={self.start}, steps={self.steps}, stages={self.stages})"


def compress_segments(comp: Compressor, x: Tensor, segments: Sequence[int], *, worker: int, step: int) -> Message:
    """Compress each segment of the last dim on its own (per-tensor granularity) into one message."""
    return comp.compress_segments(x, tuple(segments), worker=worker, step=step)


def concat_messages(msgs: list[Message], segments: Sequence[int]) -> Message:
    first = msgs[0]
    d = sum(segments)
    if isinstance(first, SparseMessage):
        offs = [0]
        for n in segments[:-1]:
            offs.append(offs[-1] + n)
        idt = ops.index_dtype(d)
        idx = torch.cat([m.indices.to(idt) + o for m, o in zip(msgs, offs)], dim=1)
        groups = tuple(
            (a + o, c) for m, o in zip(msgs, offs) for a, c in (m.groups or ((0, m.values.shape[1]),))
        )  # a chunked message keeps its chunks; a plain one is one group per segment
        local = all(m.local_indices for m in msgs)
        shared = all(m.shared for m in msgs)
        return SparseMessage(
            torch.cat([m.values for m in msgs], dim=1), idx, d, groups, local, shared=shared, leader=first.leader,
            offset_bits=max(m.offset_bits for m in msgs),
        )  # fmt: skip
    if isinstance(first, DenseMessage):
        return DenseMessage(torch.cat([m.values for m in msgs], dim=1))
    if isinstance(first, SignMessage):
        bits = torch.cat([m.bits for m in msgs], dim=1)
        scales = torch.cat([m.scales for m in msgs], dim=1)
        return SignMessage(bits, scales, tuple(s for m in msgs for s in m.segments))
    raise TypeError(f"cannot concatenate messages of type {type(first).__name__}")


def segment_value_bits(comp: Compressor, segments: Sequence[int]) -> int:
    return sum(comp.value_bits(n) for n in segments)


def segment_wire_bytes(comp: Compressor, segments: Sequence[int], value_dtype=torch.float32) -> int:
    if isinstance(comp, _Sparsifier):
        return chunk_wire_bytes(comp, segments, value_dtype)
    return sum(comp.wire_bytes(n, value_dtype) for n in segments)


def chunk_wire_bytes(comp: _Sparsifier, segments: Sequence[int], value_dtype=torch.float32) -> int:
    """Exact bytes of one packed sparse row: values (int8 plus one fp32 scale per group, 2-bit codes plus two, else
    the dtype's), indices (12- or 16-bit chunk offsets, else int32 or int64 global offsets, whose width follows
    the whole vector)."""
    d = sum(segments)
    chunked = getattr(comp, "chunk", None) is not None
    groups = [k for n in segments for _, _, k in comp.chunks(n)] if chunked else [comp.k_for(n) for n in segments]
    k = sum(groups)
    if value_dtype == INT2 and INT2 is not None:
        values = (2 * k + 7) // 8 + 8 * len(groups)
    else:
        values = k * comp.value_bytes(value_dtype) + (4 * len(groups) if value_dtype == torch.int8 else 0)
    if chunked:
        return values + (getattr(comp, "offset_bits", 16) * k + 7) // 8
    return values + k * comp.index_bytes(d)


# ------------------------------------------------------------------------------------------- wire packing
def pack_message(
    msg: Message, value_dtype: torch.dtype | None = None, trailer: Tensor | None = None
) -> tuple[Tensor, WireLayout]:
    """One row of ``msg`` as a flat byte tensor (one collective carries values and indices together), with
    ``trailer`` (uint8) appended in the same copy, at the next multiple of 8 bytes."""
    if _MESSAGE_KINDS.get(getattr(msg, "kind", None)) is not type(msg):
        raise TypeError(f"cannot pack {type(msg).__name__}: not a registered message type")
    return msg.pack(value_dtype, trailer)


def unpack_message(buf: Tensor, layout: WireLayout) -> Message:
    """Inverse of :func:`pack_message` for ``[rows, nbytes]`` gathered bytes. Parts whose bytes are aligned for
    their dtype (fp32 values, int32 indices at the offsets packing gives them) are views of ``buf``, not copies:
    the message shares ``buf``'s memory, so copy it before ``buf`` is written again."""
    cls = _MESSAGE_KINDS.get(layout.kind)
    if cls is None:
        raise TypeError(f"cannot unpack message kind {layout.kind!r}: not a registered message type")
    return cls.unpack(buf, layout)
