"""Run under torchrun: `clipline pretrain`'s path under FSDP2 on CPU ranks (see
tests/dist/train_fsdp.py) with ``loop.async_checkpoint``: each periodic checkpoint's DTensor
shards are staged to host memory and written in the background."""

import sys
from pathlib import Path

import clipline.launch.run as run
from clipline.launch.config import load_run_config
from tests.helpers import fsdp_on_cpu_accelerator, micro_recipe

shards, run_dir, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
run.Accelerator = fsdp_on_cpu_accelerator()
loop = {"steps": steps, "checkpoint_every": 2, "keep_last": 10, "async_checkpoint": True}
run.run_pretrain(load_run_config(micro_recipe(shards, run_dir, **loop)))
