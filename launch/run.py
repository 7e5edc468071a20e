"""Wiring: the only place that sees the whole run config and builds every component."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from clipline.data.stream import build_train_loader
from clipline.eval.evaluators import build_evaluator
from clipline.launch.config import RunConfig, build
from clipline.pretrain.checkpoint import list_checkpoints, load_weights, read_config
from clipline.pretrain.export import load_export, read_export_meta
from clipline.pretrain.loop import train
from clipline.pretrain.loss import LossConfig, model_overrides
from clipline.pretrain.model import DualEncoder, ModelConfig

log = logging.getLogger(__name__)


def build_evaluators(cfg: RunConfig, model: DualEncoder) -> dict[str, Any]:
    """Evaluator callables for every task in the config, using the model's eval transform."""
    preprocess = model.image_transform(is_train=False)
    return {
        task.name: build_evaluator(task, preprocess=preprocess, tokenize=model.tokenize)
        for task in [*cfg.zeroshot, *cfg.retrieval]
    }


def plan(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The run's shape as it would start: what ``clipline pretrain --dry-run`` prints.

    Reads only the shard manifest; raises ValueError for missing shards like a real start.
    """
    from clipline.data.shards import list_shards, read_manifest

    shards = list_shards(cfg.data.shards)
    num_samples = cfg.data.num_samples or sum(read_manifest(cfg.data.shards).values())
    readers = world_size * max(cfg.data.workers, 1)
    per_epoch = num_samples // (readers * cfg.data.batch_size) * max(cfg.data.workers, 1)
    total = cfg.loop.total_steps(per_epoch) if per_epoch else 0
    global_batch = cfg.data.batch_size * cfg.loop.accum_steps * world_size
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "shards": len(shards),
        "samples_per_epoch": num_samples,
        "steps_per_epoch": per_epoch // cfg.loop.accum_steps,
        "total_steps": total,
        "total_samples": total * global_batch,
        "epochs": total * cfg.loop.accum_steps / per_epoch if per_epoch else 0.0,
    }


def run_pretrain(cfg: RunConfig, *, resume: str | None = None) -> dict[str, float]:
    """Builds model, stream and evaluators from ``cfg`` and trains; returns last metrics."""
    # Without an accelerator, Accelerate only joins the process group when told it is on CPU;
    # otherwise every torchrun rank would silently train alone and overwrite the others' files.
    accelerator = Accelerator(
        mixed_precision=cfg.loop.mixed_precision, cpu=not torch.accelerator.is_available()
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but Accelerate formed a group of "
            f"{accelerator.num_processes}; check the launcher flags (accelerate launch "
            "--multi_gpu / torchrun --nproc_per_node)"
        )
    set_seed(cfg.loop.seed)  # same initial weights on every rank
    model = DualEncoder.from_config(cfg.model, **model_overrides(cfg.loss))
    loader = build_train_loader(
        cfg.data,
        preprocess=model.image_transform(is_train=True),
        tokenize=model.tokenize,  # a picklable Tokenize: workers tokenise whole batches
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    evaluators = build_evaluators(cfg, model)
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        total = cfg.loop.total_steps(loader.batches_per_epoch)
        log.info(
            "training %s: %d processes x batch %d = global batch %d, %d steps (%.2f epochs of "
            "%d samples)",
            cfg.model.name,
            accelerator.num_processes,
            cfg.data.batch_size,
            cfg.data.batch_size * accelerator.num_processes,
            total,
            total / loader.batches_per_epoch,
            loader.num_samples,
        )
    try:
        return train(
            accelerator=accelerator,
            model=model,
            loader=loader,
            loss_cfg=cfg.loss,
            optim_cfg=cfg.optim,
            loop_cfg=cfg.loop,
            run_dir=run_dir,
            run_config=cfg.to_dict(),
            evaluators=evaluators,
            resume=resume,
        )
    finally:
        # Release the DDP wrapper (Accelerate keeps a reference) *before* the process group
        # is destroyed: a reducer outliving its group aborts the process at exit.
        accelerator.free_memory()
        accelerator.end_training()


def load_encoders(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """A dual encoder from an export directory, a checkpoint directory or a run directory.

    A run directory means its latest checkpoint.

    Raises:
        ValueError: the path is none of these.
    """
    path = Path(path)
    if (path / "clipline_export.json").is_file():
        read_export_meta(path)
        return load_export(path, device)
    if (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ValueError(f"run directory {path} has no complete checkpoint yet")
        path = found[-1]
    if not (path / "model.safetensors").is_file():
        raise ValueError(
            f"{path} is neither a clipline export (clipline_export.json), a checkpoint "
            "(model.safetensors) nor a run directory (checkpoints/)"
        )
    saved = read_config(path)
    model_cfg = build(ModelConfig, saved["model"], prefix="model.")
    loss_cfg = build(LossConfig, saved.get("loss", {}), prefix="loss.")
    model = DualEncoder.from_config(model_cfg, **model_overrides(loss_cfg))
    load_weights(model, path)
    return model.to(device).eval()
