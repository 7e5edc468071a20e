"""Distillation on the demo's emoji data: plain vs online-distilled vs reinforced students.

One command, resumable (each finished step leaves a JSON in ``--out`` and is skipped on a
rerun; a killed run restarts from scratch):

1. the demo's data (``prepare_demo_data``, seed 0: the same training shards and held-out
   emoji sets as ``clipline demo``; no Fashion-MNIST set, it is not reported here);
2. a teacher: ``clipline:tiny`` with the demo's recipe trained ``--teacher-steps`` (default
   4x the demo's) steps on the training split, exported with ``clipline export``; its
   held-out scores are printed beside the students';
3. ``clipline reinforce`` of the training shards with that teacher, ``--views`` K views
   (disk bytes and time reported);
4. students, ``clipline:tiny`` with the demo's recipe and step count, ``--seeds`` seeds each
   (``loop.seed`` and ``data.seed``), one at a time through the CLI: *plain*; *online*
   (``loss.distill.teacher`` = the export); *reinforced* (trained on the reinforced shards).

Reports held-out emoji retrieval R@1/R@10 (image and text, CLIP_benchmark names) and
emoji-group zero-shot acc1 at the last step, mean ± std over seeds, and each student's
samples/s (median of its logged windows after the first; evaluation time is excluded by
the loop), with the online and reinforced students' step time relative to plain. Writes
``table.md``, ``results.json`` and ``distill.png`` (metric vs step, mean over seeds).

    .venv/bin/python -m tests.benchmarks.bench_distill            # ~60-70 min, 2 idle cores
    .venv/bin/python -m tests.benchmarks.bench_distill --quick    # smoke, a few minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clipline.data.demo_data import prepare_demo_data  # noqa: E402
from clipline.launch.config import read_recipe  # noqa: E402
from tests.benchmarks.bench_train import wait_for_quiet  # noqa: E402
from tests.helpers import to_toml  # noqa: E402

STUDENTS = ("plain", "online", "reinforced")
METRICS = {
    "text R@1": "emoji_heldout/text_retrieval_recall@1",
    "text R@10": "emoji_heldout/text_retrieval_recall@10",
    "image R@1": "emoji_heldout/image_retrieval_recall@1",
    "image R@10": "emoji_heldout/image_retrieval_recall@10",
    "zero-shot acc1": "emoji_groups/acc1",
}


def _clipline(args: list[str], log_path: Path, timeout: float) -> float:
    """Runs ``clipline ARGS`` (this interpreter), output to ``log_path``; returns wall s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "clipline", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"clipline {args[0]} failed ({proc.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - t0


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def prepare_data(a: argparse.Namespace) -> dict:
    """The demo's split (seed 0), once; the paths are kept in ``OUT/data.json``."""
    if done := _done(a.out / "data.json"):
        return done
    data = prepare_demo_data(
        a.out / "data", seed=0, fashion_mnist_per_class=0, limit=800 if a.quick else None
    )
    if data.source != "emoji":
        raise RuntimeError("the emoji font/names are not installed; see `clipline demo`")
    info = {
        "train_shards": str(data.train_shards),
        "retrieval_root": str(data.retrieval_root),
        "zeroshot_root": str(data.zeroshot_roots["emoji_groups"]),
        "stats": data.stats,
    }
    (a.out / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def train(a: argparse.Namespace, data: dict, tag: str, shards: str, overrides: list[str]) -> dict:
    """One ``clipline pretrain`` run with the demo's recipe; its metrics rows, saved."""
    out = a.out / "runs" / tag
    if done := _done(out / "result.json"):
        print(f"  {tag}: done earlier (skipped)", flush=True)
        return done
    shutil.rmtree(out, ignore_errors=True)  # a killed run starts again
    out.mkdir(parents=True)
    recipe = read_recipe("demo")
    recipe["run_dir"] = str(out / "run")
    recipe["data"]["shards"] = shards
    recipe["zeroshot"] = [{"name": "emoji_groups", "root": data["zeroshot_root"]}]
    recipe["retrieval"] = [{"name": "emoji_heldout", "root": data["retrieval_root"]}]
    (out / "recipe.toml").write_text(to_toml(recipe))
    background = wait_for_quiet(a.quiet_wait)
    wall = _clipline(
        ["pretrain", "--recipe", str(out / "recipe.toml"), *overrides], out / "log.txt", a.timeout
    )
    rows = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    evals = {
        r["step"]: {k: r[f"eval/{v}"] for k, v in METRICS.items() if f"eval/{v}" in r}
        for r in rows
        if any(k.startswith("eval/") for k in r)
    }
    result = {
        "tag": tag,
        "overrides": overrides,
        "wall_s": wall,
        "background_share_before": background,
        # The first window holds the start-up (first batches, workers spawning).
        "samples_per_s": statistics.median(speeds[1:] or speeds),
        "evals": {str(s): m for s, m in sorted(evals.items())},
        "final": evals[max(evals)],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"  {tag}: {wall / 60:.1f} min, {result['samples_per_s']:.1f} samples/s", flush=True)
    return result


def reinforce(a: argparse.Namespace, data: dict, teacher: Path) -> dict:
    """``clipline reinforce`` of the training shards with the teacher; time and bytes."""
    out = a.out / "reinforced"
    if done := _done(a.out / "reinforce.json"):
        return done
    wait_for_quiet(a.quiet_wait)
    wall = _clipline(
        [
            "reinforce",
            data["train_shards"],
            str(out),
            "--teacher",
            str(teacher),
            "--augmentations",
            str(a.views),
            "--workers",
            "1",
        ],
        a.out / "reinforce.log",
        a.timeout,
    )
    src = sum(p.stat().st_size for p in Path(data["train_shards"]).glob("*.tar"))
    dst = sum(p.stat().st_size for p in out.glob("*.tar"))
    samples = sum(json.loads((out / "sizes.json").read_text()).values())
    info = {
        "shards": str(out),
        "views": a.views,
        "wall_s": wall,
        "samples": samples,
        "source_bytes": src,
        "reinforced_bytes": dst,
        "extra_bytes_per_sample": (dst - src) / samples,
        "extra_bytes_per_view": (dst - src) / samples / a.views,
    }
    (a.out / "reinforce.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _stats(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(a, teacher: dict, rf: dict, runs: dict[str, list[dict]]) -> str:
    """The markdown table, ``results.json`` and the plot."""
    plain_speed = statistics.fmean(r["samples_per_s"] for r in runs["plain"])
    lines = [
        f"Students: clipline:tiny, demo recipe, {a.steps} steps, {a.seeds} seed(s); teacher: "
        f"clipline:tiny, demo recipe, {a.teacher_steps} steps; distill weight "
        f"{a.distill_weight}, temperature {a.temperature}; reinforce K = {a.views}.",
        "",
        "| student | " + " | ".join(METRICS) + " | samples/s | step time vs plain |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for kind, results in runs.items():
        speed = statistics.fmean(r["samples_per_s"] for r in results)
        cells = [_stats([r["final"][m] for r in results]) for m in METRICS]
        lines.append(
            f"| {kind} | "
            + " | ".join(cells)
            + f" | {_stats([r['samples_per_s'] for r in results], 1)}"
            f" | {plain_speed / speed:.2f}x |"
        )
    lines.append(
        "| teacher | " + " | ".join(f"{teacher['final'][m]:.3f}" for m in METRICS) + " | | |"
    )
    lines += [
        "",
        f"reinforce: {rf['samples']} samples x {rf['views']} views in {rf['wall_s']:.0f} s; "
        f"shards {rf['source_bytes'] / 1e6:.1f} MB -> {rf['reinforced_bytes'] / 1e6:.1f} MB "
        f"(+{rf['extra_bytes_per_sample']:.0f} B/sample, +{rf['extra_bytes_per_view']:.0f} B/view)",
    ]
    table = "\n".join(lines) + "\n"
    (a.out / "table.md").write_text(table)
    results = {"args": {k: str(v) for k, v in vars(a).items()}, "teacher": teacher}
    results |= {"reinforce": rf, "students": runs}
    (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.8))
    for ax, (label, _) in zip(axes, METRICS.items(), strict=True):
        for kind, results in runs.items():
            steps = sorted(int(s) for s in results[0]["evals"])
            means = [statistics.fmean(r["evals"][str(s)][label] for r in results) for s in steps]
            ax.plot(steps, means, marker="o", label=kind)
        ax.set(title=label, xlabel="step", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "distill.png", dpi=110)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> None:
    demo = read_recipe("demo")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/clipline-bench/distill"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=demo["loop"]["steps"])
    parser.add_argument("--teacher-steps", type=int, default=4 * demo["loop"]["steps"])
    parser.add_argument("--views", type=int, default=8, help="K of clipline reinforce")
    parser.add_argument("--eval-every", type=int, default=50)
    # open_clip's --distill loss (c + d) is weight 0.5 (times 2) at T = 1; MobileCLIP's
    # larger weights (0.75-1) lean on teachers far stronger than a longer-trained tiny one.
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, K=2: smoke")
    parser.add_argument("--quiet-wait", type=float, default=120, help="s to wait for idle CPUs")
    parser.add_argument("--timeout", type=float, default=3600, help="s per clipline command")
    a = parser.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.teacher_steps, a.views, a.eval_every = 1, 20, 40, 2, 10
        a.quiet_wait = min(a.quiet_wait, 10)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(a)
    common = [f"loop.eval_every={a.eval_every}", f"optim.warmup_steps={min(30, a.steps // 4)}"]
    print(f"teacher: clipline:tiny, {a.teacher_steps} steps", flush=True)
    teacher = train(
        a, data, "teacher", data["train_shards"], [f"loop.steps={a.teacher_steps}", *common]
    )
    export = a.out / "teacher_export"
    if not (export / "clipline_export.json").exists():
        shutil.rmtree(export, ignore_errors=True)
        _clipline(
            ["export", str(a.out / "runs/teacher/run"), str(export)],
            a.out / "export.log",
            a.timeout,
        )
    rf = reinforce(a, data, export)
    distill = [
        f"loss.distill.weight={a.distill_weight}",
        f"loss.distill.temperature={a.temperature}",
    ]
    kinds = {
        "plain": (data["train_shards"], []),
        "online": (data["train_shards"], [*distill, f"loss.distill.teacher={export}"]),
        "reinforced": (rf["shards"], distill),
    }
    runs: dict[str, list[dict]] = {k: [] for k in STUDENTS}
    for seed in range(a.seeds):  # seed-major: the three students of a seed run back to back
        for kind, (shards, extra) in kinds.items():
            overrides = [f"loop.steps={a.steps}", f"loop.seed={seed}", f"data.seed={seed}"]
            runs[kind].append(
                train(a, data, f"{kind}-s{seed}", shards, [*overrides, *common, *extra])
            )
    print("\n" + report(a, teacher, rf, runs))
    print(
        f"{(time.perf_counter() - t0) / 60:.1f} min; {a.out / 'table.md'}, results.json, distill.png"
    )


if __name__ == "__main__":
    main()
