"""Per-rank training stream over webdataset shards.

Each (rank, dataloader worker) pair reads its own disjoint slice of the epoch's shard order
and yields exactly ``batches_per_worker`` batches, cycling its shards if they run short.
So every rank yields the same number of batches per epoch whatever the shard sizes, and
no rank can reach the end of its data while the others wait in a collective (the classic
DDP epoch-end hang). The stream is deliberately *not* passed to ``accelerator.prepare``:
for an iterable dataset Accelerate would read everything on rank 0 and broadcast it.

Bad samples never stop training: each is dropped and counted by reason, and every batch
carries the counts its worker dropped since its previous batch, so the training loop can
report ``data/skipped/<reason>`` without any side channel between processes.
"""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipline.data.shards import list_shards, read_manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "shard_read_error")


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
    """

    shards: str
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 2000
    seed: int = 0
    num_samples: int | None = None


def _decode(sample: dict[str, Any], counts: Counter) -> tuple[str, Image.Image, str] | None:
    """(key, RGB image, caption), or None after counting why the sample is unusable."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        counts["missing_image"] += 1
        return None
    caption = sample.get("txt", b"")
    try:
        caption = caption.decode("utf-8").strip() if isinstance(caption, bytes) else caption
    except UnicodeDecodeError:
        caption = ""
    if not caption:
        counts["missing_caption"] += 1
        return None
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = img.convert("RGB")  # also forces the full decode, so truncation shows here
    except Exception:  # PIL raises many types for bad bytes; all mean the same here
        counts["corrupt_image"] += 1
        return None
    return sample["__key__"], image, caption


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
            for sample in wds.tarfile_samples(
                [{"url": u} for u in urls], handler=self._count_handler(counts)
            ):
                produced += 1
                yield sample
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank}: a full pass over shards {urls} produced no samples "
                    f"({counts.total() - before} read errors); check them with `clipline shards`"
                )

    @staticmethod
    def _count_handler(counts: Counter) -> Callable[[Exception], bool]:
        def handler(exn: Exception) -> bool:
            counts["shard_read_error"] += 1
            log.warning("skipping unreadable shard data: %r", exn)
            return True  # keep going with the next file or shard

        return handler

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = self._slot_urls(worker, num_workers)
        rng_key = f"{self.cfg.seed}/samples/{self.epoch}/{self.rank}/{worker}"
        rng = random.Random(rng_key)
        counts: Counter = Counter()
        reported: Counter = Counter()
        samples = wds.shuffle(self.cfg.shuffle_buffer, rng=rng)(self._cycle(urls, rng, counts))
        decoded = (d for s in samples if (d := _decode(s, counts)) is not None)
        batches = wds.batched(self.cfg.batch_size, collation_fn=None)(decoded)
        position = 0  # samples this worker has yielded this epoch
        for batch in itertools.islice(batches, self.batches_per_worker):
            keys, images, captions = zip(*batch, strict=True)
            skipped = counts - reported
            reported = counts.copy()
            # Augmentation draws from torch's global RNG; seeding it per sample from its
            # coordinates makes every crop a pure function of (seed, epoch, rank, worker,
            # position): resumed runs, fresh or persistent workers and any batch split see
            # the same pixels. fork_rng leaves the caller's RNG alone (workers=0 runs here).
            with torch.random.fork_rng(devices=[]):
                tensors = []
                for image in images:
                    torch.manual_seed(zlib.crc32(f"{rng_key}/augment/{position}".encode()))
                    tensors.append(self.preprocess(image))
                    position += 1
                image_BCHW = torch.stack(tensors)
            yield {
                "image": image_BCHW,  # f32[B,3,H,W]
                "text": self.tokenize(list(captions)),  # i64[B,L], tokenised once per batch
                "key": list(keys),
                "skipped": dict(skipped),
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
