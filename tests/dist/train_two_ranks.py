"""Run under torchrun: the real `clipline pretrain` path on the micro model, 2 CPU ranks."""

import sys
from pathlib import Path

from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain
from tests.helpers import micro_recipe

shards, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
run_pretrain(load_run_config(micro_recipe(shards, run_dir, steps=4)))
