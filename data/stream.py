"""Per-rank training stream over webdataset shards.

Each (rank, dataloader worker) pair reads its own disjoint slice of the epoch's shard order
and yields exactly ``batches_per_worker`` batches, cycling its shards if they run short.
So every rank yields the same number of batches per epoch whatever the shard sizes, and
no rank can reach the end of its data while the others wait in a collective (the classic
DDP epoch-end hang). The stream is deliberately *not* passed to ``accelerator.prepare``:
for an iterable dataset Accelerate would read everything on rank 0 and broadcast it.

Bad samples never stop training: each is dropped and counted by reason (colour conversions
too; see :mod:`clipline.data.decode`), and every batch carries the counts its worker made
since its previous batch, so the training loop can report ``data/skipped/<reason>`` and
``data/converted/<kind>`` without any side channel between processes.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipline.data.decode import CONVERSIONS as CONVERSIONS  # re-exported for the loop
from clipline.data.decode import SKIP_REASONS as SKIP_REASONS
from clipline.data.decode import DecodeConfig, Decoder, read_shards
from clipline.data.shards import list_shards, read_manifest

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StreamConfig:
    """Where training pairs come from and how they are batched.

    Attributes:
        shards: A shard directory, a brace pattern (``/data/{000000..000099}.tar``) or a
            ``::``-separated list; counts come from the ``sizes.json`` beside them.
        batch_size: Samples per batch *per rank*; the global batch is this x world size.
        workers: Dataloader worker processes per rank.
        shuffle_buffer: Samples held in each worker's shuffle buffer.
        seed: Seeds the shard order (per epoch) and the sample shuffle (per rank/worker).
        num_samples: Samples per epoch; ``None`` reads the manifest (``sizes.json``).
        decode: Per-sample decoding: bad-sample limits, alpha handling, JPEG draft
            decoding, uint8 batches (see :class:`~clipline.data.decode.DecodeConfig`).
    """

    shards: str
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 2000
    seed: int = 0
    num_samples: int | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)


class ContrastiveStream(IterableDataset):
    """The iterable each dataloader worker runs; see the module docstring."""

    def __init__(
        self,
        cfg: StreamConfig,
        urls: list[str],
        *,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
        rank: int,
        world_size: int,
        batches_per_worker: int,
    ):
        super().__init__()
        self.cfg, self.urls = cfg, urls
        self.preprocess, self.tokenize = preprocess, tokenize
        self.decoder = Decoder(cfg.decode, preprocess)
        self.rank, self.world_size = rank, world_size
        self.batches_per_worker = batches_per_worker
        # Shared memory, so persistent workers see the epoch the owner sets before iter().
        self._epoch = multiprocessing.Value("i", 0, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def _slot_urls(self, worker: int, num_workers: int) -> list[str]:
        order = list(self.urls)
        random.Random(f"{self.cfg.seed}/shards/{self.epoch}").shuffle(order)
        slots = self.world_size * num_workers
        return order[self.rank * num_workers + worker :: slots]

    def _cycle(self, urls: list[str], rng: random.Random, counts: Counter) -> Iterator[dict]:
        """This slot's shards, reshuffled each pass, forever (the caller cuts the stream)."""
        while True:
            before = counts.total()
            produced = 0
            rng.shuffle(urls)
            for sample in read_shards(urls, counts):
                produced += 1
                yield sample
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank}: a full pass over shards {urls} produced no samples "
                    f"({counts.total() - before} read errors); check them with `clipline shards`"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = self._slot_urls(worker, num_workers)
        rng_key = f"{self.cfg.seed}/samples/{self.epoch}/{self.rank}/{worker}"
        rng = random.Random(rng_key)
        counts: Counter = Counter()
        reported: Counter = Counter()
        converted: Counter = Counter()
        reported_converted: Counter = Counter()
        samples = wds.shuffle(self.cfg.shuffle_buffer, rng=rng)(self._cycle(urls, rng, counts))

        def decoded() -> Iterator[tuple[str, torch.Tensor, str]]:
            # Seeding each sample's augmentation from its coordinates makes every crop a
            # pure function of (seed, epoch, rank, worker, position): resumed runs, fresh
            # or persistent workers and any batch split see the same pixels. Decoding runs
            # only here, after the shuffle, so buffered samples stay compressed bytes.
            position = 0  # samples this worker has yielded this epoch
            for s in samples:
                seed = zlib.crc32(f"{rng_key}/augment/{position}".encode())
                d = self.decoder(s, seed=seed, skipped=counts, converted=converted)
                if d is not None:
                    position += 1
                    yield d

        batches = wds.batched(self.cfg.batch_size, collation_fn=None)(decoded())
        for batch in itertools.islice(batches, self.batches_per_worker):
            keys, images, captions = zip(*batch, strict=True)
            skipped, reported = counts - reported, counts.copy()
            new_converted, reported_converted = converted - reported_converted, converted.copy()
            yield {
                # u8[B,3,H,W] (decode.uint8_images: the loop normalises it on the device
                # with decoder.model_input), else normalised f32[B,3,H,W]
                "image": self.decoder.collate(images),
                "text": self.tokenize(list(captions)),  # i64[B,L], tokenised once per batch
                "key": list(keys),
                "skipped": dict(skipped),
                "converted": dict(new_converted),
            }


