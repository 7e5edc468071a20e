"""The training loop's periodic components, each owning its cadence and its state.

As torchtitan's ``checkpointer.save(step, last_step=...)`` and
``validator.should_validate(step)``: the loop calls each one every step and it decides
whether its work is due (:func:`is_due`, the last step, a signal, the clock).

* :class:`MetricLogger`: the throughput window, the progress bar and the metric sinks
  (JSONL, TensorBoard, W&B), with the data counts summed over ranks;
* :class:`Checkpointer`: resume, the per-step stop-signal agreement, timed and periodic
  checkpoints with every rank's stream position, and :class:`Preempted` after a signal;
* :class:`EvalRunner`: the evaluators, on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.tensorboard import SummaryWriter

from clipline.data.loader import LoaderStats, TrainLoader
from clipline.data.progress import progress
from clipline.pretrain import console
from clipline.pretrain.checkpoint import (
    ModelState,
    load_training_state,
    read_loop_state,
    resolve_resume,
    save_checkpoint,
    saved_parts,
    training_state,
)
from clipline.pretrain.flops import ModelFlops, peak_tflops
from clipline.pretrain.model import DualEncoder

if TYPE_CHECKING:  # loop.py imports this module
    from timm.utils import ModelEmaV3

    from clipline.pretrain.loop import LoopConfig
from clipline.pretrain.signals import Preempted, StopSignals

log = logging.getLogger(__name__)

Evaluator = Callable[[Any], dict[str, float]]  # (encoders) -> metrics; the loop never imports eval


def is_due(step: int, every: int) -> bool:
    """True when periodic work scheduled ``every`` steps falls on ``step`` (1-based count)."""
    return every > 0 and step % every == 0


@dataclass
class StepOutput:
    """What one optimizer step measured (tensors stay on the device until logged)."""

    loss: torch.Tensor
    logit_scale: torch.Tensor
    grad_norm: float
    nonfinite_steps: int  # the run's skipped steps so far
    text_shapes: list[tuple[int, ...]]  # per micro-batch, for the FLOP count
    # Terms of a combined loss (loss_contrastive, loss_distill), logged as train/<name>
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


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


class MetricLogger:
    """Every ``log_every`` steps and at the last one: metrics averaged over the window since
    the previous line, summed or averaged over ranks, to the sinks and the progress bar.

    The window counts the steps, their FLOPs and the time spent waiting for data; time the
    loop spends elsewhere (evaluation, checkpoints) is left out with :meth:`restart_clock`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        loop_cfg: LoopConfig,
        *,
        loader: TrainLoader,
        flops: ModelFlops,
        total_steps: int,
        start_step: int,
        config_blob: dict[str, Any] | None = None,
        model: DualEncoder,
        model_description: str,
        resumed_from: Path | None = None,
    ):
        """Logs the start banner (main process) and opens the sinks and the progress bar."""
        self.accelerator, self.loader, self.flops = accelerator, loader, flops
        self.total_steps, self.accum = total_steps, loop_cfg.accum_steps
        self.every = loop_cfg.log_every
        self.peak = loop_cfg.peak_tflops or peak_tflops(
            accelerator.device, loop_cfg.mixed_precision
        )
        self.global_batch = loader.batch_size * self.accum * accelerator.num_processes
        main = accelerator.is_main_process
        if main:
            console.log_start(
                model=model,
                model_name=model_description,
                world_size=accelerator.num_processes,
                device=accelerator.device.type,
                precision=loop_cfg.mixed_precision,
                per_rank_batch=loader.batch_size,
                accum_steps=self.accum,
                step=start_step,
                total_steps=total_steps,
                steps_per_epoch=loader.batches_per_epoch / self.accum,
                samples_per_epoch=loader.num_samples,
                run_dir=run_dir,
                checkpoint=resumed_from,
            )
        self.sink = _MetricSink(
            run_dir,
            main,
            wandb_project=loop_cfg.wandb_project,
            run_config=config_blob,
            start_step=start_step,
        )
        self.bar = progress(
            total=total_steps, initial=start_step, disable=not main, unit="step", desc="train"
        )
        self.last: dict[str, float] = {}
        self._new_window()

    def _new_window(self) -> None:
        self.window_start = time.perf_counter()
        self.data_wait, self.window_steps, self.window_flops = 0.0, 0, 0.0

    def restart_clock(self) -> None:
        """Leaves the time since the last step (evaluation, a checkpoint) out of throughput."""
        self.window_start = time.perf_counter()

    def waited(self, seconds: float) -> None:
        """Time the step waited for its batches."""
        self.data_wait += seconds

    def log(self, step: int, lr: float, out: StepOutput) -> None:
        """Counts step ``step`` (1-based, just taken) and writes a line when one is due."""
        self.window_flops += self.flops.train_step(out.text_shapes)
        self.window_steps += 1
        self.bar.update(1)
        if not (is_due(step, self.every) or step == self.total_steps):
            return
        acc = self.accelerator
        elapsed = time.perf_counter() - self.window_start
        parts = [v.float().item() for v in out.parts.values()]
        loss = out.loss.float().item()
        means = torch.tensor(
            [loss, self.window_flops / elapsed, self.data_wait / elapsed, *parts], device=acc.device
        )
        loss_mean, flops_per_s, wait_share, *parts = acc.reduce(means, "mean").tolist()
        counts = torch.tensor(self.loader.stats.vector(), device=acc.device)
        counts = acc.reduce(counts, reduction="sum").tolist()
        samples_per_s = self.global_batch * self.window_steps / elapsed
        self.last = {}  # a log line replaces the previous one's metrics (and evaluations')
        self.write(
            step,
            {
                "train/loss": loss_mean,
                **{f"train/{k}": v for k, v in zip(out.parts, parts, strict=True)},
                "train/lr": lr,
                "train/logit_scale": out.logit_scale.float().item(),
                "train/grad_norm": out.grad_norm,
                "train/samples_per_s": samples_per_s,
                "train/samples_per_s_per_device": samples_per_s / acc.num_processes,
                "train/data_wait_share": wait_share,
                "train/tflops_per_device": flops_per_s / 1e12,
                **({"train/mfu": flops_per_s / 1e12 / self.peak} if self.peak else {}),
                "train/peak_memory_mb": _peak_memory_mb(acc.device),
                "train/epoch": step * self.accum / self.loader.batches_per_epoch,
                "train/nonfinite_steps": out.nonfinite_steps,
                **LoaderStats.as_metrics(counts),
            },
        )
        self.bar.set_postfix(
            loss=f"{loss_mean:.3f}",
            samples_s=f"{samples_per_s:.1f}",
            refresh=False,  # in a log file, a refresh prints a line
        )
        self._new_window()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Writes ``metrics`` (on the main process) and keeps them as the latest."""
        self.sink.write(step, metrics)
        self.last.update(metrics)

    def close(self) -> None:
        self.bar.close()
        self.sink.close()


class EvalRunner:
    """Runs the evaluators every ``every`` steps (0: never) and after the last step, on the
    raw weights and, when the run keeps one, on the EMA's (``eval_ema/<name>/<metric>``).

    Every rank runs them: under FSDP each forward needs all ranks, and a rank-0-only path
    is how runs deadlock. Evaluators that split their data by rank gather the results;
    all ranks return the same numbers.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: DualEncoder,
        evaluators: dict[str, Evaluator],
        every: int,
        ema: ModelEmaV3 | None = None,
    ):
        self.accelerator, self.model, self.evaluators, self.every = (
            accelerator,
            model,
            evaluators,
            every,
        )
        self.ema = ema

    def should_evaluate(self, step: int, *, last_step: bool) -> bool:
        return is_due(step, self.every) or (last_step and bool(self.evaluators))

    def run(self, step: int) -> dict[str, float]:
        """``eval/<name>/<metric>`` of every evaluator (and the main process logs them)."""
        results: dict[str, float] = {}
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            for name, fn in self.evaluators.items():
                results.update({f"eval/{name}/{k}": v for k, v in fn(self.model).items()})
                if self.ema is not None:  # the same evaluator on the averaged weights
                    results.update(
                        {f"eval_ema/{name}/{k}": v for k, v in fn(self.ema.module).items()}
                    )
        self.model.train()
        if hasattr(
            self.model, "reshard"
        ):  # FSDP2 keeps the root's gathered weights after a forward
            self.model.reshard()
        if self.accelerator.is_main_process:
            console.log_eval(step, results)
        return results


