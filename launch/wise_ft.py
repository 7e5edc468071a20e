"""Wiring of ``clipline wise-ft``: two models read from their paths, interpolated for every
alpha (:mod:`clipline.pretrain.wise_ft`), each alpha scored by ``clipline eval``'s
evaluators, the sweep written as a table, JSON and plot, and one alpha exported."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipline.eval.evaluators import Task, build_evaluator, evaluator_kind
from clipline.launch.run import load_encoders
from clipline.pretrain.export import export, list_export_formats
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.wise_ft import WeightSpaceEnsemble

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))  # 0, 0.1, ..., 1
RESULTS_FILE = "wise_ft.json"
PLOT_FILE = "wise_ft.png"
EXPORT_DIR = "export"  # OUT/export: the chosen alpha, as `clipline export` writes it


@dataclass(kw_only=True)
class WiseFTConfig:
    """One WiSE-FT sweep.

    Attributes:
        zero_shot: The model the fine-tuning started from: an export (any format clipline
            reads but ONNX), a checkpoint or a run directory.
        finetuned: The fine-tuned model, the same kinds of path.
        out: Output folder: ``wise_ft.json``, ``wise_ft.png`` and ``export/``.
        tasks: What every alpha is scored on (``clipline eval``'s tasks).
        alphas: The weights of the fine-tuned model, in the order they are evaluated.
        pick: The alpha to export (one of ``alphas``); None: the best mean of the tasks'
            main metrics (:func:`main_metric`), the smallest such alpha on a tie.
        device: Where the models are interpolated and evaluated.
        format: The export format (``clipline export --format``'s choices).
        name: The open_clip model-config name of the open_clip format.
    """

    zero_shot: str
    finetuned: str
    out: str
    tasks: list[Task] = field(default_factory=list)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    pick: float | None = None
    device: str = "cpu"
    format: str = "clipline"
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(
                "nothing to evaluate: give --zeroshot NAME=ROOT, --retrieval NAME=ROOT and/or "
                "--linear-probe NAME=ROOT (every alpha is scored on them)"
            )
        if not self.alphas or len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"--alphas {_alpha_list(self.alphas)!r}: give distinct values")
        if not all(math.isfinite(a) for a in self.alphas):
            raise ValueError(f"--alphas {_alpha_list(self.alphas)!r}: every alpha must be finite")
        if self.pick is not None and self.pick not in self.alphas:
            raise ValueError(
                f"--pick {self.pick:g} is not among --alphas {_alpha_list(self.alphas)}; add it "
                "there, or pick one of them"
            )
        if self.format not in (*list_export_formats(), "all"):
            raise ValueError(
                f"format={self.format!r}: use one of {[*list_export_formats(), 'all']}"
            )


def parse_alphas(text: str) -> tuple[float, ...]:
    """``--alphas 0,0.25,0.5`` -> ``(0.0, 0.25, 0.5)``.

    Raises:
        ValueError: A value that is not a number.
    """
    alphas = []
    for part in text.split(","):
        try:
            alphas.append(float(part))
        except ValueError:
            raise ValueError(
                f"--alphas {text!r}: {part.strip()!r} is not a number; give comma-separated "
                "values, e.g. --alphas 0,0.25,0.5,0.75,1"
            ) from None
    return tuple(alphas)


def read_model(path: str | Path, device: str | torch.device) -> DualEncoder:
    """The model at ``path`` as its weights (the one place wise-ft reads a model).

    Raises:
        ValueError: Not a model path, or one that holds no weights (ONNX).
    """
    model = load_encoders(path, device)
    if not isinstance(model, DualEncoder):
        raise ValueError(
            f"{path} holds no weights to interpolate ({type(model).__name__}); give the "
            "clipline, open_clip or hf export, the checkpoint or the run directory it came from"
        )
    return model


def main_metric(task: Task, metrics: dict[str, float]) -> tuple[str, float]:
    """The one number a task contributes to the choice of alpha: ``(name, value)``.

    Zero-shot: ``acc1``. Retrieval: the mean of CLIP_benchmark's ``image_retrieval_recall@k``
    and ``text_retrieval_recall@k`` at the task's smallest k (1 by default), named
    ``mean_recall@k``. Linear probe: ``lp_acc1``.
    """
    kind = evaluator_kind(task)
    if kind == "retrieval":
        k = min(task.ks)
        both = metrics[f"image_retrieval_recall@{k}"] + metrics[f"text_retrieval_recall@{k}"]
        return f"mean_recall@{k}", both / 2
    name = {"zeroshot": "acc1", "linear_probe": "lp_acc1"}[kind]
    return name, metrics[name]


@dataclass(kw_only=True)
class WiseFTReport:
    """The sweep's results: every alpha's metrics and the chosen alpha's export."""

    rows: list[dict[str, Any]]
    picked: dict[str, Any]
    written: dict[str, Path] = field(default_factory=dict)  # {format: export folder}

    def table(self) -> str:
        """Alpha by main metric (each task's, and their mean); ``*`` marks the chosen alpha."""
        columns = [*self.rows[0]["main"], "mean"]
        widths = [max(6, len(c)) for c in columns]
        lines = ["alpha    " + "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
        for row in self.rows:
            values = [*row["main"].values(), row["mean"]]
            mark = "*" if row["alpha"] == self.picked["alpha"] else " "
            cells = "  ".join(f"{v:.4f}".rjust(w) for v, w in zip(values, widths, strict=True))
            lines.append(f"{row['alpha']:<7g}{mark} {cells}")
        return "\n".join(lines)


def run_wise_ft(cfg: WiseFTConfig) -> WiseFTReport:
    """Interpolates, scores every alpha, writes ``wise_ft.json``, ``wise_ft.png`` and the
    chosen alpha's export into ``cfg.out``.

    Raises:
        ValueError: A path that holds no model, two models of different architectures,
            a task whose data cannot be read, or an export format that cannot be written.
    """
    zero_shot = read_model(cfg.zero_shot, cfg.device)
    ensemble = WeightSpaceEnsemble(
        zero_shot, read_model(cfg.finetuned, cfg.device), names=(cfg.zero_shot, cfg.finetuned)
    )
    preprocess, tokenize = zero_shot.preprocess_config(), zero_shot.tokenize
    evaluators = [
        (task, build_evaluator(task, preprocess=preprocess, tokenize=tokenize))
        for task in cfg.tasks
    ]
    rows = []
    for alpha in cfg.alphas:
        model = ensemble.at(alpha)
        row: dict[str, Any] = {"alpha": alpha, "metrics": {}, "main": {}}
        with torch.inference_mode():
            for task, evaluate in evaluators:
                metrics = evaluate(model)
                row["metrics"].update({f"{task.name}/{k}": v for k, v in metrics.items()})
                name, value = main_metric(task, metrics)
                row["main"][f"{task.name}/{name}"] = value
        row["mean"] = sum(row["main"].values()) / len(row["main"])
        log.info("alpha %g: %s", alpha, ", ".join(f"{k}={v:.4f}" for k, v in row["main"].items()))
        rows.append(row)

    if cfg.pick is not None:
        alpha, why = cfg.pick, "--pick"
    else:  # max() keeps the first of equals: ties go to the alpha nearer the zero-shot model
        best = max(sorted(rows, key=lambda r: r["alpha"]), key=lambda r: r["mean"])
        alpha, why = best["alpha"], "the best mean of the tasks' main metrics"
    # The sweep is written before the export, so that a format that fails keeps the results.
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    picked = {"alpha": alpha, "by": why, "export": str(out / EXPORT_DIR), "format": cfg.format}
    report = WiseFTReport(rows=rows, picked=picked)
    results = {"zero_shot": cfg.zero_shot, "finetuned": cfg.finetuned, "alphas": rows}
    (out / RESULTS_FILE).write_text(json.dumps({**results, "picked": picked}, indent=2) + "\n")
    plot_sweep(report, out / PLOT_FILE)
    wise_ft = {"alpha": alpha, "zero_shot": cfg.zero_shot, "finetuned": cfg.finetuned}
    model = ensemble.at(alpha).to("cpu")  # as `clipline export` holds it
    report.written = export(
        model, out / EXPORT_DIR, format=cfg.format, run_config={"wise_ft": wise_ft}, name=cfg.name
    )
    return report


def plot_sweep(report: WiseFTReport, path: Path) -> None:
    """One panel per task (its metrics on the 0-1 scale: accuracies, recalls) and one of the
    main metrics and their mean, each against alpha; the chosen alpha dashed."""
    import matplotlib

    matplotlib.use("Agg")  # headless: only a PNG is written
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in report.rows]
    panels: dict[str, dict[str, list[float]]] = {}
    for key in report.rows[0]["metrics"]:
        values = [r["metrics"][key] for r in report.rows]
        if all(0.0 <= v <= 1.0 for v in values):  # ranks and a probe's C are in the JSON only
            task, _, metric = key.partition("/")
            panels.setdefault(task, {})[metric] = values
    main = {k: [r["main"][k] for r in report.rows] for k in report.rows[0]["main"]}
    panels["main metrics"] = {**main, "mean": [r["mean"] for r in report.rows]}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items(), strict=True):
        for label, values in series.items():
            ax.plot(alphas, values, marker="o", label=label)
        ax.axvline(report.picked["alpha"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("alpha (0: zero-shot, 1: fine-tuned)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _alpha_list(alphas: tuple[float, ...]) -> str:
    return ",".join(f"{a:g}" for a in alphas)