@dataclass
class TrainLoader:
    """Per-rank batches, epoch by epoch; every rank gets ``batches_per_epoch`` batches."""

    stream: ContrastiveStream
    workers: int
    batches_per_epoch: int
    num_samples: int
    _loader: DataLoader | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """A fresh iterator over epoch ``epoch`` (shard order and shuffles depend on it).

        The previous epoch's iterator must be exhausted: workers persist across epochs
        (no process start-up at each epoch boundary) and restart on the new epoch.
        """
        self.stream.epoch = epoch
        if self._loader is None:
            self._loader = DataLoader(
                self.stream,
                batch_size=None,  # batches are built (and tokenised) inside the workers
                num_workers=self.workers,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=4 if self.workers else None,
                persistent_workers=self.workers > 0,
            )
        return iter(self._loader)


@dataclass(frozen=True)
class EpochShape:
    """How one epoch divides among ranks and workers (the same on every rank)."""

    urls: list[str]
    num_samples: int
    readers_per_rank: int  # dataloader workers, or 1 reading in-process
    batches_per_worker: int

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch."""
        return self.batches_per_worker * self.readers_per_rank


def epoch_shape(cfg: StreamConfig, world_size: int) -> EpochShape:
    """Checks the shards against the run shape and divides an epoch among the readers.

    Raises:
        ValueError: missing shards, too few shards for ranks x workers, or too few samples
            for one batch per worker; raised before any training starts.
    """
    urls = list_shards(cfg.shards)
    num_samples = cfg.num_samples
    if num_samples is None:
        num_samples = sum(read_manifest(cfg.shards).values())
    per_rank = max(cfg.workers, 1)
    slots = world_size * per_rank
    if len(urls) < slots:
        raise ValueError(
            f"{len(urls)} shards in {cfg.shards!r} but {world_size} ranks x "
            f"{per_rank} workers = {slots} readers: some would read nothing. "
            f"Lower data.workers, or rewrite the shards smaller (clipline shards "
            f"--samples-per-shard) so there are at least {slots}."
        )
    per_worker = num_samples // (slots * cfg.batch_size)
    if per_worker == 0:
        raise ValueError(
            f"{num_samples} samples cannot give one batch of {cfg.batch_size} to each of "
            f"{slots} readers; lower data.batch_size or data.workers"
        )
    return EpochShape(
        urls=urls, num_samples=num_samples, readers_per_rank=per_rank, batches_per_worker=per_worker
    )


def build_train_loader(
    cfg: StreamConfig,
    *,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    rank: int,
    world_size: int,
) -> TrainLoader:
    """This rank's loader, after :func:`epoch_shape` has checked the run shape."""
    shape = epoch_shape(cfg, world_size)
    stream = ContrastiveStream(
        cfg,
        shape.urls,
        preprocess=preprocess,
        tokenize=tokenize,
        rank=rank,
        world_size=world_size,
        batches_per_worker=shape.batches_per_worker,
    )
    return TrainLoader(
        stream=stream,
        workers=cfg.workers,
        batches_per_epoch=shape.batches_per_epoch,
        num_samples=shape.num_samples,
    )
