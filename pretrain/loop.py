"""The training loop: one function that reads top to bottom.

The global step is the only clock. The learning rate is a pure function of it, periodic
work runs when :func:`is_due` says so, and the data position is derived from it (epoch =
step // batches_per_epoch), so a resumed run replays exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch.utils.tensorboard import SummaryWriter

from clipline.data.loader import TrainLoader
from clipline.data.progress import progress
from clipline.data.stream import CONVERSIONS, SKIP_REASONS
from clipline.pretrain import console
from clipline.pretrain.checkpoint import (
    full_state_dicts,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    resolve_resume,
    save_checkpoint,
)
from clipline.pretrain.flops import count_model_flops, peak_tflops
from clipline.pretrain.host_memory import keep_freed_memory
from clipline.pretrain.loss import LossConfig, build_loss
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.optim import FiniteStepGuard, OptimConfig, build_optimizer, lr_at

log = logging.getLogger(__name__)

Evaluator = Callable[[Any], dict[str, float]]  # (encoders) -> metrics; the loop never imports eval


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

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run, given micro-batches per epoch on each rank."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None  # RunConfig.validate guarantees exactly one
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.accum_steps))


def is_due(step: int, every: int) -> bool:
    """True when periodic work scheduled ``every`` steps falls on ``step`` (1-based count)."""
    return every > 0 and step % every == 0


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the CLI prints the message and exits 1."""

    exit_code = 1


class Preempted(RuntimeError):
    """A stop signal was turned into a checkpoint; the process should exit with ``exit_code``.

    143 (128 + SIGTERM) after SIGTERM or SIGUSR1: what schedulers (Slurm requeue) read as
    "terminated"; 130 (128 + SIGINT) after Ctrl-C, as a shell reports an interrupted command.
    """

    exit_code = 143

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _StopSignals:
    """Records SIGTERM, SIGUSR1 (Slurm's pre-emption warning) and Ctrl-C (SIGINT) instead of
    dying mid-step.

    The first one only sets a flag; the loop checks it between steps, all ranks agree, and
    the run checkpoints and stops. Repeats are ignored (Slurm and a launcher may both
    forward one signal), except that a second Ctrl-C stops at once, as Ctrl-C does
    elsewhere: it raises KeyboardInterrupt wherever the process is (a stalled data read
    included), without a checkpoint. Once the loop has ended, the previous handlers are
    back: a signal during the exit that follows acts as it would without clipline.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    # One Ctrl-C can arrive twice within milliseconds (Slurm signals every process of a
    # step and torchrun forwards the same SIGINT); a person's second press comes later.
    SECOND_PRESS_S = 0.5

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.announce = announce
        self._since = 0.0

    def __enter__(self) -> _StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received
        if first is None:
            self.received, self._since = signum, time.monotonic()
            if self.announce:
                self._say(signum)
        elif time.monotonic() - self._since < self.SECOND_PRESS_S:
            pass  # the first signal, delivered again
        # torchrun passes a second Ctrl-C on to its ranks as SIGTERM.
        elif signum == signal.SIGINT or (signum == signal.SIGTERM and first == signal.SIGINT):
            raise KeyboardInterrupt("second Ctrl-C: stopped at once, without a checkpoint")

    @staticmethod
    def _say(signum: int) -> None:
        name = signal.Signals(signum).name
        line = f"clipline: {name}: saving a checkpoint after this step, then stopping"
        if signum == signal.SIGINT:
            line += " (Ctrl-C again to stop at once without one)"
        # os.write, not print/logging: the handler may interrupt a write to stderr (the
        # progress bar's), and a buffered stream cannot be re-entered.
        os.write(2, (("\n" if os.isatty(2) else "") + line + "\n").encode())

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _MetricSink:
    """JSONL + TensorBoard (+ W&B when configured) on the main process; no-ops elsewhere."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        *,
        wandb_project: str | None = None,
        run_config: dict[str, Any] | None = None,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            # A run killed after its last checkpoint logged steps that the resumed run logs
            # again: drop them here, and let TensorBoard hide its events from then on.
            _drop_rows_after(self.path, start_step)
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        self.wandb = None
        if enabled and wandb_project:
            self.wandb = _start_wandb(run_dir, wandb_project, run_config or {})

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)  # its writer thread flushes (and on close)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrites ``path`` (metrics.jsonl) without its rows past ``step``, atomically.

    A line cut by a kill mid-write is dropped too.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info(
        "%s: dropped %d rows past step %d (this run logs those steps again)",
        path,
        len(lines) - len(kept),
        step,
    )


