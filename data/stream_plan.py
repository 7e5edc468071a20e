"""Planning a rank's epoch: which samples each dataloader worker yields, in which order.

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

A plan is a list of *lanes* (shard pieces read back to back) and, per worker, the rows
``(lane, index in lane)`` it emits in order; :class:`~clipline.data.stream.ContrastiveStream`
reads them. A change of worker count on resume is a *chain* of links (each worker's
position when it changed), replayed as arithmetic by :func:`_follow_chain`; a change of
world size is a *hop* (every old rank's chain), after which the rows no old rank emitted
are re-divided in equal whole batches among the new ranks (:func:`_elastic_plan`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

from clipline.data.shard_io import protocol, shard_name


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
    local = [p for u, p in zip(urls, paths, strict=True) if protocol(u) != "pipe"]
    common = os.path.commonprefix(local)
    root = common[: common.rfind("/") + 1]
    return [
        shard_name(u) if protocol(u) == "pipe" else p[len(root) :]
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


def _remaining(plan: _RankPlan, chain: list[dict[str, Any]], B: int) -> _RankPlan:
    """The rows a rank had not emitted when it stopped: per worker of the chain's last
    link, the suffix of its list after its saved position (a worker in its repeats has
    none). Returned as a one-worker plan over the rank's lanes."""
    followed = _follow_chain(plan, chain, B)
    positions = chain[-1]["positions"]
    rest = [it[p:] for it, p in zip(followed.items, positions, strict=True)]
    rows = np.concatenate(rest) if rest else np.empty((0, 2), dtype=np.int64)
    return _RankPlan(followed.lanes, [rows], [0])


def _elastic_rest(
    layout: _Layout, epoch: int, history: list[dict[str, Any]]
) -> tuple[list[_Lane], np.ndarray]:
    """The lanes of all ranks of ``history``'s last hop side by side, and the rows none of
    them emitted, in (rank, worker) order (see :func:`_elastic_plan`)."""
    hop = history[-1]
    old = replace(layout, rank_batches=hop["rank_batches"])
    lanes: list[_Lane] = []
    rests = []
    for r, chain in enumerate(hop["chains"]):
        base = _elastic_plan(old, epoch, r, hop["world_size"], chain[0]["workers"], history[:-1])
        part = _remaining(base, chain, layout.batch_size)
        rows = part.items[0].copy()
        rows[:, 0] += len(lanes)
        lanes += part.lanes
        rests.append(rows)
    return lanes, np.concatenate(rests)


def _elastic_plan(
    layout: _Layout,
    epoch: int,
    rank: int,
    world_size: int,
    workers: int,
    history: list[dict[str, Any]],
) -> _RankPlan:
    """Rank ``rank`` of ``world_size``'s plan for ``epoch``, before its own chain of worker
    changes, after the changes of world size recorded in ``history``.

    Each hop is ``{"world_size": W, "rank_batches": R, "chains": [chain per rank]}``: W
    ranks (R batches each when the epoch was planned for them) emitted their lists up to
    their chains' last positions, then the run came back on another number of ranks. The
    rows none of them emitted are joined in (rank, worker) order, over all their lanes, and
    cut into equal whole-batch shares, one per new rank (DDP needs equal batch counts); the
    last ``len(rows) mod (world_size x batch)`` rows fill no batch on every rank and are
    left out of the epoch (:func:`_elastic_left_out`). The plan is arithmetic on the hops
    alone, so a second change of world size in the same epoch nests one more hop.
    """
    if not history:
        return layout.plan(epoch, rank, world_size, workers)
    B = layout.batch_size
    lanes, rest = _elastic_rest(layout, epoch, history)
    per_rank = len(rest) // (world_size * B)
    mine = rest[rank * per_rank * B : (rank + 1) * per_rank * B]
    quotas = _split(per_rank, workers)
    bounds = np.cumsum([0, *quotas]) * B
    items = [mine[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return _RankPlan(lanes, items, quotas)


def _elastic_left_out(
    layout: _Layout, epoch: int, world_size: int, history: list[dict[str, Any]]
) -> list[tuple[str, int]]:
    """The (shard URL, index in shard) of the rows left after ``history``'s last hop that
    fill no whole batch on every one of ``world_size`` ranks: left out of the epoch."""
    lanes, rest = _elastic_rest(layout, epoch, history)
    tail = rest[len(rest) - len(rest) % (world_size * layout.batch_size) :]
    out = []
    for lane, idx in tail.tolist():
        offsets = lanes[lane].offsets
        seg = int(np.searchsorted(offsets, idx, side="right")) - 1
        url, first, _ = lanes[lane].segments[seg]
        out.append((url, first + idx - int(offsets[seg])))
    return out
