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

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import clipline.launch.run as run
from clipline.launch.config import load_run_config
from tests.helpers import micro_recipe

shards, run_dir, mode, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
resume = sys.argv[5] if len(sys.argv) > 5 else None


class FSDPOnCPU(Accelerator):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap"
        )
        # AcceleratorState re-reads PartialState's shared fields when re-instantiated.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


if mode == "fsdp":
    run.Accelerator = FSDPOnCPU

eval_root = run_dir.parent / "ret"  # written by the test
recipe = micro_recipe(shards, run_dir, steps=steps, checkpoint_every=2, keep_last=5, eval_every=2)
recipe["retrieval"] = [{"name": "ret", "root": str(eval_root)}]
metrics = run.run_pretrain(load_run_config(recipe), resume=resume)
(run_dir / f"final_metrics_{run.os.environ['RANK']}.json").write_text(json.dumps(metrics))
