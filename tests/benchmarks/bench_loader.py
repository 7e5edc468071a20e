"""Loader throughput: clipline's training stream vs open_clip's ``get_wds_dataset``.

Not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_loader.py          # defaults: ~12 min on 2 idle CPUs
    .venv/bin/python tests/benchmarks/bench_loader.py --sizes 256 --workers 1 --batches 4 \\
        --warmup 1 --repeats 1 --pairs 400 --memory-samples 2000     # smoke run, ~1 min

What it does:

1. Writes webdataset shards once per image size (``--sizes``, default 256 and 1024 px)
   with clipline's own writer under ``--cache-dir``: clipline's generated shape scenes with
   mild per-pixel noise, saved as quality-90 JPEGs (about 20 KB at 256 px, 300 KB at
   1024 px, like web photos of those sizes; flat synthetic scenes would decode too fast).
2. For each size and worker count (``--workers``, default 1 and 2) runs, each in a fresh
   process and alternating the order across ``--repeats``:

   * ``open_clip``: ``open_clip_train.data.get_wds_dataset`` as ``open_clip_train`` builds
     it (``--dataset-resampled`` so it streams forever; webdataset's ``eof_value=None``
     fix applied at run time, see /work/shared/peers.md), with open_clip's training
     transform (224 px, ``RandomResizedCrop(scale=(0.9, 1.0))``, bicubic) and tokenizer;
   * ``clipline``: ``build_train_loader`` with the same transform object, tokenizer, batch
     size, shuffle buffer and worker count, and default decode settings: JPEG draft
     decoding on, uint8 batches (the training loop normalises them on the accelerator;
     not timed here, as open_clip's normalisation on the accelerator would not be);
   * ``clipline-f32``: the same with ``decode.uint8_images=false``: normalised float32
     batches, the same work and batch as open_clip's.

   Each run iterates ``--warmup`` batches (worker start, shuffle-buffer fill), then times
   ``--batches`` batches in the main process, which only takes them (no model). Figures:
   samples/s (wall clock) and the loader workers' CPU time per sample (user + system, from
   psutil), which a busy machine distorts far less than wall time.
3. Memory: one clipline run with ``--memory-workers`` workers over ``--memory-samples``
   samples of the smallest size, sampling each worker's resident set size (RSS) every
   ``--memory-every`` batches; it prints the curve and the growth after the first 20%.

Both loaders get the same shuffle buffer (``--shuffle-buffer``; open_clip's module
constants are patched for it in its child process) so that neither holds more samples.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA_VERSION = 1  # bump when the generated data change, so caches are rebuilt
RESULT = "BENCH_RESULT "


# --------------------------------------------------------------------------- data


def _noisy_jpeg(image, rng, noise_std: float, quality: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    arr = arr + rng.normal(0.0, noise_std, arr.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ensure_shards(cache_dir: Path, size: int, num_pairs: int, num_shards: int) -> Path:
    """Shards of ``num_pairs`` ``size``-px JPEG pairs under ``cache_dir``, written once."""
    import numpy as np

    from clipline.data.builtin_data import generate_shapes
    from clipline.data.ingest import Sample
    from clipline.data.shards import write_samples

    out = cache_dir / f"shards-{size}px"
    spec = {"version": DATA_VERSION, "size": size, "pairs": num_pairs, "shards": num_shards}
    marker = out / "bench_data.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)  # our own cache folder, other parameters
    tmp = cache_dir / f"shards-{size}px.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"writing {num_pairs} {size}-px pairs into {out} ...", flush=True)
    rng = np.random.default_rng(size)
    scenes = generate_shapes(num_pairs, seed=size, image_size=size)
    samples = (
        Sample(key=f"s{i:06d}", image=_noisy_jpeg(s.image, rng, 10.0, 90), caption=s.caption)
        for i, s in enumerate(scenes)
    )
    write_samples(samples, tmp, samples_per_shard=-(-num_pairs // num_shards))
    marker_tmp = tmp / "bench_data.json"
    marker_tmp.write_text(json.dumps(spec) + "\n")
    tmp.rename(out)
    mib = sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20
    print(f"  {mib:.0f} MiB in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


# --------------------------------------------------------------------------- children


def _transform_and_tokenizer():
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    # What clipline's DualEncoder.image_transform(True) and open_clip_train both build for a
    # 224-px model with open_clip's default augmentation.
    transform = image_transform_v2(PreprocessCfg(size=224), is_train=True)
    return transform, open_clip.get_tokenizer("ViT-B-32")


def _open_clip_loader(spec: dict):
    import functools

    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    # webdataset 1.0.x ends each shard with a {} marker that open_clip cannot group
    # (KeyError: 'fname'); documented remedy, applied in this process only.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    oc_data._SAMPLE_SHUFFLE_SIZE = spec["shuffle_buffer"]
    oc_data._SAMPLE_SHUFFLE_INITIAL = spec["shuffle_buffer"]
    transform, tokenizer = _transform_and_tokenizer()
    shards = sorted(str(p) for p in Path(spec["shards"]).glob("*.tar"))
    args = argparse.Namespace(
        train_data="::".join(shards),
        train_num_samples=spec["num_samples"],
        dataset_resampled=True,  # streams forever, like a long run; same per-sample work
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=spec["batch_size"],
        workers=spec["workers"],
        world_size=1,
    )
    info = oc_data.get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)
    return info.dataloader


def _clipline_loader(spec: dict):
    from clipline.data.decode import DecodeConfig
    from clipline.data.loader import build_train_loader
    from clipline.data.stream import StreamConfig
    from clipline.pretrain.model import Tokenize, open_clip_preprocess_config

    _, tokenizer = _transform_and_tokenizer()
    cfg = StreamConfig(
        shards=spec["shards"],
        batch_size=spec["batch_size"],
        workers=spec["workers"],
        shuffle_buffer=spec["shuffle_buffer"],
        num_samples=spec["num_samples"],
        # Streams forever over the shards, like open_clip's --dataset-resampled above.
        mode="resampled",
        decode=DecodeConfig(uint8_images=spec["loader"] != "clipline-f32"),
    )
    loader = build_train_loader(
        cfg,
        # The numbers of the same open_clip transform the open_clip loader gets.
        preprocess=open_clip_preprocess_config({"size": 224}),
        tokenize=Tokenize(tokenizer=tokenizer, pad_id=0, trim=True),
        rank=0,
        world_size=1,
    )
    return loader.epoch(0)


def _worker_cpu_s(me) -> float:
    total = 0.0
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except Exception:  # a worker that just exited
            pass
    return total


def child(spec: dict) -> None:
    """One measurement; prints one ``BENCH_RESULT {json}`` line."""
    import psutil
    import torch

    torch.set_num_threads(1)  # the main process only receives batches
    me = psutil.Process()
    make = _open_clip_loader if spec["loader"] == "open_clip" else _clipline_loader
    batches = iter(make(spec))
    bs = spec["batch_size"]
    for _ in range(spec["warmup"]):
        batch = next(batches)
    image = batch["image"] if isinstance(batch, dict) else batch[0]
    out: dict = {"dtype": str(image.dtype), "shape": list(image.shape)}
    if spec["mode"] == "speed":
        cpu0, t0 = _worker_cpu_s(me), time.perf_counter()
        for _ in range(spec["batches"]):
            next(batches)
        wall, cpu = time.perf_counter() - t0, _worker_cpu_s(me) - cpu0
        n = spec["batches"] * bs
        out.update(samples_per_s=n / wall, worker_cpu_ms=1000 * cpu / n, wall_s=wall)
    else:  # memory curve
        curve, seen = [], spec["warmup"] * bs
        while seen < spec["samples"]:
            for _ in range(spec["every"]):
                next(batches)
            seen += spec["every"] * bs
            rss = []
            for c in me.children(recursive=True):
                try:
                    rss.append(c.memory_info().rss / 2**20)
                except Exception:
                    pass
            curve.append({"samples": seen, "worker_rss_mib": rss})
        out["curve"] = curve
    print(RESULT + json.dumps(out), flush=True)
    os._exit(0)  # skip the loaders' worker shutdown: not part of any figure


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {spec['loader']} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT) :])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="image sizes, px")
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="pairs per size (default: 2000 at <= 256 px, 500 above; shards are cycled)",
    )
    p.add_argument("--shards", type=int, default=8, help="shards per size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="both loaders")
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--batches", type=int, default=30, help="timed batches per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per loader, alternating")
    p.add_argument(
        "--loaders",
        nargs="+",
        default=["open_clip", "clipline", "clipline-f32"],
        choices=["open_clip", "clipline", "clipline-f32"],
    )
    p.add_argument("--memory-samples", type=int, default=20000, help="0 skips the memory run")
    p.add_argument("--memory-workers", type=int, default=2)
    p.add_argument("--memory-every", type=int, default=20, help="batches between RSS samples")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/clipline-bench-loader"))
    p.add_argument("--timeout", type=float, default=600, help="seconds per child run")
    p.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    a = p.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return

    a.cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    shards = {
        s: ensure_shards(
            a.cache_dir, s, a.pairs or (2000 if s <= 256 else 500), max(a.shards, *a.workers)
        )
        for s in a.sizes
    }
    print(
        f"batch {a.batch_size}, 224-px output, shuffle buffer {a.shuffle_buffer}, "
        f"{a.batches} timed batches after {a.warmup}, {a.repeats} repeats, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    results: list[dict] = []
    for size in a.sizes:
        for workers in a.workers:
            for r in range(a.repeats):
                order = a.loaders if r % 2 == 0 else a.loaders[::-1]
                for loader in order:
                    spec = {
                        "mode": "speed",
                        "loader": loader,
                        "shards": str(shards[size]),
                        "workers": workers,
                        "batch_size": a.batch_size,
                        "shuffle_buffer": a.shuffle_buffer,
                        "warmup": a.warmup,
                        "batches": a.batches,
                        # per worker, with room: neither loader may end its epoch early
                        "num_samples": 4 * (a.warmup + a.batches + 8) * a.batch_size * workers,
                    }
                    res = {"size": size, "workers": workers, "loader": loader, "repeat": r}
                    res.update(run_child(spec, a.timeout))
                    results.append(res)
                    print(
                        f"  {size:>5} px  {workers} worker(s)  {loader:<12} "
                        f"{res['samples_per_s']:7.1f} samples/s  "
                        f"{res['worker_cpu_ms']:6.2f} worker-CPU ms/sample  ({res['dtype']})",
                        flush=True,
                    )

    print("\nmedians over repeats (samples/s; worker CPU ms/sample); ratio = clipline / open_clip")
    head = f"{'size':>6} {'workers':>7} " + " ".join(f"{n:>22}" for n in a.loaders)
    print(head + ("  ratio(s/s)" if "open_clip" in a.loaders else ""))
    summary = []
    for size in a.sizes:
        for workers in a.workers:
            row: dict = {"size": size, "workers": workers}
            cells = []
            for loader in a.loaders:
                rs = [
                    r
                    for r in results
                    if (r["size"], r["workers"], r["loader"]) == (size, workers, loader)
                ]
                sps = statistics.median(r["samples_per_s"] for r in rs)
                cpu = statistics.median(r["worker_cpu_ms"] for r in rs)
                row[loader] = {"samples_per_s": sps, "worker_cpu_ms": cpu}
                cells.append(f"{sps:9.1f} ({cpu:5.2f} ms)")
            line = f"{size:>6} {workers:>7} " + " ".join(f"{c:>22}" for c in cells)
            if "open_clip" in a.loaders:
                base = row["open_clip"]["samples_per_s"]
                ratios = {n: row[n]["samples_per_s"] / base for n in a.loaders if n != "open_clip"}
                row["ratio"] = ratios
                line += "  " + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items())
            print(line)
            summary.append(row)

    memory = None
    if a.memory_samples:
        size = min(a.sizes)
        spec = {
            "mode": "memory",
            "loader": "clipline",
            "shards": str(shards[size]),
            "workers": a.memory_workers,
            "batch_size": a.batch_size,
            "shuffle_buffer": a.shuffle_buffer,
            "warmup": a.warmup,
            "samples": a.memory_samples,
            "every": a.memory_every,
            "num_samples": 2 * a.memory_samples + 1000 * a.batch_size,
        }
        memory = run_child(spec, a.timeout)["curve"]
        print(f"\nclipline worker RSS (MiB), {a.memory_workers} workers, {size}-px shards:")
        for point in memory:
            rss = ", ".join(f"{m:6.1f}" for m in point["worker_rss_mib"])
            print(f"  {point['samples']:>7} samples  {rss}")
        start = memory[len(memory) // 5]["worker_rss_mib"]
        end = memory[-1]["worker_rss_mib"]
        growth = ", ".join(f"{e - s:+.1f}" for s, e in zip(start, end, strict=False))
        print(
            f"  growth from {memory[len(memory) // 5]['samples']} to {memory[-1]['samples']} "
            f"samples: {growth} MiB per worker"
        )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        payload = {"args": {k: str(v) for k, v in vars(a).items()}, "summary": summary}
        payload.update(runs=results, memory=memory)
        a.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
