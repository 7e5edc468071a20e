"""The training loop: one function that reads top to bottom.

The global step is the only clock. The learning rate is a pure function of it, periodic
work runs when :func:`is_due` says so, and the data position is derived from it (epoch =
step // batches_per_epoch), so a resumed run replays exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from clipline.data.hints import check_choices
from clipline.data.loader import TrainLoader
from clipline.pretrain.checkpoint import list_checkpoints
from clipline.pretrain.distill import step_inputs
from clipline.pretrain.ema import build_ema
from clipline.pretrain.flops import count_model_flops
from clipline.pretrain.host_memory import keep_freed_memory
from clipline.pretrain.ledger import SampleLedger
from clipline.pretrain.loss import LossConfig, build_loss
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.optim import FiniteStepGuard, OptimConfig, build_optimizer, lr_at
from clipline.pretrain.periodic import Checkpointer, EvalRunner, Evaluator, MetricLogger, StepOutput

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoopConfig:
    """How long to train and what to do along the way.

    Attributes:
        steps: Optimizer steps to train; exclusive with ``epochs``.
        epochs: Passes over the data, converted once to steps.
        accum_steps: Micro-batches per optimizer step. Features of all micro-batches are
            cached first, so every step contrasts the full ``accum_steps`` x batch x ranks
            samples, exactly as one large batch would (at the cost of one extra forward).
        mixed_precision: ``no`` (fp32), ``bf16`` or ``fp16`` autocast; the loss is fp32 always.
        log_every: Steps between metric lines (JSONL, TensorBoard, progress bar).
        checkpoint_every: Steps between checkpoints; the last step is always saved.
        checkpoint_minutes: Also checkpoint when this many minutes have passed since the
            last one (0: off); bounds the work lost to a crash whatever the step time.
        keep_last: Checkpoints kept on disk (older ones are deleted).
        eval_every: Steps between evaluations; 0 evaluates only after the last step.
        max_nonfinite: Consecutive non-finite steps (skipped, weights untouched) before the
            run stops with an error.
        seed: Seeds model initialisation.
        compile: ``torch.compile`` the model (Inductor) for training steps; the first steps
            are slower while it compiles, and a new caption length may recompile once
            before shapes are marked dynamic.
        peak_tflops: The device's peak TFLOP/s for the training precision, for the MFU
            metric where clipline's table (pretrain/flops.py) does not know the device
            (e.g. a CPU); unset and unknown: MFU is not reported, TFLOP/s still are.
        wandb_project: Also log metrics to this Weights & Biases project (needs
            ``pip install wandb``; the run id is kept in the run directory, so a resumed
            run continues the same W&B run).
        sample_ledger: Append every step's sample keys (all ranks, all micro-batches) to
            ``run_dir/ledger/`` (:mod:`clipline.pretrain.ledger`), for
            ``clipline data ledger RUN``.
        ema_decay: Keep an exponential moving average of the weights with this decay
            (timm's ``ModelEmaV3``; pretrain/ema.py), checkpointed, evaluated as
            ``eval_ema/...`` and exported with ``--weights ema``; 0: off.
        ema_warmup: timm's EMA decay warmup: ``1 - (1 + step / gamma) ** -power``, capped at
            ``ema_decay``, so early weights are not averaged in for long.
        ema_warmup_gamma: timm's ``warmup_gamma`` (inverse multiplicative factor).
        ema_warmup_power: timm's ``warmup_power`` (2/3 for runs of a million steps or more,
            3/4 for shorter ones).
    """

    steps: int | None = None
    epochs: float | None = None
    accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_minutes: float = 0.0
    keep_last: int = 3
    eval_every: int = 0
    max_nonfinite: int = 5
    seed: int = 0
    compile: bool = False
    peak_tflops: float | None = None
    wandb_project: str | None = None
    sample_ledger: bool = False
    ema_decay: float = 0.0
    ema_warmup: bool = False
    ema_warmup_gamma: float = 1.0
    ema_warmup_power: float = 2 / 3

    def __post_init__(self) -> None:
        check_choices(self, "loop")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"set exactly one of loop.steps and loop.epochs (got steps={self.steps}, "
                f"epochs={self.epochs})"
            )
        for key in ("steps", "epochs", "log_every", "keep_last", "max_nonfinite", "accum_steps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"loop.{key} must be > 0, got {value}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(
                f"loop.ema_decay must be in [0, 1) (0: no EMA; e.g. 0.999), got {self.ema_decay}"
            )
        for key in ("ema_warmup_gamma", "ema_warmup_power"):
            if getattr(self, key) <= 0:
                raise ValueError(f"loop.{key} must be > 0, got {getattr(self, key)}")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run, given micro-batches per epoch on each rank."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None  # __post_init__ guarantees exactly one
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.accum_steps))


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the CLI prints the message and exits 1."""

    exit_code = 1


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_sharding(accelerator: Accelerator, model: DualEncoder) -> None:
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not accelerator.is_fsdp2:
        raise ValueError(
            "clipline trains with FSDP2 (torch fully_shard) only: set fsdp_version: 2 in the "
            "accelerate config (see launch/accelerate/fsdp.yaml)"
        )
    from torch.distributed.fsdp import register_fsdp_forward_method

    # Evaluators call these instead of forward(); FSDP must gather the root's weights for them.
    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)


