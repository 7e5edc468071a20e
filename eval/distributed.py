"""Evaluation across ranks: each rank embeds its own part, every rank gets the whole result.

Samples are split by index (``index % world_size == rank``), so parts are disjoint and differ
in size by at most one. Gathering pads every part to the largest, gathers, then drops the
padding and sorts by index: the result is exactly what one process computes, in the same
order, on every rank. Metrics are then computed identically on every rank, so no rank waits
on a collective that another rank skips.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world(distributed: bool = True) -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one.

    Args:
        distributed: ``False`` forces ``(0, 1)`` (one process evaluates alone).
    """
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(index_N: Tensor, rows_N: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """Gathers every rank's rows and returns them all, sorted by index, on every rank.

    Args:
        index_N: Global sample index of each local row (distinct across ranks).
        rows_N: Local rows, ``[N]`` or ``[N, X]`` (a rank without rows may pass ``[0, 0]``).
        world_size: Number of ranks; 1 sorts the local rows only.

    Returns:
        ``(index_M, rows_M)`` with the rows of all ranks, ``index_M`` ascending, on the CPU.
    """
    index_N = index_N.to(torch.long).cpu()
    rows_N = rows_N.cpu()
    assert rows_N.ndim in (1, 2) and len(rows_N) == len(index_N), (rows_N.shape, index_N.shape)
    if world_size > 1:
        # NCCL only moves CUDA tensors; gloo (CPU) moves CPU tensors.
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        width = rows_N.shape[1] if rows_N.ndim == 2 else 1
        shape = torch.tensor([len(index_N), width], device=device)
        shapes = [torch.zeros_like(shape) for _ in range(world_size)]
        dist.all_gather(shapes, shape)
        most = int(max(s[0].item() for s in shapes))
        width = int(max(s[1].item() for s in shapes))  # a rank without rows cannot know it
        # Padding rows carry index -1 and are dropped after the gather.
        index_pad = torch.full((most,), -1, dtype=torch.long)
        index_pad[: len(index_N)] = index_N
        rows_pad = rows_N.new_zeros((most, width) if rows_N.ndim == 2 else (most,))
        rows_pad[: len(rows_N)] = rows_N
        index_parts = [torch.empty_like(index_pad, device=device) for _ in range(world_size)]
        rows_parts = [torch.empty_like(rows_pad, device=device) for _ in range(world_size)]
        dist.all_gather(index_parts, index_pad.to(device))
        dist.all_gather(rows_parts, rows_pad.to(device))
        index_N = torch.cat(index_parts).cpu()
        rows_N = torch.cat(rows_parts).cpu()
        keep = index_N >= 0
        index_N, rows_N = index_N[keep], rows_N[keep]
    order = torch.argsort(index_N)
    return index_N[order], rows_N[order]


def all_ranks_agree(flag: bool, world_size: int) -> bool:
    """``True`` on every rank when ``flag`` is true on every rank (e.g. "my cache file loaded").

    Branching on a per-rank condition before collectives would deadlock when ranks differ.
    """
    if world_size == 1:
        return flag
    flags: list[Any] = [None] * world_size
    dist.all_gather_object(flags, flag)
    return all(flags)


def gather_objects(index: list[int], items: list[Any], world_size: int) -> list[Any]:
    """Gathers picklable per-sample items (captions) from every rank, in index order.

    Args:
        index: Global sample index of each local item.
        items: The local items.
        world_size: Number of ranks.

    Returns:
        All ranks' items, sorted by index, on every rank.
    """
    pairs = list(zip(index, items, strict=True))
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, pairs)
        pairs = [pair for part in parts for pair in part]
    pairs.sort(key=lambda pair: pair[0])
    return [item for _, item in pairs]


def same_on_all_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Rank 0's metrics on every rank.

    Every rank computes the metrics from the same gathered embeddings, so they agree; this
    guards against libraries whose results may differ between runs (faiss builds its HNSW
    graph with unordered threads), so that ranks never log or act on different numbers.
    """
    if world_size == 1:
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]