def _start_wandb(run_dir: Path, project: str, run_config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"loop.wandb_project={project!r} needs Weights & Biases: pip install wandb "
            "(or unset loop.wandb_project)"
        ) from None
    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file():
        id_file.write_text(wandb.util.generate_id())
    return wandb.init(
        project=project,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(run_dir),
        name=run_dir.name,
        config=run_config,
    )


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward for one optimizer step; returns (loss, logit_scale).

    With several micro-batches this is open_clip's feature-caching accumulation: embed
    every micro-batch without gradients, then re-embed each one with gradients and take
    the loss over the whole set (its own rows live, the others cached). Each backward
    gives d(loss)/d(its rows); their sum is exactly the large-batch gradient. The
    temperature's gradient is taken once, in the last pass (open_clip counts it once per
    micro-batch; so is the SigLIP bias's), and DDP synchronises only on that last pass.
    """
    if len(micro_batches) == 1:
        img_emb_BD, txt_emb_BD, logit_scale, logit_bias = ddp_model(*micro_batches[0])
        loss = loss_fn(img_emb_BD, txt_emb_BD, logit_scale, logit_bias)
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
            loss = loss_fn(img_KB_D, txt_KB_D, scale, logit_bias)
            accelerator.backward(loss)
    return loss.detach(), logit_scale.detach()


def train(
    *,
    accelerator: Accelerator,
    model: DualEncoder,
    loader: TrainLoader,
    loss_cfg: LossConfig,
    optim_cfg: OptimConfig,
    loop_cfg: LoopConfig,
    run_dir: str | Path,
    run_config: dict[str, Any],
    evaluators: dict[str, Evaluator] | None = None,
    resume: str | None = None,
) -> dict[str, float]:
    """Trains ``model`` on ``loader``; returns the last logged and evaluated metrics."""
    run_dir = Path(run_dir)
    main = accelerator.is_main_process
    evaluators = evaluators or {}
    total_steps = loop_cfg.total_steps(loader.batches_per_epoch)
    accum = loop_cfg.accum_steps
    global_batch = loader.stream.cfg.batch_size * accum * accelerator.num_processes

    if accelerator.device.type == "cpu":
        keep_freed_memory()  # before the loader forks its workers; see pretrain/host_memory.py
    flops = count_model_flops(model)
    peak = loop_cfg.peak_tflops or peak_tflops(accelerator.device, loop_cfg.mixed_precision)
    optimizer = build_optimizer(model, optim_cfg)
    state: dict[str, Any] = {"nonfinite_steps": 0, "skipped": {}}
    ckpt = resolve_resume(run_dir, resume)
    if ckpt is not None:  # weights before wrapping: every rank reads the full file
        state = load_checkpoint(ckpt, model=model)
        loader.load_state_dict(state.get("stream"))  # per-rank stream positions: O(1) resume
    step = int(state.get("step", 0))
    # A checkpoint holds the counts summed over ranks; the main rank carries them on, so the
    # sum the metrics report stays the run's total after a resume.
    skipped = Counter(state["skipped"] if main else {})
    converted = Counter(state.get("converted", {}) if main else {})  # absent in older ones
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    _check_sharding(accelerator, model)
    if ckpt is not None:  # optimizer state after wrapping: FSDP re-creates the parameters
        load_optimizer_state(ckpt, ddp_model, optimizer)
        log.info("resumed from %s at step %d", ckpt, step)
    step_guard = FiniteStepGuard(optimizer)  # on every rank: it measures the (resumed) state
    if main:
        console.log_start(
            model=model,
            model_name=console.model_description(run_config.get("model", {})),
            world_size=accelerator.num_processes,
            device=accelerator.device.type,
            precision=loop_cfg.mixed_precision,
            per_rank_batch=loader.stream.cfg.batch_size,
            accum_steps=accum,
            step=step,
            total_steps=total_steps,
            steps_per_epoch=loader.batches_per_epoch / accum,
            samples_per_epoch=loader.num_samples,
            run_dir=run_dir,
            checkpoint=ckpt,
        )
    loss_fn = build_loss(loss_cfg)
    sink = _MetricSink(
        run_dir,
        main,
        wandb_project=loop_cfg.wandb_project,
        run_config=run_config,
        start_step=step,
    )

    def batches_from(step: int) -> Iterator[dict[str, Any]]:
        epoch, offset = divmod(step * accum, loader.batches_per_epoch)
        while True:
            yield from loader.epoch(epoch, start=offset)  # continues a loaded stream state
            epoch, offset = epoch + 1, 0

    def evaluate() -> dict[str, float]:
        # Every rank runs the evaluators: under FSDP each forward needs all ranks, and a
        # rank-0-only path is how runs deadlock. Evaluators that split their data by rank
        # gather the results; all ranks return the same numbers.
        results: dict[str, float] = {}
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            for name, fn in evaluators.items():
                results.update({f"eval/{name}/{k}": v for k, v in fn(model).items()})
        model.train()
        if hasattr(model, "reshard"):  # FSDP2 keeps the root's gathered weights after a forward
            model.reshard()
        return results

    last: dict[str, float] = {}
    batches = batches_from(step)
    bar = progress(total=total_steps, initial=step, disable=not main, unit="step", desc="train")
    window_start, data_wait, window_steps, consecutive_bad = time.perf_counter(), 0.0, 0, 0
    window_flops = 0.0
    last_save = window_start
    ddp_model.train()
    with _StopSignals(announce=main) as stop_signals:
        while step < total_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            data_wait += time.perf_counter() - t0
            for batch in micro:
                skipped.update(batch["skipped"])
                converted.update(batch["converted"])

            lr = lr_at(step, optim_cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            device = accelerator.device
            # uint8 batches (data.decode.uint8_images) are normalised here, on the device,
            # each micro-batch into its own reused buffer (this step's are all alive at once).
            inputs = [
                (
                    loader.model_input(b["image"].to(device, non_blocking=True), slot=i),
                    b["text"].to(device, non_blocking=True),
                )
                for i, b in enumerate(micro)
            ]
            loss, logit_scale = contrastive_step(ddp_model, loss_fn, inputs, accelerator)
            window_flops += flops.train_step([tuple(text.shape) for _, text in inputs])
            max_norm = optim_cfg.grad_clip_norm if optim_cfg.grad_clip_norm > 0 else math.inf
            grad_norm = accelerator.clip_grad_norm_(ddp_model.parameters(), max_norm)
            # The norm is all-reduced with the gradients and the guard reduces what it measures,
            # so every rank takes the same branch.
            grad_norm = _full(grad_norm).item()  # the guard's input and the logged metric
            if step_guard.step(grad_norm, max_norm):
                consecutive_bad = 0
            else:
                state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + 1
                consecutive_bad += 1
                log.warning("step %d: non-finite loss, gradients or update; step skipped", step)
                if consecutive_bad >= loop_cfg.max_nonfinite:
                    saved = list_checkpoints(run_dir)
                    where = f"newest checkpoint: {saved[-1]}" if saved else "no checkpoint yet"
                    raise NonFiniteLossError(
                        f"stopped: {consecutive_bad} consecutive non-finite steps at step {step}; "
                        f"the weights are those of the last finite step ({where}). Lower "
                        "optim.lr, raise optim.warmup_steps, or use mixed_precision='bf16' "
                        "instead of 'fp16'."
                    )
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale()
            step += 1
            window_steps += 1
            bar.update(1)

            if is_due(step, loop_cfg.log_every) or step == total_steps:
                elapsed = time.perf_counter() - window_start
                means = torch.tensor(
                    [loss.float().item(), window_flops / elapsed, data_wait / elapsed],
                    device=accelerator.device,
                )
                loss_mean, flops_per_s, wait_share = accelerator.reduce(means, "mean").tolist()
                # Fixed-length vector: every rank reduces the same names in the same order.
                counts = [skipped[r] for r in SKIP_REASONS] + [converted[k] for k in CONVERSIONS]
                counts = torch.tensor(counts, device=accelerator.device)
                counts = accelerator.reduce(counts, reduction="sum").tolist()
                names = [f"skipped/{r}" for r in SKIP_REASONS] + [
                    f"converted/{k}" for k in CONVERSIONS
                ]
                samples_per_s = global_batch * window_steps / elapsed
                last = {
                    "train/loss": loss_mean,
                    "train/lr": lr,
                    "train/logit_scale": logit_scale.float().item(),
                    "train/grad_norm": grad_norm,
                    "train/samples_per_s": samples_per_s,
                    "train/samples_per_s_per_device": samples_per_s / accelerator.num_processes,
                    "train/data_wait_share": wait_share,
                    "train/tflops_per_device": flops_per_s / 1e12,
                    **({"train/mfu": flops_per_s / 1e12 / peak} if peak else {}),
                    "train/peak_memory_mb": _peak_memory_mb(accelerator.device),
                    "train/epoch": step * accum / loader.batches_per_epoch,
                    "train/nonfinite_steps": state.get("nonfinite_steps", 0),
                    **{f"data/{n}": c for n, c in zip(names, counts, strict=True)},
                }
                sink.write(step, last)
                bar.set_postfix(
                    loss=f"{loss_mean:.3f}",
                    samples_s=f"{last['train/samples_per_s']:.1f}",
                    refresh=False,  # in a log file, a refresh prints a line
                )
                window_start, data_wait, window_steps, window_flops = time.perf_counter(), 0.0, 0, 0

            if is_due(step, loop_cfg.eval_every) or (step == total_steps and evaluators):
                results = evaluate()
                sink.write(step, results)
                if main:
                    console.log_eval(step, results)
                last.update(results)
                window_start = time.perf_counter()  # eval time is not training throughput

            # One tiny collective per step so that every rank stops at the same step.
            minutes = (time.perf_counter() - last_save) / 60
            timed = loop_cfg.checkpoint_minutes > 0 and minutes >= loop_cfg.checkpoint_minutes
            got = stop_signals.received
            flags = torch.tensor(
                [got in (signal.SIGTERM, signal.SIGUSR1), got == signal.SIGINT, timed],
                device=accelerator.device,
            )
            flags = accelerator.reduce(flags.float(), reduction="sum") > 0
            terminated, interrupted, timed = flags.tolist()
            stop = (terminated or interrupted) and step < total_steps  # the last step: done
            if is_due(step, loop_cfg.checkpoint_every) or step == total_steps or stop or timed:
                model_state, optimizer_state = full_state_dicts(ddp_model, optimizer)  # all ranks
                # One small gather per checkpoint: each rank's stream position and counts.
                gathered = gather_object([(loader.state_dict(), dict(skipped), dict(converted))])
                stream_states = [stream for stream, _, _ in gathered]
                if main:
                    save_checkpoint(
                        run_dir,
                        step=step,
                        model_state=model_state,
                        optimizer_state=optimizer_state,
                        state={
                            "epoch": step * accum // loader.batches_per_epoch,
                            "nonfinite_steps": state.get("nonfinite_steps", 0),
                            "skipped": dict(sum((Counter(s) for _, s, _ in gathered), Counter())),
                            "converted": dict(sum((Counter(c) for _, _, c in gathered), Counter())),
                            "stream": stream_states,
                        },
                        config=run_config,
                        keep_last=loop_cfg.keep_last,
                    )
                accelerator.wait_for_everyone()
                window_start = last_save = time.perf_counter()
            if stop:
                raise Preempted(
                    f"stopped by a signal after step {step}; checkpoint saved in {run_dir}; "
                    "continue with --resume latest",
                    exit_code=143 if terminated else 130,
                )
    bar.close()
    sink.close()
    return last
