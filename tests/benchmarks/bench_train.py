"""Training throughput: clipline's trainer vs open_clip's own trainer (``open_clip_train``).

Not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_train.py             # defaults: ~5 min on 2 CPUs
    .venv/bin/python tests/benchmarks/bench_train.py --steps 20 --repeats 1   # quick look

What it does:

1. Writes 3,000 (image, caption) pairs once into webdataset shards with clipline's own
   writer (``clipline.data.shards.write_samples``) under ``--cache-dir`` (reused while the
   data parameters match). Images are clipline's generated shape scenes at 256 px with mild
   per-pixel noise, saved as quality-90 JPEGs of ~25 KB: flat synthetic scenes would be
   4 KB files that decode in half the time of a web photo of that size.
2. Runs ``open_clip_train`` (1 process, fp32, webdataset input, ``--train-num-samples =
   steps x batch``) through a small ``python -c`` wrapper that registers clipline's model
   config with ``open_clip.add_model_config`` and applies webdataset's ``eof_value=None``
   fix to open_clip's tar expansion at run time (``KeyError: 'fname'`` with webdataset
   1.0.x otherwise; the installed package is never edited).
3. Runs clipline's ``run_pretrain`` (recipe ``cpu-debug`` + overrides) on the same shards,
   model, batch, precision, number of loader workers and samples per epoch.
4. Measures the pure model step (forward + InfoNCE + backward + AdamW on one fixed batch
   of real pairs from the shards, no data loading) before the first and after the last
   trainer run, twice over: with the full 77-token text context (what open_clip_train
   feeds its text tower) and with the batch trimmed by clipline's ``DualEncoder.tokenize``
   (clipline cuts each token batch after its longest caption). Each trainer is set
   against the pure step that does its work.

Every measurement runs in its own fresh Python process, and the two trainers alternate
(A B, B A, ...) so that drift on a shared, noisy machine hits both alike. Before each run
the script waits for other processes to leave the CPUs, and a run during which they took
more than 5% of the CPUs is measured again (``--retries``). Figures are medians over
repeats.

Steady state only: each run's first ``--log-every`` steps (start-up, shuffle-buffer fill)
and its last ``--log-every`` steps are left out. The last ones because the loader worker
has produced its quota by then (it runs ``prefetch_factor`` batches ahead: 4 in clipline,
2 in open_clip) and stops competing with the training threads for the 2 cores, so those
steps run at nearly the pure-step speed and would flatter whichever trainer prefetches
more.

Statistics, for both trainers from the same kind of raw data:

* ``win_med``: median of ``--log-every``-step windows (samples / wall time of the window).
  clipline logs exactly this (``train/samples_per_s`` in ``metrics.jsonl``); for
  open_clip the per-step times from its log lines are summed into the same windows.
* ``step_med`` (open_clip only): median of its per-step ``X/s`` figures; a per-step
  median hides occasional data stalls that a window figure includes.
* ``mean``: all steady-state samples / all steady-state time.
* ``data_wait``: share of steady-state time spent waiting for the next batch (clipline:
  ``train/data_wait_share``; open_clip: derived from its running ``Data (t)`` average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path
from typing import Any

CPUS = os.cpu_count() or 1
# Share of all CPUs that other processes may take during a run before it is re-measured:
# with 2 cores, torch's OpenMP threads wait at every barrier for a preempted thread, so even
# a niced competitor slows a step far more than its CPU share suggests.
CONTAMINATED = 0.05
DATA_VERSION = 1  # bump when the generated data changes, so caches are rebuilt


# --------------------------------------------------------------------------- data


def _noisy_jpeg(image: Any, rng: Any, noise_std: float, quality: int) -> bytes:
    """JPEG bytes of ``image`` plus Gaussian pixel noise (texture like a photo's)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    arr = arr + rng.normal(0.0, noise_std, arr.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ensure_shards(cache_dir: Path, num_pairs: int, samples_per_shard: int, seed: int) -> Path:
    """The benchmark shards under ``cache_dir/shards``, written once and reused."""
    import numpy as np

    from clipline.data.builtin_data import generate_shapes
    from clipline.data.ingest import Sample
    from clipline.data.shards import write_samples

    out = cache_dir / "shards"
    spec = {
        "version": DATA_VERSION,
        "num_pairs": num_pairs,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "image_size": 256,
        "noise_std": 10.0,
        "jpeg_quality": 90,
    }
    marker = out / "bench_data.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    if out.exists():
        shutil.rmtree(out)  # our own cache folder, with other parameters
    tmp = cache_dir / "shards.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    print(f"writing {num_pairs} pairs into {out} ...", flush=True)
    rng = np.random.default_rng(seed)
    scenes = generate_shapes(num_pairs, seed=seed, image_size=spec["image_size"])
    samples = (
        Sample(
            key=f"shape{i:05d}",
            image=_noisy_jpeg(s.image, rng, spec["noise_std"], spec["jpeg_quality"]),
            caption=s.caption,
            meta={"shape": s.shape},
        )
        for i, s in enumerate(scenes)
    )
    report = write_samples(samples, tmp, samples_per_shard=samples_per_shard)
    if report.written != num_pairs:
        raise RuntimeError(f"wrote {report.written} of {num_pairs} pairs: {report.skipped}")
    (tmp / "bench_data.json").write_text(json.dumps(spec, indent=2) + "\n")
    tmp.rename(out)
    size_mb = sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20
    print(
        f"  {len(report.shards)} shards, {size_mb:.1f} MiB, {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------- children
# Each child is a fresh interpreter started with ``python -c``: both trainers start cold in
# the same way, and the open_clip patches never leak into this process.

_OPENCLIP_CHILD = textwrap.dedent(
    """
    import functools, sys
    import open_clip
    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    # webdataset 1.0.x yields an end-of-shard marker ({}) that open_clip's
    # group_by_keys_nothrow cannot group (KeyError: 'fname'; webdataset#384,
    # open_clip#935). Documented remedy: no marker. Patched here, in this process only;
    # dataloader workers are forked from it and inherit the patch.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    open_clip.add_model_config(sys.argv[1])
    from open_clip_train.main import main
    main(sys.argv[2:])
    """
)

_CLIPLINE_CHILD = textwrap.dedent(
    """
    import json, logging, os, sys
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import clipline.launch.run as run
    from clipline.launch.config import load_run_config

    # loop.compile's backend: gpu_check.py's CPU smoke takes dynamo's "eager" (no codegen).
    run.COMPILE_BACKEND = os.environ.get("CLIPLINE_BENCH_COMPILE_BACKEND", run.COMPILE_BACKEND)

    if sys.argv[3] == "in-memory":
        # The loop alone: the real loader delivers one batch, which is then fed again and
        # again from memory (no worker process competing for the cores).
        sys.path.insert(0, sys.argv[4])
        from fixed_batch import feed_one_batch

        feed_one_batch(run)

        # Where each step's time goes, timed inside this run: the model step
        # (contrastive_step, gradient clipping, optimizer step, zero_grad) and the rest,
        # which is the loop's own cost. Then, in this same process, pure steps on the
        # trained model and the same batch: no cross-process noise in the comparison.
        import statistics, time
        import torch
        import torch.nn.functional as F
        import clipline.pretrain.loop as loop
        import clipline.pretrain.periodic as periodic
        from accelerate import Accelerator
        from accelerate.optimizer import AcceleratedOptimizer
        spans = {"forward_backward": [], "clip": [], "optimizer": [], "zero_grad": []}
        step_ends, seen = [], {}

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                spans[name].append(time.perf_counter() - t)
                return out
            return wrapper

        real_step = loop.contrastive_step

        def contrastive_step(ddp_model, loss_fn, micro_batches, accelerator):
            seen.update(model=ddp_model, loss_fn=loss_fn, inputs=micro_batches,
                        accelerator=accelerator)  # fmt: skip
            return real_step(ddp_model, loss_fn, micro_batches, accelerator)

        real_opt_step = AcceleratedOptimizer.step

        def optimizer_step(self, *args, **kwargs):
            seen["optimizer"] = self
            return real_opt_step(self, *args, **kwargs)

        loop.contrastive_step = timed("forward_backward", contrastive_step)
        Accelerator.clip_grad_norm_ = timed("clip", Accelerator.clip_grad_norm_)
        AcceleratedOptimizer.step = timed("optimizer", optimizer_step)
        AcceleratedOptimizer.zero_grad = timed("zero_grad", AcceleratedOptimizer.zero_grad)

        real_progress = periodic.progress

        def progress(**kwargs):  # the loop's bar, marking the end of every step
            bar = real_progress(**kwargs)
            real_update = bar.update

            def update(n=1):
                step_ends.append(time.perf_counter())
                return real_update(n)

            bar.update = update
            return bar

        periodic.progress = progress

    cfg = load_run_config(sys.argv[1], json.loads(sys.argv[2]))
    run.run_pretrain(cfg)

    if sys.argv[3] == "in-memory":
        skip = cfg.loop.log_every
        steps = [b - a for a, b in zip(step_ends, step_ends[1:])]  # steps 2..N
        window = slice(skip, len(steps) - skip)  # steady state, as the windows
        parts = {k: v[1:][window] for k, v in spans.items()}
        model_step = [sum(p[i] for p in parts.values()) for i in range(len(steps[window]))]
        own = [t - m for t, m in zip(steps[window], model_step)]
        # The loop's model step against the pure step, on the trained model and the same
        # batch, in alternating blocks (a step's time drifts by several % over a minute).
        model, ((image, text),) = seen["model"], seen["inputs"]
        image = image.clone()  # the loop's buffer is reused; these steps keep their own
        loss_fn, accelerator, optimizer = seen["loss_fn"], seen["accelerator"], seen["optimizer"]
        labels = torch.arange(len(text))
        max_norm = cfg.optim.grad_clip_norm
        ab = {"loop model step": [], "pure step": []}
        for block in range(2 * 4):
            kind = "loop model step" if block % 2 == 0 else "pure step"
            for i in range(1 + 3):
                t0 = time.perf_counter()
                if kind == "pure step":
                    img_emb, txt_emb, scale = model(image, text)[:3]
                    logits = scale * img_emb.float() @ txt_emb.float().T
                    loss = 0.5 * (
                        F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
                    )
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    optimizer.optimizer.step()
                    optimizer.optimizer.zero_grad(set_to_none=True)
                else:
                    real_step(model, loss_fn, [(image, text)], accelerator)
                    accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if i >= 1:  # the first step of a block warms the allocator up
                    ab[kind].append(time.perf_counter() - t0)
        med = statistics.median
        print("BENCH_LOOP " + json.dumps({
            "step_ms": 1e3 * med(steps[window]),
            "model_step_ms": 1e3 * med(model_step),
            "own_ms": 1e3 * med(own),
            "own_mean_ms": 1e3 * sum(own) / len(own),
            "step_mean_ms": 1e3 * sum(steps[window]) / len(own),
            "parts_ms": {k: 1e3 * med(v) for k, v in parts.items()},
            "ab_ms": {k: 1e3 * med(v) for k, v in ab.items()},
            "steps_timed": len(own),
        }), flush=True)
    """
)

_PURE_CHILD = textwrap.dedent(
    """
    import io, json, statistics, sys, tarfile, time
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from clipline.pretrain.model import DualEncoder, ModelConfig

    from clipline.pretrain.host_memory import keep_freed_memory

    # As clipline's loop does when training on the CPU: the pure step is clipline's own.
    keep_freed_memory()
    name, shards, batch, warmup, steps = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
    bf16 = sys.argv[6] == "bf16"
    torch.manual_seed(0)
    # clipline's DualEncoder wraps the same open_clip CLIP that open_clip_train builds from
    # the same config; with full-context tokens its forward is open_clip's own.
    model = DualEncoder.from_config(ModelConfig(name=name)).train()

    # One fixed batch of real pairs from the benchmark shards, plus every caption for the
    # per-batch token lengths clipline trains with.
    members, captions = {}, []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.rsplit(".", 1)
                if ext in ("jpg", "txt"):
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
    pairs = [v for _, v in sorted(members.items())]
    captions = [v["txt"].decode() for v in pairs]
    preprocess = model.image_transform(is_train=True)
    image = torch.stack(
        [preprocess(Image.open(io.BytesIO(v["jpg"])).convert("RGB")) for v in pairs[:batch]]
    )
    texts = {
        "full": model.tokenizer(captions[:batch]),  # open_clip_train: the whole context
        "trimmed": model.tokenize(captions[:batch]),  # what clipline's stream feeds
    }
    lengths = [
        int(model.tokenize(captions[i : i + batch]).shape[1])
        for i in range(0, len(captions) - batch + 1, batch)
    ]
    # clipline's own optimizer (AdamW with CLIP's exemptions, torch's fused kernel): the
    # pure step is clipline's step without its loop. open_clip_train's AdamW runs torch's
    # per-tensor loop on CPU (~40 ms more per step for tiny-224): part of its "vs pure".
    from clipline.pretrain.optim import OptimConfig, build_optimizer
    opt = build_optimizer(
        model, OptimConfig(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    )
    labels = torch.arange(batch)
    times = {k: [] for k in texts}
    clip_times = []
    # Blocks (A B A B), each after its own warm-up steps: alternating every step would
    # churn the allocator between two activation sizes, which neither trainer does.
    blocks = [(kind, n) for n in (steps // 2, steps - steps // 2) for kind in texts]
    for kind, n in blocks:
        text = texts[kind]
        for i in range(warmup + n):
            t0 = time.perf_counter()
            # L2-normalised embeddings and exp(logit scale) first (a SigLIP bias may follow).
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                img_emb, txt_emb, scale = model(image, text)[:3]
            img_emb, txt_emb = img_emb.float(), txt_emb.float()  # the loss in fp32, as both
            logits = scale * img_emb @ txt_emb.T
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            loss.backward()
            t1 = time.perf_counter()
            # Both trainers clip (clipline always computes the norm; open_clip is run with
            # --grad-clip-norm 1.0): timed apart so the pure step stays forward + loss +
            # backward + AdamW.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i >= warmup:
                times[kind].append((t1 - t0) + (t3 - t2))
                clip_times.append(t2 - t1)
    print("BENCH_RESULT " + json.dumps({
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": times,
        "clip_s": clip_times,
        "text_len": {k: int(v.shape[1]) for k, v in texts.items()},
        "batch_text_len": lengths,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))
    """
)


def _cpu_busy_s() -> tuple[float, float]:
    """CPU-seconds all processes have been busy (all cores), and the niced part of it."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, nice / hz


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Waits (up to ``max_wait`` s) until other processes use < ``threshold`` of the CPUs.

    Another engineer's job on this 2-core machine halves a trainer's speed; measuring in a
    quiet moment beats averaging over the noise. Returns the last background share seen.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = _cpu_busy_s()[0], time.monotonic()
        time.sleep(2.0)
        share = (_cpu_busy_s()[0] - b0) / ((time.monotonic() - t0) * CPUS)
        if share < threshold or time.monotonic() >= deadline:
            return share
        print(f"  (machine busy: {100 * share:.0f}% of CPUs in use by others; waiting)", flush=True)
        time.sleep(8.0)


def _run_child(code: str, args: list[str], log_path: Path, timeout: float) -> tuple[str, dict]:
    """Runs ``python -c code args`` with output to ``log_path``.

    Returns:
        The output, and CPU accounting: ``own_cpu`` (the child's CPU-seconds per wall
        second, at most the core count), ``others_cpu`` (share of all cores that other
        processes used meanwhile: a measure of how contaminated the run is) and
        ``others_nice_cpu`` (the part of it from niced processes, which yield to ours).
    """
    cmd = [sys.executable, "-c", code, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    (busy0, nice0), own0, t0 = _cpu_busy_s(), _children_cpu_s(), time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=log_path.parent
        )
    wall = time.monotonic() - t0
    own = _children_cpu_s() - own0
    busy1, nice1 = _cpu_busy_s()
    others = max(0.0, busy1 - busy0 - own)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"child failed (exit {proc.returncode}), log {log_path}:\n{tail}")
    return text, {
        "own_cpu": own / wall,
        "others_cpu": others / (wall * CPUS),
        "others_nice_cpu": (nice1 - nice0) / (wall * CPUS),  # our children run un-niced
    }


def model_name(model: str) -> str:
    """The clipline model name: ``open_clip:<name>`` as given, a bare name is clipline's."""
    return (
        model if model.startswith("open_clip:") else f"clipline:{model.removeprefix('clipline:')}"
    )


def model_config_path(model: str, cache_dir: Path) -> Path:
    """The model's open_clip config file, registered with open_clip_train's process."""
    prefix, _, name = model_name(model).partition(":")
    if prefix == "open_clip":
        import open_clip

        config = open_clip.get_model_config(name)
        if config is None:
            raise SystemExit(f"open_clip has no model config {name!r}")
        path = cache_dir / "model_configs" / f"{name}.json"  # re-registers the same config
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return path
    path = Path(str(resources.files("clipline.pretrain") / "model_configs" / f"{name}.json"))
    if not path.is_file():
        raise SystemExit(f"no clipline model config {path}; --model takes a clipline:<name>")
    return path


# --------------------------------------------------------------------------- measurements


def _windows(step_times: list[float], batch: int, every: int) -> list[float]:
    """Samples/s of consecutive ``every``-step windows (a short last window is kept)."""
    out = []
    for i in range(0, len(step_times), every):
        chunk = step_times[i : i + every]
        out.append(batch * len(chunk) / sum(chunk))
    return out


_OC_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), "
    r"([\d.eE+-]+)/s, ([\d.eE+-]+)/s/gpu"
)


