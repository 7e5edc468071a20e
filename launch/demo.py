"""``clipline demo``: the whole product on the embedded emoji data, on a CPU, in minutes.

emoji + CLDR names -> shards with a held-out split -> train ``clipline:tiny`` -> export ->
evaluate the *export* (zero-shot on emoji groups and Fashion-MNIST, retrieval on the
held-out emoji) -> a summary table next to chance level, and a PNG of loss and metrics
versus step.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo only writes a PNG
import matplotlib.pyplot as plt  # noqa: E402

from clipline.data import benchmark_sets  # noqa: E402
from clipline.data.demo_data import prepare_demo_data  # noqa: E402
from clipline.launch.config import load_run_config, read_recipe  # noqa: E402
from clipline.launch.run import build_evaluators, load_encoders, run_pretrain  # noqa: E402
from clipline.pretrain.export_clipline import export_model  # noqa: E402

log = logging.getLogger(__name__)


def chance_levels(cfg) -> dict[str, float]:
    """Expected value of each metric for a model that ranks at random."""
    chance: dict[str, float] = {}
    for task in cfg.zeroshot:
        n_classes = len(benchmark_sets.read_classification_set(task.root).classnames)
        chance[f"{task.name}/acc1"] = 1 / n_classes
        chance[f"{task.name}/acc5"] = min(1.0, 5 / n_classes)
        chance[f"{task.name}/mean_per_class_recall"] = 1 / n_classes
    for task in cfg.retrieval:
        pairs = list(benchmark_sets.read_retrieval_set(task.root).samples())
        n_images = len(pairs)
        n_texts = sum(len(captions) for _, captions in pairs)
        for k in task.ks:
            chance[f"{task.name}/image_retrieval_recall@{k}"] = min(1.0, k / n_images)
            positives = round(n_texts / n_images)
            chance[f"{task.name}/text_retrieval_recall@{k}"] = 1 - _p_miss(n_texts, positives, k)
    return chance


def _p_miss(n_texts: int, positives: int, k: int) -> float:
    """Probability that k random texts out of n_texts miss all ``positives`` of an image."""
    if k > n_texts - positives:
        return 0.0
    p = 1.0
    for i in range(k):
        p *= (n_texts - positives - i) / (n_texts - i)
    return p


def plot_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """Loss and every eval metric versus step, one panel each group."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/") and (
                k.endswith("acc1") or "recall@1" in k or k.endswith("recall@5")
            ):
                evals.setdefault(k.removeprefix("eval/"), []).append((r["step"], v))
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(*zip(*loss, strict=True), color="tab:blue")
    ax_loss.set(title="train/loss", xlabel="step", ylabel="InfoNCE loss")
    for name, points in sorted(evals.items()):
        ax_eval.plot(*zip(*points, strict=True), marker="o", label=name)
    ax_eval.set(title="evaluation", xlabel="step", ylabel="score", ylim=(0, 1))
    ax_eval.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def run_demo(out: Path, *, overrides: list[str] = ()) -> dict[str, float]:
    """Runs the demo end to end into ``out``; returns the export's metrics."""
    t_start = time.perf_counter()
    data = prepare_demo_data(out / "data", seed=0)
    for note in data.notes:
        log.warning("%s", note)
    recipe = read_recipe("demo")
    recipe["run_dir"] = str(out / "run")
    recipe["data"]["shards"] = str(data.train_shards)
    recipe["zeroshot"] = [{"name": n, "root": str(r)} for n, r in data.zeroshot_roots.items()]
    recipe["retrieval"] = [{"name": f"{data.source}_heldout", "root": str(data.retrieval_root)}]
    cfg = load_run_config(recipe, list(overrides))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a demo always starts from scratch

    t_train = time.perf_counter()
    run_pretrain(cfg)
    t_train = time.perf_counter() - t_train

    trained = load_encoders(cfg.run_dir)
    step = cfg.loop.steps
    export_dir = export_model(trained, out / "export", run_config=cfg.to_dict(), step=step)
    model = load_encoders(export_dir)  # evaluate what users get: the export
    results: dict[str, float] = {}
    for name, evaluate in build_evaluators(cfg, model).items():
        results.update({f"{name}/{k}": v for k, v in evaluate(model).items()})
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(Path(cfg.run_dir) / "metrics.jsonl", out / "curves.png")

    chance = chance_levels(cfg)
    print(
        f"\nclipline demo: {data.source} data, {cfg.model.name}, {step} steps "
        f"({t_train / 60:.1f} min training, {(time.perf_counter() - t_start) / 60:.1f} min total)"
    )
    print(f"{'metric':<52}{'value':>9}{'chance':>9}")
    for key in sorted(results):
        if key.endswith(("acc1", "acc5", "mean_per_class_recall", "@1", "@5", "@10")):
            print(f"{key:<52}{results[key]:>9.3f}{chance.get(key, float('nan')):>9.3f}")
    print(f"\nexport: {export_dir}\nmetrics: {out / 'metrics.json'}\nplot: {out / 'curves.png'}")
    return results
