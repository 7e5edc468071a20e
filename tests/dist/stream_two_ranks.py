"""Run under torchrun (2 CPU ranks, gloo): both stream modes on deliberately uneven shards.

Every batch is followed by an all-reduce, as a DDP step would be: if one rank yielded fewer
batches than the other, the other would wait in it until the process group timed out.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from clipline.data.loader import build_train_loader
from clipline.data.stream import StreamConfig
from tests.helpers import micro_model

spec, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo", timeout=timedelta(seconds=20))
rank, world = dist.get_rank(), dist.get_world_size()
model = micro_model()
report = {}
for mode, few in (("exact", "error"), ("resampled", "error"), ("exact", "resample")):
    cfg = StreamConfig(
        shards=spec if few == "error" else spec.split("::")[0],  # 1 shard, 4 readers
        mode=mode,
        few_shards=few,
        batch_size=4,
        workers=2,
        shuffle_buffer=8,
        num_samples=None if mode == "exact" and few == "error" else 48,
    )
    loader = build_train_loader(
        cfg,
        preprocess=model.preprocess_config(),
        tokenize=model.tokenize,
        rank=rank,
        world_size=world,
    )
    ids, batches = [], 0
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            step = torch.ones(1)
            dist.all_reduce(step)  # the collective a short rank would hang
            batches += 1
            ids += [f"{epoch}/{u}#{k}" for u, k in zip(batch["url"], batch["key"], strict=True)]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"batches": batches, "ids": ids})
    report[f"{mode}/{few}"] = gathered
    del loader
if rank == 0:
    out.write_text(json.dumps(report))
dist.destroy_process_group()
