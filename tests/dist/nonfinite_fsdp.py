"""Run under torchrun: an update that overflows on one FSDP2 shard only must skip on all ranks.

Like tests/dist/train_fsdp.py this switches Accelerate to FSDP2 on CPU. One weight of
``clip.text_projection`` (row 0: rank 0's shard) is set to 100 and the run uses
``lr * weight_decay = 1e37``: 100 * (1 - 1e37) overflows, every other weight stays finite.
Only rank 0 sees the non-finite value; unless the ranks agree, rank 1 steps and the ranks
disagree on when to stop. Each rank writes the error it stopped with.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import clipline.launch.run as run
from clipline.launch.config import load_run_config
from clipline.pretrain.loop import NonFiniteLossError
from tests.helpers import fsdp_on_cpu_accelerator, micro_recipe

shards, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
rank = os.environ["RANK"]


FSDPOnCPU = fsdp_on_cpu_accelerator()


class OneLargeWeight(run.DualEncoder):
    @classmethod
    def from_config(cls, cfg, **overrides):
        model = super().from_config(cfg, **overrides)
        with torch.no_grad():
            model.clip.text_projection[0, 0] = 100.0
        if rank == "0":
            run_dir.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), run_dir / "initial.safetensors")
        return model


run.Accelerator = FSDPOnCPU
run.DualEncoder = OneLargeWeight
recipe = micro_recipe(shards, run_dir, steps=6, checkpoint_every=1, keep_last=5, max_nonfinite=3)
recipe["optim"].update(lr=1e25, weight_decay=1e12)
try:
    run.run_pretrain(load_run_config(recipe))
except NonFiniteLossError as exc:
    (run_dir / f"stopped_{rank}.txt").write_text(str(exc))
