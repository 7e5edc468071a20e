"""Wiring: the only place that sees the whole run config and builds every component."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, TorchDynamoPlugin, broadcast_object_list, set_seed

from clipline.data.stream import build_train_loader, epoch_shape
from clipline.eval.evaluators import build_evaluator
from clipline.launch.config import RunConfig, build
from clipline.launch.lock import LOCK_FILE, DirLock
from clipline.pretrain.checkpoint import list_checkpoints, load_weights, read_config
from clipline.pretrain.export import load_export
from clipline.pretrain.loop import train
from clipline.pretrain.loss import LossConfig, model_overrides
from clipline.pretrain.model import DualEncoder, ModelConfig

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests swap in a compiler-free one

# Written into the run directory when training returns normally (not on a crash or a signal),
# so that a watcher (``clipline eval --run --watch``) knows no further checkpoint will come.
DONE_FILE = "DONE"


def build_evaluators(
    cfg: RunConfig, model: DualEncoder, *, distributed: bool = False
) -> dict[str, Any]:
    """Evaluator callables for every task in the config, using the model's eval transform.

    ``distributed``: each rank embeds its share of the data (every rank must call them).
    """
    preprocess = model.image_transform(is_train=False)
    return {
        task.name: build_evaluator(
            task, preprocess=preprocess, tokenize=model.tokenize, distributed=distributed
        )
        for task in [*cfg.zeroshot, *cfg.retrieval, *cfg.linear_probe]
    }


def plan(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The run's shape as it would start: what ``clipline pretrain --dry-run`` prints.

    Reads only the shard manifest, and fails (ValueError) exactly where a real start would.
    """
    shape = epoch_shape(cfg.data, world_size)
    per_epoch = shape.batches_per_epoch
    total = cfg.loop.total_steps(per_epoch)
    global_batch = cfg.data.batch_size * cfg.loop.accum_steps * world_size
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "shards": len(shape.urls),
        "samples_per_epoch": shape.num_samples,
        "steps_per_epoch": per_epoch // cfg.loop.accum_steps,
        "total_steps": total,
        "total_samples": total * global_batch,
        "epochs": total * cfg.loop.accum_steps / per_epoch,
    }


def hold_run_dir(run_dir: Path, accelerator: Accelerator) -> DirLock:
    """Rank 0 locks ``run_dir`` for this run; every rank fails at once if another run has it.

    Two runs into one directory would overwrite each other's checkpoints and metrics. Rank 0
    decides and shares its verdict, so no rank of a refused launch waits in a collective.

    Raises:
        ValueError: another live process holds ``run_dir`` (named, with its host and PID).
    """
    lock = DirLock(
        run_dir / LOCK_FILE, busy=f"another clipline pretrain is training into {run_dir}"
    )
    refusal = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except ValueError as exc:
            refusal = str(exc)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ValueError(refusal)
    return lock


def run_pretrain(cfg: RunConfig, *, resume: str | None = None) -> dict[str, float]:
    """Builds model, stream and evaluators from ``cfg`` and trains; returns last metrics."""
    # Without an accelerator, Accelerate only joins the process group when told it is on CPU;
    # otherwise every torchrun rank would silently train alone and overwrite the others' files.
    accelerator = Accelerator(
        mixed_precision=cfg.loop.mixed_precision,
        cpu=not torch.accelerator.is_available(),
        # Accelerate compiles the model in prepare(); caption lengths vary (trimmed batches),
        # so let a second length switch that dimension to dynamic instead of recompiling.
        dynamo_plugin=TorchDynamoPlugin(backend=COMPILE_BACKEND, dynamic=None)
        if cfg.loop.compile
        else None,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but Accelerate formed a group of "
            f"{accelerator.num_processes}; check the launcher flags (accelerate launch "
            "--multi_gpu / torchrun --nproc_per_node)"
        )
    # Before anything is built or written: a second launch into a live run's directory stops.
    run_lock = hold_run_dir(Path(cfg.run_dir), accelerator)
    set_seed(cfg.loop.seed)  # same initial weights on every rank
    model = DualEncoder.from_config(cfg.model, **model_overrides(cfg.loss))
    loader = build_train_loader(
        cfg.data,
        preprocess=model.image_transform(is_train=True),
        tokenize=model.tokenize,  # a picklable Tokenize: workers tokenise whole batches
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    # The loop runs the evaluators on every rank. Under DDP each rank embeds its share; under
    # FSDP every forward is a collective, so all ranks must run the same forwards: each
    # evaluates everything (identical results) rather than shares of unequal length.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    evaluators = build_evaluators(cfg, model, distributed=not fsdp)
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DONE_FILE).unlink(missing_ok=True)  # a resumed run is not done until it ends
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
        metrics = train(
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
        if accelerator.is_main_process:
            final_step = cfg.loop.total_steps(loader.batches_per_epoch)
            (run_dir / DONE_FILE).write_text(json.dumps({"step": final_step}) + "\n")
        return metrics
    finally:
        # Release the DDP wrapper (Accelerate keeps a reference) *before* the process group
        # is destroyed: a reducer outliving its group aborts the process at exit.
        accelerator.free_memory()
        accelerator.end_training()
        run_lock.release()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's latest checkpoint.

    Raises:
        ValueError: the path is neither, or the run has no complete checkpoint yet.
    """
    path = Path(path)
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
    return path


def load_encoders(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """A dual encoder from an export directory, a checkpoint directory or a run directory.

    Raises:
        ValueError: the path is none of these.
    """
    if (Path(path) / "clipline_export.json").is_file():
        return load_export(path, device)
    if (Path(path) / "clipline" / "clipline_export.json").is_file():  # export --format all
        return load_export(Path(path) / "clipline", device)
    path = resolve_checkpoint(path)
    saved = read_config(path)
    model_cfg = build(ModelConfig, saved["model"], prefix="model.")
    loss_cfg = build(LossConfig, saved.get("loss", {}), prefix="loss.")
    model = DualEncoder.from_config(model_cfg, **model_overrides(loss_cfg))
    load_weights(model, path)
    return model.to(device).eval()
