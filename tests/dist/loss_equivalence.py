"""Run under torchrun: one training step of the micro model on this rank's half of the batch,
for each ``--case LOSS:LOCAL_LOSS:ACCUM`` in turn (one launch serves every case; each case
builds its own model, DDP wrapper and loss, as a fresh launch would).

Rank 0 writes each case's rank-averaged loss and (DDP-averaged) gradients to
``OUT_DIR/LOSS-LOCAL_LOSS-ACCUM.safetensors`` for the test to compare with one process on
the concatenated batch.
"""

import argparse
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file

from clipline.pretrain.loop import contrastive_step
from clipline.pretrain.loss import LossConfig, build_loss
from tests.helpers import global_batch, micro_model

parser = argparse.ArgumentParser()
parser.add_argument("--out-dir", required=True, type=Path)
parser.add_argument("--per-rank", type=int, default=4)
parser.add_argument(
    "--case", action="append", required=True, help="LOSS:LOCAL_LOSS:ACCUM (micro-batches)"
)
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
for case in args.case:
    kind, local_loss, accum = case.split(":")
    model = micro_model(loss=kind)
    ddp = accelerator.prepare(model)
    images, texts = global_batch(args.per_rank * world)
    mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
    micro = list(zip(images[mine].chunk(int(accum)), texts[mine].chunk(int(accum)), strict=True))
    loss_fn = build_loss(LossConfig(kind=kind, local_loss=bool(int(local_loss))))
    loss, _ = contrastive_step(ddp, loss_fn, micro, accelerator)
    loss_mean = accelerator.reduce(loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
        save_file(
            {"loss": loss_mean.reshape(1), **{f"grad/{k}": v for k, v in grads.items()}},
            args.out_dir / f"{kind}-{local_loss}-{accum}.safetensors",
        )
    accelerator.wait_for_everyone()
    del ddp
    accelerator.free_memory()  # drop the DDP wrapper (and its hooks) before the next case
accelerator.end_training()
