"""What a user sees in the first hour, through the real CLI with stdout/stderr captured (a log
file, not a terminal): the start banner, evaluation lines, the end summary and its JSON file,
time-stamped metrics rows that a kill -9 and resume never duplicate, ``--resume latest`` on a
finished run, shard-writing progress, clipline's INFO lines on rank 0 only, and progress lines
instead of carriage-return floods.
"""

import csv
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from clipline.data.builtin_data import generate_shapes
from clipline.pretrain.checkpoint import list_checkpoints
from clipline.pretrain.console import human_count
from tests.helpers import (
    free_port,
    make_shape_sets,
    micro_model,
    micro_recipe,
    to_toml,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("TQDM_MININTERVAL", None)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    return make_shape_sets(tmp_path_factory.mktemp("console"), held_out=12)


def _recipe(path: Path, recipe: dict) -> Path:
    path.write_text(to_toml(recipe))
    return path


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clipline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, **env})


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows if "train/loss" in r]


def test_banner_eval_lines_summary_and_finished_resume(sets, tmp_path):
    run = tmp_path / "run"
    recipe = micro_recipe(sets / "shards", run, steps=4, eval_every=2)
    recipe["zeroshot"] = [{"name": "shapes", "root": str(sets / "zs")}]
    recipe["retrieval"] = [{"name": "heldout", "root": str(sets / "ret")}]
    path = _recipe(tmp_path / "r.toml", recipe)

    t0 = time.time()
    # TQDM_MININTERVAL=0: a progress line at every step instead of every 30 s.
    res = _cli("pretrain", "--recipe", str(path), TQDM_MININTERVAL="0")
    t1 = time.time()
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert "\r" not in err  # a log file gets lines, not carriage-return redraws
    n_params = sum(p.numel() for p in micro_model().parameters())
    for line in (
        f"model        custom: {human_count(n_params)} parameters ({human_count(n_params)} "
        "trainable)",
        "processes    1 (cpu",
        "global batch 8 = 8 per rank x 1 rank x 1 accumulation step",
        "steps        4 = 0.67 epochs of 48 samples (6 steps per epoch)",
        f"run dir      {run.resolve()}",
        "resume       fresh start",
    ):
        assert line in err, (line, err)
    assert "INFO clipline.pretrain.checkpoint: saved checkpoint" in err
    for done in range(5):  # a progress line per step (and the postfix from the last log)
        assert f"train: {done * 25:3d}% {done}/4 [" in err
    assert re.search(r"train: 100% 4/4 \[.*loss=\d\.\d{3}, samples_s=", err)

    rows = _rows(run)
    assert all(list(r)[:2] == ["step", "time"] for r in rows)
    times = [r["time"] for r in rows]
    assert times == sorted(times) and t0 <= times[0] and times[-1] <= t1
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # each evaluation was printed when it arrived, with the logged numbers
        zs = {k.removeprefix("eval/shapes/"): v for k, v in r.items() if "/shapes/" in k}
        assert (
            f"eval step {r['step']} shapes: acc1 {zs['acc1']:.3f}, acc5 {zs['acc5']:.3f}, "
            f"mean_per_class_recall {zs['mean_per_class_recall']:.3f}\n"
        ) in err
        line = next(x for x in err.splitlines() if f"eval step {r['step']} heldout: " in x)
        for way in ("image", "text"):
            recalls = [r[f"eval/heldout/{way}_retrieval_recall@{k}"] for k in (1, 5, 10)]
            assert f"{way}_retrieval_recall@1/5/10 {'/'.join(f'{v:.3f}' for v in recalls)}" in line

    # stdout: a short summary; the full metrics are in final_metrics.json.
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["wall_time_s"] > 0
    assert final["train/loss"] == _rows(run)[-2]["train/loss"]
    assert {k: v for k, v in final.items() if k.startswith("eval/")} == {
        k: v for k, v in evals[-1].items() if k.startswith("eval/")
    }
    out = res.stdout
    assert out.startswith("clipline pretrain: finished at step 4 in ")
    assert f"train/loss   {final['train/loss']:.4f}" in out
    assert f"eval         shapes: acc1 {final['eval/shapes/acc1']:.3f}" in out
    assert str(list_checkpoints(run)[-1]) in out and str(run / "final_metrics.json") in out
    assert f"clipline export {run} " in out and f"clipline eval --run {run}" in out
    assert len(out.splitlines()) < 15

    # --resume latest on the finished run: one line, exit 0, nothing retrained or rewritten.
    before = (run / "metrics.jsonl").read_bytes(), list_checkpoints(run)
    res = _cli("pretrain", "--recipe", str(path), "--resume", "latest")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "already finished" in res.stdout
    assert "step 4" in res.stdout and "loop.steps" in res.stdout
    assert ((run / "metrics.jsonl").read_bytes(), list_checkpoints(run)) == before

    # ... unless loop.steps was raised: then it continues.
    res = _cli("pretrain", "--recipe", str(path), "--resume", "latest", "loop.steps=6")
    assert res.returncode == 0, res.stderr
    ckpt = run / "checkpoints" / "step_000000004"
    assert f"INFO clipline.pretrain.loop: resumed from {ckpt} at step 4" in res.stderr
    assert f"resume       step 4 of 6, from {ckpt}" in res.stderr
    assert _train_steps(_rows(run)) == [1, 2, 3, 4, 5, 6]
    assert res.stdout.startswith("clipline pretrain: finished at step 6 in ")


