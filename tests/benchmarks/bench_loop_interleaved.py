"""The training loop against its pure model step, alternating in one process, with page faults.

Not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_loop_interleaved.py                # as clipline runs
    .venv/bin/python tests/benchmarks/bench_loop_interleaved.py --plain-malloc # glibc defaults

Fresh processes of the same ~0.5 s CPU step differ by a few percent on a small VM, more than
the 3% that the loop may add. Here one process alternates blocks (A B B A ...) of

* ``loop``: clipline's real ``run_pretrain`` (recipe ``cpu-debug``) fed one real batch from
  the shards again and again (no loader worker), timed step to step; and
* ``pure``: the bare model step on the same batch (forward, InfoNCE, backward, gradient
  clipping, clipline's fused AdamW, ``zero_grad``) on a fresh model, as the run starts one,

and prints each block's median step time and minor page faults per step, then the median
of the block medians. ``--plain-malloc`` leaves glibc's allocator as it is (no
``keep_freed_memory``, which CPU training calls; see ``pretrain/host_memory.py``): that is
how the page faults, and the loop's larger share of them, were found.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fixed_batch import feed_one_batch

import clipline.launch.run as run
import clipline.pretrain.loop as loop
import clipline.pretrain.periodic as periodic
from clipline.launch.config import load_run_config
from clipline.pretrain.host_memory import keep_freed_memory
from clipline.pretrain.model import DualEncoder, ModelConfig
from clipline.pretrain.optim import build_optimizer


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="/tmp/clipline-bench/shards", help="bench_train.py's")
    p.add_argument("--model", default="clipline:tiny-224")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per block")
    p.add_argument("--skip", type=int, default=5, help="steps left out at each block's ends")
    p.add_argument("--blocks", type=int, default=4, help="blocks of each kind")
    p.add_argument("--plain-malloc", action="store_true", help="glibc's default allocator")
    a = p.parse_args(argv)
    if not Path(a.shards).is_dir():
        p.error(f"{a.shards} not found: run tests/benchmarks/bench_train.py once to write it")
    if a.plain_malloc:
        loop.keep_freed_memory = lambda: False
    else:
        keep_freed_memory()

    loaders = feed_one_batch(run)
    marks: list[tuple[float, int]] = []

    real_progress = periodic.progress

    def progress(**kwargs):  # the loop's bar, marking the end of every step
        bar = real_progress(**kwargs)
        real_update = bar.update

        def update(n=1):
            marks.append((time.perf_counter(), _faults()))
            return real_update(n)

        bar.update = update
        return bar

    periodic.progress = progress
    run_dir = Path(tempfile.mkdtemp(prefix="clipline-interleaved-"))
    cfg = load_run_config(
        "cpu-debug",
        [
            f"data.shards={a.shards}",
            f"data.batch_size={a.batch_size}",
            "data.workers=0",
            f"data.num_samples={a.steps * a.batch_size}",
            f"model.name={a.model}",
            "loop.mixed_precision=no",
            f"loop.steps={a.steps}",
            f"loop.log_every={a.skip}",
            f"loop.checkpoint_every={10 * a.steps}",
            "loss.kind=infonce",
            "optim.lr=1e-3",
            "optim.weight_decay=0.1",
            "optim.warmup_steps=2",
            "optim.grad_clip_norm=1.0",
            f"run_dir={run_dir}",
        ],
    )

    def steady(values: list[float]) -> list[float]:
        return values[a.skip : len(values) - a.skip]

    def loop_block() -> tuple[float, float]:
        shutil.rmtree(run_dir, ignore_errors=True)
        marks.clear()
        run.run_pretrain(cfg)
        steps = [t1 - t0 for (t0, _), (t1, _) in zip(marks, marks[1:], strict=False)]
        faults = [f1 - f0 for (_, f0), (_, f1) in zip(marks, marks[1:], strict=False)]
        return statistics.median(steady(steps)), statistics.median(steady(faults))

    def pure_block() -> tuple[float, float]:
        torch.manual_seed(0)
        model = DualEncoder.from_config(ModelConfig(name=a.model)).train()
        opt = build_optimizer(model, cfg.optim)
        first = loaders[0].batch  # every loop block feeds the same shards' first batch
        ready = loaders[0].ready(first)
        image, text = ready["image"].clone(), ready["text"]
        labels = torch.arange(len(text))
        steps, faults = [], []
        for _ in range(a.steps):
            t0, f0 = time.perf_counter(), _faults()
            img_emb, txt_emb, scale = model(image, text)[:3]
            logits = scale * img_emb @ txt_emb.T
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - t0)
            faults.append(_faults() - f0)
        return statistics.median(steady(steps)), statistics.median(steady(faults))

    print(
        f"{a.model}, batch {a.batch_size}, {'glibc defaults' if a.plain_malloc else 'keep_freed_memory'}"
    )
    loop_block()  # warm-up; builds the first loader
    results: dict[str, list[float]] = {"loop": [], "pure": []}
    for r in range(2 * a.blocks):
        kind = ("pure", "loop", "loop", "pure")[r % 4]
        step_s, faults = loop_block() if kind == "loop" else pure_block()
        results[kind].append(step_s)
        print(f"  {kind}: {1e3 * step_s:6.1f} ms/step, {faults:7.0f} page faults/step", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    loop_ms = 1e3 * statistics.median(results["loop"])
    pure_ms = 1e3 * statistics.median(results["pure"])
    print(
        f"median of block medians: loop {loop_ms:.1f} ms, pure {pure_ms:.1f} ms, "
        f"loop {100 * (loop_ms / pure_ms - 1):+.1f}% over the pure step"
    )


if __name__ == "__main__":
    main()
