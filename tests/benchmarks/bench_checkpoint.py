"""One checkpoint save of open_clip ViT-B-32 on 2 gloo ranks: memory and time (issue 13, item 4).

Not a test (pytest does not collect it). Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_checkpoint.py              # ~3-5 min, ~10 GB RAM
    .venv/bin/python tests/benchmarks/bench_checkpoint.py --wrap fsdp  # FSDP2 on the CPU ranks
    .venv/bin/python tests/benchmarks/bench_checkpoint.py --model ViT-S-32 --repeats 1  # smoke

Each mode runs in fresh torchrun processes (2 CPU ranks, gloo, DDP through Accelerate as
``clipline pretrain`` does; ``--wrap fsdp``: FSDP2, each rank holding half of the state). Each rank builds the model (random init), takes one AdamW step on
a batch of 2 so that the optimizer state exists (weights + two moments: ~1.8 GB per rank for
ViT-B-32), then saves one checkpoint:

* ``sharded``: what clipline does now, :func:`clipline.pretrain.checkpoint.save_checkpoint`:
  DCP, each rank writes its own part, rank 0 commits (rename) after ``.metadata``;
* ``async``: the same through :class:`~clipline.pretrain.checkpoint.AsyncCheckpointWriter`
  (``loop.async_checkpoint``): "blocking" is what a training step waits for (the copy of the
  rank's state to host memory), "until committed" the time until rank 0's rename;
* ``full``: the former path (clipline before issue 13), written here and not in the product:
  ``get_model_state_dict``/``get_optimizer_state_dict`` with
  ``StateDictOptions(full_state_dict=True, cpu_offload=True)`` on every rank, then rank 0
  writes ``model.safetensors`` and ``torch.save``\\ s the optimizer state, fsyncs, renames.

Peak host memory per rank: the kernel's high-water mark of the process's resident set
(``VmHWM`` in ``/proc/self/status``), reset to the current RSS right before the save by
writing ``5`` to ``/proc/self/clear_refs``; the figure is that peak minus the RSS before the
save (after ``malloc_trim``, so that heap the step freed is not reused unseen), so it is
what the save itself costs, not the model build or the training step. Wall
time is measured between barriers on rank 0. Files are fsynced (DCP's writer and clipline's
commit; the former path too), so the times include the disk.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "sharded", "async")


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> int:
    """Resets VmHWM to the current RSS; returns that RSS (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _save_full(model, optimizer, out: Path) -> None:
    """The former checkpoint: full state gathered to rank 0's CPU, two files, rename."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:
        tmp, final = out / "step_000000001.tmp", out / "step_000000001"
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()},
            tmp / "model.safetensors",
        )
        torch.save(optim, tmp / "optimizer.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    del weights, optim
    dist.barrier()


def _release_freed_heap() -> None:
    """Returns freed heap pages to the OS, so that the save's peak is not hidden in memory
    the training step freed (gradients) but malloc kept resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta may then be understated
        pass


def worker(mode: str, model_name: str, wrap: str, out: Path, result: Path) -> None:
    """One rank: build, one step, one save; rank 0 writes every rank's figures to ``result``."""
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from clipline.pretrain.checkpoint import (
        AsyncCheckpointWriter,
        save_checkpoint,
        training_state,
    )
    from clipline.pretrain.loss import InfoNCELoss, LossConfig
    from clipline.pretrain.model import DualEncoder, ModelConfig
    from clipline.pretrain.optim import OptimConfig, build_optimizer

    if wrap == "fsdp":  # FSDP2 on CPU ranks, as tests/dist/train_fsdp.py runs it
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.helpers import fsdp_on_cpu_accelerator

        accelerator = fsdp_on_cpu_accelerator()()
    else:
        accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = DualEncoder.from_config(ModelConfig(name=f"open_clip:{model_name}"))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=1, weight_decay=0.1))
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    size = model.clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(2, 3, size, size)
    texts = torch.randint(1, 49406, (2, model.clip.context_length))
    img, txt, scale, bias = ddp_model(images, texts)
    accelerator.backward(InfoNCELoss(LossConfig())(img, txt, scale, bias))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del img, txt, scale, bias
    gc.collect()
    _release_freed_heap()
    params = sum(p.numel() for p in model.parameters())

    writer = AsyncCheckpointWriter() if mode == "async" else None
    dist.barrier()
    rss = _reset_peak()
    t0 = time.perf_counter()
    if mode == "full":
        _save_full(ddp_model, optimizer, out)
        blocking = time.perf_counter() - t0
        peak_blocking = _status_kib("VmHWM")
    else:
        kwargs = dict(
            step=1, states=training_state(ddp_model, optimizer), state={}, config={}, keep_last=0
        )
        if writer is None:
            save_checkpoint(out, **kwargs)
        else:
            writer.start(out, **kwargs)
            dist.barrier()  # the slower rank's copy is what the step waits for
        blocking = time.perf_counter() - t0
        peak_blocking = _status_kib("VmHWM")
        if writer is not None:
            writer.wait()
            dist.barrier()
    committed = time.perf_counter() - t0
    figures = {
        "rank": dist.get_rank(),
        "params": params,
        "rss_before_mib": rss / 1024,
        "peak_delta_blocking_mib": (peak_blocking - rss) / 1024,
        "peak_delta_mib": (_status_kib("VmHWM") - rss) / 1024,
        "blocking_s": blocking,
        "committed_s": committed,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    if dist.get_rank() == 0:
        files = [p for p in out.rglob("*") if p.is_file()]
        disk = sum(p.stat().st_size for p in files) / 2**20
        result.write_text(json.dumps({"ranks": gathered, "disk_mib": disk}))
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _launch(mode: str, args: argparse.Namespace, repeat: int) -> dict:
    out = Path(args.out) / f"{mode}_{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = out.with_suffix(".json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        __file__,
        "--worker",
        mode,
        "--model",
        args.model,
        "--wrap",
        args.wrap,
        "--out",
        str(out / "checkpoints"),
        "--result",
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on the 2 cores
    load = _loadavg()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    figures = json.loads(result.read_text())
    figures["loadavg"] = max(load, _loadavg())
    shutil.rmtree(out)
    result.unlink()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip config name")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {MODES}")
    parser.add_argument("--repeats", type=int, default=2, help="fresh launches per mode")
    parser.add_argument(
        "--wrap",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="DDP (each rank holds the full state) or FSDP2 on the CPU ranks (each holds half)",
    )
    parser.add_argument("--out", default="/tmp/clipline-bench/checkpoint")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.wrap, Path(args.out), Path(args.result))
        return
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        for mode in modes:  # interleaved: a load change touches every mode alike
            runs[mode].append(_launch(mode, args, repeat))
            r = runs[mode][-1]
            print(
                f"{mode} #{repeat + 1}: committed {r['ranks'][0]['committed_s']:.2f} s, "
                f"load {r['loadavg']:.1f}",
                file=sys.stderr,
            )

    def med(mode: str, key: str, rank: int) -> float:
        return statistics.median(r["ranks"][rank][key] for r in runs[mode])

    params = runs[modes[0]][0]["ranks"][0]["params"]
    print(
        f"\none checkpoint save, open_clip {args.model} ({params / 1e6:.1f} M parameters, AdamW "
        f"state after one step), 2 gloo ranks ({args.wrap.upper()}), median of {args.repeats} fresh launches"
    )
    header = (
        "| mode | training blocked (s) | until committed (s) | peak RSS delta rank 0 / 1 (MiB) "
        "| RSS before rank 0 (MiB) | on disk (MiB) |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    names = {
        "full": "full gather to rank 0 (former)",
        "sharded": "DCP sharded (now)",
        "async": "DCP sharded, async",
    }
    for mode in modes:
        peaks = " / ".join(f"{med(mode, 'peak_delta_mib', r):.0f}" for r in (0, 1))
        if mode == "async":
            blocked = " / ".join(f"{med(mode, 'peak_delta_blocking_mib', r):.0f}" for r in (0, 1))
            peaks += f" (while blocked: {blocked})"
        disk = statistics.median(r["disk_mib"] for r in runs[mode])
        print(
            f"| {names[mode]} | {med(mode, 'blocking_s', 0):.2f} | {med(mode, 'committed_s', 0):.2f} "
            f"| {peaks} | {med(mode, 'rss_before_mib', 0):.0f} | {disk:.0f} |"
        )
    loads = [r["loadavg"] for rs in runs.values() for r in rs]
    print(
        f"\nload average (1 min) around the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
