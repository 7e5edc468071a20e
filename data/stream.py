"""Per-rank training stream over webdataset shards: exact epochs or resampling, mixing, resume.

**Plans, not buffers.** Every epoch is first *planned* from the shard manifests
(``sizes.json``: samples per shard) as pure arithmetic, on every rank, before any byte is
read: which samples each (rank, dataloader worker) yields and in what order. Workers then
read their shards sequentially and emit samples in the planned order. Because the plan is a
function of (seed, epoch, rank, world size, workers) alone, a checkpoint only needs to know
how far each worker got (a few integers per rank), and a resumed run recomputes the plan and
starts reading where the workers stopped: no sample is read twice to get there.

**Two modes.**

* ``exact``: each sample of every source at most once per epoch. The shards of all sources
  are shuffled together (per epoch), laid end to end, and the sequence is cut into equal
  contiguous ranges per rank (whole batches) and per worker. Shards need not be equal: cuts
  fall inside shards where they must. The samples left over (fewer than ranks x batch, or
  more with a smaller ``num_samples``) are left out of the epoch before it is cut: a window
  over the shards in a fixed seeded order that moves on by its own length every epoch, so
  a sample left out of one epoch is read in the next ones (none is left out for good).
* ``resampled``: infinite; each worker draws shards with replacement (probability
  proportional to their sample count, so every sample of a source is equally likely),
  seeded by (seed, epoch, rank, worker). An epoch is then just a *checkpoint unit* of
  ``num_samples`` samples (default: the manifests' total). Several sources mix with
  ``weight``\\ s that are fractions of the stream, drawn per sample or per batch (``mix``).

**Shuffling.** Within a worker, sample ``i`` of its read order is emitted at the rank of
``i + U_i * shuffle_buffer`` (``U_i`` uniform in [0, 1), seeded): each output position draws
from a window of ``shuffle_buffer`` consecutive samples, like webdataset's shuffle buffer,
and about ``shuffle_buffer`` read samples wait in memory. Unlike a buffer, the order is
known without reading, which is what makes an O(1) resume possible.

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
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from clipline.data.decode import DecodeConfig, Decoder
from clipline.data.shard_io import check_url as _check_url
from clipline.data.shard_io import list_shards, open_shard
from clipline.data.shard_io import protocol as _protocol
from clipline.data.shard_io import read_bytes as _read_bytes

log = logging.getLogger(__name__)

OPEN_ATTEMPTS = 3  # tries to open a shard before it is given up (resampled) or lost
RETRY_SECONDS = 0.5  # first wait between tries; doubled each time


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
        for i, src in enumerate(sources):
            if not src.weight > 0:
                raise ValueError(f"data.sources[{i}].weight must be > 0, got {src.weight}")
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


# ----------------------------------------------------------------------------- reading URLs


def _shard_name(url: str) -> str:
    """The ``sizes.json`` key of a shard: its file name (for pipe:, the last ``*.tar`` word)."""
    if _protocol(url) == "pipe":
        names = re.findall(r"([^/\s'\"]+\.tar)\b", url)
        return names[-1] if names else url
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def _source_shards(src: SourceConfig, allow_pipe: bool) -> list[tuple[str, int]]:
    """[(shard URL, samples in it)] for one source, from its manifest(s).

    Raises:
        ValueError: a missing shard, gated pipe:, missing backend, or unreadable manifest.
    """
    urls = list_shards(src.shards)
    manifests: dict[str, dict[str, int]] = {}
    out = []
    for url in urls:
        _check_url(url, allow_pipe)
        where = src.manifest
        if where is None:
            if _protocol(url) == "pipe":
                raise ValueError(
                    f"pipe: shard {url!r} has no folder to find sizes.json in; give its "
                    "location with data.manifest (or manifest in [[data.sources]])"
                )
            where = url.rsplit("/", 1)[0] + "/sizes.json" if "/" in url else "sizes.json"
        if where not in manifests:
            _check_url(where, allow_pipe=False)
            try:
                sizes = json.loads(_read_bytes(where))
            except Exception as e:  # missing file, HTTP 404, bad JSON: all need the same fix
                raise ValueError(
                    f"cannot read the shard manifest {where!r} ({type(e).__name__}: {e}); "
                    "shards written by `clipline shards` have one, otherwise write "
                    '{"<shard>.tar": <count>, ...} there or point data.manifest at it'
                ) from e
            manifests[where] = {k: int(v) for k, v in sizes.items()}
        name = _shard_name(url)
        if name not in manifests[where]:
            raise ValueError(
                f"{where!r} has no entry for {name!r} (it lists {len(manifests[where])} "
                "shards); rewrite the shards or add the entry"
            )
        out.append((url, manifests[where][name]))
    if Path(src.shards).is_dir():  # a folder: every shard its manifest lists should be there
        listed = set().union(*manifests.values())
        absent = sorted(listed - {_shard_name(u) for u, _ in out})
        if absent:
            raise ValueError(
                f"{src.shards}/sizes.json lists {len(absent)} shard(s) that are not in the "
                f"folder, e.g. {absent[:3]}; restore them or rewrite sizes.json "
                "(`clipline shards --index-only`)"
            )
    return out


def _tar_samples(
    f: IO[bytes], seekable: bool, start: int, stop: int, want: Callable[[int], bool]
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(index in shard, sample or None) for samples ``start..stop-1`` of a webdataset tar.

    Samples before ``start`` are stepped over without reading their data (seeking, where the
    file allows it); samples that are not wanted come back as None, also unread. Files are
    grouped into samples by key as webdataset does (the name up to the first dot).
    """
    index, key, sample = -1, None, None
    with tarfile.open(fileobj=f, mode="r:" if seekable else "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            prefix, suffix = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key:
                if index >= start:
                    yield index, sample
                index, key = index + 1, prefix
                if index >= stop:
                    return
                sample = {"__key__": prefix} if index >= start and want(index) else None
            if sample is not None:
                sample[suffix.lower()] = tar.extractfile(member).read()
    if start <= index < stop:
        yield index, sample


# ------------------------------------------------------------------------------- planning


@dataclass
class _Lane:
    """A virtual stream: shard pieces read back to back. Samples are indexed 0..len-1."""

    segments: list[tuple[str, int, int]]  # (url, first, stop): samples first..stop-1 of a shard
    offsets: np.ndarray  # int64[len(segments) + 1]: lane index where each segment starts

    @classmethod
    def of(cls, segments: list[tuple[str, int, int]]) -> _Lane:
        sizes = [stop - first for _, first, stop in segments]
        return cls(segments, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))


