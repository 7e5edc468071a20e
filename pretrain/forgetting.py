"""The forgetting guard: reference tasks measured at the start of a run and at every
evaluation; their change is logged, and a drop past ``loop.max_reference_drop`` stops the run.

A reference task is an evaluator that carries a ``reference_metric`` (``[[zeroshot]]``
tasks with ``reference = true`` watch ``acc1``). What it scored before the first step is
kept in ``run_dir/reference_start.json``: a resumed run compares with the weights the run
started from, never with the fine-tuned weights it resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_FILE = "reference_start.json"


class ReferenceDropError(RuntimeError):
    """A reference task dropped past ``loop.max_reference_drop``; the checkpoint of that step
    is saved. The CLI prints the message and exits 3."""

    exit_code = 3


class ForgettingGuard:
    """The reference tasks' start values, their deltas, and the stop rule.

    Args:
        evaluators: ``name -> evaluator``; those with a ``reference_metric`` are watched.
        max_drop: The largest drop of a main metric allowed (0: never stop).
    """

    def __init__(self, evaluators: dict[str, Any], max_drop: float):
        self.metric = {
            name: fn.reference_metric
            for name, fn in evaluators.items()
            if getattr(fn, "reference_metric", None)
        }
        self.max_drop = max_drop
        self.start: dict[str, dict[str, Any]] = {}  # task -> {"step", "metrics"}

    def restore(self, run_dir: Path | None) -> list[str]:
        """Reads the start values the run in ``run_dir`` saved (None: a fresh run); returns
        the reference tasks that still need measuring."""
        path = None if run_dir is None else Path(run_dir) / START_FILE
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            self.start = {k: v for k, v in saved.items() if k in self.metric}
        missing = [name for name in self.metric if name not in self.start]
        if run_dir is not None and missing:
            log.warning(
                "reference task(s) %s have no start value in %s (not reference tasks when the "
                "run started): measured now, on the resumed weights; their deltas count from here",
                missing,
                path,
            )
        return missing

    def record(self, step: int, results: dict[str, float]) -> None:
        """Keeps ``results`` (``eval/<task>/<metric>``) as the start of the tasks they hold."""
        for name in self.metric:
            prefix = f"eval/{name}/"
            metrics = {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}
            if metrics:
                self.start[name] = {"step": step, "metrics": metrics}

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / START_FILE).write_text(json.dumps(self.start, indent=2) + "\n")

    def describe_start(self) -> list[str]:
        return [
            f"reference {name}: {metric} {self.start[name]['metrics'][metric]:.4f} at step "
            f"{self.start[name]['step']}"
            for name, metric in self.metric.items()
        ]

    def deltas(self, results: dict[str, float]) -> dict[str, float]:
        """``eval/<task>/delta``: the main metric's change since the start (negative: lost)."""
        out = {}
        for name, metric in self.metric.items():
            now = results.get(f"eval/{name}/{metric}")
            if now is not None:
                out[f"eval/{name}/delta"] = now - self.start[name]["metrics"][metric]
        return out

    def breach(self, results: dict[str, float]) -> str | None:
        """What stops the run, or None: the task whose drop exceeds ``max_drop`` most."""
        if self.max_drop <= 0:
            return None
        drops = {
            name: -results[f"eval/{name}/delta"]
            for name in self.metric
            if f"eval/{name}/delta" in results
        }
        worst = max(drops, key=drops.__getitem__, default=None)
        if worst is None or drops[worst] <= self.max_drop:
            return None
        metric, start = self.metric[worst], self.start[worst]
        return (
            f"reference task {worst!r} {metric} fell from {start['metrics'][metric]:.4f} (step "
            f"{start['step']}) to {results[f'eval/{worst}/{metric}']:.4f}, a drop of "
            f"{drops[worst]:.4f} > loop.max_reference_drop={self.max_drop:g}"
        )
