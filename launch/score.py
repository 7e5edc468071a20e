"""Wiring of ``clipline eval --run``: eval's scorer (:mod:`clipline.eval.score`) reads the
run's checkpoints through pretrain's checkpoint reader, under the lock of ``RUN_DIR/eval/``."""

from __future__ import annotations

from pathlib import Path

from clipline.eval.score import EVAL_DIR, RunSource, ScoreConfig, ScoreReport
from clipline.eval.score import score_run as score_checkpoints
from clipline.launch.lock import LOCK_FILE, DirLock
from clipline.launch.run import DONE_FILE, load_encoders
from clipline.pretrain.checkpoint import checkpoint_dir, checkpoint_step, list_checkpoints


def score_run(cfg: ScoreConfig) -> ScoreReport:
    """Scores the unscored checkpoints of the run ``cfg.run_dir`` (see
    :func:`clipline.eval.score.score_run`).

    Raises:
        ValueError: Not a run directory (unless watching for its first checkpoint), bad tasks
            or eval sets, or another scorer holds this run's lock.
    """
    run_dir = Path(cfg.run_dir)
    if not checkpoint_dir(run_dir).is_dir() and not cfg.watch:
        raise ValueError(
            f"{cfg.run_dir} is not a run directory (no checkpoints/); pass the run_dir of a "
            "clipline pretrain run, or add --watch to wait for its first checkpoint"
        )
    eval_dir = run_dir / EVAL_DIR
    eval_dir.mkdir(parents=True, exist_ok=True)
    run = RunSource(
        checkpoints=lambda: [(checkpoint_step(p), p) for p in list_checkpoints(run_dir)],
        load=load_encoders,
        # The run renames its final checkpoint into place before it writes DONE.
        finished=(run_dir / DONE_FILE).is_file,
    )
    with _exclusive(eval_dir):
        return score_checkpoints(cfg, run)


def _exclusive(eval_dir: Path) -> DirLock:
    # Two scorers appending to one results.jsonl would evaluate and record checkpoints twice.
    return DirLock(
        eval_dir / LOCK_FILE,
        busy=f"another `clipline eval --run` is scoring {eval_dir.parent} (it holds "
        f"{eval_dir / LOCK_FILE})",
    )
