"""Wiring: the only place that sees the whole run config and builds every component."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, TorchDynamoPlugin, broadcast_object_list, set_seed

from clipline.data.loader import build_train_loader
from clipline.data.reinforce import read_manifests
from clipline.data.replay import replay_decoder
from clipline.data.stream import EpochShape, epoch_shape
from clipline.eval.evaluators import build_evaluator
from clipline.launch.config import RunConfig, build
from clipline.launch.lock import LOCK_FILE, DirLock
from clipline.pretrain.checkpoint import (
    load_weights,
    read_config,
    read_step,
    resolve_checkpoint,
    resolve_resume,
)
from clipline.pretrain.console import model_description, write_final_metrics
from clipline.pretrain.distill import check_teacher
from clipline.pretrain.export import find_export, load_exported
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
    preprocess = model.preprocess_config()
    return {
        task.name: build_evaluator(
            task, preprocess=preprocess, tokenize=model.tokenize, distributed=distributed
        )
        for task in cfg.tasks()
    }


# What a run that distills without an online teacher can do instead of reinforced shards.
STORED_FIX = (
    "set loss.distill.teacher=EXPORT_DIR (an online teacher), or loss.distill.weight=0 (no "
    "distillation)"
)


def stored_teacher(cfg: RunConfig) -> bool:
    """Whether the run distills from stored features (reinforced shards): a distillation
    weight and no online teacher."""
    return cfg.loss.distill.weight > 0 and cfg.loss.distill.teacher is None


def _not_in_a_check(*_: Any) -> Any:
    raise AssertionError("check_start builds evaluators only to check their data; never runs them")


def check_start(cfg: RunConfig, *, world_size: int, resume: str | None = None) -> EpochShape:
    """Every check a start makes before it builds the model: the one validation path of
    ``clipline pretrain --dry-run`` and of :func:`run_pretrain` (which calls it first).

    Checks the config's cross-field rules and model and tower names, the shards against the
    run shape (manifests only), every evaluation's data (each evaluator is built, which
    opens its set and reads its class names and templates, but never run), the run
    directory, the checkpoint to resume from and the optional packages the config asks for.
    An online teacher's export (``loss.distill.teacher``) must be there (it is read later);
    without one, a distilling run's shards must be reinforced (``reinforce.json``).
    Creates nothing.

    Returns:
        The epoch's shape (from the shard manifests).

    Raises:
        ValueError: naming the offending value and the fix, exactly as the start would.
    """
    cfg.validate()
    check_teacher(cfg.loss.distill)
    shape = epoch_shape(cfg.data, world_size)
    if stored_teacher(cfg):  # the teacher's features must come with the shards
        read_manifests(shape.urls, fix=STORED_FIX)
    for task in cfg.tasks():
        build_evaluator(task, preprocess=_not_in_a_check, tokenize=_not_in_a_check)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={cfg.run_dir!r} is a file; give a directory")
    resolve_resume(run_dir, resume)
    # A module already imported (or stubbed) may have no __spec__; find_spec raises on those.
    wandb_found = "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None
    if cfg.loop.wandb_project and not wandb_found:
        raise ValueError(
            f"loop.wandb_project={cfg.loop.wandb_project!r} needs Weights & Biases: pip install "
            "wandb (or unset loop.wandb_project)"
        )
    return shape


def plan(cfg: RunConfig, world_size: int, *, resume: str | None = None) -> dict[str, Any]:
    """The run's shape as it would start: what ``clipline pretrain --dry-run`` prints.

    Runs :func:`check_start`, so it fails (ValueError) exactly where a real start would.
    """
    shape = check_start(cfg, world_size=world_size, resume=resume)
    per_epoch = shape.batches_per_epoch
    total = cfg.loop.total_steps(per_epoch)
    global_batch = cfg.data.batch_size * cfg.loop.accum_steps * world_size
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "shards": len(shape.urls),
        # What an epoch really reads (whole batches on every rank); in exact mode the rest
        # of the shards is left out of that epoch and read in others (the window moves).
        "samples_per_epoch": shape.samples_read,
        "samples_dropped_per_epoch": shape.samples_left_out,
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
        # Any failure on rank 0 is shared: raising here would leave the other ranks waiting
        # in the broadcast below until the collective times out.
        except (ValueError, OSError) as exc:
            refusal = str(exc)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ValueError(refusal)
    return lock


def run_pretrain(cfg: RunConfig, *, resume: str | None = None) -> dict[str, float]:
    """Builds model, stream and evaluators from ``cfg`` and trains; returns last metrics."""
    shape = check_start(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), resume=resume)
    if cfg.model.pretrained is not None:  # saved absolute: resume and eval may run elsewhere
        cfg.model.pretrained = str(Path(cfg.model.pretrained).absolute())
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
    preprocess = model.preprocess_config()
    loader = build_train_loader(
        cfg.data,
        preprocess=preprocess,
        tokenize=model.tokenize,  # a picklable Tokenize: workers tokenise whole batches
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        device=accelerator.device,  # batches arrive normalised on the device
        accum_steps=cfg.loop.accum_steps,
        # Reinforced shards: one stored view per sample replayed, with its teacher features.
        decoder=replay_decoder(cfg.data.decode, preprocess, shape.urls, fix=STORED_FIX)
        if stored_teacher(cfg)
        else None,
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
    # The start banner (model, batch, steps, resume point) is logged by the loop.
    t_start = time.monotonic()
    try:
        metrics = train(
            accelerator=accelerator,
            model=model,
            loader=loader,
            loss_cfg=cfg.loss,
            optim_cfg=cfg.optim,
            loop_cfg=cfg.loop,
            run_dir=run_dir,
            config_blob=cfg.to_dict(),
            model_description=model_description(cfg.to_dict()["model"]),
            evaluators=evaluators,
            resume=resume,
        )
        if accelerator.is_main_process:
            final_step = cfg.loop.total_steps(loader.batches_per_epoch)
            (run_dir / DONE_FILE).write_text(json.dumps({"step": final_step}) + "\n")
            write_final_metrics(
                run_dir, step=final_step, wall_time_s=time.monotonic() - t_start, metrics=metrics
            )
        return metrics
    finally:
        # Release the DDP wrapper (Accelerate keeps a reference) *before* the process group
        # is destroyed: a reducer outliving its group aborts the process at exit.
        accelerator.free_memory()
        accelerator.end_training()
        run_lock.release()


def finished_run(cfg: RunConfig, resume: str | None, *, world_size: int) -> str | None:
    """Whether ``resume`` points at a checkpoint at (or past) the run's last step.

    Then there is nothing to train: returns one line saying so (and writes ``DONE`` where a
    run was killed after its last checkpoint but before writing it). Returns None where
    training should go on, e.g. after ``loop.steps`` was raised. Reads only files, so every
    rank of a launch answers the same without forming a process group.
    """
    ckpt = resolve_resume(cfg.run_dir, resume)
    if ckpt is None:
        return None
    step = read_step(ckpt)
    if cfg.loop.steps is not None:
        total = cfg.loop.steps
    else:
        total = cfg.loop.total_steps(epoch_shape(cfg.data, world_size).batches_per_epoch)
    if step < total:
        return None
    done = Path(cfg.run_dir) / DONE_FILE
    if not done.is_file() and int(os.environ.get("RANK", "0")) == 0:
        done.write_text(json.dumps({"step": step}) + "\n")
    return (
        f"run {cfg.run_dir} is already finished: checkpoint {ckpt} is at step {step} and the "
        f"run has {total} steps; nothing to train (raise loop.steps or loop.epochs to continue)"
    )


def load_encoders(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A dual encoder from an export (any format, or a ``--format all`` root), a checkpoint
    directory or a run directory (its latest checkpoint); see
    :func:`~clipline.pretrain.export.load_exported`.

    Wiring: an export is read by its format's reader; a checkpoint's saved run config is
    parsed here (only launch reads the whole run config) into the model and loss configs.

    Raises:
        ValueError: the path is none of these.
    """
    found = find_export(path)
    if found is not None:
        return load_exported(*found, device)
    path = resolve_checkpoint(path)
    saved = read_config(path)
    model_cfg = build(ModelConfig, saved["model"], prefix="model.")
    loss_cfg = build(LossConfig, saved.get("loss", {}), prefix="loss.")
    model = DualEncoder.from_config(model_cfg, **model_overrides(loss_cfg))
    load_weights(model, path)
    return model.to(device).eval()
