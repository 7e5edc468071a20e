"""What an online teacher adds to a training step (README, "Distillation").

Times, on one batch of generated shards, the student's forward and backward
(``contrastive_step``) and the online teacher's forward (``OnlineTeacher.complete``: its
preprocessing included, and its tokenisation where its tokenizer is not the student's),
interleaved step by step so that both see the same machine load; prints their medians and
the ratio. The teacher is a randomly
initialised export of ``--teacher`` (its cost does not depend on its weights).

    .venv/bin/python -m tests.benchmarks.bench_teacher_cost --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from clipline.data.loader import build_train_loader
from clipline.data.stream import StreamConfig
from clipline.pretrain.distill import OnlineTeacher
from clipline.pretrain.export import export
from clipline.pretrain.loop import contrastive_step
from clipline.pretrain.loss import InfoNCELoss, LossConfig
from clipline.pretrain.model import DualEncoder, ModelConfig
from tests.helpers import make_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="clipline:tiny")
    parser.add_argument("--teacher", default="clipline:tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = DualEncoder.from_config(ModelConfig(name=args.student))
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp, "shards"), n=2 * args.batch_size, image_size=64)
        export(
            DualEncoder.from_config(ModelConfig(name=args.teacher)),
            Path(tmp, "teacher"),
            run_config={},
        )
        teacher = OnlineTeacher(str(Path(tmp, "teacher")), precision=args.precision)
        cfg = StreamConfig(shards=str(shards), batch_size=args.batch_size, workers=0)
        loader = build_train_loader(
            cfg,
            preprocess=student.preprocess_config(),
            tokenize=student.tokenize,
            rank=0,
            world_size=1,
            device="cpu",
        )
        batch = next(iter(loader.epoch(0)))
    accelerator, loss_fn = Accelerator(cpu=True), InfoNCELoss(LossConfig())
    inputs = [(batch["image"], batch["text"])]
    student_s, teacher_s = [], []
    for i in range(args.steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        contrastive_step(student, loss_fn, inputs, accelerator)
        t1 = time.perf_counter()
        teacher.complete([dict(batch)], student)
        t2 = time.perf_counter()
        student.zero_grad()
        if i:
            student_s.append(t1 - t0)
            teacher_s.append(t2 - t1)
    s, t = statistics.median(student_s), statistics.median(teacher_s)
    print(
        f"student {args.student} forward+backward {s * 1e3:.0f} ms, teacher {args.teacher} "
        f"({args.precision}) forward {t * 1e3:.0f} ms per batch of {args.batch_size}: "
        f"teacher / student = {t / s:.2f}"
    )


if __name__ == "__main__":
    main()
