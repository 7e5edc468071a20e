"""The sample ledger: which samples every optimizer step trained on, for audits.

With ``loop.sample_ledger = true`` each rank appends one JSON line per step to
``run_dir/ledger/rank_NNNNN.jsonl``: per micro-batch its epoch, its samples' shard URL
(interned: a number into the file's own URL table, extended by the row that first uses
one) and key, and the samples its loader worker skipped since its previous batch, by
reason. A file per rank needs no collective per step, and a rank writes its row before
the step's checkpoint, so every checkpoint's steps are in every rank's file.

Resume keeps the ledger consistent with the checkpoint: rows past the resumed step
(written by a run killed after its last checkpoint; the resumed run trains those steps
again) and a line cut by a kill mid-write are cut off the end of the file, in place.
``clipline data ledger RUN`` (:mod:`clipline.data.ledger`) reads it back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from clipline.data.ledger import complete_rows
from clipline.data.loader import TrainLoader

if TYPE_CHECKING:  # loop.py imports this module
    from clipline.pretrain.loop import LoopConfig

log = logging.getLogger(__name__)


def _cut_after(path: Path, step: int) -> list[str]:
    """Cuts ``path`` after its last complete row at or before ``step``; returns the URL table
    of the rows kept. Rows are in step order (every resume cuts first, then appends)."""
    urls: list[str] = []
    if not path.is_file():
        return urls
    keep = 0
    for length, row in complete_rows(path):
        if row["step"] > step:
            break
        urls += row.get("new_urls", [])
        keep += length
    size = path.stat().st_size
    if keep < size:
        os.truncate(path, keep)
        log.info(
            "%s: cut %d bytes of rows past step %d (trained again now)", path, size - keep, step
        )
    return urls


class SampleLedger:
    """Every step (``loop.sample_ledger``): this rank's samples of the step, as one row.

    Args:
        loop_cfg: ``sample_ledger`` (off: every call is a no-op).
        loader: The rank's loader: micro-batches per epoch, and the shards of the run.
        accelerator: This process's rank and the world size.
        run_dir: The ledger goes to ``run_dir/ledger/``.
        start_step: The step the run starts from (the resumed checkpoint's, or 0).
    """

    def __init__(
        self,
        loop_cfg: LoopConfig,
        loader: TrainLoader,
        accelerator: Accelerator,
        run_dir: Path,
        *,
        start_step: int,
    ):
        self.enabled = loop_cfg.sample_ledger
        if not self.enabled:
            return
        self.loader = loader
        rank, world = accelerator.process_index, accelerator.num_processes
        folder = Path(run_dir) / "ledger"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank_{rank:05d}.jsonl"
        self.urls = {url: i for i, url in enumerate(_cut_after(self.path, start_step))}
        if rank == 0:
            # The files of ranks a larger earlier world had: nobody writes them now.
            for other in sorted(folder.glob("rank_*.jsonl")):
                if int(other.stem.removeprefix("rank_")) >= world:
                    _cut_after(other, start_step)
            layout = loader.stream.layout
            run = {
                "mode": layout.mode,
                "world_size": world,
                # Sample slots of an epoch (skipped samples' slots are filled by repeats).
                "samples_per_epoch": world * loader.batches_per_epoch * loader.batch_size,
                "shards": [[url, n] for source in layout.sources for url, n in source],
            }
            tmp = folder / "run.json.tmp"
            tmp.write_text(json.dumps(run) + "\n")
            os.replace(tmp, folder / "run.json")

    def record(self, step: int, micro: list[dict[str, Any]]) -> None:
        """Appends step ``step``'s row (1-based, just taken) from its micro-batches."""
        if not self.enabled:
            return
        new_urls: list[str] = []
        batches = []
        # The loader's position after the step's last micro-batch: its epoch, and the batches
        # taken in it. Micro-batches run across epochs, and after a resume on another world
        # size an epoch had other lengths, so a division of the step would mislabel them.
        position = self.loader.state_dict()
        for j, batch in enumerate(micro):
            for url in batch["url"]:
                if url not in self.urls:
                    self.urls[url] = len(self.urls)
                    new_urls.append(url)
            batches.append(
                {
                    "epoch": position["epoch"] - int(len(micro) - 1 - j >= position["batches"]),
                    "url": [self.urls[u] for u in batch["url"]],
                    "key": list(batch["key"]),
                    "skipped": batch["skipped"],
                }
            )
        row = {"step": step, "batches": batches, **({"new_urls": new_urls} if new_urls else {})}
        # One write per row: a kill leaves at worst a cut last line, which resume cuts off.
        with open(self.path, "a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
