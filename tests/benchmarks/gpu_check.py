"""GPU check: one script, one table, for the day a GPU machine is lent (one H100, <= 8 min).

Not a test (pytest does not collect it); ``tests/test_gpu_check.py`` runs its CPU smoke.
Run from the repository root, through the shell wrapper (it picks the repo's .venv):

    bash tests/benchmarks/gpu_check.sh                # on the GPU machine: ~6-8 min on an H100
    bash tests/benchmarks/gpu_check.sh --cpu-smoke    # anywhere: tiny sizes, < 2 min on 2 CPUs

Nothing is downloaded: the script writes its own shards with clipline's writer
(``bench_train.ensure_shards``) and every model is randomly initialised. The parts, each in
fresh processes under its own time budget (a part that fails or runs out of time prints
FAILED in its cells, and its error tail below the table; the others go on). On the GPU they
run one at a time; the CPU smoke runs them in two lanes side by side, using both cores:

1. ``open_clip_train``: open_clip ``ViT-B-16``, bf16 (``--precision amp_bf16``), samples/s
   from its per-step log lines, exactly as ``bench_train.py`` runs it offline; its MFU from
   the FLOPs clipline counts for the same model at the full 77-token context it feeds.
2. clipline on the same shards, model, batch, precision, loader workers and samples per
   epoch (``bench_train.run_clipline``): samples/s and MFU from its ``metrics.jsonl``.
   clipline's MFU counts the text tower at the trimmed caption lengths it really runs.
3. the same with ``loop.compile=true`` (Inductor; the compile itself falls in the first,
   left-out window; the CPU smoke uses dynamo's ``eager`` backend: the same plumbing
   without minutes of code generation).
4. FSDP2 on one GPU: ``accelerate launch --config_file launch/accelerate/fsdp.yaml
   --num_processes 1 -m clipline pretrain ...`` for a few steps with a checkpoint, then
   the same launch with ``--resume latest`` and more steps. Checked: the model really was
   wrapped by ``fully_shard``, the second launch resumed from the first one's checkpoint
   and reached its last step. (On a CPU, Accelerate never turns FSDP on; the smoke puts
   ``tests.helpers.fsdp_on_cpu_accelerator`` in place, as tests/dist/train_fsdp.py does.)
5. loader samples/s with 8 workers, 224-px JPEGs to 224-px batches: clipline's stream and
   open_clip's ``get_wds_dataset`` (``bench_loader.py``).
6. zero-shot evaluation images/s, full evaluator (read, decode, preprocess, forward,
   classify) and the pure forward on ready batches (``bench_eval.py --part zeroshot``).

Record the GPU figures in tests/benchmarks/RESULTS.md with the date, card and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # bench_train, bench_loader, bench_eval

import bench_train  # noqa: E402

# Each setting as (GPU, CPU smoke). The GPU side fits 8 minutes on one H100 (ViT-B-16 bf16
# steps take ~0.1 s at batch 128; process start-up, shards and the compile dominate); the
# smoke is the same code path at sizes a 2-core CPU runs in about a minute.
SETTINGS: dict[str, tuple[Any, Any]] = {
    "model": ("open_clip:ViT-B-16", "tiny"),  # tiny: clipline:tiny, 64 px
    "precision": ("bf16", "fp32"),
    "batch": (128, 8),
    "steps": (48, 4),
    "log_every": (8, 1),
    "workers": (8, 2),
    "samples_per_shard": (256, 16),
    "compile_backend": ("inductor", "eager"),
    "fsdp_steps": ((10, 20), (2, 4)),
    "loader": (
        {"pairs": 1024, "warmup": 5, "batches": 30},
        {"pairs": 32, "warmup": 1, "batches": 2},
    ),
    "eval": (
        {"images": 1024, "batch": 256, "workers": 8, "repeats": 2},
        {"images": 16, "batch": 8, "workers": 0, "repeats": 1},
    ),
    "total_s": (465, 900),  # the parts; start-up and the table fit in the rest of 8 min
}
# Seconds each part may take at most, (GPU, CPU smoke); on the GPU they add up to total_s.
BUDGET_S = {
    "shards": (45, 60),
    "open_clip_train": (60, 90),
    "clipline": (60, 90),
    "compile": (120, 120),
    "fsdp": (90, 120),
    "loader": (45, 90),
    "eval": (45, 90),
}

# (row label, (part filling the clipline cell, part filling the peer cell), peer's name).
ROWS = [
    ("train samples/s", ("clipline", "open_clip_train"), "open_clip_train"),
    ("train MFU", ("clipline", "open_clip_train"), "open_clip_train"),
    ("train samples/s, loop.compile=true", ("compile", None), ""),
    ("train MFU, loop.compile=true", ("compile", None), ""),
    ("FSDP2 1 GPU: train + checkpoint, samples/s", ("fsdp", None), ""),
    ("FSDP2 1 GPU: --resume latest", ("fsdp", None), ""),
    ("loader samples/s, 8 workers, 224 px", ("loader", "loader"), "get_wds_dataset"),
    ("zero-shot eval images/s", ("eval", "eval"), "pure forward"),
]


def _tail(text: str, lines: int = 25) -> str:
    """The last lines, after any error lines from before them (a launcher's traceback
    would otherwise bury the child's one-line ``error:``)."""
    all_lines = text.strip().splitlines()
    errors = [ln for ln in all_lines[:-lines] if "error:" in ln.lower()][-3:]
    return "\n".join([*errors, *all_lines[-lines:]])


def _run(cmd: list[str], timeout: float, log: Path) -> str:
    """Runs ``cmd`` from the repository root; its output goes to ``log`` and is returned."""
    # PYTHONPATH: the FSDP child imports tests.helpers on a CPU.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        # A session of its own: on a timeout the whole tree goes (launcher, ranks, workers),
        # not just the launcher, so the next part gets the GPU and the cores.
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            text = log.read_text(errors="replace")
            raise TimeoutError(
                f"{' '.join(cmd[:6])} ... over {timeout:.0f} s:\n{_tail(text)}"
            ) from None
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exit {proc.returncode}:\n{_tail(text)}")
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steady(rows: list[dict], key: str, log_every: int, steps: int) -> float | None:
    """Median of ``key`` over the windows after the first and before the last one."""
    vals = [r[key] for r in rows if key in r and log_every < r["step"] < steps]
    return statistics.median(vals) if vals else None


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/samples_per_s" in r]


class Check:
    """The parts, their figures, and the table."""

    def __init__(self, a: argparse.Namespace) -> None:
        side = int(a.cpu_smoke)
        self.a, self.p = a, {k: v[side] for k, v in SETTINGS.items()}
        self.budget_s = {k: v[side] for k, v in BUDGET_S.items()}
        self.cache = a.cache_dir.resolve()
        self.runs = self.cache / "runs"
        self.cells: dict[tuple[str, str], str] = {}
        self.errors: list[tuple[str, str]] = []
        self.walls: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.device = "cpu" if a.cpu_smoke else "cuda"
        self.peak = a.peak_tflops if a.peak_tflops else (1.0 if a.cpu_smoke else None)
        # The namespace bench_train's runners read (see ns).
        self._ns = argparse.Namespace(
            cache_dir=self.cache,
            steps=self.p["steps"],
            batch_size=self.p["batch"],
            workers=self.p["workers"],
            precision=self.p["precision"],
            log_every=self.p["log_every"],
            model=self.p["model"],
            device=self.device,
            timeout=60.0,
        )
        self.shards: Path | None = None
        self._lane = threading.local()

    @property
    def ns(self) -> argparse.Namespace:
        """The namespace bench_train's runners read: each lane's own copy, whose timeout is
        the budget of the part that lane is running."""
        if not hasattr(self._lane, "ns"):
            self._lane.ns = argparse.Namespace(**vars(self._ns))
        return self._lane.ns

    # ------------------------------------------------------------------ framework

    def part(self, name: str, fn) -> None:
        left = self.p["total_s"] - (time.monotonic() - self.t0)
        budget = min(self.budget_s[name], left)
        print(f"[{time.monotonic() - self.t0:5.0f} s] {name} (budget {budget:.0f} s)", flush=True)
        t = time.monotonic()
        try:
            if budget < 5:
                raise TimeoutError(f"no time left of the {self.p['total_s']} s total")
            self.ns.timeout = budget
            fn(budget)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a FAILED cell
            self.errors.append((name, f"{type(exc).__name__}: {_tail(str(exc))}"))
            print(f"  {name} FAILED: {type(exc).__name__}", flush=True)
        self.walls[name] = time.monotonic() - t

    def lane(self, parts: list[tuple[str, Any]]) -> None:
        """Runs ``parts`` (name, method) one after the other."""
        for name, fn in parts:
            self.part(name, fn)

    def set(self, row: str, col: str, value: str) -> None:
        self.cells[(row, col)] = value

    # ------------------------------------------------------------------ parts

    def make_shards(self, budget: float) -> None:
        pairs = self.p["steps"] * self.p["batch"]  # one exact epoch for both trainers
        self.shards = bench_train.ensure_shards(self.cache, pairs, self.p["samples_per_shard"], 0)

    def _peak(self) -> float | None:
        if self.peak is not None or self.device != "cuda":
            return self.peak
        import torch

        from clipline.pretrain.flops import peak_tflops

        return peak_tflops(torch.device("cuda"), self.p["precision"])

    def open_clip_train(self, budget: float) -> None:
        assert self.shards is not None, "no shards (the shards part failed)"
        cfg_path = bench_train.model_config_path(self.p["model"], self.cache)
        res = bench_train.run_open_clip(self.ns, self.shards, cfg_path, "open_clip_train")
        self.set("train samples/s", "peer", f"{res['win_med']:.1f}")
        # open_clip_train feeds the whole context: its FLOPs per sample at that length.
        from clipline.pretrain.flops import count_model_flops
        from clipline.pretrain.model import DualEncoder, ModelConfig

        model = DualEncoder.from_config(ModelConfig(name=bench_train.model_name(self.p["model"])))
        per_sample = count_model_flops(model).train_step([(1, model.context_length)])
        peak = self._peak()
        mfu = res["win_med"] * per_sample / 1e12 / peak if peak else None
        self.set("train MFU", "peer", f"{100 * mfu:.1f}%" if mfu is not None else "-")

    def _clipline(self, tag: str, extra: tuple[str, ...]) -> tuple[float, float | None]:
        assert self.shards is not None, "no shards (the shards part failed)"
        peak = self._peak()
        extra = (*extra, *([f"loop.peak_tflops={peak}"] if self.peak else []))
        res = bench_train.run_clipline(self.ns, self.shards, tag, extra=extra)
        rows = _metrics(self.runs / tag)
        return res["win_med"], _steady(rows, "train/mfu", self.p["log_every"], self.p["steps"])

    def clipline(self, budget: float) -> None:
        sps, mfu = self._clipline("clipline", ())
        self.set("train samples/s", "clipline", f"{sps:.1f}")
        self.set("train MFU", "clipline", f"{100 * mfu:.1f}%" if mfu is not None else "-")

    def compile(self, budget: float) -> None:
        extra: tuple[str, ...] = ("loop.compile=true",)
        backend = self.p["compile_backend"]
        os.environ["CLIPLINE_BENCH_COMPILE_BACKEND"] = backend
        try:
            sps, mfu = self._clipline("clipline-compile", extra)
        finally:
            del os.environ["CLIPLINE_BENCH_COMPILE_BACKEND"]
        self.set("train samples/s, loop.compile=true", "clipline", f"{sps:.1f}")
        self.set(
            "train MFU, loop.compile=true",
            "clipline",
            f"{100 * mfu:.1f}%" if mfu is not None else "-",
        )
        self.set("train samples/s, loop.compile=true", "note", f"backend {backend}")

    def fsdp(self, budget: float) -> None:
        assert self.shards is not None, "no shards (the shards part failed)"
        run_dir = self.runs / "fsdp"
        first, second = self.p["fsdp_steps"]
        deadline = time.monotonic() + budget

        def launch(steps: int, *resume: str) -> dict:
            cmd = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(REPO / "launch/accelerate/fsdp.yaml"),
                "--num_processes", "1",
                "--main_process_port", str(_free_port()),
                str(Path(__file__).resolve()), "--fsdp-child",
                "pretrain", "--recipe", "cpu-debug", *resume,
                f"data.shards={self.shards}",
                f"data.batch_size={self.p['batch']}",
                f"data.workers={self.p['workers']}",
                f"model.name={bench_train.model_name(self.p['model'])}",
                f"loop.mixed_precision={'bf16' if self.p['precision'] == 'bf16' else 'no'}",
                f"loop.steps={steps}",
                "optim.warmup_steps=1",  # a short run still needs steps after the warm-up
                f"loop.log_every={max(1, first // 2)}",
                f"loop.checkpoint_every={first}",
                f"run_dir={run_dir}",
            ]  # fmt: skip
            log = self.runs / f"fsdp-{steps}.log"
            text = _run(cmd, deadline - time.monotonic(), log)
            line = next((ln for ln in text.splitlines() if ln.startswith("FSDP_CHECK ")), None)
            if line is None:
                raise RuntimeError(f"no FSDP_CHECK line in {log}:\n{_tail(text)}")
            check = json.loads(line.removeprefix("FSDP_CHECK "))
            if not check["fully_sharded"]:
                raise RuntimeError(f"the model was not wrapped by fully_shard: {check}")
            return check

        t = time.monotonic()
        launch(first)
        wall = time.monotonic() - t
        from clipline.pretrain.checkpoint import checkpoint_step, list_checkpoints

        ckpts = [checkpoint_step(c) for c in list_checkpoints(run_dir)]
        if first not in ckpts:
            raise RuntimeError(f"no checkpoint of step {first} in {run_dir}: steps {ckpts}")
        sps = statistics.median(r["train/samples_per_s"] for r in _metrics(run_dir))
        self.set("FSDP2 1 GPU: train + checkpoint, samples/s", "clipline", f"{sps:.1f}")
        self.set(
            "FSDP2 1 GPU: train + checkpoint, samples/s",
            "note",
            f"{first} steps + save, {wall:.0f} s wall",
        )
        t = time.monotonic()
        check = launch(second, "--resume", "latest")
        wall = time.monotonic() - t
        # Both launches append to one metrics.jsonl: resumed, its steps go on from the
        # checkpoint's; started afresh, they would begin again at the first window.
        steps = [r["step"] for r in _metrics(run_dir)]
        if steps != sorted(set(steps)) or steps[-1] != second:
            raise RuntimeError(f"the second launch did not resume at step {first}: {steps}")
        self.set("FSDP2 1 GPU: --resume latest", "clipline", "ok")
        self.set(
            "FSDP2 1 GPU: --resume latest",
            "note",
            f"{check['type']}, step {first} -> {second}, {wall:.0f} s wall",
        )

    def loader(self, budget: float) -> None:
        lp = self.p["loader"]
        out = self.runs / "loader.json"
        cmd = [
            sys.executable, str(HERE / "bench_loader.py"),
            "--sizes", "224", "--workers", "8", "--repeats", "1",
            "--batch-size", str(self.p["batch"]),
            "--pairs", str(lp["pairs"]), "--warmup", str(lp["warmup"]),
            "--batches", str(lp["batches"]),
            "--loaders", "open_clip", "clipline",
            "--memory-samples", "0",
            "--cache-dir", str(self.cache / "loader"),
            "--timeout", str(budget), "--json", str(out),
        ]  # fmt: skip
        _run(cmd, budget, self.runs / "loader.log")
        (row,) = json.loads(out.read_text())["summary"]
        label = "loader samples/s, 8 workers, 224 px"
        self.set(label, "clipline", f"{row['clipline']['samples_per_s']:.1f}")
        self.set(label, "peer", f"{row['open_clip']['samples_per_s']:.1f}")
        self.set(label, "note", f"batch {self.p['batch']}")

    def eval(self, budget: float) -> None:
        ep = self.p["eval"]
        out = self.runs / "eval.json"
        cmd = [
            sys.executable, str(HERE / "bench_eval.py"), "--part", "zeroshot",
            "--model", bench_train.model_name(self.p["model"]),
            "--zeroshot-images", str(ep["images"]), "--zeroshot-batch", str(ep["batch"]),
            "--workers", str(ep["workers"]), "--repeats", str(ep["repeats"]),
            "--device", self.device, "--precision", self.p["precision"],
            "--cache-dir", str(self.cache / "eval"), "--json", str(out),
        ]  # fmt: skip
        _run(cmd, budget, self.runs / "eval.log")
        res = json.loads(out.read_text())["zeroshot"]
        label = "zero-shot eval images/s"
        self.set(label, "clipline", f"{res['eval_images_per_s']:.1f}")
        self.set(label, "peer", f"{res['forward_images_per_s']:.1f}")
        self.set(
            label,
            "note",
            f"ratio {res['ratio']:.2f}; pixels cached {res['eval_cached_images_per_s']:.1f}",
        )

    # ------------------------------------------------------------------ table

    def table(self) -> str:
        failed = {name for name, _ in self.errors}
        head = (
            f"GPU check: {self.p['model']}, {self.p['precision']}, batch {self.p['batch']}, "
            f"{self.p['steps']} steps, {self.p['workers']} loader workers, device "
            f"{self._device_name()}; peak {self._peak_text()}"
        )
        lines = [head, f"{'check':<44} {'clipline':>10} {'peer':>10}  notes"]

        def cell(row: str, col: str, part: str | None) -> str:
            if part is None:
                return "-"
            if part in failed:
                return "FAILED"
            return self.cells.get((row, col), "FAILED")  # a part that set nothing failed

        for label, (mine, theirs), peer in ROWS:
            note = ", ".join(x for x in (peer, self.cells.get((label, "note"), "")) if x)
            lines.append(
                f"{label:<44} {cell(label, 'clipline', mine):>10} "
                f"{cell(label, 'peer', theirs):>10}  {note}"
            )
        walls = ", ".join(f"{k} {v:.0f}" for k, v in self.walls.items())
        lines.append(f"wall s per part: {walls}; total {time.monotonic() - self.t0:.0f} s")
        for name, err in self.errors:
            lines.append(f"--- {name} FAILED:\n{err}")
        return "\n".join(lines)

    def _device_name(self) -> str:
        if self.device != "cuda":
            return f"CPU ({bench_train.cpu_model()}, {os.cpu_count()} cores)"
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"

    def _peak_text(self) -> str:
        try:
            peak = self._peak()
        except Exception:  # noqa: BLE001 - no device: the parts say why
            return "unknown"
        if peak is None:
            return "unknown (pass --peak-tflops for MFU)"
        nominal = " (nominal, for the smoke's arithmetic only)" if self.a.cpu_smoke else ""
        return f"{peak:g} TFLOP/s{nominal}"


