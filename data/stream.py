"""Per-rank training stream over webdataset shards: exact epochs or resampling, mixing, resume.

Every epoch is planned before any byte is read (:mod:`clipline.data.stream_plan`: the two
modes, mixing, the windowed shuffle); each dataloader worker here reads its part of the
plan through :mod:`clipline.data.shard_io` and decodes, batches and tokenises it.

**Augmentation** is seeded per sample by (seed, epoch, sample); in exact mode a sample is
its shard's name *within its source* (the path below the folder its shards share) and its
key, never the shard's path: the same shards moved to another folder, or given by a
relative path, give the same run, and a checkpoint's stream state still fits them.

**No hangs.** Every rank yields exactly ``batches_per_epoch`` batches in both modes, whatever
the shard sizes: ranks receive equal sample counts, and a worker whose samples fail to
decode fills its last batches by repeating its own good samples (deterministically). No rank
can reach the end of its data while the others wait in a collective (the classic DDP
epoch-end hang). The stream is deliberately *not* passed to ``accelerator.prepare``: for an
iterable dataset Accelerate would read everything on rank 0 and broadcast it.

**Exact resume** (see :class:`~clipline.data.loader.TrainLoader`): the state saved with a checkpoint is, per rank,
the epoch and each worker's position in its planned list, in its repeats of good samples
(the fill), and the rows it found unusable (rare). These are a complete description of
what was consumed and what the repeats leave out, so resuming with the same workers
continues every list where it stopped (identical batches, losses and skip counts, on
damaged data too); resuming with a different number of workers re-plans only the
*remaining* samples among the new workers (none repeated, none skipped).

Shards can be local paths, ``file://``, any fsspec URL (``s3://`` with s3fs, ``gs://`` with
gcsfs, ``http(s)://`` with aiohttp) or, only with ``allow_pipe = true``, ``pipe:`` shell
commands that write a tar to stdout.

Bad samples never stop training: each is dropped and counted by reason (colour conversions
too; see :mod:`clipline.data.decode`), samples lost with a truncated or unreadable shard
one by one, when their turn comes. Every batch carries the counts its worker made since
its previous batch, so the training loop can report ``data/skipped/<reason>`` and
``data/converted/<kind>`` without any side channel between processes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipline.data.decode import DecodeConfig, Decoder
from clipline.data.hints import check_choices
from clipline.data.preprocess import PreprocessConfig
from clipline.data.shard_io import TarSamples, open_retrying, shard_sizes
from clipline.data.stream_plan import (
    _elastic_plan,
    _follow_chain,
    _fresh_link,
    _known_failed,
    _Lane,
    _Layout,
    _RankPlan,
    _source_names,
    _taken,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SourceConfig:
    """One data source of a mixture (``[[data.sources]]`` in a recipe).

    Attributes:
        shards: A shard directory, a brace pattern (``s3://b/{000000..000099}.tar``), a glob,
            or a ``::``-separated list of these.
        weight: Share of the stream drawn from this source (normalised over sources), in
            ``resampled`` mode; ``exact`` mode reads every source whole, so weights must stay 1.
        manifest: Where this source's ``sizes.json`` is; default: beside each shard.
            Needed for ``pipe:`` shards, which have no folder.
    """

    shards: str
    weight: float = 1.0
    manifest: str | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(
                f"data.sources weight must be > 0, got {self.weight} for {self.shards!r}; "
                "give each source a positive share of the stream"
            )


@dataclass(kw_only=True)
class StreamConfig:
    """Where training pairs come from and how they are batched.

    Attributes:
        shards: Single-source shorthand for ``sources = [{shards = ...}]``: a shard
            directory, a brace pattern (``/data/{000000..000099}.tar``), a glob or a
            ``::``-separated list; local paths or fsspec URLs. Counts come from the
            ``sizes.json`` beside the shards (or ``manifest``).
        manifest: Location of ``sizes.json`` for ``shards`` (default: beside the shards).
        sources: Several weighted sources (exclusive with ``shards``); see
            :class:`SourceConfig`.
        mode: ``exact`` (each sample at most once per epoch) or ``resampled`` (shards drawn
            with replacement, infinite; an epoch is a checkpoint unit of ``num_samples``).
        mix: In ``resampled`` mode with several sources: draw the source of each ``sample``
            or of each ``batch`` (a batch then holds one source only).
        batch_size: Samples per batch *per rank*; the global batch is this x world size.
        workers: Dataloader worker processes per rank (0 reads in the training process).
        shuffle_buffer: Width of each worker's shuffle window, in samples.
        seed: Seeds shard order, shard draws, shuffles and augmentation.
        num_samples: Samples per epoch. ``exact``: at most the manifests' total (default:
            all of it). ``resampled``: any number (default: the manifests' total).
        few_shards: What ``exact`` mode does with fewer shards than ranks x workers:
            ``error`` (stop before training) or ``resample`` (switch to ``resampled`` mode
            with a warning).
        allow_pipe: Allow ``pipe:`` shard URLs, which run shell commands from the config.
        decode: Per-sample decoding: bad-sample limits, alpha handling, JPEG draft
            decoding, uint8 batches (see :class:`~clipline.data.decode.DecodeConfig`).
    """

    shards: str = ""
    manifest: str | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    mode: Literal["exact", "resampled"] = "exact"
    mix: Literal["sample", "batch"] = "sample"
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 2000
    seed: int = 0
    num_samples: int | None = None
    few_shards: Literal["error", "resample"] = "error"
    allow_pipe: bool = False
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        check_choices(self, "data")
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        self.resolved_sources()  # shards xor sources, weights only when resampling

    def resolved_sources(self) -> list[SourceConfig]:
        """The sources, with the ``shards`` shorthand expanded; checks the combination.

        Raises:
            ValueError: neither or both of ``shards`` and ``sources``, a bad weight, or
                weights / ``mix='batch'`` in ``exact`` mode.
        """
        if bool(self.shards) == bool(self.sources):
            raise ValueError(
                "set exactly one of data.shards (one source) and [[data.sources]] (several); "
                f"got shards={self.shards!r} and {len(self.sources)} sources"
            )
        sources = self.sources or [SourceConfig(shards=self.shards, manifest=self.manifest)]
        if self.mode == "exact":
            weighted = [s.weight for s in sources if s.weight != 1.0]
            if weighted:
                raise ValueError(
                    f"source weights {weighted} need data.mode='resampled': exact mode reads "
                    "every sample of every source once per epoch, so its mix is proportional "
                    "to the sources' sizes"
                )
            if self.mix == "batch" and len(sources) > 1:
                raise ValueError("data.mix='batch' needs data.mode='resampled'")
        return sources


# -------------------------------------------------------------------------------- reading


def _tagged(
    samples: Iterator[tuple[int, dict[str, Any] | None]], base: int, url: str
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """A shard's (index in the lane, sample) pairs, each sample tagged with its shard's URL in
    place (no copy per sample)."""
    for i, sample in samples:
        if sample:
            sample["__url__"] = url
        yield base + i, sample


class _LaneReader:
    """Fetches samples of one lane in any order that stays close to the read order.

    It reads forward only, caching the samples it passes that are still wanted, and jumps
    over whole shards (without opening them) and unwanted samples (without reading their
    data where the file can seek). With the windowed shuffle the cache holds at most
    ``shuffle_buffer`` samples, and a resumed worker starts reading at its first wanted
    sample: no already-consumed shard is read again.
    """

    def __init__(
        self,
        lane: _Lane,
        wanted: np.ndarray,
        on_error: Callable[[Exception], str],
        exact: bool,
        allow_pipe: bool,
    ):
        self.lane, self.on_error, self.exact = lane, on_error, exact
        self.allow_pipe = allow_pipe  # data.allow_pipe: the shared opener applies the rule
        self.wanted = np.unique(wanted)  # sorted lane indices this pass will ask for
        self.wanted_set = set(self.wanted.tolist())
        self.cache: dict[int, dict[str, Any] | str | None] = {}  # str: why unreadable
        self.frontier = 0  # everything wanted below this was read (or found unreadable)
        self.it: Iterator[tuple[int, dict[str, Any] | None]] | None = None
        self.close: Callable[[], None] | None = None
        self.seg = -1

    def get(self, idx: int) -> dict[str, Any] | str:
        """Sample ``idx`` of the lane (with ``__url__``), or the :data:`SKIP_REASONS` entry
        saying why it could not be read."""
        while idx not in self.cache:
            assert idx >= self.frontier, "each wanted sample is asked for once"
            if self.it is None:
                self._open(int(self.wanted[np.searchsorted(self.wanted, self.frontier)]))
                continue  # a shard that failed to open marked its samples unreadable
            seg_end = int(self.lane.offsets[self.seg + 1])
            if idx < seg_end:
                self._read_to(idx)
                continue
            # idx lies in a later segment: first take this one's remaining wanted samples.
            last = int(self.wanted[np.searchsorted(self.wanted, seg_end) - 1])
            if last >= self.frontier:
                self._read_to(last)
            self.shut()
            self.frontier = max(self.frontier, seg_end)
        return self.cache.pop(idx)

    def _open(self, idx: int) -> None:
        self.seg = int(np.searchsorted(self.lane.offsets, idx, side="right")) - 1
        url, first, stop = self.lane.segments[self.seg]
        base = int(self.lane.offsets[self.seg]) - first  # lane index = base + index in shard
        self.frontier = idx
        try:
            # Missing in an exact epoch: fatal at once, retries cannot bring it back.
            final = (FileNotFoundError,) if self.exact else ()
            f, seekable, self.close = open_retrying(url, allow_pipe=self.allow_pipe, final=final)
        except Exception as e:
            if self.exact and isinstance(e, FileNotFoundError):
                raise RuntimeError(
                    f"shard {url} is missing but listed in its sizes.json: an exact epoch "
                    "cannot skip it without changing which samples the run sees. Restore "
                    "it, remove it from sizes.json, or use data.mode='resampled' (which "
                    "retries, then skips and counts missing shards)"
                ) from e
            self._lose(e)  # retried already: an unreachable shard costs its samples, not the run
            return

        def want(i: int) -> bool:
            return base + i in self.wanted_set

        samples = iter(TarSamples(f, seekable=seekable, start=idx - base, stop=stop, want=want))
        self.it = _tagged(samples, base, url)

    def _read_to(self, target: int) -> None:
        try:
            for idx, sample in self.it:
                self.frontier = idx + 1
                if idx in self.wanted_set:
                    self.cache[idx] = sample
                if idx >= target:
                    return
        except Exception as e:  # truncated or corrupt tar, connection lost
            self._lose(e)
            return
        url = self.lane.segments[self.seg][0]
        self._lose(EOFError(f"{url} holds fewer samples than its sizes.json entry"))

    def _lose(self, e: Exception) -> None:
        """Marks the wanted samples left in the open segment unreadable, and moves past it.

        Each lost sample is counted (by the stream) when its turn comes, as a sample that
        fails to decode is: counts then belong to the batch that missed the sample, which
        keeps them exact across a resume, and say how many samples were lost.
        """
        reason = self.on_error(e)
        seg_end = int(self.lane.offsets[self.seg + 1])
        lo, hi = np.searchsorted(self.wanted, [self.frontier, seg_end])
        self.cache.update(dict.fromkeys(self.wanted[lo:hi].tolist(), reason))
        self.frontier = seg_end
        self.shut()

    def shut(self) -> None:
        """Closes the open shard, if any."""
        if self.it is not None:
            self.it.close()  # runs the tar reader's cleanup before its file goes
        if self.close is not None:
            self.close()
        self.it = self.close = None


# --------------------------------------------------------------------------------- stream


class ContrastiveStream(IterableDataset):
    """The iterable each dataloader worker runs: its part of the rank's epoch plan."""

    def __init__(
        self,
        cfg: StreamConfig,
        layout: _Layout,
        *,
        preprocess: PreprocessConfig,
        tokenize: Callable[[list[str]], torch.Tensor],
        rank: int,
        world_size: int,
    ):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        self.preprocess, self.tokenize = preprocess, tokenize
        self.decoder = Decoder(cfg.decode, preprocess)
        self.rank, self.world_size = rank, world_size
        self.fingerprint = layout.fingerprint(world_size)
        # Shared memory, so persistent workers see the epoch the owner sets before iter().
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        # (epoch, chain, history of world-size changes) of a resumed epoch; workers are
        # started after it is set.
        self.resume: tuple[int, list[dict[str, Any]], list[dict[str, Any]]] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def plan(
        self, epoch: int, chain: list[dict[str, Any]], history: list[dict[str, Any]] | None = None
    ) -> _RankPlan:
        """This rank's plan for ``epoch`` after the world-size changes in ``history`` and
        the worker-count changes in ``chain``."""
        workers = chain[0]["workers"]
        base = _elastic_plan(self.layout, epoch, self.rank, self.world_size, workers, history or [])
        return _follow_chain(base, chain, self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        dl_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        history: list[dict[str, Any]] = []
        if self.resume is not None and self.resume[0] == epoch:
            _, chain, history = self.resume
        else:
            chain = [_fresh_link(num_workers)]
        link = chain[-1]
        assert link["workers"] == num_workers, (link, num_workers)
        plan = self.plan(epoch, chain, history)
        # The DataLoader asks its workers round-robin from worker 0; a resumed epoch must
        # go on with the worker whose turn it was, so logical workers are rotated.
        worker = (dl_worker + link["batches"]) % num_workers
        todo = plan.batches[worker] - _taken(link["batches"], worker, num_workers)
        where = _Where(link["positions"][worker], link["fill"][worker], [])
        failed = _known_failed(chain, worker)
        yield from self._batches(plan, worker, where, failed, todo, epoch)

    def _batches(
        self,
        plan: _RankPlan,
        worker: int,
        where: _Where,
        failed: set[tuple[int, int]],
        todo: int,
        epoch: int,
    ) -> Iterator[dict[str, Any]]:
        counts: Counter = Counter()
        converted: Counter = Counter()
        samples = self._samples(plan, worker, where, failed, epoch, counts, converted)
        # closing: a worker stops mid-shard after its last batch; its reads end with it.
        with contextlib.closing(samples):
            reported: Counter = Counter()
            reported_converted: Counter = Counter()
            for _ in range(todo):
                batch = []
                while len(batch) < self.cfg.batch_size:
                    item = next(samples)
                    if item is not None:
                        batch.append(item)
                urls, keys, images, captions = zip(*batch, strict=True)
                skipped, reported = counts - reported, counts.copy()
                new_converted = converted - reported_converted
                reported_converted = converted.copy()
                newly_failed, where.failed = where.failed, []
                yield {
                    # "image": u8[B,3,H,W] (uint8_images: normalised on the device by
                    # decoder.model_input) or f32; a ReplayDecoder adds teacher features
                    **self.decoder.collate_batch(images),
                    "text": self.tokenize(list(captions)),  # i64[B,L], tokenised once per batch
                    "caption": list(captions),  # for a teacher with its own tokenizer
                    "key": list(keys),  # with "url", identifies each sample across sources
                    "url": list(urls),
                    "skipped": dict(skipped),
                    "converted": dict(new_converted),
                    # read by TrainLoader, popped before the loop
                    "_stream": (worker, where.position, where.fill, newly_failed),
                }

    def _samples(
        self,
        plan: _RankPlan,
        worker: int,
        where: _Where,
        failed: set[tuple[int, int]],
        epoch: int,
        counts: Counter,
        converted: Counter,
    ) -> Iterator[tuple[str, str, torch.Tensor, str] | None]:
        """(url, key, image, caption), or None for a row that gave no sample; ``where``
        follows each row taken.

        After the planned rows, if dropped samples left the last batches short, the
        worker's good rows are repeated, in plan order, to fill them: ``where.fill`` counts
        the repeated rows passed (all cycles), ``failed`` (rows known to be unusable, left out of
        the repeats) grows by each row that fails, and ``where.failed`` lists them until the
        next batch reports them. Both are saved with the stream state, so a resume inside
        the repeats continues them exactly.
        """

        def on_error(e: Exception) -> str:
            # A tar that ends early (cut download, short write) vs. one that cannot be read.
            truncated = isinstance(e, EOFError | tarfile.TarError)
            log.warning("skipping unreadable shard data: %r", e)
            return "truncated_tar" if truncated else "shard_read_error"

        def decoded(rows: np.ndarray) -> Iterator[tuple[str, str, torch.Tensor, str] | None]:
            readers = {
                lane: _LaneReader(
                    plan.lanes[lane],
                    rows[rows[:, 0] == lane, 1],
                    on_error,
                    exact=self.layout.mode == "exact",
                    allow_pipe=self.cfg.allow_pipe,
                )
                for lane in np.unique(rows[:, 0]).tolist()
            }
            try:
                for lane, idx in rows.tolist():
                    raw = readers[lane].get(idx)
                    item = None
                    if isinstance(raw, str):  # lost with its shard: counted per sample
                        counts[raw] += 1
                    else:
                        if self.layout.mode == "exact":  # a sample's identity: shard and key
                            # (the shard's name in its source, not its path: moved shards and
                            # a relative path give the same run)
                            tag = f"{self.layout.ids[raw['__url__']]}#{raw['__key__']}"
                        else:  # a sample may be drawn twice; its draw is the identity
                            tag = f"{self.rank}/{lane}/{idx}"
                        # Each crop is a pure function of (seed, epoch, sample): resumed runs,
                        # any worker count and any batch split see the same pixels.
                        seed = zlib.crc32(f"{self.cfg.seed}/augment/{epoch}/{tag}".encode())
                        item = self.decoder(raw, seed=seed, skipped=counts, converted=converted)
                    if item is None:
                        failed.add((lane, idx))
                        where.failed.append([lane, idx])
                        yield None
                        continue
                    yield (raw["__url__"], *item)
            finally:
                for reader in readers.values():
                    reader.shut()

        items = plan.items[worker]
        with contextlib.closing(decoded(items[where.position :])) as planned:
            for item in planned:
                where.position += 1
                yield item
        pool = items if len(items) else plan.rows
        while True:
            start = where.fill % len(pool) if len(pool) else 0
            rest = pool[start:]
            usable = np.array([(a, b) not in failed for a, b in rest.tolist()], dtype=bool)
            if start == 0 and not usable.any():
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: none of its {len(pool)} planned "
                    f"samples could be read and decoded (skipped: {dict(counts)}); check the "
                    "shards with `clipline data doctor`"
                )
            log.warning("filling a batch short of dropped samples with repeated samples")
            with contextlib.closing(decoded(rest[usable])) as repeats:
                for ok in usable.tolist():
                    item = next(repeats) if ok else None
                    where.fill += 1
                    yield item


@dataclass
class _Where:
    """How far a worker got in its epoch: rows of its list, rows of its repeats (the fill),
    and the rows that failed since its last batch."""

    position: int
    fill: int
    failed: list[list[int]]


@dataclass(frozen=True)
class EpochShape:
    """How one epoch divides among ranks and workers (the same on every rank)."""

    urls: list[str]
    num_samples: int  # samples per epoch (in resampled mode: per checkpoint unit)
    readers_per_rank: int  # dataloader workers, or 1 reading in-process
    batches_per_epoch: int  # batches each rank yields per epoch
    mode: Literal["exact", "resampled"]
    samples_read: int  # samples an epoch really yields, all ranks: whole batches
    # exact mode: samples of the shards an epoch does not read (a window that moves every
    # epoch, so each is read in other epochs); resampled mode: 0 (draws, not samples)
    samples_left_out: int


def _layout(cfg: StreamConfig, world_size: int) -> tuple[EpochShape, _Layout]:
    sources = cfg.resolved_sources()
    shards = [
        shard_sizes(src.shards, manifest=src.manifest, allow_pipe=cfg.allow_pipe) for src in sources
    ]
    urls = [url for src in shards for url, _ in src]
    total = sum(n for src in shards for _, n in src)
    readers = max(cfg.workers, 1)
    slots = world_size * readers
    mode = cfg.mode
    if mode == "exact" and len(urls) < slots:
        where = repr(cfg.shards) if cfg.shards else f"{len(sources)} sources"
        msg = (
            f"{len(urls)} shards in {where} but {world_size} ranks x {readers} workers = "
            f"{slots} readers: readers would share shards, each reading through the others' "
            "samples."
        )
        if cfg.few_shards == "error":
            raise ValueError(
                f"{msg} Lower data.workers, rewrite the shards smaller (clipline shards "
                f"--samples-per-shard) so there are at least {slots}, or set "
                "data.few_shards='resample' to draw shards with replacement instead."
            )
        log.warning("%s data.few_shards='resample': switching to resampled mode.", msg)
        mode = "resampled"
    num_samples = cfg.num_samples if cfg.num_samples is not None else total
    if num_samples <= 0:
        raise ValueError(f"data.num_samples must be > 0, got {num_samples}")
    if mode == "exact" and num_samples > total:
        raise ValueError(
            f"data.num_samples={num_samples} but the shards hold {total}: an exact epoch "
            "reads each sample at most once; lower it or use data.mode='resampled'"
        )
    rank_batches = num_samples // (world_size * cfg.batch_size)
    if rank_batches == 0:
        raise ValueError(
            f"{num_samples} samples cannot give one batch of {cfg.batch_size} to each of "
            f"{world_size} ranks; lower data.batch_size"
        )
    ids = {}
    for s, src in reversed(list(enumerate(shards))):  # a url listed twice: its first source
        urls_s = [url for url, _ in src]
        ids |= {url: f"{s}/{name}" for url, name in zip(urls_s, _source_names(urls_s), strict=True)}
    layout = _Layout(
        mode=mode,
        mix=cfg.mix,
        sources=shards,
        weights=[src.weight for src in sources],
        batch_size=cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        rank_batches=rank_batches,
        ids=ids,
    )
    read = world_size * rank_batches * cfg.batch_size
    shape = EpochShape(
        urls=urls,
        num_samples=num_samples,
        readers_per_rank=readers,
        batches_per_epoch=rank_batches,
        mode=mode,
        samples_read=read,
        samples_left_out=layout.left_out(world_size) if mode == "exact" else 0,
    )
    return shape, layout


def epoch_shape(cfg: StreamConfig, world_size: int) -> EpochShape:
    """Checks the shards against the run shape and divides an epoch among the ranks.

    Reads the manifests (``sizes.json``, local or remote), nothing else.

    Raises:
        ValueError: missing shards or manifests, gated ``pipe:`` URLs, a missing fsspec
            backend, too few shards for ranks x workers in exact mode (unless
            ``few_shards='resample'``), or too few samples for one batch per rank; raised
            before any training starts.
    """
    return _layout(cfg, world_size)[0]
