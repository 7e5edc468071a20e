"""Run under torchrun (gloo CPU ranks): one leg of an epoch that changes world size.

Arguments: shards, the previous leg's report (``-``: none, start the epoch), batches to take
per rank (``all``: to the end of the epoch, then all of the next one), data.workers, and
where rank 0 writes this leg's report: every rank's stream state, sample ids and batch count.
Every batch is followed by an all-reduce, as a DDP step would be: a rank with fewer batches
than the others would hang there until the process group timed out.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from clipline.data.stream import StreamConfig
from tests.helpers import micro_loader, sample_ids

shards, previous, take, workers, out = sys.argv[1:6]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
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
dist.destroy_process_group()
