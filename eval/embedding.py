"""Embedding a data set, in parts across ranks and loader workers, back into one ordered set.

The samples of a set are numbered in its reading order. Rank ``r`` of ``W`` with ``J``
loader workers hands worker ``j`` the samples with ``index % (W * J) == r * J + j``; each
batch carries its indexes, and the gathered result is sorted by index. So whatever the
number of ranks and workers, the result equals one process reading the set in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import PIL.Image
import torch
from torch import Tensor

from clipline.eval.distributed import gather_objects, gather_rows
from clipline.eval.encoders import Encoders, embed_images, embed_texts

# (part, num_parts) -> (index, image, target) for the samples of that part.
IndexedSamples = Callable[[int, int], Iterator[tuple[int, PIL.Image.Image, Any]]]


class _PartBatches(torch.utils.data.IterableDataset):
    """Preprocessed batches of one rank's samples; split again across loader workers."""

    def __init__(
        self,
        samples: IndexedSamples,
        preprocess: Callable[[PIL.Image.Image], Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
    ):
        self.samples, self.preprocess, self.batch_size = samples, preprocess, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[list[int], Tensor, list[Any]]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        part = self.rank * workers + worker
        # Per-image tensor ops (to_tensor, normalize) are too small to gain from intra-op
        # threads, and on a busy machine OpenMP's fork-join makes them ~50x slower (measured:
        # to_tensor of a 224-px image 0.8 ms on 1 thread, 56 ms on 2 with the other core
        # taken). Loader workers already run on 1 thread; do the same in this process while
        # preprocessing, and give the forward pass its threads back between batches.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            index, images, targets = [], [], []
            for i, image, target in self.samples(part, self.world_size * workers):
                index.append(i)
                images.append(self.preprocess(image))
                targets.append(target)
                if len(images) == self.batch_size:
                    batch = torch.stack(images)
                    torch.set_num_threads(threads)
                    yield index, batch, targets
                    torch.set_num_threads(1)
                    index, images, targets = [], [], []
            if images:
                batch = torch.stack(images)
                torch.set_num_threads(threads)
                yield index, batch, targets
        finally:
            torch.set_num_threads(threads)


def embed_indexed_images(
    encoders: Encoders,
    samples: IndexedSamples,
    preprocess: Callable[[PIL.Image.Image], Tensor],
    batch_size: int,
    *,
    labels: bool,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
) -> tuple[Tensor, list[Any]]:
    """Embeds every image of a set; this rank embeds its part, all ranks get the whole.

    Args:
        encoders: The model.
        samples: The set's ``indexed_samples(part, num_parts)``.
        preprocess: PIL image -> model input ``[3, H, W]``.
        batch_size: Images per ``encode_image`` call.
        labels: Whether targets are integer labels (gathered as a tensor) rather than
            other objects such as caption lists (pickled). Decided by the caller, not by
            looking at the targets, since a rank may have none to look at.
        rank: This process's rank.
        world_size: Number of ranks (each must call this function).
        workers: DataLoader worker processes decoding and preprocessing in the background
            (0: in this process).

    Returns:
        ``(img_emb_ND, targets)``: unit float32 CPU embeddings and the per-sample targets
        (labels or captions), in the set's order.

    Raises:
        ValueError: If the set is empty.
    """
    batches: Any = _PartBatches(samples, preprocess, batch_size, rank, world_size)
    if workers > 0:
        batches = torch.utils.data.DataLoader(
            batches, batch_size=None, num_workers=workers, persistent_workers=False
        )
    index: list[int] = []
    targets: list[Any] = []
    embs: list[Tensor] = []
    for batch_index, image_BCHW, batch_targets in batches:
        embs.append(embed_images(encoders, image_BCHW))
        index += list(batch_index)
        targets += list(batch_targets)
    img_emb_ND = torch.cat(embs) if embs else torch.empty(0, 0)
    index_N = torch.tensor(index, dtype=torch.long)
    index_M, img_emb_MD = gather_rows(index_N, img_emb_ND, world_size)
    if len(index_M) == 0:
        raise ValueError("the evaluation set has no samples")
    assert torch.equal(index_M, torch.arange(len(index_M))), "parts must cover the set exactly"
    if labels:
        _, labels_M = gather_rows(index_N, torch.tensor(targets, dtype=torch.long), world_size)
        return img_emb_MD, labels_M.tolist()
    return img_emb_MD, gather_objects(index, targets, world_size)


def embed_all_texts(
    encoders: Encoders,
    texts: list[str],
    tokenize: Callable[[list[str]], Tensor],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Embeds ``texts``; this rank embeds every ``world_size``-th text, all ranks get all.

    Returns:
        ``[T, D]`` unit float32 CPU embeddings, in the order of ``texts``.
    """
    mine = list(range(rank, len(texts), world_size))
    embs = [
        embed_texts(encoders, tokenize([texts[i] for i in mine[s : s + batch_size]]))
        for s in range(0, len(mine), batch_size)
    ]
    txt_emb_ND = torch.cat(embs) if embs else torch.empty(0, 0)
    _, txt_emb_TD = gather_rows(torch.tensor(mine, dtype=torch.long), txt_emb_ND, world_size)
    return txt_emb_TD
