"""Shared test fixtures: a tiny model config and a deterministic batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from clipline.pretrain.model import DualEncoder

# Small enough for a 2-process CPU test to run in seconds.
MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def micro_model(seed: int = 0, loss: str = "infonce") -> DualEncoder:
    from clipline.pretrain.loss import LossConfig, model_overrides

    torch.manual_seed(seed)
    return DualEncoder({**MICRO_CFG, **model_overrides(LossConfig(kind=loss))})


def micro_loader(cfg, rank: int = 0, world_size: int = 1):
    """The real training loader for ``cfg`` with the micro model's transform and tokenizer."""
    from clipline.data.loader import build_train_loader

    model = micro_model()
    return build_train_loader(
        cfg,
        preprocess=model.preprocess_config(),
        tokenize=model.tokenize,
        rank=rank,
        world_size=world_size,
    )


def sample_ids(batches) -> list[str]:
    """``url#key`` of every sample in ``batches``: unique across shards and sources."""
    return [f"{u}#{k}" for b in batches for u, k in zip(b["url"], b["key"], strict=True)]


def global_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = torch.randint(1, 49406, (n, 16), generator=g)
    texts[:, 0] = 49406  # start of text
    texts[:, 10] = 49407  # end of text: encode_text pools at the argmax token id
    texts[:, 11:] = 0
    return images, texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> None:
    """Runs ``script`` under torchrun with ``nproc`` CPU processes (gloo); raises on failure."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    repo = str(Path(__file__).resolve().parents[1])  # scripts import tests.helpers
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}")


def make_shards(
    out: Path, n: int = 96, per_shard: int = 16, seed: int = 0, image_size: int = 32
) -> Path:
    """Writes ``n`` generated (image, caption) pairs as shards; returns the shard folder."""
    from clipline.data.builtin_data import generate_shapes
    from clipline.data.ingest import Sample
    from clipline.data.shards import write_samples

    scenes = generate_shapes(n, seed=seed, image_size=image_size)
    write_samples(
        (Sample(key=f"s{i:05d}", image=s.image, caption=s.caption) for i, s in enumerate(scenes)),
        out,
        samples_per_shard=per_shard,
    )
    return out


def micro_recipe(shards: Path, run_dir: Path, **loop) -> dict:
    """A run config dict for the micro model on ``shards`` (seconds per step on CPU)."""
    return {
        "run_dir": str(run_dir),
        "data": {"shards": str(shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
        "model": {"name": "custom", "config": MICRO_CFG},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.1},
        "loop": {"steps": 4, "log_every": 1, "checkpoint_every": 2, "keep_last": 2, **loop},
    }


def to_toml(data: dict) -> str:
    """Minimal TOML writer for recipe dicts: top-level tables, inline tables, scalars, lists."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float | str):
            return json.dumps(v)  # JSON numbers and basic strings are valid TOML
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, items in ((k, v) for k, v in data.items() if isinstance(v, dict)):
        lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


def numpy2_safe_accuracy(accuracy):
    """clip_benchmark's ``accuracy`` calls ``float()`` on a one-element array, which NumPy 2
    rejects; where it fails, compute the same top-k accuracy with ``.item()`` (applied at
    run time; the installed package is never edited)."""

    def safe_accuracy(output, target, topk=(1,)):
        try:
            return accuracy(output, target, topk)
        except TypeError:
            pred = output.topk(max(topk), 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    return safe_accuracy


SHAPES = ["circle", "square", "triangle"]


def make_shape_sets(root: Path, held_out: int) -> Path:
    """Training shards plus a retrieval set (``ret``) and a 3-class zero-shot set (``zs``) of
    ``held_out`` generated shapes, under ``root``; returns ``root``."""
    from clipline.data import benchmark_sets
    from clipline.data.builtin_data import generate_shapes

    make_shards(root / "shards", n=48, per_shard=16)
    held = generate_shapes(held_out, seed=7, image_size=32)
    benchmark_sets.write_retrieval_set(root / "ret", ((s.image, [s.caption]) for s in held))
    labelled = [(s.image, SHAPES.index(s.shape)) for s in held if s.shape in SHAPES]
    benchmark_sets.write_classification_set(root / "zs", labelled, SHAPES, ["a {c}."])
    return root


def fsdp_on_cpu_accelerator():
    """An ``Accelerator`` that runs FSDP2 on CPU (gloo), which Accelerate enables only on
    accelerators; torchrun scripts put it in place of ``clipline.launch.run.Accelerator``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class FSDPOnCPU(Accelerator):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                reshard_after_forward=True,
                auto_wrap_policy="transformer_based_wrap",
            )
            # AcceleratorState re-reads PartialState's shared fields when re-instantiated.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = plugin

    return FSDPOnCPU
