"""Run under torchrun: a checkpoint written by any number of ranks, loaded into this
world's DDP or FSDP2 model and optimizer through ``accelerator.prepare`` (as
:meth:`clipline.pretrain.periodic.Checkpointer.wrap` does), then saved again by this
world's ranks. The test compares the two checkpoints, consolidated."""

import sys
from pathlib import Path

from accelerate import Accelerator

from clipline.pretrain.checkpoint import (
    load_training_state,
    read_step,
    save_checkpoint,
    training_state,
)
from clipline.pretrain.optim import OptimConfig, build_optimizer
from tests.helpers import fsdp_on_cpu_accelerator, micro_model

src, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
accelerator = fsdp_on_cpu_accelerator()() if mode == "fsdp" else Accelerator(cpu=True)
model = micro_model(seed=1)  # other weights than the saved ones: the load must replace them
optimizer = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1))
model, optimizer = accelerator.prepare(model, optimizer)
states = training_state(model, optimizer)
load_training_state(src, states)
save_checkpoint(out, step=read_step(src), states=states, state={}, config={}, keep_last=0)