def run_open_clip(a: argparse.Namespace, shards: Path, cfg_path: Path, tag: str) -> dict:
    """One open_clip_train run; per-step figures parsed from its log lines."""
    logs = a.cache_dir / "runs"
    n_shards = len(sorted(shards.glob("*.tar")))
    argv = [
        "--train-data", str(shards / f"{{000000..{n_shards - 1:06d}}}.tar"),
        "--dataset-type", "webdataset",
        "--train-num-samples", str(a.steps * a.batch_size),
        "--batch-size", str(a.batch_size),
        "--workers", str(a.workers),
        "--epochs", "1",
        "--model", cfg_path.stem,
        "--precision", "amp_bf16" if a.precision == "bf16" else "fp32",
        "--device", a.device,
        "--lr", "1e-3", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", "2",
        "--grad-clip-norm", "1.0",  # clipline clips at 1.0 by default: same work per step
        "--log-every-n-steps", "1",
        "--save-frequency", "1",
        "--zeroshot-frequency", "0",
        "--val-frequency", "0",
        "--report-to", "",
        "--seed", "0",
        "--logs", str(logs),
        "--name", tag,
    ]  # fmt: skip
    t0 = time.perf_counter()
    text, cpu = _run_child(_OPENCLIP_CHILD, [str(cfg_path), *argv], logs / f"{tag}.log", a.timeout)
    wall = time.perf_counter() - t0
    rows = [
        (int(m[1]), float(m[2]), float(m[3]), float(m[4]))
        for m in map(_OC_LINE.search, text.splitlines())
        if m
    ]
    if len(rows) != a.steps:
        raise RuntimeError(f"parsed {len(rows)} of {a.steps} open_clip step lines in {tag}.log")
    sps = [r[3] for r in rows]
    step_times = [a.batch_size / s for s in sps]  # batch_time_m.val of each step
    k = a.log_every
    post = step_times[k:-k]  # steady state (module docstring)
    # Data (t) is a running average printed with 3 decimals: total data time over steps
    # k+1..n-k is (n-k)*avg_(n-k) - k*avg_k (error <= 0.0005*n s, well under 1% of the span).
    n = len(rows)
    data_post = (n - k) * rows[n - k - 1][1] - k * rows[k - 1][1]
    return {
        "trainer": "open_clip_train",
        "tag": tag,
        "wall_s": wall,
        "step_med": statistics.median(sps[k:-k]),
        "win_med": statistics.median(_windows(post, a.batch_size, k)),
        "mean": a.batch_size * len(post) / sum(post),
        "data_wait": data_post / sum(post),
        "per_step": sps,
        **cpu,
    }