@dataclass
class _RankPlan:
    """One rank's epoch: lanes to read, and per worker the (lane, index) list it emits."""

    lanes: list[_Lane]
    items: list[np.ndarray]  # per worker: int64[n, 2] rows (lane, index in lane), emit order
    batches: list[int]  # per worker: batches it yields (len(items[w]) <= batches[w] * B)
    # Per worker, the rows as first planned (before any change of worker count).
    first_items: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.first_items is None:
            self.first_items = self.items

    @functools.cached_property
    def rows(self) -> np.ndarray:
        """The rank's whole epoch, all workers' rows as first planned: what a worker left
        with no rows of its own (after a change of worker count) repeats to fill its
        batches. Joined only then, not for every plan a worker builds."""
        assert self.first_items is not None
        if not self.first_items:
            return np.empty((0, 2), dtype=np.int64)
        return np.concatenate(self.first_items)


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _split(batches: int, workers: int) -> list[int]:
    """Batches per worker, the first ones taking the remainder: the DataLoader reads workers
    round-robin, so batch t always comes from worker t % workers."""
    return [batches // workers + (w < batches % workers) for w in range(workers)]


def _taken(batches: int, worker: int, workers: int) -> int:
    """How many of the first ``batches`` round-robin batches came from ``worker``."""
    return max(0, (batches - worker + workers - 1) // workers)


def _window_shuffle(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..n-1 moving each element at most ``window`` places (see module doc)."""
    if window <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    return np.argsort(np.arange(n) + rng.random(n) * window, kind="stable").astype(np.int64)


def _cut(pieces: list[tuple[str, int, int]], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """The parts of shard pieces ``(url, first, stop)`` covering positions lo..hi-1 of the
    pieces laid end to end."""
    segments, start = [], 0
    for url, first, stop in pieces:
        n = stop - first
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            segments.append((url, first + a - start, first + b - start))
        start += n
        if start >= hi:
            break
    return segments


def _without(n: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of 0..n-1 left after removing the sorted, disjoint ``holes``."""
    kept, cur = [], 0
    for a, b in holes:
        if cur < a:
            kept.append((cur, a))
        cur = max(cur, b)
    if cur < n:
        kept.append((cur, n))
    return kept


def _source_names(urls: list[str]) -> list[str]:
    """Each shard's name relative to its source: the path after the folder all of the
    source's shards share (a pipe: shard: its ``*.tar`` word). It identifies a shard
    wherever the source is moved, and however its path is written (relative or absolute)."""
    paths = [u.split("?", 1)[0] for u in urls]  # a query (signed URLs) is not a name
    local = [p for u, p in zip(urls, paths, strict=True) if _protocol(u) != "pipe"]
    common = os.path.commonprefix(local)
    root = common[: common.rfind("/") + 1]
    return [
        _shard_name(u) if _protocol(u) == "pipe" else p[len(root) :]
        for u, p in zip(urls, paths, strict=True)
    ]


@dataclass(frozen=True)
class _Layout:
    """What every rank agrees on before planning an epoch (picklable into the workers)."""

    mode: Literal["exact", "resampled"]
    mix: Literal["sample", "batch"]
    sources: list[list[tuple[str, int]]]  # per source: [(url, samples)]
    weights: list[float]
    batch_size: int
    shuffle_buffer: int
    seed: int
    rank_batches: int  # batches per rank per epoch
    # url -> "<source index>/<name in source>": a sample's identity (with its key) that does
    # not change when the shards move; it seeds augmentation and the fingerprint.
    ids: dict[str, str] = field(default_factory=dict)

    def fingerprint(self, world_size: int) -> str:
        """Identifies everything a plan depends on except the worker count and where the
        shards are (moving them between a checkpoint and its resume keeps the resume exact)."""
        described = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ids"}
        described["sources"] = [[(self.ids[u], n) for u, n in src] for src in self.sources]
        return hashlib.sha256(json.dumps([repr(described), world_size]).encode()).hexdigest()[:16]

    def left_out(self, world_size: int) -> int:
        """Samples an exact epoch does not read: the rest of whole batches on every rank."""
        total = sum(n for src in self.sources for _, n in src)
        return total - world_size * self.rank_batches * self.batch_size

    def plan(self, epoch: int, rank: int, world_size: int, workers: int) -> _RankPlan:
        if self.mode == "exact":
            return self._exact(epoch, rank, world_size, workers)
        return self._resampled(epoch, rank, workers)

    def _kept(self, epoch: int, world_size: int) -> list[list[tuple[int, int]]]:
        """Per shard, the (first, stop) ranges epoch ``epoch`` reads.

        The samples an epoch leaves out (fewer than ranks x batch, or more with a smaller
        ``num_samples``) are a window of the shards laid end to end in a fixed seeded order,
        and the window moves on by its own length every epoch: every sample is read in the
        epochs around the one that left it out, none is left out for good.
        """
        sizes = [n for src in self.sources for _, n in src]
        total, left = sum(sizes), self.left_out(world_size)
        if left == 0:
            return [[(0, n)] for n in sizes]
        start = epoch * left % total
        window = [(start, min(start + left, total)), (0, max(0, start + left - total))]
        canon = list(range(len(sizes)))
        random.Random(f"{self.seed}/left-out").shuffle(canon)
        kept: list[list[tuple[int, int]]] = [[] for _ in sizes]
        pos = 0
        for i in canon:
            lo, hi = pos, pos + sizes[i]
            holes = sorted(
                (max(a, lo) - lo, min(b, hi) - lo) for a, b in window if a < hi and b > lo
            )
            kept[i] = _without(sizes[i], holes)
            pos = hi
        return kept

    def _exact(self, epoch: int, rank: int, world_size: int, workers: int) -> _RankPlan:
        shards = [shard for src in self.sources for shard in src]
        kept = self._kept(epoch, world_size)
        order = list(range(len(shards)))
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        pieces = [(shards[i][0], a, b) for i in order for a, b in kept[i]]
        B = self.batch_size
        quotas = _split(self.rank_batches, workers)
        lanes, items, start = [], [], rank * self.rank_batches * B
        for w, nb in enumerate(quotas):
            n = nb * B
            lanes.append(_Lane.of(_cut(pieces, start, start + n)))
            perm = _window_shuffle(n, self.shuffle_buffer, _rng(self.seed, epoch, rank, w))
            items.append(np.stack([np.full(n, w, dtype=np.int64), perm], axis=1))
            start += n
        return _RankPlan(lanes, items, quotas)

    def _resampled(self, epoch: int, rank: int, workers: int) -> _RankPlan:
        B = self.batch_size
        quotas = _split(self.rank_batches, workers)
        probs = np.asarray(self.weights) / sum(self.weights)
        lanes, items = [], []
        for w, nb in enumerate(quotas):
            rng = _rng(self.seed, "resampled", epoch, rank, w)
            n = nb * B
            draws = rng.choice(len(self.sources), size=nb if self.mix == "batch" else n, p=probs)
            source_of = np.repeat(draws, B) if self.mix == "batch" else draws
            rows = np.empty((n, 2), dtype=np.int64)
            for s, shards in enumerate(self.sources):
                where = np.flatnonzero(source_of == s)
                if not len(where):
                    continue
                sizes = np.array([c for _, c in shards], dtype=np.float64)
                segments, total = [], 0
                # Shards with probability proportional to their size: every sample of the
                # source is equally likely, whatever the shard sizes.
                while total < len(where):
                    url, count = shards[rng.choice(len(shards), p=sizes / sizes.sum())]
                    take = min(count, len(where) - total)
                    segments.append((url, 0, take))
                    total += take
                rows[where, 0] = len(lanes)
                rows[where, 1] = _window_shuffle(len(where), self.shuffle_buffer, rng)
                lanes.append(_Lane.of(segments))
            items.append(rows)
        return _RankPlan(lanes, items, quotas)


def _follow_chain(plan: _RankPlan, chain: list[dict[str, Any]], B: int) -> _RankPlan:
    """The plan after each change of worker count recorded in ``chain``.

    Each link is ``{"workers": W, "positions": [...], "batches": k}``: W workers emitted
    their lists up to ``positions`` and the rank yielded ``k`` batches; the next link's
    workers share what is left. The remaining (lane, index) rows of all workers are
    concatenated in worker order and cut into consecutive whole-batch pieces, so every
    sample left is emitted exactly once, and the rank still yields its fixed batch count.
    """
    lanes, items, batches = plan.lanes, plan.items, plan.batches
    for link, nxt in zip(chain, chain[1:], strict=False):
        assert len(items) == link["workers"], (len(items), link)
        rest = np.concatenate([it[p:] for it, p in zip(items, link["positions"], strict=True)])
        quotas = _split(sum(batches) - link["batches"], nxt["workers"])
        bounds = np.cumsum([0, *quotas]) * B
        items = [rest[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        batches = quotas
    return _RankPlan(lanes, items, batches, plan.first_items)


def _fresh_link(workers: int) -> dict[str, Any]:
    """A chain link (see :func:`_follow_chain`) for ``workers`` workers at their start.

    Besides the list ``positions``, per worker: ``fill``, how far into its repeats of good
    rows (after its list) it got, and ``failed``, the [lane, index] rows it found unusable
    (rare; they are what the repeats leave out, so a resumed worker must know them).
    """
    return {
        "workers": workers,
        "positions": [0] * workers,
        "fill": [0] * workers,
        "failed": [[] for _ in range(workers)],
        "batches": 0,
    }


def _known_failed(chain: list[dict[str, Any]], worker: int) -> set[tuple[int, int]]:
    """The rows worker ``worker`` of the chain's last link knows to be unusable: its own,
    and all of the earlier links' workers' (whose rows it took over)."""
    links = [(link, range(link["workers"])) for link in chain[:-1]] + [(chain[-1], [worker])]
    return {(int(a), int(b)) for link, ws in links for w in ws for a, b in link["failed"][w]}


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
        error: Exception | None = None
        for attempt in range(OPEN_ATTEMPTS):
            try:
                f, seekable, self.close = open_shard(url, allow_pipe=self.allow_pipe)
                break
            except FileNotFoundError as e:
                if self.exact:
                    raise RuntimeError(
                        f"shard {url} is missing but listed in its sizes.json: an exact epoch "
                        "cannot skip it without changing which samples the run sees. Restore "
                        "it, remove it from sizes.json, or use data.mode='resampled' (which "
                        "retries, then skips and counts missing shards)"
                    ) from e
                error = e
            except Exception as e:  # network blips: retried; then the shard is given up
                error = e
            if attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(RETRY_SECONDS * 2**attempt)
        else:  # an unreachable shard costs its samples, not the run (counted)
            self._lose(error)
            return

        def want(i: int) -> bool:
            return base + i in self.wanted_set

        samples = _tar_samples(f, seekable, idx - base, stop, want)
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
        preprocess: Callable[[Image.Image], torch.Tensor],
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
        # (epoch, chain) of a resumed epoch; workers are started after it is set.
        self.resume: tuple[int, list[dict[str, Any]]] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def plan(self, epoch: int, chain: list[dict[str, Any]]) -> _RankPlan:
        """This rank's plan for ``epoch`` after the worker-count changes in ``chain``."""
        base = self.layout.plan(epoch, self.rank, self.world_size, chain[0]["workers"])
        return _follow_chain(base, chain, self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        dl_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        if self.resume is not None and self.resume[0] == epoch:
            chain = self.resume[1]
        else:
            chain = [_fresh_link(num_workers)]
        link = chain[-1]
        assert link["workers"] == num_workers, (link, num_workers)
        plan = self.plan(epoch, chain)
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
                    # u8[B,3,H,W] (decode.uint8_images: the loop normalises it on the device
                    # with decoder.model_input), else normalised f32[B,3,H,W]
                    "image": self.decoder.collate(images),
                    "text": self.tokenize(list(captions)),  # i64[B,L], tokenised once per batch
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
    shards = [_source_shards(src, cfg.allow_pipe) for src in sources]
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
