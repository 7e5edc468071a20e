"""Run under torchrun: `clipline pretrain`'s real path on 2 CPU ranks, DDP or FSDP2.

Accelerate turns FSDP on only for accelerator devices (on CPU it always builds DDP), so for
``fsdp`` this script sets Accelerate's state to FSDP2 right after the Accelerator is made,
as `accelerate launch --config_file launch/accelerate/fsdp.yaml` would on GPUs. Everything
after that (fully_shard through accelerator.prepare, gathered checkpoints, evaluation on
every rank, resume into a sharded optimizer) is the code a GPU run executes.
"""

import json
import sys
from pathlib import Path


import clipline.launch.run as run
from clipline.launch.config import load_run_config
from tests.helpers import fsdp_on_cpu_accelerator, micro_recipe

shards, run_dir, mode, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
resume = sys.argv[5] if len(sys.argv) > 5 else None


FSDPOnCPU = fsdp_on_cpu_accelerator()


if mode == "fsdp":
    run.Accelerator = FSDPOnCPU

eval_root = run_dir.parent / "ret"  # written by the test
recipe = micro_recipe(shards, run_dir, steps=steps, checkpoint_every=2, keep_last=5, eval_every=2)
recipe["retrieval"] = [{"name": "ret", "root": str(eval_root)}]
metrics = run.run_pretrain(load_run_config(recipe), resume=resume)
(run_dir / f"final_metrics_{run.os.environ['RANK']}.json").write_text(json.dumps(metrics))