def run_clipline(
    a: argparse.Namespace,
    shards: Path,
    tag: str,
    data: str = "stream",
    extra: tuple[str, ...] = (),
) -> dict:
    """One clipline run; per-window figures read from its metrics.jsonl.

    ``data="in-memory"`` feeds one real batch again and again: the loop without the loader.
    ``extra`` overrides come last (e.g. ``loop.compile=true``).
    """
    run_dir = a.cache_dir / "runs" / tag
    overrides = [
        f"data.shards={shards}",
        f"data.batch_size={a.batch_size}",
        f"data.workers={a.workers}",
        # Same samples per epoch as open_clip's --train-num-samples: one epoch, no
        # dataloader restart mid-run on either side.
        f"data.num_samples={a.steps * a.batch_size}",
        f"model.name={model_name(a.model)}",
        f"loop.mixed_precision={'bf16' if a.precision == 'bf16' else 'no'}",
        f"loop.steps={a.steps}",
        f"loop.log_every={a.log_every}",
        f"loop.checkpoint_every={10 * a.steps}",  # only the final save, after timing
        # Pinned to what open_clip_train is given, whatever the recipe's defaults become.
        "loss.kind=infonce",
        "optim.lr=1e-3",
        "optim.weight_decay=0.1",
        "optim.warmup_steps=2",
        "optim.grad_clip_norm=1.0",
        "optim.schedule=cosine",
        f"run_dir={run_dir}",
        *extra,
    ]
    log_path = a.cache_dir / "runs" / f"{tag}.log"
    t0 = time.perf_counter()
    child_args = ["cpu-debug", json.dumps(overrides), data, str(Path(__file__).resolve().parent)]
    text, cpu = _run_child(_CLIPLINE_CHILD, child_args, log_path, a.timeout)
    loop_line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_LOOP ")), None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/samples_per_s" in r]
    if not rows or rows[-1]["step"] != a.steps:
        raise RuntimeError(f"clipline run {tag} logged {[r['step'] for r in rows]}")
    post, prev_step = [], None
    for r in rows:
        steps_in_window = r["step"] - (prev_step or 0)
        prev_step = r["step"]
        elapsed = a.batch_size * steps_in_window / r["train/samples_per_s"]
        if a.log_every < r["step"] < a.steps:  # steady state (module docstring)
            post.append(
                (steps_in_window, elapsed, r["train/samples_per_s"], r["train/data_wait_share"])
            )
    total_t = sum(p[1] for p in post)
    return {
        "trainer": "clipline" if data == "stream" else "clipline, in-memory batch",
        "tag": tag,
        "wall_s": wall,
        "step_med": None,
        "win_med": statistics.median(p[2] for p in post),
        "mean": a.batch_size * sum(p[0] for p in post) / total_t,
        "data_wait": sum(p[1] * p[3] for p in post) / total_t,
        "per_window": [p[2] for p in post],
        **({"loop": json.loads(loop_line.removeprefix("BENCH_LOOP "))} if loop_line else {}),
        **cpu,
    }


