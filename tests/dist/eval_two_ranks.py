"""Run under torchrun: distributed evaluation of the micro model; each rank writes its metrics."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tests.test_eval_distributed import eval_tasks, evaluate_all, gathered_embeddings
from tests.helpers import micro_model

data, out = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
model = micro_model(seed=0).eval()
metrics = evaluate_all(model, eval_tasks(data), distributed=True)
(out / f"metrics_rank{rank}.json").write_text(json.dumps(metrics))
img_emb_ND, labels = gathered_embeddings(model, data, distributed=True)
save_file(
    {"image": img_emb_ND, "label": torch.tensor(labels)}, out / f"embeddings_rank{rank}.safetensors"
)
dist.destroy_process_group()
