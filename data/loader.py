"""The training loader: a rank's batches epoch by epoch, and its exact stream position.

:class:`TrainLoader` runs :class:`~clipline.data.stream.ContrastiveStream` in dataloader
workers and records, per batch the training loop takes, how far each worker got, so that a
checkpoint can resume the stream without reading the consumed samples again.

Batches arrive model-ready (timm's ``PrefetchLoader`` idea): workers decode to uint8 (a
quarter of the bytes through shared memory and the host-to-device copy), the loader copies
them to the device and normalises them there (:class:`ModelReady`), and the skip and
colour-conversion counts of the batches taken add up in one :class:`LoaderStats`.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from clipline.data.decode import CONVERSIONS, SKIP_REASONS, Decoder
from clipline.data.preprocess import PreprocessConfig
from clipline.data.stream import ContrastiveStream, StreamConfig, _layout
from clipline.data.stream_plan import _elastic_left_out, _fresh_link
from clipline.data.worker_signals import shield_worker, start_workers

log = logging.getLogger(__name__)

# 2: links record each worker's place in its repeats (fill) and its unusable rows (failed).
STATE_VERSION = 2
# Batch entries a ReplayDecoder adds: stored teacher features, f16[B,ΣD] (data/replay.py).
TEACHER_FEATURES = ("teacher_image", "teacher_text")


@dataclass
class LoaderStats:
    """Samples dropped (by reason) and colour-converted in the batches the loop took.

    Counts of this rank; a checkpoint holds their sum over ranks (:meth:`total`), which
    rank 0 carries on after a resume (:meth:`load_state_dict`), so that the sum the metrics
    report stays the run's total.
    """

    rank: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)

    def add(self, batch: dict[str, Any]) -> None:
        """Counts what the workers reported with ``batch``."""
        self.skipped.update(batch["skipped"])
        self.converted.update(batch["converted"])

    def vector(self) -> list[int]:
        """The counts in a fixed order (every rank the same), for a cross-rank sum."""
        return [self.skipped[r] for r in SKIP_REASONS] + [self.converted[k] for k in CONVERSIONS]

    @staticmethod
    def as_metrics(vector: list[float]) -> dict[str, float]:
        """``data/skipped/<reason>`` and ``data/converted/<kind>`` of a (summed) :meth:`vector`."""
        names = [f"data/skipped/{r}" for r in SKIP_REASONS]
        names += [f"data/converted/{k}" for k in CONVERSIONS]
        return dict(zip(names, vector, strict=True))

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"skipped": dict(self.skipped), "converted": dict(self.converted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes a checkpoint's counts (summed over ranks) on rank 0; other ranks start at 0."""
        if self.rank == 0:
            self.skipped = Counter(state.get("skipped", {}))
            self.converted = Counter(state.get("converted", {}))  # absent in older checkpoints

    @staticmethod
    def total(states: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
        """The sum of several ranks' state dicts (what a checkpoint holds)."""
        return {
            kind: dict(sum((Counter(s[kind]) for s in states), Counter()))
            for kind in ("skipped", "converted")
        }


class ModelReady:
    """A worker's batch -> the model's inputs on ``device``: images normalised, text moved.

    uint8 images are copied to the device (non-blocking from pinned memory) and normalised
    there by the decoder, each into one of ``buffers`` reused buffers taken in turn: the
    training loop holds ``accum_steps`` micro-batches of a step at once, so it needs that
    many (a step's graph, which saved its inputs, is gone before the next step's batches).
    """

    def __init__(
        self,
        normalize: Callable[[torch.Tensor, int], torch.Tensor],
        device: torch.device | str,
        buffers: int = 1,
    ):
        if buffers < 1:
            raise ValueError(f"buffers must be >= 1 (one per micro-batch of a step), got {buffers}")
        self.normalize, self.device, self.buffers = normalize, torch.device(device), buffers
        self._taken = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        slot, self._taken = self._taken % self.buffers, self._taken + 1
        image = batch["image"].to(self.device, non_blocking=True)
        ready = {
            **batch,
            "image": self.normalize(image, slot),  # f32[B,3,H,W]
            "text": batch["text"].to(self.device, non_blocking=True),  # i64[B,L]
        }
        for name in TEACHER_FEATURES:  # stored as f16 (data/replay.py); the loss takes f32
            if name in batch:
                ready[name] = batch[name].to(self.device, non_blocking=True).float()  # f32[B,ΣD]
        return ready


@dataclass
class TrainLoader:
    """Per-rank batches, epoch by epoch; every rank gets ``batches_per_epoch`` batches.

    It also keeps the stream's position: :meth:`state_dict` (a small JSON-able dict) is
    saved with each checkpoint and :meth:`load_state_dict` makes the next :meth:`epoch`
    call continue from it without reading the consumed samples again.

    Why the resume is exact: a rank's epoch is a fixed plan, one list of (lane, index)
    rows per worker, computed from the manifests alone; worker ``w`` emits its list in
    order and tags each batch with how far into its list it got. The state records,
    per worker, that position for the last batch the *training loop* took (prefetched
    batches do not count). So the consumed samples are exactly the list prefixes, and the
    remaining ones exactly the suffixes. With the same worker count, each worker resumes
    its suffix and the DataLoader's round-robin is rotated to the worker whose turn it
    was: the batches are identical to an uninterrupted run's. A worker past its list (it
    repeats good rows to fill batches short of failed samples) also records how far into
    the repeats it got, and each worker the rows that failed (they are left out of the
    repeats and not counted again), so a resume inside the repeats is exact too. With a different count, the
    suffixes are concatenated and cut into whole batches for the new workers (a new link
    in the state's ``chain``, which a later resume replays as arithmetic), so every
    remaining sample is still emitted exactly once and the rank still yields its fixed
    number of batches. With a different world size, all old ranks' states are read: their
    unread rows are re-divided among the new ranks in equal whole batches (a *hop* in the
    state's ``history``; the tail short of a batch on every rank is reported in
    :attr:`left_out`).
    """

    stream: ContrastiveStream
    workers: int
    batches_per_epoch: int
    num_samples: int
    # Makes batches model-ready; None: batches as the workers made them (uint8 on the CPU).
    ready: ModelReady | None = None
    stats: LoaderStats = field(default_factory=LoaderStats)
    _loader: DataLoader | None = None
    _state: dict[str, Any] | None = None  # the epoch being read, updated per batch taken
    _saved: dict[str, Any] | None = None  # a loaded state, for the next epoch() call
    # (shard URL, index in shard) of the samples a resume on another world size left out
    # of its epoch: they fill no whole batch on every new rank
    left_out: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stats.rank = self.stream.rank

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self.stream.cfg.batch_size

    def start_of(self, micro_batches: int) -> tuple[int, int]:
        """The (epoch, batch) that ``micro_batches`` batches taken since the run began lead
        to: the loaded stream state's own position when there is one (after a change of world
        size, epochs had other lengths than ``batches_per_epoch``), else by division."""
        if self._saved is not None:
            return self._saved["epoch"], self._saved["batches"]
        return divmod(micro_batches, self.batches_per_epoch)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """An iterator over epoch ``epoch`` from its batch ``start`` on.

        ``start`` > 0 continues from the state given to :meth:`load_state_dict` (O(1));
        without a matching state (a checkpoint from an older version, a changed world
        size or data config) it reads and discards ``start`` batches, with a warning.
        The previous epoch's iterator must be exhausted: workers persist across epochs.
        """
        readers = max(self.workers, 1)
        fresh = _fresh_link(readers)
        saved, self._saved = self._saved, None
        replay = start
        chain: list[dict[str, Any]] = [fresh]
        history: list[dict[str, Any]] = []
        if start and saved is not None and (saved["epoch"], saved["batches"]) == (epoch, start):
            chain, replay = copy.deepcopy(saved["chain"]), 0
            history = copy.deepcopy(saved.get("history", []))
            if "hop" in saved:  # another world size: its ranks' unread rows are shared out
                history.append(saved["hop"])
                chain = [fresh]
                self._report_left_out(epoch, history)
            elif chain[-1]["workers"] != readers:
                log.info(
                    "resuming epoch %d with %d workers instead of %d: the remaining samples "
                    "are shared among the new workers",
                    epoch,
                    readers,
                    chain[-1]["workers"],
                )
                chain.append(fresh)
            if self._loader is not None:
                raise RuntimeError("load_state_dict() must come before the first epoch()")
            self.stream.resume = (epoch, copy.deepcopy(chain), copy.deepcopy(history))
        elif start:
            log.warning(
                "no saved stream position for batch %d of epoch %d: reading and discarding "
                "%d batches to get there",
                start,
                epoch,
                start,
            )
        self.stream.epoch = epoch
        if self._loader is None:
            self._loader = DataLoader(
                self.stream,
                batch_size=None,  # batches are built (and tokenised) inside the workers
                num_workers=self.workers,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=4 if self.workers else None,
                persistent_workers=self.workers > 0,
                worker_init_fn=shield_worker,  # a stop signal is the trainer's to handle
            )
        self._state = {"epoch": epoch, "batches": start - replay, "chain": chain}
        if history:
            self._state["history"] = history
        batches = self._track(start_workers(self._loader), self._state)
        for _ in range(replay):
            next(batches)
        return self._taken(batches)

    def _taken(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            self.stats.add(batch)
            yield batch if self.ready is None else self.ready(batch)

    @staticmethod
    def _track(it: Iterator[dict[str, Any]], state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        link = state["chain"][-1]
        for batch in it:
            worker, position, fill, failed = batch.pop("_stream")
            link["positions"][worker] = position
            link["fill"][worker] = fill
            link["failed"][worker] += failed
            link["batches"] += 1
            state["batches"] += 1
            yield batch

    def _report_left_out(self, epoch: int, history: list[dict[str, Any]]) -> None:
        hop = history[-1]
        self.left_out = _elastic_left_out(
            self.stream.layout, epoch, self.stream.world_size, history
        )
        log.info(
            "resuming epoch %d on %d ranks instead of %d: the samples the old ranks had not "
            "read are shared among the new ranks in equal whole batches",
            epoch,
            self.stream.world_size,
            hop["world_size"],
        )
        if self.left_out:
            log.warning(
                "%d samples of epoch %d fill no whole batch on every one of the %d ranks: "
                "left out of this epoch (first: %s)",
                len(self.left_out),
                epoch,
                self.stream.world_size,
                self.left_out[0],
            )

    def state_dict(self) -> dict[str, Any]:
        """This rank's stream position: epoch, batches taken, per-worker list positions,
        and the world-size changes of the epoch (``history``)."""
        assert self._state is not None, "state_dict() before the first epoch()"
        return {
            "version": STATE_VERSION,
            "fingerprint": self.stream.fingerprint,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "rank_batches": self.stream.layout.rank_batches,
            **copy.deepcopy(self._state),
        }

    def load_state_dict(self, states: list[dict[str, Any]] | None) -> None:
        """Takes this rank's entry of the per-rank states saved with a checkpoint.

        A state that cannot be continued exactly (none saved, another world size or data
        config) is dropped with a warning; :meth:`epoch` then falls back to replaying.
        """
        rank, world = self.stream.rank, self.stream.world_size
        if not states:
            return
        if len(states) != world:
            self._saved = self._elastic(states)
            return
        state = states[rank]
        if state.get("version") != STATE_VERSION:
            log.warning(
                "the checkpoint's stream state has version %s, this clipline reads %d: the "
                "stream position is recomputed by replay (exact, but it reads the epoch's "
                "consumed samples again)",
                state.get("version"),
                STATE_VERSION,
            )
            return
        if state["fingerprint"] != self.stream.fingerprint:
            log.warning(
                "data settings changed since the checkpoint (only data.workers may change "
                "for an exact resume); the stream position is recomputed by replay"
            )
            return
        self._saved = state

    def _elastic(self, states: list[dict[str, Any]]) -> dict[str, Any] | None:
        """A state for :meth:`epoch` from all ranks of a run on another world size: their
        chains become a hop of the epoch's ``history`` (see
        :func:`~clipline.data.stream_plan._elastic_plan`), or None (replay) with a warning."""
        world, layout = self.stream.world_size, self.stream.layout
        why = None
        if any(s.get("version") != STATE_VERSION or "rank_batches" not in s for s in states):
            why = "was written by an older clipline"
        elif any(
            replace(layout, rank_batches=s["rank_batches"]).fingerprint(s["world_size"])
            != s["fingerprint"]
            for s in states
        ):
            why = "has other data settings (only the ranks and data.workers may change)"
        elif len({(s["epoch"], s["batches"]) for s in states}) != 1:
            why = "has ranks at different batches"
        if why:
            log.warning(
                "the checkpoint's stream state is for %d ranks, this run has %d, and it %s: "
                "the stream position is recomputed by replay (samples may repeat or be missed)",
                len(states),
                world,
                why,
            )
            return None
        first = states[0]
        return {
            "epoch": first["epoch"],
            "batches": first["batches"],
            "chain": [],
            "history": first.get("history", []),
            "hop": {
                "world_size": len(states),
                "rank_batches": first["rank_batches"],
                "chains": [s["chain"] for s in states],
            },
        }


def build_train_loader(
    cfg: StreamConfig,
    *,
    preprocess: PreprocessConfig,
    tokenize: Callable[[list[str]], torch.Tensor],
    rank: int,
    world_size: int,
    device: torch.device | str | None = None,
    accum_steps: int = 1,
    decoder: Decoder | None = None,
) -> TrainLoader:
    """This rank's loader, after :func:`epoch_shape`'s checks of the run shape.

    Args:
        cfg: The stream's settings.
        preprocess: The training preprocessing numbers (size, crop, mean, std), from the model.
        tokenize: Captions -> ``i64[B,L]``, run in the workers on whole batches.
        rank: This process's rank.
        world_size: Number of ranks.
        device: Where batches go, normalised (the training loop's device); None: batches
            as the workers made them (uint8 images on the CPU), for inspecting the data.
        accum_steps: Micro-batches the loop holds at once (one reused buffer each).
        decoder: Replaces the stream's own decoder (built from ``cfg.decode`` and
            ``preprocess``), e.g. a :class:`~clipline.data.replay.ReplayDecoder`.
    """
    shape, layout = _layout(cfg, world_size)
    stream = ContrastiveStream(
        cfg, layout, preprocess=preprocess, tokenize=tokenize, rank=rank, world_size=world_size
    )
    if decoder is not None:
        stream.decoder = decoder
    return TrainLoader(
        stream=stream,
        workers=cfg.workers,
        batches_per_epoch=shape.batches_per_epoch,
        num_samples=shape.samples_read,
        ready=None
        if device is None
        else ModelReady(stream.decoder.model_input, device, buffers=accum_steps),
    )
