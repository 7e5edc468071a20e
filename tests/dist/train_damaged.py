"""Run under torchrun (2 CPU ranks, gloo): `clipline pretrain`'s real path on damaged shards.

Arguments: shards, run dir, data.workers, and optionally a checkpoint to resume from.
"""

import sys
from pathlib import Path

from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain
from tests.helpers import micro_recipe

shards, run_dir, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
recipe = micro_recipe(shards, run_dir, steps=8, checkpoint_every=4, keep_last=3)
recipe["data"].update(workers=workers, shuffle_buffer=8, batch_size=4)
run_pretrain(load_run_config(recipe), resume=resume)