class Checkpointer:
    """Resume at the start; then, after every step, the ranks' agreement on whether to stop
    and a checkpoint when one is due (``checkpoint_every``, ``checkpoint_minutes``, the
    last step, a stop signal), after which a signal ends the run with :class:`Preempted`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        loop_cfg: LoopConfig,
        loader: TrainLoader,
        *,
        run_dir: Path,
        config_blob: dict[str, Any],
    ):
        self.accelerator, self.run_dir, self.loader = accelerator, run_dir, loader
        self.every, self.minutes = loop_cfg.checkpoint_every, loop_cfg.checkpoint_minutes
        self.keep_last, self._accum = loop_cfg.keep_last, loop_cfg.accum_steps
        self.config_blob = config_blob
        self.signals = StopSignals(announce=accelerator.is_main_process)
        self.resumed_from: Path | None = None
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.states: dict[str, Stateful] = {}
        self._last_save = time.perf_counter()

    def load(self, resume: str | None, model: DualEncoder) -> dict[str, Any]:
        """Before wrapping: the stream position and the data counts of the checkpoint
        ``resume`` names; returns its state (step 0 and no skipped steps without one). The
        weights follow in :meth:`wrap`, sharded."""
        ckpt = resolve_resume(self.run_dir, resume)
        if ckpt is None:
            return {"step": 0, "nonfinite_steps": 0}
        state = read_loop_state(ckpt)
        self.loader.load_state_dict(state.get("stream"))  # per-rank stream positions: O(1) resume
        self.loader.stats.load_state_dict(state)
        self.resumed_from = ckpt
        return {"nonfinite_steps": 0, **state, "step": int(state.get("step", 0))}

    def wrap(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: ModelEmaV3 | None = None,
    ) -> None:
        """After ``accelerate.prepare``: what later checkpoints save (the wrapped model, the
        optimizer and the EMA's copy, under ``ema``), restored from the resumed checkpoint;
        each rank reads only its own shards, from any saved world size. A checkpoint saved
        without an EMA (``loop.ema_decay`` was 0) starts the average from its weights."""
        self.model, self.optimizer = model, optimizer
        extra = {"ema": ModelState(ema.module)} if ema is not None else None
        self.states = training_state(model, optimizer, extra)
        if self.resumed_from is not None:
            saved = saved_parts(self.resumed_from)
            load_training_state(
                self.resumed_from, {k: v for k, v in self.states.items() if k in saved}
            )
            if ema is not None and "ema" not in saved:
                log.warning(
                    "%s has no EMA (saved with loop.ema_decay=0): the EMA starts from its weights",
                    self.resumed_from,
                )
                ema.set(self.accelerator.unwrap_model(model))
        self._last_save = time.perf_counter()

    def __enter__(self) -> Checkpointer:
        """Catches stop signals (:class:`StopSignals`) until the block ends: the training."""
        self.signals.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.signals.__exit__(*exc)

    def save(self, step: int, *, last_step: bool, nonfinite_steps: int) -> bool:
        """Saves when due; returns whether it saved.

        Args:
            step: The step just taken (1-based).
            last_step: Whether it was the run's last.
            nonfinite_steps: The run's skipped steps so far.

        Raises:
            Preempted: a rank received a stop signal before the last step; the checkpoint
                is saved.
        """
        acc, received = self.accelerator, self.signals.received
        # One tiny collective per step so that every rank stops at the same step.
        timed = self.minutes > 0 and (time.perf_counter() - self._last_save) / 60 >= self.minutes
        flags = torch.tensor(
            [received in (signal.SIGTERM, signal.SIGUSR1), received == signal.SIGINT, timed],
            device=acc.device,
        )
        flags = acc.reduce(flags.float(), reduction="sum") > 0
        terminated, interrupted, timed = flags.tolist()
        stop = (terminated or interrupted) and not last_step  # the last step: done
        due = is_due(step, self.every) or last_step or stop or timed
        if due:
            self._save(step, nonfinite_steps)
        if stop:
            raise Preempted(
                f"stopped by a signal after step {step}; checkpoint saved in {self.run_dir}; "
                "continue with --resume latest",
                exit_code=143 if terminated else 130,
            )
        return due

    def _save(self, step: int, nonfinite_steps: int) -> None:
        # One small gather per checkpoint: each rank's stream position and counts.
        gathered = gather_object([(self.loader.state_dict(), self.loader.stats.state_dict())])
        save_checkpoint(  # a collective: each rank writes its shards, rank 0 the JSON
            self.run_dir,
            step=step,
            states=self.states,
            state={
                "epoch": step * self._accum // self.loader.batches_per_epoch,
                "nonfinite_steps": nonfinite_steps,
                **LoaderStats.total([stats for _, stats in gathered]),
                "stream": [stream for stream, _ in gathered],
            },
            config=self.config_blob,
            keep_last=self.keep_last,
        )
        self._last_save = time.perf_counter()
