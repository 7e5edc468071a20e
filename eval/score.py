"""Scoring a run: evaluate each checkpoint of a run directory once per eval manifest.

``clipline eval --run RUN_DIR --zeroshot NAME=ROOT ...`` evaluates every complete checkpoint
(``RUN_DIR/checkpoints/step_N``) that has no result yet for a task under the task's current
*manifest*, and writes into ``RUN_DIR/eval/``:

  results.jsonl         append-only, one row per (step, task, metric): the source of truth
  results.csv           the same rows, rewritten after each checkpoint (pandas/Excel-friendly)
  plots/<task>__<metric>.png
                        the metric versus step, one series per manifest hash
  manifests/<hash>.json what each manifest hash stands for
  hash_cache.json       content hashes of eval-set files, keyed by (path, size, mtime)

Rows are in long ("tidy") form, not one column per metric: a run gains tasks and metrics
over its life, and long rows can be appended without rewriting a header, while
``df.pivot_table(index="step", columns=["task", "metric"], values="value")`` gives the wide
table in one line.

A task's manifest hash covers what its numbers depend on besides the weights: a content hash
of the eval set's files, its class names and prompt templates, the task's options (recall
ks), and the clipline, torch and open_clip versions. Results under different hashes are never
merged: they are plotted as separate series, and a checkpoint is re-scored under a new hash.

Evaluation knows neither the checkpoint format nor the run's files: the wiring hands the
scorer a :class:`RunSource` (``clipline.launch.score`` lists checkpoints with
:func:`clipline.pretrain.checkpoint.list_checkpoints`, which lists complete ``step_N``
directories only, so one being written is never seen) and holds the results' lock.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clipline.data import benchmark_sets
from clipline.eval.evaluators import LinearProbeTask, RetrievalTask, ZeroShotTask, build_evaluator

log = logging.getLogger(__name__)

Task = ZeroShotTask | RetrievalTask | LinearProbeTask

EVAL_DIR = "eval"
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
PLOTS_DIR = "plots"
MANIFESTS_DIR = "manifests"
HASH_CACHE = "hash_cache.json"
CSV_COLUMNS = ("step", "task", "metric", "value", "manifest_hash", "checkpoint", "scored_at")
# Task fields that do not change the numbers: they stay out of the manifest, so that renaming
# a task, moving its set, changing the batch size or making it a training run's reference task
# does not start a new series.
_NOT_IN_MANIFEST = ("name", "root", "batch_size", "reference")


@dataclass(kw_only=True)
class ScoreConfig:
    """What ``clipline eval --run`` scores and how long it keeps watching.

    Attributes:
        run_dir: The run directory (holds ``checkpoints/``).
        tasks: Zero-shot, retrieval and linear-probe tasks; names must be unique.
        device: Where the checkpoints are evaluated.
        watch: Keep polling for new checkpoints until the run is finished (it wrote DONE),
            a checkpoint reaches ``until_step``, or ``timeout_s`` passes.
        poll_s: Seconds between polls while watching.
        until_step: While watching, stop once a checkpoint at or past this step is scored.
        timeout_s: While watching, give up after this many seconds (None: no limit).
    """

    run_dir: str
    tasks: list[Task]
    device: str = "cpu"
    watch: bool = False
    poll_s: float = 60.0
    until_step: int | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(
                "nothing to evaluate: the run's config.json has no zeroshot, retrieval or "
                "linear_probe tasks; give --zeroshot NAME=ROOT and/or --retrieval NAME=ROOT"
            )
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names {names} repeat; give each --zeroshot/--retrieval a name")
        if self.poll_s <= 0:
            raise ValueError(f"--poll-seconds {self.poll_s}: it must be positive")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"--timeout {self.timeout_s}: it must be positive (or omitted)")
        if not self.watch and self.until_step is not None:
            raise ValueError("--until-step only applies with --watch; add --watch or drop it")


@dataclass(kw_only=True)
class RunSource:
    """How the scorer reads a training run, given by the wiring.

    Attributes:
        checkpoints: The run's complete checkpoints as ``(step, folder)``, oldest first; a
            checkpoint still being written must never be listed.
        load: ``(checkpoint folder, device) -> encoders`` with ``preprocess_config()`` and
            ``tokenize`` (what ``clipline eval CHECKPOINT`` evaluates).
        finished: Whether the run has ended, so that no further checkpoint will come; it
            must turn true only after the final checkpoint is listed.
    """

    checkpoints: Callable[[], list[tuple[int, Path]]]
    load: Callable[[Path, str], Any]
    finished: Callable[[], bool]


@dataclass(kw_only=True)
class ScoreReport:
    """What one ``score_run`` call did.

    Attributes:
        scored: ``(step, task)`` pairs evaluated by this call, in order.
        results: ``{step: {"task/metric": value}}`` of this call's new results.
        finished: Watching ended because the run is done or ``until_step`` was reached
            (always True without ``watch``).
        plots: PNG files written.
    """

    scored: list[tuple[int, str]] = field(default_factory=list)
    results: dict[int, dict[str, float]] = field(default_factory=dict)
    finished: bool = True
    plots: list[Path] = field(default_factory=list)


def score_run(cfg: ScoreConfig, run: RunSource) -> ScoreReport:
    """Scores the run's unscored checkpoints; with ``cfg.watch``, keeps polling.

    The caller holds the lock on ``RUN_DIR/eval/`` (two scorers appending to one
    ``results.jsonl`` would evaluate and record checkpoints twice).

    Raises:
        ValueError: Bad tasks or eval sets.
    """
    eval_dir = Path(cfg.run_dir) / EVAL_DIR
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = ScoreReport()
    deadline = None if cfg.timeout_s is None else time.monotonic() + cfg.timeout_s
    while True:
        # Read before scoring: the final checkpoint is listed before the run is finished, so
        # the pass after seeing it finished is guaranteed to include it.
        done = run.finished()
        steps = _score_pass(cfg, run, eval_dir, report)
        reached = cfg.until_step is not None and any(s >= cfg.until_step for s in steps)
        if not cfg.watch or done or reached:
            break
        remaining = math.inf if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            report.finished = False
            log.warning(
                "stopped watching %s after %ss: the run is not done", cfg.run_dir, cfg.timeout_s
            )
            break
        time.sleep(min(cfg.poll_s, remaining))
    return report


def _score_pass(cfg: ScoreConfig, run: RunSource, eval_dir: Path, report: ScoreReport) -> list[int]:
    """Scores every pending (checkpoint, task) once; returns the steps of the checkpoints seen."""
    cache_path = eval_dir / HASH_CACHE
    cache = _read_json(cache_path, default={})
    # Recomputed each pass (cheap with the stat-keyed cache): an eval set edited while
    # watching gets a new hash rather than being mixed into the old series.
    hashes: dict[str, str] = {}
    for task in cfg.tasks:
        manifest = task_manifest(task, cache)
        hashes[task.name] = manifest_hash(manifest)
        _write_atomic(
            eval_dir / MANIFESTS_DIR / f"{hashes[task.name]}.json",
            json.dumps(manifest, indent=2, sort_keys=True) + "\n",
        )
    _write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")

    rows = read_results(eval_dir)
    done = {(r["step"], r["task"], r["manifest_hash"]) for r in rows}
    steps, changed = [], False
    for step, ckpt in run.checkpoints():
        steps.append(step)
        pending = [t for t in cfg.tasks if (step, t.name, hashes[t.name]) not in done]
        if not pending:
            continue
        try:
            model = run.load(ckpt, cfg.device)
            new_rows = _evaluate_checkpoint(model, ckpt, step, pending, hashes)
        except (FileNotFoundError, ValueError) as exc:
            if ckpt.exists():
                raise
            # The run's keep_last pruned it between listing and loading: nothing to score.
            log.warning("checkpoint %s was deleted before it could be scored (%s)", ckpt, exc)
            continue
        _append_jsonl(eval_dir / RESULTS_JSONL, new_rows)
        rows += new_rows
        _write_csv(eval_dir / RESULTS_CSV, rows)
        changed = True
        for task in pending:
            report.scored.append((step, task.name))
        for r in new_rows:
            report.results.setdefault(step, {})[f"{r['task']}/{r['metric']}"] = r["value"]
    if changed or (rows and not (eval_dir / PLOTS_DIR).is_dir()):
        report.plots = plot_results(rows, eval_dir / PLOTS_DIR)
    return steps


def _evaluate_checkpoint(
    model: Any, ckpt: Path, step: int, tasks: list[Task], hashes: dict[str, str]
) -> list[dict[str, Any]]:
    # The same calls as ``clipline eval CHECKPOINT``, so the numbers are the same.
    preprocess = model.preprocess_config()
    rows = []
    with torch.inference_mode():
        for task in tasks:
            evaluate = build_evaluator(task, preprocess=preprocess, tokenize=model.tokenize)
            metrics = evaluate(model)
            scored_at = datetime.now(UTC).isoformat(timespec="seconds")
            rows += [
                {
                    "step": step,
                    "task": task.name,
                    "metric": metric,
                    # null, not NaN (e.g. acc5 with under 5 classes): NaN is not JSON.
                    "value": float(value) if math.isfinite(value) else None,
                    "manifest_hash": hashes[task.name],
                    "checkpoint": ckpt.name,
                    "scored_at": scored_at,
                }
                for metric, value in metrics.items()
            ]
            log.info(
                "step %d %s [%s]: %s",
                step,
                task.name,
                hashes[task.name],
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            )
    return rows


def task_manifest(task: Task, cache: dict[str, list] | None = None) -> dict[str, Any]:
    """Everything a task's numbers depend on, apart from the model weights.

    Args:
        task: The task.
        cache: ``{path: [size, mtime_ns, sha256]}``; updated in place. Eval-set files whose
            size and mtime are unchanged are not re-read.

    Returns:
        A JSON-able dict; :func:`manifest_hash` turns it into the hash stored with results.

    Raises:
        ValueError: The task's eval set cannot be opened.
    """
    import open_clip

    import clipline

    options = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(task).items()
        if k not in _NOT_IN_MANIFEST
    }
    manifest: dict[str, Any] = {"kind": type(task).__name__, "options": options}
    if isinstance(task, ZeroShotTask):
        zeroshot_set = task.open(task.split)  # any format the task reads
        manifest["classnames"] = zeroshot_set.classnames
        # The templates actually used: the task's own, or the set's file.
        manifest["options"]["templates"] = (
            zeroshot_set.templates if task.templates is None else task.templates
        )
    elif isinstance(task, LinearProbeTask):
        manifest["classnames"] = task.open(task.train_split).classnames
    elif isinstance(task, RetrievalTask):
        benchmark_sets.read_retrieval_set(task.root, task.split)  # fails early on a wrong path
    # A CSV set is a file: its images sit beside it, relative to its folder.
    root = Path(task.root)
    manifest["data"] = data_hash(root if root.is_dir() else root.parent, cache)
    manifest["versions"] = {
        "clipline": clipline.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    """A short stable hash of a manifest (16 hex digits of SHA-256 of its canonical JSON)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_hash(root: str | Path, cache: dict[str, list] | None = None) -> dict[str, Any]:
    """Content hash of every file under ``root`` except hidden ones (names starting with ".").

    Content, not names and mtimes: copying a set elsewhere keeps its hash, and rewriting it
    with different images changes it. Each file's SHA-256 is cached against its size and
    mtime, so an unchanged set is hashed once.
    """
    root = Path(root)
    cache = {} if cache is None else cache
    lines, total = [], 0
    for path in _data_files(root):
        stat = path.stat()
        key = str(path.resolve())
        hit = cache.get(key)
        if hit is not None and hit[:2] == [stat.st_size, stat.st_mtime_ns]:
            digest = hit[2]
        else:
            digest = _sha256_file(path)
            cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
        lines.append(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{digest}\n")
        total += stat.st_size
    return {
        "files": len(lines),
        "bytes": total,
        "sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
    }


def _data_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_results(eval_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``results.jsonl`` (a line cut short by a killed scorer is skipped)."""
    path = Path(eval_dir) / RESULTS_JSONL
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (a scorer killed mid-write?); ignored", path, i + 1)
    return rows


def plot_results(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per (task, metric): value versus step, one series per manifest hash."""
    import matplotlib

    matplotlib.use("Agg")  # headless; scoring often runs on a cluster node
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in rows:
        value = math.nan if r["value"] is None else r["value"]
        series[r["task"], r["metric"]][r["manifest_hash"]][r["step"]] = value
    written, warned = [], set()
    for (task, metric), by_hash in sorted(series.items()):
        if len(by_hash) > 1 and task not in warned:
            warned.add(task)
            log.warning(
                "task %r has results under %d manifests (%s): plotted as separate series, "
                "never joined; eval/manifests/<hash>.json shows what differs",
                task,
                len(by_hash),
                ", ".join(by_hash),
            )
        fig, ax = plt.subplots(figsize=(6, 4))
        for digest, points in by_hash.items():
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o", label=f"manifest {digest}")
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps, not 2.5
        ax.set_ylabel(metric)
        ax.set_title(f"{task}/{metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{_safe_name(task)}__{_safe_name(metric)}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        _write_atomic(path, buffer.getvalue())
        written.append(path)
    return written


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", name)


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    # One write per checkpoint, fsynced: a killed scorer leaves at most one cut line.
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["task"], r["manifest_hash"], r["step"])))
    _write_atomic(path, buffer.getvalue())


def _write_atomic(path: Path, data: str | bytes) -> None:
    # Readers (a notebook polling the CSV, an image viewer) never see a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default
