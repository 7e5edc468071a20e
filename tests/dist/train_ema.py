"""Run under torchrun: `clipline pretrain`'s real path on 2 CPU ranks with an EMA of the
weights (``loop.ema_decay``), under DDP or FSDP2 (switched on as in train_fsdp.py)."""

import sys
from pathlib import Path

import clipline.launch.run as run
from clipline.launch.config import load_run_config
from tests.helpers import fsdp_on_cpu_accelerator, micro_recipe

shards, run_dir, mode, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
resume = sys.argv[5] if len(sys.argv) > 5 else None

if mode == "fsdp":
    run.Accelerator = fsdp_on_cpu_accelerator()

recipe = micro_recipe(
    shards,
    run_dir,
    steps=steps,
    checkpoint_every=1,
    keep_last=10,
    eval_every=2,
    ema_decay=0.9,
    ema_warmup=True,
)
recipe["retrieval"] = [{"name": "ret", "root": str(run_dir.parent / "ret")}]  # by the test
run.run_pretrain(load_run_config(recipe), resume=resume)
