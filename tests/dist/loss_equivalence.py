"""Run under torchrun: one training step of the micro model on this rank's half of the batch.

Rank 0 writes the rank-averaged loss and the (DDP-averaged) gradients for the test to
compare with one process on the concatenated batch.
"""

import argparse

from accelerate import Accelerator
from safetensors.torch import save_file

from clipline.pretrain.loss import InfoNCELoss, LossConfig
from tests.helpers import global_batch, micro_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local-loss", type=int, default=0)
parser.add_argument("--per-rank", type=int, default=4)
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
model = micro_model()
ddp = accelerator.prepare(model)
images, texts = global_batch(args.per_rank * world)
mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
img, txt, scale = ddp(images[mine], texts[mine])
loss = InfoNCELoss(LossConfig(local_loss=bool(args.local_loss)))(img, txt, scale)
accelerator.backward(loss)
loss_mean = accelerator.reduce(loss.detach(), reduction="mean")
if accelerator.is_main_process:
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(
        {"loss": loss_mean.reshape(1), **{f"grad/{k}": v for k, v in grads.items()}}, args.out
    )
accelerator.wait_for_everyone()
accelerator.end_training()