def fsdp_child(argv: list[str]) -> int:
    """``clipline pretrain`` under ``accelerate launch``; prints whether FSDP2 wrapped it."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    import clipline.launch.run as run
    from clipline.launch.cli import main

    if not torch.cuda.is_available():
        from tests.helpers import fsdp_on_cpu_accelerator

        run.Accelerator = fsdp_on_cpu_accelerator()
    seen: dict[str, Any] = {}
    real_train = run.train

    def train(**kwargs):
        out = real_train(**kwargs)
        seen["type"] = kwargs["accelerator"].distributed_type.value
        seen["fully_sharded"] = isinstance(kwargs["model"], FSDPModule)
        return out

    run.train = train
    rc = main(argv)
    print("FSDP_CHECK " + json.dumps({"fully_sharded": False, **seen}), flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fsdp-child"]:
        return fsdp_child(argv[1:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, fp32")
    p.add_argument("--cache-dir", type=Path, default=None, help="shards, runs and logs")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak, where not known"
    )
    p.add_argument("--json", type=Path, help="also write the cells to this JSON file")
    a = p.parse_args(argv)
    if a.cache_dir is None:
        a.cache_dir = Path(f"/tmp/clipline-gpu-check{'-smoke' if a.cpu_smoke else ''}")
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    check = Check(a)
    # A fresh runs/ each time: open_clip_train refuses an existing run name, clipline would
    # append to old metrics and the FSDP part would resume an old checkpoint.
    shutil.rmtree(check.runs, ignore_errors=True)
    check.runs.mkdir()
    if not a.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke on a machine without a GPU")
            return 2
    check.part("shards", check.make_shards)
    parts = {  # on the GPU, one at a time in this order: none slows another
        "open_clip_train": check.open_clip_train,
        "clipline": check.clipline,
        "compile": check.compile,
        "fsdp": check.fsdp,
        "loader": check.loader,
        "eval": check.eval,
    }
    lanes = [list(parts.items())]
    if a.cpu_smoke:
        # The smoke shows that every part runs end to end, not how fast: two lanes of parts
        # side by side use both cores of a small CPU machine (the figures mean nothing there),
        # each process on one thread (two lanes of multi-threaded ops only oversubscribe).
        os.environ["OMP_NUM_THREADS"] = "1"
        lane_of = {"clipline": 0, "compile": 0, "fsdp": 0}  # the others: lane 1
        lanes = [[(n, fn) for n, fn in parts.items() if lane_of.get(n, 1) == i] for i in (0, 1)]
    threads = [threading.Thread(target=check.lane, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print()
    print(check.table(), flush=True)
    if a.json:
        cells = {f"{row} | {col}": v for (row, col), v in check.cells.items()}
        a.json.write_text(json.dumps({"cells": cells, "errors": dict(check.errors)}, indent=2))
    return 1 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
