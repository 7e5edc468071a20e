"""Run under torchrun: one distilling step of the micro model on this rank's share of the
global batch, for each case ``kind:local_loss:accum`` given.

Rank 0 writes each case's rank-averaged loss and DDP-averaged gradients, for the test to
compare with one process on the whole batch (tests/test_distill.py).
"""

import argparse

from accelerate import Accelerator
from safetensors.torch import save_file

from clipline.pretrain.loop import contrastive_step
from tests.helpers import global_batch, micro_model
from tests.test_distill import SPEC_TWO, _distill, teacher_features

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--per-rank", type=int, default=4)
parser.add_argument("cases", nargs="+", help="kind:local_loss:accum")
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
images, texts = global_batch(args.per_rank * world)
t_img, t_txt = teacher_features(args.per_rank * world, SPEC_TWO)
mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
results = {}
for case in args.cases:
    kind, local, accum = case.split(":")
    model = micro_model(loss=kind)
    ddp = accelerator.prepare(model)
    loss_fn = _distill(weight=0.5, temperature=2.0, kind=kind, local_loss=bool(int(local)))
    chunks = [t.chunk(int(accum)) for t in (images[mine], texts[mine], t_img[mine], t_txt[mine])]
    inputs = list(zip(chunks[0], chunks[1], strict=True))
    micro = [{"teacher_image": i, "teacher_text": t} for i, t in zip(*chunks[2:], strict=True)]
    micro[0]["teacher_spec"] = {"dims": SPEC_TWO.dims, "logit_scales": SPEC_TWO.logit_scales}
    extra = loss_fn.step_inputs(micro, model.preprocess_config())
    loss, _ = contrastive_step(ddp, loss_fn, inputs, accelerator, **extra)
    results[f"{case}/loss"] = accelerator.reduce(loss.detach(), reduction="mean").reshape(1)
    for name, p in model.named_parameters():
        if p.grad is not None:
            results[f"{case}/grad/{name}"] = p.grad.contiguous()
if accelerator.is_main_process:
    save_file(results, args.out)
accelerator.wait_for_everyone()
del ddp
accelerator.free_memory()  # drop the DDP wrappers before their process group goes
accelerator.end_training()
