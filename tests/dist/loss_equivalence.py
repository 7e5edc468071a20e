"""Run under torchrun: one training step of the micro model on this rank's half of the batch.

Rank 0 writes the rank-averaged loss and the (DDP-averaged) gradients for the test to
compare with one process on the concatenated batch.
"""

import argparse

from accelerate import Accelerator
from safetensors.torch import save_file

from clipline.pretrain.loop import contrastive_step
from clipline.pretrain.loss import LossConfig, build_loss
from tests.helpers import global_batch, micro_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local-loss", type=int, default=0)
parser.add_argument("--per-rank", type=int, default=4)
parser.add_argument("--accum", type=int, default=1, help="micro-batches per rank's share")
parser.add_argument("--loss", default="infonce")
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
model = micro_model(loss=args.loss)
ddp = accelerator.prepare(model)
images, texts = global_batch(args.per_rank * world)
mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
micro = list(zip(images[mine].chunk(args.accum), texts[mine].chunk(args.accum), strict=True))
loss_fn = build_loss(LossConfig(kind=args.loss, local_loss=bool(args.local_loss)))
loss, _ = contrastive_step(ddp, loss_fn, micro, accelerator)
loss_mean = accelerator.reduce(loss.detach(), reduction="mean")
if accelerator.is_main_process:
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(
        {"loss": loss_mean.reshape(1), **{f"grad/{k}": v for k, v in grads.items()}}, args.out
    )
accelerator.wait_for_everyone()
del ddp
accelerator.free_memory()  # drop the DDP wrapper before its process group goes
accelerator.end_training()
