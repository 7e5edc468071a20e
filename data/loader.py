"""The training loader: a rank's batches epoch by epoch, and its exact stream position.

:class:`TrainLoader` runs :class:`~clipline.data.stream.ContrastiveStream` in dataloader
workers and records, per batch the training loop takes, how far each worker got, so that a
checkpoint can resume the stream without reading the consumed samples again.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipline.data.stream import ContrastiveStream, StreamConfig, _fresh_link, _layout
from clipline.data.worker_signals import shield_worker, start_workers

log = logging.getLogger(__name__)

# 2: links record each worker's place in its repeats (fill) and its unusable rows (failed).
STATE_VERSION = 2


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
    number of batches.
    """

    stream: ContrastiveStream
    workers: int
    batches_per_epoch: int
    num_samples: int
    _loader: DataLoader | None = None
    _state: dict[str, Any] | None = None  # the epoch being read, updated per batch taken
    _saved: dict[str, Any] | None = None  # a loaded state, for the next epoch() call

    def model_input(self, image_BCHW: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A batch's images, moved to the device, as the model takes them (uint8 batches
        are normalised there; see :meth:`Decoder.model_input` for ``slot``)."""
        return self.stream.decoder.model_input(image_BCHW, slot)

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
        chain = [fresh]
        if start and saved is not None and (saved["epoch"], saved["batches"]) == (epoch, start):
            chain, replay = copy.deepcopy(saved["chain"]), 0
            if chain[-1]["workers"] != readers:
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
            self.stream.resume = (epoch, copy.deepcopy(chain))
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
        batches = self._track(start_workers(self._loader), self._state)
        for _ in range(replay):
            next(batches)
        return batches

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

    def state_dict(self) -> dict[str, Any]:
        """This rank's stream position: epoch, batches taken, per-worker list positions."""
        assert self._state is not None, "state_dict() before the first epoch()"
        return {
            "version": STATE_VERSION,
            "fingerprint": self.stream.fingerprint,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
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
        state = states[rank] if len(states) == world else None
        if state is None:
            log.warning(
                "the checkpoint's stream state is for %d ranks, this run has %d: the stream "
                "position is recomputed by replay",
                len(states),
                world,
            )
            return
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


def build_train_loader(
    cfg: StreamConfig,
    *,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    rank: int,
    world_size: int,
) -> TrainLoader:
    """This rank's loader, after :func:`epoch_shape`'s checks of the run shape."""
    shape, layout = _layout(cfg, world_size)
    stream = ContrastiveStream(
        cfg, layout, preprocess=preprocess, tokenize=tokenize, rank=rank, world_size=world_size
    )
    return TrainLoader(
        stream=stream,
        workers=cfg.workers,
        batches_per_epoch=shape.batches_per_epoch,
        num_samples=shape.samples_read,
    )
