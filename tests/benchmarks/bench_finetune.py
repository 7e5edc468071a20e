"""Fine-tuning without forgetting, on real data: pretrain on emoji, fine-tune on
Fashion-MNIST, and sweep WiSE-FT between the two (issue 15, item 5).

Stages, each through the real CLI in a subprocess, one at a time, each skipped on a rerun
when its outputs are in ``--out`` (delete a stage's folder to redo it):

1. ``pretrain/``: ``clipline demo`` (the emoji data, the demo recipe, its export), with
   ``loop.steps = --pretrain-steps``.
2. ``fmnist/``: Fashion-MNIST's train split captioned "a photo of a {class}." (and two other
   templates) as training shards (clipline's shard writer), and a held-out zero-shot set
   from its test split (CLIP_benchmark's layout, as ``clipline eval --zeroshot`` reads it).
3. ``finetune/``: ``clipline pretrain --recipe finetune`` adapted to the tiny model, from
   ``model.pretrained = pretrain/export``, with the emoji-group zero-shot set as a
   ``reference = true`` task (the forgetting guard logs ``eval/emoji_groups/delta``) and a
   limit of 1.0 on its drop, so the guard reports and never stops the run.
4. ``eval/``: ``clipline eval`` of the pretrained export (before) and the fine-tuned run
   (after) on the three tasks.
5. ``wise_ft/``: ``clipline wise-ft pretrain/export finetune/run --alphas ...``.

Then ``table.md`` (printed too), ``results.json`` and ``finetune_tradeoff.png`` (emoji
zero-shot vs Fashion-MNIST zero-shot along alpha). ``--quick`` checks the whole path in a
few minutes (20 steps each, 3 alphas, small sets); its figures mean nothing.

    .venv/bin/python tests/benchmarks/bench_finetune.py             # the evidence
    .venv/bin/python tests/benchmarks/bench_finetune.py --quick --out /tmp/ft-quick
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # bench_train's wait_for_quiet
sys.path.insert(0, str(ROOT))  # tests.helpers' recipe writer

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bench_train import wait_for_quiet  # noqa: E402
from PIL import Image  # noqa: E402

from clipline.data import benchmark_sets, builtin_data  # noqa: E402
from clipline.data.demo_data import FASHION_TEMPLATES  # noqa: E402
from clipline.data.ingest import Sample  # noqa: E402
from clipline.data.shards import write_samples  # noqa: E402
from clipline.launch.config import read_recipe  # noqa: E402
from clipline.launch.run import DONE_FILE  # noqa: E402
from tests.helpers import to_toml  # noqa: E402

CLIPLINE = [sys.executable, "-m", "clipline.launch.cli"]
EMOJI_ZS, RETRIEVAL, FMNIST_ZS = "emoji_groups", "emoji_heldout", "fashion_mnist"
# The table's columns: (metric key, header). CLIP_benchmark's names.
COLUMNS = [
    (f"{EMOJI_ZS}/acc1", "emoji zero-shot acc1"),
    (f"{RETRIEVAL}/image_retrieval_recall@1", "emoji image_retrieval R@1 (text->image)"),
    (f"{RETRIEVAL}/image_retrieval_recall@10", "emoji image_retrieval R@10"),
    (f"{RETRIEVAL}/text_retrieval_recall@1", "emoji text_retrieval R@1 (image->text)"),
    (f"{RETRIEVAL}/text_retrieval_recall@10", "emoji text_retrieval R@10"),
    (f"{FMNIST_ZS}/acc1", "Fashion-MNIST zero-shot acc1"),
]


def run_cli(args: list[str], log: Path, quiet_wait: float) -> None:
    """Runs ``clipline ARGS`` with its output in ``log``; a failure shows the log's tail."""
    wait_for_quiet(quiet_wait)
    print(f"$ clipline {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run([*CLIPLINE, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"clipline {args[0]} failed (exit {rc.returncode}); {log}:\n{tail}")
    print(f"  done in {(time.perf_counter() - t0) / 60:.1f} min (log: {log})", flush=True)


def fashion_data(out: Path, *, train_n: int, eval_per_class: int, seed: int) -> None:
    """Fashion-MNIST train pairs as shards, and a zero-shot set from its test split."""
    classes = list(builtin_data.FASHION_MNIST_CLASSES)
    images, labels = builtin_data.load_fashion_mnist("train")
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(labels)), min(train_n, len(labels))))
    rng.shuffle(idx)
    captions = [t.replace("{c}", "{}") for t in FASHION_TEMPLATES]

    def samples():
        for i in idx:
            name = classes[int(labels[i])]
            yield Sample(
                key=f"train_{i:05d}",
                image=Image.fromarray(images[i]).convert("RGB"),
                caption=rng.choice(captions).format(name),
                meta={"label": name},
            )

    # At least 8 shards: 2 loader workers (and a few ranks) each need their own.
    write_samples(samples(), out / "train", samples_per_shard=max(1, min(1000, len(idx) // 8)))
    test_images, test_labels = builtin_data.load_fashion_mnist("test")
    picked = []
    for c in range(len(classes)):
        members = [i for i, y in enumerate(test_labels.tolist()) if y == c]
        picked.extend(sorted(rng.sample(members, min(eval_per_class, len(members)))))
    benchmark_sets.write_classification_set(
        out / "zeroshot",
        ((Image.fromarray(test_images[i]).convert("RGB"), int(test_labels[i])) for i in picked),
        classes,
        FASHION_TEMPLATES,
    )
    (out / "done.json").write_text(json.dumps({"train": len(idx), "zeroshot": len(picked)}))


def finetune_recipe(a: argparse.Namespace, export: Path, data: Path, fmnist: Path) -> dict:
    """The ``finetune`` recipe, scaled to ``clipline:tiny`` on 2 CPU cores.

    The tiny model was pretrained at lr 1e-3; the recipe's 1e-5 (for a ViT-B/32 at batch
    256 over 2000 steps) would hardly move it in a few hundred steps, so 1e-4, a tenth of
    the pretraining rate, as FT-CLIP-style recipes do. Its towers have 5 layers each, so
    layer_decay 0.7 lets the embeddings learn at 0.7**4 = 24 % of that.
    """
    recipe = read_recipe("finetune")
    recipe["run_dir"] = str(a.out / "finetune" / "run")
    recipe["data"].update(shards=str(fmnist / "train"), batch_size=128, workers=2)
    recipe["data"]["shuffle_buffer"] = 1000
    recipe["model"] = {"name": "pretrained", "pretrained": str(export)}
    recipe["optim"].update(lr=a.finetune_lr, warmup_steps=max(1, a.finetune_steps // 10))
    recipe["optim"]["layer_decay"] = a.layer_decay
    every = max(1, a.finetune_steps // 3)
    recipe["loop"].update(
        steps=a.finetune_steps,
        mixed_precision="no",  # CPU: bf16 autocast is slower there and the model is tiny
        log_every=max(1, a.finetune_steps // 20),
        eval_every=every,
        checkpoint_every=every,
        keep_last=1,
        max_reference_drop=1.0,  # the guard logs every delta but never stops this run
    )
    recipe["zeroshot"] = [
        {"name": EMOJI_ZS, "root": str(data / "zeroshot" / "emoji_groups"), "reference": True},
        {"name": FMNIST_ZS, "root": str(fmnist / "zeroshot")},
    ]
    recipe["retrieval"] = [{"name": RETRIEVAL, "root": str(data / "retrieval")}]
    return recipe


def task_flags(data: Path, fmnist: Path) -> list[str]:
    return [
        "--zeroshot",
        f"{EMOJI_ZS}={data / 'zeroshot' / 'emoji_groups'}",
        "--retrieval",
        f"{RETRIEVAL}={data / 'retrieval'}",
        "--zeroshot",
        f"{FMNIST_ZS}={fmnist / 'zeroshot'}",
    ]


def guard_trace(metrics_jsonl: Path) -> list[dict]:
    """The fine-tuning run's reference task along its steps: acc1 and its delta."""
    keys = (f"eval/{EMOJI_ZS}/acc1", f"eval/{EMOJI_ZS}/delta")
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in rows if keys[1] in r]


def write_report(out: Path, before: dict, after: dict, sweep: dict, meta: dict) -> str:
    """table.md, results.json and finetune_tradeoff.png; returns the table."""
    rows = [("before (pretrained)", before), ("after (fine-tuned)", after)]
    rows += [(f"WiSE-FT alpha={r['alpha']:g}", r["metrics"]) for r in sweep["alphas"]]
    lines = [
        "| model | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for label, metrics in rows:
        cells = [f"{metrics[k]:.3f}" if k in metrics else "n/a" for k, _ in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    results = {**meta, "before": before, "after": after, "wise_ft": sweep}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    x_key, y_key = f"{EMOJI_ZS}/acc1", f"{FMNIST_ZS}/acc1"
    points = [(r["alpha"], r["metrics"][x_key], r["metrics"][y_key]) for r in sweep["alphas"]]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-", color="tab:blue", label="WiSE-FT")
    for alpha, x, y in points:
        ax.annotate(f"{alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot(before[x_key], before[y_key], "s", ms=10, color="tab:green", label="before")
    ax.plot(after[x_key], after[y_key], "^", ms=10, color="tab:red", label="after fine-tuning")
    ax.set(
        xlabel="emoji-group zero-shot acc1 (pretraining domain)",
        ylabel="Fashion-MNIST zero-shot acc1 (fine-tuning domain)",
        title="fine-tuning trade-off along WiSE-FT alpha",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "finetune_tradeoff.png", dpi=110)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/clipline-bench/finetune"))
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the demo's")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--layer-decay", type=float, default=0.7)
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--fmnist-train", type=int, default=40000, help="training pairs")
    p.add_argument("--fmnist-eval-per-class", type=int, default=500, help="test images/class")
    p.add_argument("--quiet-wait", type=float, default=120, help="max s to wait per stage")
    p.add_argument("--quick", action="store_true", help="smoke: 20 steps, 3 alphas, small sets")
    a = p.parse_args(argv)
    if a.quick:
        a.pretrain_steps, a.finetune_steps, a.alphas = 20, 20, "0,0.5,1"
        a.fmnist_train, a.fmnist_eval_per_class = 1000, 20
    if a.pretrain_steps is None:
        a.pretrain_steps = read_recipe("demo")["loop"]["steps"]
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    pre = a.out / "pretrain"
    export, data = pre / "export", pre / "data"
    if not (pre / "metrics.json").is_file():
        demo_overrides = [f"loop.steps={a.pretrain_steps}"]
        if a.pretrain_steps <= read_recipe("demo")["optim"]["warmup_steps"]:  # --quick
            demo_overrides.append(f"optim.warmup_steps={max(1, a.pretrain_steps // 10)}")
        run_cli(
            ["demo", "--output", str(pre), *demo_overrides],
            a.out / "pretrain.log",
            a.quiet_wait,
        )

    fmnist = a.out / "fmnist"
    if not (fmnist / "done.json").is_file():
        print("writing Fashion-MNIST shards and zero-shot set", flush=True)
        shutil.rmtree(fmnist, ignore_errors=True)
        fashion_data(fmnist, train_n=a.fmnist_train, eval_per_class=a.fmnist_eval_per_class, seed=0)

    ft = a.out / "finetune"
    run_dir = ft / "run"
    if not (run_dir / DONE_FILE).is_file():
        ft.mkdir(exist_ok=True)
        recipe_path = ft / "recipe.toml"
        recipe_path.write_text(to_toml(finetune_recipe(a, export, data, fmnist)))
        resume = ["--resume", "latest"] if (run_dir / "checkpoints").is_dir() else []
        args = ["pretrain", "--recipe", str(recipe_path), *resume]
        run_cli(args, a.out / "finetune.log", a.quiet_wait)

    tasks = task_flags(data, fmnist)
    evals = {}
    for tag, model in (("before", export), ("after", run_dir)):
        path = a.out / "eval" / f"{tag}.json"
        if not path.is_file():
            args = ["eval", str(model), *tasks, "--output", str(path)]
            run_cli(args, a.out / f"eval_{tag}.log", a.quiet_wait)
        evals[tag] = json.loads(path.read_text())

    wise = a.out / "wise_ft"
    if not (wise / "export").is_dir():
        args = ["wise-ft", str(export), str(run_dir), str(wise), "--alphas", a.alphas, *tasks]
        run_cli(args, a.out / "wise_ft.log", a.quiet_wait)
    sweep = json.loads((wise / "wise_ft.json").read_text())

    final = run_dir / "final_metrics.json"
    meta = {
        "command": " ".join(sys.argv),
        "pretrain_steps": a.pretrain_steps,
        "finetune_steps": a.finetune_steps,
        "finetune_lr": a.finetune_lr,
        "layer_decay": a.layer_decay,
        "max_reference_drop": 1.0,
        "fmnist": json.loads((fmnist / "done.json").read_text()),
        "finetune_final_metrics": json.loads(final.read_text()) if final.is_file() else None,
        "forgetting_guard": guard_trace(run_dir / "metrics.jsonl"),
    }
    table = write_report(a.out, evals["before"], evals["after"], sweep, meta)
    print("\n" + table)
    print(f"table: {a.out / 'table.md'}\nresults: {a.out / 'results.json'}")
    print(f"plot: {a.out / 'finetune_tradeoff.png'}; WiSE-FT plot: {wise / 'wise_ft.png'}")
    print(f"this invocation: {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
