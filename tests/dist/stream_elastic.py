"""Run under torchrun (gloo CPU ranks): legs of epochs that change world size, one after
the other in this launch (each with its own loader, as a launch of its own would have).

Arguments: shards, then per leg four: the previous leg's report (``-``: none, start the
epoch), batches to take per rank (``all``: to the end of the epoch, then all of the next
one), data.workers, and where rank 0 writes this leg's report: every rank's stream state,
sample ids and batch count. Every batch is followed by an all-reduce, as a DDP step would
be: a rank with fewer batches than the others would hang there until the process group
timed out.
"""

import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from clipline.data.stream import StreamConfig
from tests.helpers import micro_loader, sample_ids


def leg(shards: str, previous: str, take: str, workers: str, out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = StreamConfig(shards=shards, batch_size=4, workers=int(workers), shuffle_buffer=8)
    loader = micro_loader(cfg, rank=rank, world_size=world)
    start = 0
    if previous != "-":
        states = json.loads(Path(previous).read_text())["states"]
        loader.load_state_dict(states)
        start = states[0]["batches"]
    it = loader.epoch(0, start=start)
    batches = []
    for batch in it:
        dist.all_reduce(torch.ones(1))  # the collective a short rank would hang
        batches.append(batch)
        if take != "all" and len(batches) == int(take):
            break
    report = {
        "state": loader.state_dict(),
        "ids": sample_ids(batches),
        "batches": len(batches),
        "left_out": len(loader.left_out),
    }
    if take == "all":  # the next epoch is planned afresh for this world size
        report["next"] = []
        for batch in loader.epoch(1):
            dist.all_reduce(torch.ones(1))
            report["next"] += sample_ids([batch])
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        states = [r.pop("state") for r in gathered]
        Path(out).write_text(json.dumps({"states": states, "ranks": gathered}))


dist.init_process_group("gloo", timeout=timedelta(seconds=60))
shards, legs = sys.argv[1], sys.argv[2:]
assert legs and len(legs) % 4 == 0, legs
for i in range(0, len(legs), 4):
    leg(shards, *legs[i : i + 4])
    gc.collect()  # this leg's loader and its worker processes go before the next leg's
dist.destroy_process_group()