def run_pure(a: argparse.Namespace, shards: Path, tag: str) -> list[dict]:
    """Pure model steps on one fixed batch: full-context text, and clipline's trimmed text."""
    # 2 warm-up steps before each block of pure_steps / 2 timed steps.
    args = [
        model_name(a.model),
        str(shards),
        str(a.batch_size),
        "2",
        str(a.pure_steps),
        a.precision,
    ]
    log_path = a.cache_dir / "runs" / f"{tag}.log"
    text, cpu = _run_child(_PURE_CHILD, args, log_path, a.timeout)
    line = next(ln for ln in text.splitlines() if ln.startswith("BENCH_RESULT "))
    res = json.loads(line.removeprefix("BENCH_RESULT "))
    out = []
    for kind, step_s in res["step_s"].items():
        out.append(
            {
                "trainer": f"pure step, {kind} text",
                "tag": tag,
                "text_len": res["text_len"][kind],
                "step_med": a.batch_size / statistics.median(step_s),
                "win_med": statistics.median(_windows(step_s, a.batch_size, a.log_every)),
                "mean": a.batch_size * len(step_s) / sum(step_s),
                "clip_ms": 1000 * statistics.median(res["clip_s"]),
                "batch_text_len": res["batch_text_len"],
                "params_m": res["params_m"],
                "threads": res["threads"],
                "torch": res["torch"],
                **cpu,
            }
        )
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def clipline_version() -> str:
    """HEAD commit of the clipline checkout, and which files differ from it."""
    import clipline

    root = Path(clipline.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h %cI %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


# --------------------------------------------------------------------------- report


def _median(results: list[dict], key: str) -> float | None:
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(a: argparse.Namespace, results: list[dict]) -> tuple[str, dict]:
    """The table, and its figures; each trainer is set against the pure step doing its work.

    open_clip_train feeds the whole context (77 tokens) to the text tower; clipline cuts each
    batch after its longest caption when that is exact, so its text tower does less work
    per sample and its pure step is the one with trimmed text.
    """
    names = (
        "pure step, full text",
        "pure step, trimmed text",
        "open_clip_train",
        "clipline",
        "clipline, in-memory batch",
    )
    by = {name: [r for r in results if r["trainer"] == name] for name in names}
    by = {name: rs for name, rs in by.items() if rs}
    pure = {
        "open_clip_train": _median(by["pure step, full text"], "step_med"),
        "clipline": _median(by["pure step, trimmed text"], "step_med"),
        "clipline, in-memory batch": _median(by["pure step, trimmed text"], "step_med"),
    }
    summary: dict[str, Any] = {}
    lines = [
        f"{'':<32} {'runs':>4} {'win_med':>7} {'step_med':>8} {'mean':>6} "
        f"{'vs pure':>7} {'ms/step':>7} {'data_wait':>9} {'others':>6}  per run",
    ]
    for name, rs in by.items():
        win, step, mean = _median(rs, "win_med"), _median(rs, "step_med"), _median(rs, "mean")
        wait = _median(rs, "data_wait")
        others = f"{100 * max(r['others_cpu'] for r in rs):.0f}%"
        if name.startswith("pure"):
            extra = ms = "-"
            per_run = "step_med " + ", ".join(f"{r['step_med']:.1f}" for r in rs)
            label = f"{name} ({rs[0]['text_len']} tok)"
        else:
            # Time per step the loop adds over its pure step, from the median window figure.
            extra = f"{100 * (pure[name] / win - 1):+.0f}%"
            ms = f"{1000 * a.batch_size * (1 / win - 1 / pure[name]):+.0f}"
            per_run = "win_med " + ", ".join(f"{r['win_med']:.1f}" for r in rs)
            label = name
        step_s = f"{step:.1f}" if step is not None else "-"
        wait_s = f"{100 * wait:.1f}%" if wait is not None else "-"
        summary[name] = {"win_med": win, "step_med": step, "mean": mean, "data_wait": wait}
        lines.append(
            f"{label:<32} {len(rs):>4} {win:>7.1f} {step_s:>8} {mean:>6.1f} {extra:>7} "
            f"{ms:>7} {wait_s:>9} {others:>6}  {per_run}"
        )
    inmem = [r["loop"] for r in by.get("clipline, in-memory batch", []) if "loop" in r]
    if inmem:
        # The goal's measure: what the loop adds to its own model step, both timed in the
        # same steps of the same process (no cross-process noise).
        own = _median(inmem, "own_ms")
        model_step = _median(inmem, "model_step_ms")
        parts = {
            k: statistics.median(r["parts_ms"][k] for r in inmem) for k in inmem[0]["parts_ms"]
        }
        summary["loop_own_share"] = own / model_step
        summary["loop_in_process"] = inmem
        lines.append(
            f"in-memory runs, timed inside the loop (medians over {inmem[0]['steps_timed']} "
            f"steady steps x {len(inmem)} runs): step {_median(inmem, 'step_ms'):.1f} ms = model "
            f"step {model_step:.1f} ms ("
            + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            + f") + the loop's own {own:.1f} ms (**{100 * own / model_step:+.1f}%** over its "
            f"model step; means: {100 * statistics.median(r['own_mean_ms'] / (r['step_mean_ms'] - r['own_mean_ms']) for r in inmem):+.1f}%). "
            "After the run, in the same process, alternating blocks on the trained model "
            "and the same batch: "
            + ", ".join(
                f"{k} {statistics.median(r['ab_ms'][k] for r in inmem):.1f} ms"
                for k in inmem[0]["ab_ms"]
            )
            + "."
        )
    c, o = summary["clipline"], summary["open_clip_train"]
    ratio = c["win_med"] / o["win_med"]
    ratio_mean = c["mean"] / o["mean"]
    summary["ratio_win_med"], summary["ratio_mean"] = ratio, ratio_mean
    lines.append(
        f"ratio clipline / open_clip_train: {ratio:.3f} (window medians), {ratio_mean:.3f} (means)"
    )
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--model",
        default="tiny-224",
        help="a clipline model config name (tiny-224) or open_clip:<name> (open_clip:ViT-S-32)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--loop-only",
        action="store_true",
        help="also run clipline on one in-memory batch: the loop's own cost over the pure step",
    )
    p.add_argument("--workers", type=int, default=1, help="dataloader workers, both trainers")
    p.add_argument("--repeats", type=int, default=2, help="runs per trainer, alternating")
    p.add_argument(
        "--log-every",
        type=int,
        default=5,
        help="window size; the first and last window of each run are left out",
    )
    p.add_argument(
        "--pure-steps", type=int, default=16, help="timed pure steps per run and text length"
    )
    # At least steps x batch: an exact epoch reads each sample at most once (both trainers).
    p.add_argument("--num-pairs", type=int, default=3000)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/clipline-bench"))
    p.add_argument("--timeout", type=float, default=900, help="seconds per child run")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="before each run, wait up to this many seconds for other jobs to leave the CPUs",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"re-measure a run during which other processes used > {100 * CONTAMINATED:.0f}%% "
        "of the CPUs, at most this many times",
    )
    p.add_argument("--device", default="cpu", help="open_clip_train's --device (cuda on a GPU)")
    p.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    a = p.parse_args(argv)
    if a.steps % a.log_every or a.steps < 4 * a.log_every:
        p.error("--steps must be a multiple of --log-every and at least 4 windows long")
    if a.steps * a.batch_size > a.num_pairs:
        p.error("--num-pairs must be at least --steps x --batch-size (one exact epoch)")
    if a.steps % max(a.workers, 1):
        p.error("--steps must be a multiple of --workers (open_clip rounds batches per worker up)")

    a.cache_dir = a.cache_dir.resolve()
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    shards = ensure_shards(a.cache_dir, a.num_pairs, a.samples_per_shard, a.seed)
    cfg_path = model_config_path(a.model, a.cache_dir)
    runs = a.cache_dir / "runs"
    if runs.exists():
        shutil.rmtree(runs)  # logs and checkpoints of an earlier invocation
    runs.mkdir()

    results: list[dict] = []
    discarded: list[dict] = []

    def record(res: dict) -> None:
        results.append(res)
        extra = f", data wait {100 * res['data_wait']:4.1f}%" if "data_wait" in res else ""
        wall = f", {res['wall_s']:3.0f} s wall" if "wall_s" in res else ""
        print(
            f"  {res['tag']:<10} {res['trainer']:<23} win_med {res['win_med']:5.1f}  "
            f"mean {res['mean']:5.1f} samples/s{extra}{wall}; CPUs used by others "
            f"{100 * res['others_cpu']:.0f}% ({100 * res['others_nice_cpu']:.0f}% niced; "
            f"before the run {100 * res['background']:.0f}%)",
            flush=True,
        )
        if res["contaminated"]:
            print("    warning: other processes competed for the CPUs during this run", flush=True)

    def measure(fn, *args, tag: str, **kwargs) -> None:
        for attempt in range(a.retries + 1):
            background = wait_for_quiet(a.quiet_wait)
            # A fresh name per attempt: open_clip refuses an existing experiment name, and
            # clipline would append to the old metrics.jsonl.
            out = fn(*args, f"{tag}-retry{attempt}" if attempt else tag, **kwargs)
            out = out if isinstance(out, list) else [out]
            for res in out:
                res["background"] = background
                res["contaminated"] = res["others_cpu"] > CONTAMINATED
            if not out[0]["contaminated"] or attempt == a.retries:
                break
            print(
                f"    discarded: other processes used {100 * out[0]['others_cpu']:.0f}% of the "
                "CPUs during the run; measuring again",
                flush=True,
            )
            discarded.extend(out)
        for res in out:
            record(res)

    version = clipline_version()
    print(
        f"model {model_name(a.model)} ({cfg_path}), batch {a.batch_size}, {a.precision}, "
        f"{a.steps} steps, "
        f"{a.workers} worker(s), {a.repeats} repeats, {os.cpu_count()} CPUs ({cpu_model()})\n"
        f"clipline {version}",
        flush=True,
    )
    measure(run_pure, a, shards, tag="pure-0")
    for r in range(a.repeats):
        order = ("open_clip", "clipline") if r % 2 == 0 else ("clipline", "open_clip")
        for which in order:
            if which == "open_clip":
                measure(run_open_clip, a, shards, cfg_path, tag=f"openclip-{r}")
            else:
                measure(run_clipline, a, shards, tag=f"clipline-{r}")
        if a.loop_only:
            measure(run_clipline, a, shards, tag=f"inmem-{r}", data="in-memory")
    measure(run_pure, a, shards, tag="pure-1")

    table, summary = summarize(a, results)
    pure_runs = [r for r in results if r["trainer"].startswith("pure")]
    lengths = pure_runs[0]["batch_text_len"]
    print()
    print(
        f"samples/s, {a.precision}, batch {a.batch_size}, {model_name(a.model)} "
        f"({pure_runs[0]['params_m']:.1f} M params), {a.workers} loader worker(s); steady "
        f"state: first and last {a.log_every} steps of each run left out.\n"
        f"Grad clipping adds {statistics.median(r['clip_ms'] for r in pure_runs):.0f} ms/step "
        "(not in the pure step). Text tokens per batch after clipline's trimming on these "
        f"captions: median {statistics.median(lengths):.0f}, max {max(lengths)} "
        "(open_clip_train: always the full context)."
    )
    print(table)
    print(f"total {time.perf_counter() - t_start:.0f} s; logs under {runs}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "date": dt.datetime.now().isoformat(timespec="seconds"),
                    "argv": sys.argv,
                    "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
                    "args": {k: str(v) for k, v in vars(a).items()},
                    "clipline": version,
                    "summary": summary,
                    "runs": results,
                    "discarded_runs": discarded,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
