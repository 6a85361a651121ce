"""Node-aware compression: dense and fast inside a node, compressed between nodes.

With ``L`` ranks per node, every parameter (every tensor of a flat gradient) is cut into ``L`` pieces of
``ceil(n / L)`` entries, as FSDP2 shards it; local rank ``l``'s shard is the ``l``-th piece of each. The node's ranks
reduce-scatter the gradient (one dense collective over the fast links), so rank ``l`` holds the node's mean
gradient on its shard; it runs the feedback method's round on that shard with the ranks of the other nodes that
hold the same shard (the slow links); the node's ranks then all-gather the estimate's shards. No rank idles, each
compresses ``d / L`` entries, the bytes each rank sends between nodes are ``d / L x density`` (the node's together:
one rank's of a node that compressed it all), and the feedback state per rank is ``1 / L`` of the model's. Pieces of
parameters, not of a bucket, so that the state of each piece is the same whatever DDP's bucketing (DDP rebuilds its
buckets after the first iteration) and in every front end.

For the feedback methods this is a blockwise compressor (``docs/algorithms.md``, 6.9) over the nodes' mean
gradients: the trajectory is the one of ``nodes`` workers whose gradients are the node means, each shard's TopK
its own. :func:`torchkit.sim.simulate` with ``local_size=L`` runs exactly that on one process.

:func:`node_groups` builds both groups from ``torchrun``'s environment (``LOCAL_WORLD_SIZE`` ranks per node).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .comm import DistExchanger, _InCaller
from .frontend import agree

__all__ = [
    "NodeShards", "node_groups", "shard_span", "shard_pieces", "shard_index", "node_means", "node_shards",
    "agree_on_nodes",
]  # fmt: skip

# torch 2.13 renamed them (the old names warn); torch 2.11 has only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_span(n: int, size: int, index: int) -> tuple[int, int]:
    """Piece ``index`` of ``size`` of a tensor of ``n`` entries: ``[a, b)``, ``ceil(n / size)`` entries (the last
    ones shorter or empty)."""
    s = -(-n // size)
    a = min(index * s, n)
    return a, min(a + s, n)


def shard_pieces(names: Sequence, sizes: Sequence[int], size: int, index: int) -> tuple[tuple, tuple[int, ...]]:
    """Shard ``index`` of ``size`` of tensors ``names`` of ``sizes``: the names and sizes of its non-empty pieces."""
    spans = [shard_span(n, size, index) for n in sizes]
    kept = [(name, b - a) for name, (a, b) in zip(names, spans) if b > a]
    return tuple(n for n, _ in kept), tuple(k for _, k in kept)


def shard_index(sizes: Sequence[int], size: int, index: int) -> Tensor:
    """The positions, in the flat vector of tensors of ``sizes``, of shard ``index``'s entries, in its order."""
    out, start = [], 0
    for n in sizes:
        a, b = shard_span(n, size, index)
        out.append(torch.arange(start + a, start + b))
        start += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def node_means(grads: Tensor, local_size: int) -> Tensor:
    """``[n, d]`` workers' gradients (node by node, ``local_size`` each) as ``[n / local_size, d]`` node means,
    summed then scaled as the node's reduce-scatter does."""
    n, d = grads.shape
    return grads.reshape(n // local_size, local_size, d).sum(1).mul_(1.0 / local_size)


class NodeShards:
    """This rank's place among its node's ranks (``group``): which shard it compresses, and the two dense
    collectives inside the node around the compressed round."""

    def __init__(self, group: dist.ProcessGroup):
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"node_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        self.group = group
        self.size = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        self._layouts: dict[tuple, tuple[Tensor, int, int]] = {}

    def pieces(self, names: Sequence, sizes: Sequence[int]) -> tuple[tuple, tuple[int, ...]]:
        return shard_pieces(names, sizes, self.size, self.index)

    def piece_length(self, n: int) -> int:
        """Entries of this rank's piece of a tensor of ``n`` (0: it holds none)."""
        a, b = shard_span(n, self.size, self.index)
        return b - a

    def mesh(self, nodes: int) -> dict[str, int]:
        """The layout a checkpoint records (:func:`torchkit.frontend.mesh_problems`)."""
        return {"nodes": nodes, "ranks per node": self.size}

    def _layout(self, sizes: Sequence[int], device) -> tuple[Tensor, int, int]:
        """``(where, width, mine)``: each flat entry's position in the collectives' ``[L, width]`` rows (rank l's
        shard in row l, zeros after it), the row width (shard 0's, the longest), this rank's shard length."""
        key = (tuple(sizes), str(device))
        got = self._layouts.get(key)
        if got is None:
            shards = [shard_index(sizes, self.size, r) for r in range(self.size)]
            width = len(shards[0])
            where = torch.empty(sum(sizes), dtype=torch.long)
            for r, idx in enumerate(shards):
                where[idx] = torch.arange(r * width, r * width + len(idx))
            got = self._layouts[key] = (where.to(device), width, len(shards[self.index]))
        return got

    def scatter_mean(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        """The node's mean of ``flat`` (tensors of ``sizes``) on this rank's shard: a dense reduce-scatter inside the
        node, waited for."""
        where, width, mine = self._layout(sizes, flat.device)
        src = torch.zeros(self.size * width, dtype=flat.dtype, device=flat.device)
        src.index_copy_(0, where, flat[: where.numel()])
        out = ops.padded_zeros(width, dtype=flat.dtype, device=flat.device)
        _reduce_scatter(out, src, group=self.group)
        return out.mul_(1.0 / self.size)[:mine]

    def gather_into(self, shard: Tensor, flat: Tensor, sizes: Sequence[int], flag=None) -> Tensor | None:
        """Every rank's shard of the estimate into ``flat`` (a dense all-gather inside the node). With ``flag``
        (this rank's round's float64 non-finite checks, or ``False``), each rank's travels after its shard as 0 or
        NaN: the checks of every shard's round of the node (each shard's round agreed on them between nodes, so every
        rank learns the same)."""
        where, width, mine = self._layout(sizes, flat.device)
        row = width + (flag is not None)
        piece = torch.zeros(row, dtype=shard.dtype, device=shard.device)
        piece[:mine].copy_(shard)
        if flag is not None:  # this rank's round's checks, as 0 or NaN
            piece[width] = 0.0 if flag is False else ops.poison_of(flag).to(piece.dtype)
        rows = torch.empty(self.size, row, dtype=flat.dtype, device=flat.device)
        _all_gather(rows.view(-1), piece, group=self.group)
        flat[: where.numel()].copy_(rows[:, :width].reshape(-1)[where])
        return rows[:, width].to(torch.float64) if flag is not None else None

    def sent_bytes(self, sizes: Sequence[int], element_size: int) -> int:
        """Bytes this rank sends inside the node for tensors of ``sizes``: its ring reduce-scatter's and
        all-gather's ``(L - 1)`` rows each."""
        width = sum(-(-n // self.size) for n in sizes)
        return 2 * (self.size - 1) * width * element_size

    def gathered(self, fut, shard: Tensor, flat: Tensor, sizes: Sequence[int]) -> _InCaller:
        """A future of ``fut``'s result once the estimate's shards are gathered into ``flat``, run by the thread
        that waits (as every round is: :class:`torchkit.comm.DistExchanger`)."""

        def finish():
            res = fut.wait()
            self.gather_into(shard, flat, sizes)
            return res

        return _InCaller(finish)


def node_shards(node_group, process_group, feedback=None) -> NodeShards | None:
    """The node-aware layout of a front end given ``node_group`` (None without one, or for a node of one rank)."""
    if node_group is None:
        return None
    node = NodeShards(node_group)
    if getattr(getattr(feedback, "compressor", None), "k", None) is not None:
        raise ValueError(
            f"node_group needs a compressor given by ratio, not k ({feedback.compressor!r}): the ranks of a node "
            "compress shards of different lengths"
        )
    if process_group is None:
        raise ValueError(
            "node_group needs process_group: the group of this rank's peers on the other nodes "
            "(torchkit.node.node_groups() builds both)"
        )
    return node if node.size > 1 else None


def agree_on_nodes(mine: dict, shared: dict, *, between, node: NodeShards, what: str, hints: dict) -> None:
    """:func:`torchkit.frontend.agree` for a node-aware layout: the whole world holds the same model and settings
    (``mine``), the ranks that hold the same shard on every node the same shared state of it (``shared``)."""
    check_layout(between, node)
    agree(mine, group=None, world_size=dist.get_world_size(), rank=dist.get_rank(), what=what, hints=hints)
    agree(shared, group=between, world_size=dist.get_world_size(between), rank=dist.get_rank(between), what=what,
          hints=hints, everyone=DistExchanger(None))  # fmt: skip


def node_groups(local_size: int | None = None, *, device_type: str | None = None):
    """``(between_nodes, inside_node)`` process groups for node-aware compression: this rank's peers holding the
    same shard on every node (pass as ``process_group``), and its node's ranks (``node_group``). Ranks are grouped
    ``local_size`` at a time in rank order (default: ``torchrun``'s ``LOCAL_WORLD_SIZE``), as ``torchrun`` numbers
    them. Every rank must call it (it creates groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    if local_size is None:
        if "LOCAL_WORLD_SIZE" not in os.environ:
            raise ValueError("local_size is needed outside torchrun (LOCAL_WORLD_SIZE is not set)")
        local_size = int(os.environ["LOCAL_WORLD_SIZE"])
    world = dist.get_world_size()
    if not isinstance(local_size, int) or isinstance(local_size, bool) or local_size < 1 or world % local_size:
        raise ValueError(f"local_size must be a positive divisor of the world size {world}, got {local_size!r}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // local_size, local_size), mesh_dim_names=("nodes", "local"))
    return mesh.get_group("nodes"), mesh.get_group("local")


def check_layout(between: dist.ProcessGroup | None, node: NodeShards) -> None:
    """Every rank has its own (node, local rank) place on a ``nodes x L`` grid, or every rank raises ``ValueError``:
    ``process_group`` and ``node_group`` must cut the world in the two directions (:func:`node_groups`)."""
    places: list = [None] * dist.get_world_size()
    mine = (dist.get_rank(between), node.index, dist.get_world_size(between), node.size,
            dist.get_process_group_ranks(between), dist.get_process_group_ranks(node.group))  # fmt: skip
    dist.all_gather_object(places, mine)
    nodes, size = places[0][2], places[0][3]
    sizes_agree = all(p[2:4] == (nodes, size) for p in places)
    # the peers on the other nodes hold the same shard; the ranks of a node are one node of the others
    crossed = all(all(places[m][1] == p[1] for m in p[4]) and all(places[m][0] == p[0] for m in p[5]) for p in places)
    if not (sizes_agree and crossed) or nodes * size != len(places) or len({p[:2] for p in places}) != len(places):
        raise ValueError(
            f"process_group and node_group do not split the {len(places)} ranks into nodes x ranks per node "
            f"(rank -> (node, local rank, nodes, local size, peers, node): {places}); build them with "
            "torchkit.node.node_groups()"
        )