def contrastive_step(
    ddp_model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    **loss_inputs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward for one optimizer step; returns (loss, logit_scale).

    ``loss_inputs`` go to every loss call as keywords: per-sample rows of the whole step,
    in micro-batch order (a distillation loss's teacher features, :func:`step_inputs`).

    With several micro-batches this is open_clip's feature-caching accumulation: embed
    every micro-batch without gradients, then re-embed each one with gradients and take
    the loss over the whole set (its own rows live, the others cached). Each backward
    gives d(loss)/d(its rows); their sum is exactly the large-batch gradient. The
    temperature's gradient is taken once, in the last pass (open_clip counts it once per
    micro-batch; so is the SigLIP bias's), and DDP synchronises only on that last pass.
    """
    if len(micro_batches) == 1:
        img_emb_BD, txt_emb_BD, logit_scale, logit_bias = ddp_model(*micro_batches[0])
        loss = loss_fn(img_emb_BD, txt_emb_BD, logit_scale, logit_bias, **loss_inputs)
        accelerator.backward(loss)
        return loss.detach(), logit_scale.detach()
    with torch.no_grad():
        cached = [ddp_model(image, text)[:2] for image, text in micro_batches]
    img_cache, txt_cache = [c[0] for c in cached], [c[1] for c in cached]
    last = len(micro_batches) - 1
    for j, (image, text) in enumerate(micro_batches):
        with contextlib.nullcontext() if j == last else accelerator.no_sync(ddp_model):
            img_emb_BD, txt_emb_BD, logit_scale, logit_bias = ddp_model(image, text)
            scale = logit_scale if j == last else logit_scale.detach()
            if logit_bias is not None and j != last:
                logit_bias = logit_bias.detach()
            img_KB_D = torch.cat([*img_cache[:j], img_emb_BD, *img_cache[j + 1 :]])
            txt_KB_D = torch.cat([*txt_cache[:j], txt_emb_BD, *txt_cache[j + 1 :]])
            loss = loss_fn(img_KB_D, txt_KB_D, scale, logit_bias, **loss_inputs)
            accelerator.backward(loss)
    return loss.detach(), logit_scale.detach()


class _FiniteSteps:
    """:class:`FiniteStepGuard` and its counts: the run's skipped steps (checkpointed) and
    the current run of them, which stops training at ``limit``."""

    def __init__(self, optimizer: torch.optim.Optimizer, limit: int, total: int, run_dir: Path):
        self.guard, self.limit, self.total, self.run_dir = (
            FiniteStepGuard(optimizer),
            limit,
            total,
            run_dir,
        )
        self.in_a_row = 0

    def step(self, grad_norm: float, max_norm: float, step: int) -> None:
        """Steps the optimizer where the step is finite; counts it where it is not.

        Raises:
            NonFiniteLossError: ``limit`` non-finite steps in a row.
        """
        if self.guard.step(grad_norm, max_norm):
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite loss, gradients or update; step skipped", step)
        if self.in_a_row >= self.limit:
            saved = list_checkpoints(self.run_dir)
            where = f"newest checkpoint: {saved[-1]}" if saved else "no checkpoint yet"
            raise NonFiniteLossError(
                f"stopped: {self.in_a_row} consecutive non-finite steps at step {step}; "
                f"the weights are those of the last finite step ({where}). Lower "
                "optim.lr, raise optim.warmup_steps, or use mixed_precision='bf16' "
                "instead of 'fp16'."
            )


def train_step(
    ddp_model: torch.nn.Module,
    model: DualEncoder,
    loss_fn: torch.nn.Module,
    micro: list[dict[str, Any]],
    *,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    grad_clip_norm: float,
    finite: _FiniteSteps,
    step: int,
) -> StepOutput:
    """One optimizer step on the model-ready micro-batches ``micro``: the teacher's features
    where the loss distils, forward and backward (:func:`contrastive_step`), clip, a step
    where finite, zero the gradients, clamp the temperature; returns what it measured."""
    inputs = [(b["image"], b["text"]) for b in micro]
    extra = step_inputs(loss_fn, micro, model)  # {} unless the loss distils
    loss, logit_scale = contrastive_step(ddp_model, loss_fn, inputs, accelerator, **extra)
    max_norm = grad_clip_norm if grad_clip_norm > 0 else math.inf
    grad_norm = accelerator.clip_grad_norm_(ddp_model.parameters(), max_norm)
    # The norm is all-reduced with the gradients and the guard reduces what it measures,
    # so every rank takes the same branch.
    grad_norm = _full(grad_norm).item()  # the guard's input and the logged metric
    finite.step(grad_norm, max_norm, step)
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale()
    return StepOutput(
        loss=loss,
        logit_scale=logit_scale,
        grad_norm=grad_norm,
        nonfinite_steps=finite.total,
        text_shapes=[tuple(text.shape) for _, text in inputs],
        parts=dict(getattr(loss_fn, "parts", {})),  # a distillation loss's two terms
    )


def _batches_from(loader: TrainLoader, step: int, accum: int) -> Iterator[dict[str, Any]]:
    """The micro-batches from optimizer step ``step`` on, across epochs."""
    epoch, offset = loader.start_of(step * accum)
    while True:
        yield from loader.epoch(epoch, start=offset)  # continues a loaded stream state
        epoch, offset = epoch + 1, 0


def train(
    *,
    accelerator: Accelerator,
    model: DualEncoder,
    loader: TrainLoader,
    loss_cfg: LossConfig,
    optim_cfg: OptimConfig,
    loop_cfg: LoopConfig,
    run_dir: str | Path,
    config_blob: dict[str, Any],
    model_description: str,
    evaluators: dict[str, Evaluator] | None = None,
    resume: str | None = None,
) -> dict[str, float]:
    """Trains ``model`` on ``loader``; returns the last logged and evaluated metrics.

    Args:
        accelerator: Devices, processes and precision.
        model: The unwrapped model (prepared here, after a checkpoint's weights are loaded).
        loader: This rank's model-ready batches (``image`` normalised on the device).
        loss_cfg: The loss.
        optim_cfg: Optimizer and schedule.
        loop_cfg: Length and cadences.
        run_dir: Checkpoints and metrics go here.
        config_blob: The resolved run config, stored opaquely in checkpoints and W&B.
        model_description: One line naming the model, for the start banner.
        evaluators: ``name -> (encoders) -> metrics``, run by :class:`EvalRunner`.
        resume: ``latest``, a checkpoint path, or None for a fresh run.
    """
    run_dir, accum = Path(run_dir), loop_cfg.accum_steps
    total_steps = loop_cfg.total_steps(loader.batches_per_epoch)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # before the loader forks its workers; see pretrain/host_memory.py
    flops = count_model_flops(model)
    optimizer = build_optimizer(model, optim_cfg)
    checkpointer = Checkpointer(
        accelerator, loop_cfg, loader, run_dir=run_dir, config_blob=config_blob
    )
    state = checkpointer.load(resume, model)  # the loop state; the weights in wrap()
    step = state["step"]
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    _check_sharding(accelerator, model)
    ema = build_ema(loop_cfg, model, accelerator)  # None: off
    checkpointer.wrap(ddp_model, optimizer, ema)  # restores weights, optimizer (and EMA)
    if checkpointer.resumed_from is not None:
        log.info("resumed from %s at step %d", checkpointer.resumed_from, step)
    # On every rank: the guard measures the (resumed) optimizer state.
    finite = _FiniteSteps(optimizer, loop_cfg.max_nonfinite, state["nonfinite_steps"], run_dir)
    logger = MetricLogger(  # logs the start banner
        accelerator,
        run_dir,
        loop_cfg,
        loader=loader,
        flops=flops,
        total_steps=total_steps,
        start_step=step,
        config_blob=config_blob,
        model=model,
        model_description=model_description,
        resumed_from=checkpointer.resumed_from,
    )
    loss_fn = build_loss(loss_cfg)
    ledger = SampleLedger(loop_cfg, loader, accelerator, run_dir, start_step=step)
    evaluator = EvalRunner(accelerator, model, evaluators or {}, loop_cfg.eval_every, ema)
    batches = _batches_from(loader, step, accum)
    ddp_model.train()
    try:
        with checkpointer:  # catches stop signals: the step ends, a checkpoint, then Preempted
            while step < total_steps:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(accum)]
                logger.waited(time.perf_counter() - t0)
                lr = lr_at(step, optim_cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                out = train_step(
                    ddp_model,
                    model,
                    loss_fn,
                    micro,
                    accelerator=accelerator,
                    optimizer=optimizer,
                    grad_clip_norm=optim_cfg.grad_clip_norm,
                    finite=finite,
                    step=step,
                )
                step += 1
                ledger.record(step, micro)  # before the step's checkpoint
                if ema is not None:  # timm's warmup counts optimizer steps, 1-based
                    ema.update(model, step)
                last_step = step == total_steps
                logger.log(step, lr, out)
                if evaluator.should_evaluate(step, last_step=last_step):
                    logger.write(step, evaluator.run(step))
                    logger.restart_clock()  # eval time is not training throughput
                if checkpointer.save(step, last_step=last_step, nonfinite_steps=finite.total):
                    logger.restart_clock()
    finally:
        logger.close()
    return logger.last
