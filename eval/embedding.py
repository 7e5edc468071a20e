"""Embedding a data set, in parts across ranks and loader workers, back into one ordered set.

The samples of a set are numbered in its reading order. Rank ``r`` of ``W`` with ``J``
loader workers hands worker ``j`` the samples with ``index % (W * J) == r * J + j``; each
batch carries its indexes, and the gathered result is sorted by index. So whatever the
number of ranks and workers, the result equals one process reading the set in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from clipline.data.benchmark_sets import ImageLoader
from clipline.data.decode import ImageNormalizer, stack_pixels
from clipline.data.preprocess import PreprocessConfig, eval_pixels
from clipline.data.worker_signals import shield_worker, start_workers
from clipline.eval.cache import PixelCache
from clipline.eval.distributed import gather_objects, gather_rows
from clipline.eval.encoders import Encoders, embed_images, embed_texts

# A set's ``indexed_items``: (part, num_parts) -> (index, image loader, target) for the
# samples of that part.
IndexedItems = Callable[[int, int], Iterator[tuple[int, ImageLoader, Any]]]
# What evaluators are given to turn images into model input: the model's numbers (the
# batched path below), or any callable from a PIL RGB image to its tensor ``[3, H, W]``.
Preprocess = PreprocessConfig | Callable[[PIL.Image.Image], Tensor]


class _PartBatches(torch.utils.data.IterableDataset):
    """Batches of one rank's samples, split again across loader workers.

    With a :class:`~clipline.data.preprocess.PreprocessConfig` (the model's numbers: the
    same pixels as open_clip's eval transform) the batches are uint8 pixels, normalised by
    the consumer once per batch (a quarter of the bytes through worker shared memory); each
    image is decoded and resized on a pool of
    ``torch.get_num_threads()`` threads (PIL releases the GIL), so with ``workers=0`` the
    evaluating process prepares a batch on all its cores, then runs the forward pass on
    all of them, in turn: the two never compete for a core, as a loader worker beside the
    forward's threads does on a CPU-only machine. A callable runs per image, on one
    thread, and gives float batches.
    """

    def __init__(
        self,
        items: IndexedItems,
        preprocess: Preprocess,
        batch_size: int,
        rank: int,
        world_size: int,
    ):
        self.items, self.preprocess, self.batch_size = items, preprocess, batch_size
        self.rank, self.world_size = rank, world_size
        self.split = preprocess if isinstance(preprocess, PreprocessConfig) else None

    def __iter__(self) -> Iterator[tuple[list[int], Tensor, list[Any]]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        items = self.items(self.rank * workers + worker, self.world_size * workers)
        threads = torch.get_num_threads()
        # Per-image tensor ops are too small to gain from intra-op threads, and on a busy
        # machine OpenMP's fork-join makes them ~50x slower (measured: to_tensor of a
        # 224-px image 0.8 ms on 1 thread, 56 ms on 2 with the other core taken). Loader
        # workers already run on 1 thread; do the same in this process while preparing a
        # batch, and give the forward pass its threads back between batches.
        torch.set_num_threads(1)
        if self.split is not None:
            prepare, collate = partial(_pixels, self.split), stack_pixels
        else:
            prepare, collate = partial(_preprocessed, self.preprocess), torch.stack
        pool = ThreadPoolExecutor(threads) if self.split is not None and threads > 1 else None
        try:
            while True:
                index, images, targets = [], [], []
                # Submitted as read: the pool decodes while this thread reads the next bytes.
                for i, load, target in islice(items, self.batch_size):
                    index.append(i)
                    targets.append(target)
                    images.append(pool.submit(prepare, load) if pool else prepare(load))
                if not index:
                    break
                batch = collate([f.result() for f in images] if pool else images)
                torch.set_num_threads(threads)
                yield index, batch, targets
                torch.set_num_threads(1)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            torch.set_num_threads(threads)


def _preprocessed(preprocess: Callable[[PIL.Image.Image], Tensor], load: ImageLoader) -> Tensor:
    return preprocess(load())


def _pixels(split: PreprocessConfig, load: ImageLoader) -> Tensor:
    return eval_pixels(split, load())


def _stored_batches(
    pixels_NCHW: np.ndarray, index: list[int], targets: list[Any], batch_size: int
) -> Iterator[tuple[list[int], Tensor, list[Any]]]:
    for start in range(0, len(index), batch_size):
        stop = start + batch_size
        yield index[start:stop], torch.from_numpy(pixels_NCHW[start:stop]), targets[start:stop]


def embed_indexed_images(
    encoders: Encoders,
    items: IndexedItems,
    preprocess: Preprocess,
    batch_size: int,
    *,
    labels: bool,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pixel_cache: PixelCache | None = None,
) -> tuple[Tensor, list[Any]]:
    """Embeds every image of a set; this rank embeds its part, all ranks get the whole.

    Args:
        encoders: The model.
        items: The set's ``indexed_items(part, num_parts)``.
        preprocess: The model's :class:`~clipline.data.preprocess.PreprocessConfig`
            (batched uint8 path), or a PIL RGB image -> model input ``[3, H, W]`` callable.
        batch_size: Images per ``encode_image`` call.
        labels: Whether targets are integer labels (gathered as a tensor) rather than
            other objects such as caption lists (pickled). Decided by the caller, not by
            looking at the targets, since a rank may have none to look at.
        rank: This process's rank.
        world_size: Number of ranks (each must call this function).
        workers: DataLoader worker processes decoding and preprocessing in the background
            (0: in this process, on a pool of ``torch.get_num_threads()`` threads between
            forward passes; the better choice without an accelerator).
        pixel_cache: Where this rank's preprocessed pixels are kept: read from there when
            present, else written there on the way (with a ``PreprocessConfig`` only; a
            callable always runs).

    Returns:
        ``(img_emb_ND, targets)``: unit float32 CPU embeddings and the per-sample targets
        (labels or captions), in the set's order.

    Raises:
        ValueError: If the set is empty.
    """
    part = _PartBatches(items, preprocess, batch_size, rank, world_size)
    split = part.split
    normalize = ImageNormalizer(split.mean, split.std) if split is not None else None
    stored = pixel_cache.load() if pixel_cache is not None and split is not None else None
    writer = None
    batches: Any
    if stored is not None:
        batches = _stored_batches(*stored, batch_size)
    else:
        batches = part
        if workers > 0:
            # The loop may evaluate with a stop signal on its way: workers leave it to the rank.
            batches = start_workers(
                torch.utils.data.DataLoader(
                    part,
                    batch_size=None,
                    num_workers=workers,
                    persistent_workers=False,
                    worker_init_fn=shield_worker,
                )
            )
        if pixel_cache is not None and split is not None:
            writer = pixel_cache.writer()
    index: list[int] = []
    targets: list[Any] = []
    embs: list[Tensor] = []
    try:
        for batch_index, image_BCHW, batch_targets in batches:
            if writer is not None:
                writer.append(batch_index, image_BCHW, batch_targets)
            if normalize is not None:  # uint8 pixels: ToTensor + Normalize, once per batch
                image_BCHW = normalize(image_BCHW)
            embs.append(embed_images(encoders, image_BCHW))
            index += list(batch_index)
            targets += list(batch_targets)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.commit()
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
