"""Shard writer throughput: ``clipline shards`` with 1..N worker processes.

Not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_shards.py                      # defaults
    .venv/bin/python tests/benchmarks/bench_shards.py --images 100 --workers 1 2   # quick look

Writes ``--images`` noisy JPEG photos-alike (``--size`` px, quality 90) plus a CSV once into
``--cache-dir``, then converts them with ``write_shards`` for each worker count, in two
modes: originals copied (the default: every JPEG still fully decoded to check it) and
``--max-side`` resizing (decode + resize + encode). Prints samples/s per run and checks that
every worker count wrote byte-identical shards. On a shared machine take the medians of
``--repeats`` and run it when the CPUs are idle.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipline.data.shard_io import list_shards
from clipline.data.shards import ShardsConfig, write_shards


def make_input(folder: Path, n: int, size: int) -> Path:
    manifest = folder / f"pairs_{n}_{size}.csv"
    if manifest.is_file():
        return manifest
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        # Smooth gradients plus noise: compresses like a photo, not like a flat fill.
        x = np.linspace(0, 255, size, dtype=np.float32)
        base = (x[None, :, None] * rng.random(3)[None, None, :] + x[:, None, None] * 0.3) % 256
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        name = f"img/{i:06d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        rows.append((name, f"a synthetic photo number {i}"))
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows(rows)
    return manifest


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for shard in list_shards(folder):
        h.update(Path(shard).read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512, help="source image side (px)")
    ap.add_argument("--max-side", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "clipline_bench"))
    args = ap.parse_args()

    cache = Path(args.cache_dir)
    manifest = make_input(cache, args.images, args.size)
    for mode, max_side in (("copy", None), ("resize", args.max_side)):
        digests = set()
        for workers in args.workers:
            rates = []
            for _ in range(args.repeats):
                out = cache / "out"
                shutil.rmtree(out, ignore_errors=True)
                cfg = ShardsConfig(
                    input=str(manifest),
                    output_dir=str(out),
                    samples_per_shard=500,
                    workers=workers,
                    max_side=max_side,
                )
                t0 = time.perf_counter()
                report = write_shards(cfg)
                rates.append(report.written / (time.perf_counter() - t0))
                digests.add(digest(out))
            print(
                f"{mode:<7} workers={workers}: {statistics.median(rates):7.1f} samples/s "
                f"(median of {args.repeats}; runs {', '.join(f'{r:.0f}' for r in rates)})"
            )
        assert len(digests) == 1, f"{mode}: worker counts wrote different shards"
        print(f"{mode:<7} identical shards for workers {args.workers}")


if __name__ == "__main__":
    main()
