"""The training loop without its loader: the real loader's first batch, fed again and again.

Shared by ``bench_train.py`` (its in-memory run) and ``bench_loop_interleaved.py``: both
measure what clipline's loop costs over its pure model step, with no loader worker
competing for the cores.
"""

from __future__ import annotations

from typing import Any


class FixedBatchLoader:
    """What the training loop asks of a ``TrainLoader``, serving one real batch forever."""

    def __init__(self, loader: Any):
        self.num_samples, self.batch_size = loader.num_samples, loader.batch_size
        self.batches_per_epoch, self.stats = loader.batches_per_epoch, loader.stats
        # The worker's batch (uint8 on the CPU), made model-ready again for every step as the
        # real loader does: the copy to the device and the normalisation are the loader's cost.
        self.ready, loader.ready = loader.ready, None
        self.batch = next(iter(loader.epoch(0)))  # the loader and its worker go after this

    def epoch(self, epoch: int, start: int = 0):
        while True:
            yield self.ready(self.batch)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:  # nothing to resume: one batch, forever
        pass


def feed_one_batch(run: Any) -> list[FixedBatchLoader]:
    """Makes ``clipline.launch.run`` build a :class:`FixedBatchLoader` around its real
    loader; returns the list that collects the loaders built (newest last)."""
    built: list[FixedBatchLoader] = []
    real_build = run.build_train_loader

    def build(*args: Any, **kwargs: Any) -> FixedBatchLoader:
        built.append(FixedBatchLoader(real_build(*args, **kwargs)))
        return built[-1]

    run.build_train_loader = build
    return built
