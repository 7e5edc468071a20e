"""Run under torchrun: distributed evaluation of the micro model; each rank writes its metrics."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from clipline.eval import RetrievalTask, build_evaluator
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

# The embedding cache across ranks: the second call loads on every rank, embeds nothing.
cached = build_evaluator(
    RetrievalTask(name="ret", root=str(data / "ret"), batch_size=3, cache_dir=str(out / "cache")),
    preprocess=model.preprocess_config(),
    tokenize=model.tokenize,
    distributed=True,
    model_id="micro-0",
)
calls = []
encode_image = model.encode_image
model.encode_image = lambda x: calls.append(len(x)) or encode_image(x)
first = cached(model)
embedded_first = sum(calls)
second = cached(model)
(out / f"cache_rank{rank}.json").write_text(
    json.dumps({"first": embedded_first, "second": sum(calls) - embedded_first, "same": first == second})
)
dist.destroy_process_group()
