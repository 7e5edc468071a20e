"""What a training run says on the console: a start banner, evaluation lines, an end summary.

Everything goes through the ``clipline.pretrain.console`` logger (INFO on the main process
under the CLI), except the end summary, which the CLI prints on stdout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from clipline.pretrain.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

# Written into the run directory at a normal end: the final metrics in full (the console
# shows a summary of them).
FINAL_METRICS_FILE = "final_metrics.json"


def human_count(n: int) -> str:
    """``1.63 M``, ``20.00 k``, ``512``."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {suffix}"
    return str(n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(seconds: float) -> str:
    """``42.0 s``, ``12 min 05 s``, ``3 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def model_description(model_config: dict[str, Any]) -> str:
    """``clipline:tiny``, or ``custom, image tower timm:resnet18, text tower hf:/m``."""
    parts = [str(model_config.get("name", "model"))]
    for tower in ("image", "text"):
        if model_config.get(f"{tower}_tower"):
            parts.append(f"{tower} tower {model_config[f'{tower}_tower']}")
    if model_config.get("lock_image"):
        parts.append("image tower locked")
    return ", ".join(parts)


def log_start(
    *,
    model: nn.Module,
    model_name: str,
    world_size: int,
    device: str,
    precision: str,
    per_rank_batch: int,
    accum_steps: int,
    step: int,
    total_steps: int,
    steps_per_epoch: float,
    samples_per_epoch: int,
    run_dir: Path,
    checkpoint: Path | None,
) -> None:
    """Logs the start banner: model, parameters, processes, batch, steps, run dir, resume point.

    Call on the main process, after a checkpoint (if any) is loaded.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    global_batch = per_rank_batch * world_size * accum_steps
    epochs = total_steps / steps_per_epoch
    if checkpoint is None:
        resume = "fresh start"
    else:
        resume = f"step {step} of {total_steps}, from {checkpoint}"
    params = f"{human_count(total)} parameters ({human_count(trainable)} trainable)"
    lines = [
        f"model        {model_name}: {params}",
        f"processes    {world_size} ({device}, mixed precision: {precision})",
        f"global batch {global_batch} = {per_rank_batch} per rank x {_plural(world_size, 'rank')}"
        f" x {_plural(accum_steps, 'accumulation step')}",
        f"steps        {total_steps} = {epochs:.2f} epochs of {samples_per_epoch} samples "
        f"({steps_per_epoch:g} steps per epoch)",
        f"run dir      {run_dir.resolve()}",
        f"resume       {resume}",
    ]
    log.info("clipline pretrain\n  %s", "\n  ".join(lines))


def _num(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _compact(metrics: dict[str, float]) -> str:
    """``acc1 0.250, image_retrieval_recall@1/5/10 0.083/0.333/0.917, ...``: @k series joined."""
    series: dict[str, list[tuple[str, float]]] = {}
    for name, value in metrics.items():
        base, at, k = name.partition("@")
        series.setdefault(base + at, []).append((k, value))
    parts = []
    for base, points in series.items():
        if base.endswith("@"):
            ks = "/".join(k for k, _ in points)
            parts.append(f"{base}{ks} {'/'.join(_num(v) for _, v in points)}")
        else:
            parts.append(f"{base} {_num(points[0][1])}")
    return ", ".join(parts)


def eval_lines(step: int, results: dict[str, float]) -> list[str]:
    """One line per task, e.g. ``eval step 10 shapes: acc1 0.250, acc5 1.000``."""
    tasks: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        prefix, task, metric = key.split("/", 2)  # eval/<task>/<metric> or eval_ema/...
        task = task if prefix == "eval" else f"{task} (ema)"
        tasks.setdefault(task, {})[metric] = value
    return [f"eval step {step} {task}: {_compact(m)}" for task, m in tasks.items()]


def log_eval(step: int, results: dict[str, float]) -> None:
    """Logs evaluation results as they arrive (call on the main process)."""
    for line in eval_lines(step, results):
        log.info("%s", line)


def summary(run_dir: str | Path) -> str:
    """A short human summary of a finished run, from the files it wrote.

    Reads ``final_metrics.json`` and the checkpoint list; says where everything is and how
    to export and evaluate.
    """
    run_dir = Path(run_dir)
    final = json.loads((run_dir / FINAL_METRICS_FILE).read_text())
    # `eval --run` scores the recipe's own tasks without flags; other sets need naming.
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    has_tasks = any(config.get(k) for k in ("zeroshot", "retrieval", "linear_probe"))
    evaluate_flags = "" if has_tasks else " --zeroshot NAME=ROOT --retrieval NAME=ROOT"
    step = final["step"]
    lines = [f"clipline pretrain: finished at step {step} in {duration(final['wall_time_s'])}"]
    if "train/loss" in final:
        lines.append(f"  train/loss   {final['train/loss']:.4f} (last logged)")
    evals = {k: v for k, v in final.items() if k.startswith("eval/")}
    for line in eval_lines(step, evals):
        lines.append("  eval         " + line.removeprefix(f"eval step {step} "))
    skipped = {
        k.removeprefix("data/skipped/"): v
        for k, v in final.items()
        if k.startswith("data/skipped/")
    }
    if any(skipped.values()):
        counts = ", ".join(f"{k} {v:g}" for k, v in skipped.items() if v)
        lines.append(f"  data         skipped {sum(skipped.values()):g} samples ({counts})")
    if final.get("train/nonfinite_steps"):
        lines.append(f"  non-finite   {final['train/nonfinite_steps']:g} steps skipped")
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        lines.append(f"  checkpoint   {checkpoints[-1]} (kept: {len(checkpoints)})")
    lines += [
        f"  metrics      {run_dir / FINAL_METRICS_FILE}, {run_dir / 'metrics.jsonl'}, "
        f"tensorboard --logdir {run_dir / 'tb'}",
        f"  export       clipline export {run_dir} EXPORT_DIR [--format open_clip|hf|onnx|all]",
        f"  evaluate     clipline eval --run {run_dir}{evaluate_flags}",
    ]
    return "\n".join(lines)


def write_final_metrics(
    run_dir: Path, *, step: int, wall_time_s: float, metrics: dict[str, Any]
) -> Path:
    """Writes ``run_dir/final_metrics.json``: step, wall time and the final metrics in full."""
    path = run_dir / FINAL_METRICS_FILE
    row = {"step": step, "wall_time_s": round(wall_time_s, 3), **metrics}
    path.write_text(json.dumps(row, indent=2) + "\n")
    return path