def test_kill_9_then_resume_logs_every_step_once(sets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    steps = 16
    path = _recipe(tmp_path / "r.toml", micro_recipe(sets / "shards", run, steps=steps))
    recipe = micro_recipe(sets / "shards", run, steps=steps, checkpoint_every=4, keep_last=5)
    path = _recipe(tmp_path / "r.toml", recipe)
    cmd = [sys.executable, "-m", "clipline", "pretrain", "--recipe", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 240
    # Kill -9 two or more steps after a checkpoint: those steps are logged, not saved.
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        ckpts = list_checkpoints(run)
        saved = int(ckpts[-1].name.removeprefix("step_")) if ckpts else None
        if saved is not None and (run / "metrics.jsonl").is_file():
            logged = max(r["step"] for r in _rows(run))
            if logged >= saved + 2:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = int(list_checkpoints(run)[-1].name.removeprefix("step_"))
    logged = _train_steps(_rows(run))
    assert logged[-1] > saved  # the replayed steps are in the file before the resume

    res = _cli("pretrain", "--recipe", str(path), "--resume", "latest")
    assert res.returncode == 0, res.stderr
    assert f"resumed from {list_checkpoints(run)[0].parent / f'step_{saved:09d}'}" in res.stderr
    assert f"dropped {logged[-1] - saved} rows past step {saved}" in res.stderr
    rows = _rows(run)
    assert _train_steps(rows) == list(range(1, steps + 1))
    times = [r["time"] for r in rows]
    assert times == sorted(times)
    # TensorBoard hides the killed run's events past the checkpoint (SummaryWriter purge_step).
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))


def test_torchrun_rank0_speaks_rank1_only_warns(sets, tmp_path):
    run = tmp_path / "run"
    path = _recipe(tmp_path / "r.toml", micro_recipe(sets / "shards", run, steps=2))

    def torchrun(*extra: str) -> dict[str, str]:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "--tee=3",  # each worker's output, every line prefixed with [default<rank>]:
            "-m",
            "clipline",
            "pretrain",
            "--recipe",
            str(path),
            *extra,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
        lines = (res.stdout + res.stderr).splitlines()
        return {
            rank: "\n".join(
                x.removeprefix(f"[default{rank}]:")
                for x in lines
                if x.startswith(f"[default{rank}]:")
            )
            for rank in "01"
        }

    first = torchrun()
    assert "resume       fresh start" in first["0"] and "2 per rank" not in first["0"]
    assert "global batch 16 = 8 per rank x 2 ranks x 1 accumulation step" in first["0"]
    assert "INFO clipline.pretrain.checkpoint: saved checkpoint" in first["0"]
    assert "clipline pretrain: finished at step 2" in first["0"]

    second = torchrun("--resume", "latest", "loop.steps=3")
    ckpt = run / "checkpoints" / "step_000000002"
    assert f"INFO clipline.pretrain.loop: resumed from {ckpt} at step 2" in second["0"]
    assert "clipline pretrain: finished at step 3" in second["0"]
    for out in (first["1"], second["1"]):
        assert " INFO " not in out and "clipline pretrain" not in out, out
    assert _train_steps(_rows(run)) == [1, 2, 3]


def _pairs_csv(root: Path, n: int) -> Path:
    (root / "img").mkdir(parents=True)
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i, s in enumerate(generate_shapes(n, seed=1, image_size=32)):
            s.image.save(root / "img" / f"{i}.png")
            writer.writerow([str(root / "img" / f"{i}.png"), s.caption])
        writer.writerow([str(root / "img" / "missing.png"), "not there"])
    return root / "pairs.csv"


def test_shards_progress_in_a_log_and_on_a_terminal(tmp_path):
    pairs = _pairs_csv(tmp_path, 40)
    cmd = [sys.executable, "-m", "clipline", "shards", str(pairs)]

    # A log file: plain lines (here one per update: tqdm's own TQDM_MININTERVAL), no "\r".
    env = {**ENV, "TQDM_MININTERVAL": "0"}
    res = subprocess.run(
        [*cmd, str(tmp_path / "a"), "--samples-per-shard", "16"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr
    progress = [x for x in res.stderr.splitlines() if x.startswith("shards: ")]
    assert progress[0].startswith("shards:   0% 0/41 ")
    assert "16/41" in progress[1] and "img/s" in progress[1]
    assert progress[-1].startswith("shards: 100% 41/41 ")
    assert progress[-1].endswith("written=40, skipped=1]")
    assert "INFO clipline.data.shards: 000000.tar done" in res.stderr
    assert json.loads(res.stdout)["written"] == 40

    # A terminal: tqdm's redrawn bar.
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "b"), "--samples-per-shard", "16"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=ENV,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    tty = b"".join(chunks).decode()
    assert "\r" in tty and "41/41" in tty and "█" in tty
