"""``loop.async_checkpoint``: checkpoints written in the background (DCP's ``async_save``).

A kill -9 of a real 2-rank torchrun run while a checkpoint is being written never leaves one
that ``--resume latest`` picks, and the run resumed (async again) equals the uninterrupted
(synchronous) run bit for bit: weights, optimizer state, EMA, stream positions and ledger; under FSDP2 the background writes hold the same state as
DDP's; in one process, keep-K counts only committed checkpoints.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain
from clipline.pretrain.checkpoint import (
    DCP_DIR,
    consolidated_state,
    list_checkpoints,
    read_loop_state,
    read_step,
    resolve_resume,
)
from tests.helpers import free_port, make_shards, micro_recipe, to_toml, torchrun
from tests.test_ledger import _per_epoch
from tests.test_reshard import _assert_same_checkpoint, _flat

DIST = Path(__file__).parent / "dist"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 8


def _complete(ckpt: Path, ranks: int) -> bool:
    dcp = ckpt / DCP_DIR
    return (
        (dcp / ".metadata").is_file()
        and (ckpt / "state.json").is_file()
        and len(list(dcp.glob("*.distcp"))) == ranks
    )


def _torchrun_pretrain(recipe: Path, *extra: str) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "clipline", "pretrain", "--recipe", str(recipe), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _kill_9(proc: subprocess.Popen) -> None:
    """kill -9 of both ranks (each in a session of its own, as torchrun starts them) and of
    torchrun: what losing the node does."""
    ranks = psutil.Process(proc.pid).children(recursive=True)
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.send_signal(signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=60)


def _recipe(tmp_path: Path, shards: Path, name: str, **loop) -> Path:
    path = tmp_path / f"{name}.toml"
    # With an EMA and the ledger: every part of a checkpoint must name the same step.
    loop = {"steps": STEPS, "ema_decay": 0.9, "sample_ledger": True, **loop}
    path.write_text(to_toml(micro_recipe(shards, tmp_path / name, **loop)))
    return path


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step_").removesuffix(".tmp"))


def _in_flight(run: Path) -> list[Path]:
    """Checkpoint directories newer than the newest complete one (none before one is)."""
    dirs = list(run.iterdir()) if run.is_dir() else []
    done = [_step(d) for d in dirs if _complete(d, ranks=2)]
    return [d for d in dirs if done and _step(d) > max(done)]


def test_kill_9_during_an_async_write_then_resume_equals_uninterrupted(tmp_path):
    shards = make_shards(tmp_path / "shards", n=64, per_shard=16)
    full = _torchrun_pretrain(
        _recipe(tmp_path, shards, "full", checkpoint_every=1, keep_last=STEPS)
    )
    # A checkpoint every step: one write is in flight nearly all the time.
    loop = {"checkpoint_every": 1, "keep_last": 2, "async_checkpoint": True}
    killed_recipe = _recipe(tmp_path, shards, "killed", **loop)
    proc = _torchrun_pretrain(killed_recipe)

    # Kill -9 while a checkpoint is in flight (a directory newer than the newest complete
    # one, whatever its name), once one is committed: it must stay invisible to resume.
    run, deadline = tmp_path / "killed" / "checkpoints", time.monotonic() + 240
    while not (in_flight := _in_flight(run)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.003)
    _kill_9(proc)
    assert all(d.name.endswith(".tmp") for d in in_flight), in_flight
    committed = list_checkpoints(tmp_path / "killed")
    assert committed and all(_complete(c, ranks=2) for c in committed)
    assert resolve_resume(tmp_path / "killed", "latest") == committed[-1]
    assert read_step(committed[-1]) < STEPS

    resumed = _torchrun_pretrain(killed_recipe, "--resume", "latest")
    fsdp = tmp_path / "fsdp"  # the uninterrupted run under FSDP2, async, meanwhile
    torchrun(DIST / "async_fsdp.py", str(shards), str(fsdp), str(STEPS))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-4000:] + err[-8000:]
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, out[-4000:] + err[-8000:]

    # keep_last=2 over committed checkpoints; the killed write's .tmp was cleared.
    names = sorted(p.name for p in run.iterdir())
    assert names == [f"step_{STEPS - 1:09d}", f"step_{STEPS:09d}"], names
    for name in names:  # a background write (STEPS - 1) and the last, synchronous one
        want = tmp_path / "full" / "checkpoints" / name
        _assert_same_checkpoint(want, run / name)
        ema = _flat(consolidated_state(want, "ema"))
        assert ema.keys() == _flat(consolidated_state(run / name, "ema")).keys()
        for key, value in _flat(consolidated_state(run / name, "ema")).items():
            assert torch.equal(value, ema[key]), key
        assert read_loop_state(run / name)["stream"] == read_loop_state(want)["stream"]
    assert _per_epoch(tmp_path / "killed") == _per_epoch(tmp_path / "full")

    # FSDP2: the background writes of the DTensor shards hold DDP's state at their step.
    steps = [read_step(c) for c in list_checkpoints(fsdp)]
    assert steps == list(range(2, STEPS + 1, 2))
    for step in steps:
        name = f"step_{step:09d}"
        for part in ("model", "optim"):
            want = _flat(consolidated_state(tmp_path / "full" / "checkpoints" / name, part))
            got = _flat(consolidated_state(fsdp / "checkpoints" / name, part))
            assert want.keys() == got.keys(), (name, part)
            for key, value in want.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5, msg=key)


def test_one_process_keeps_the_last_committed_checkpoints(tmp_path):
    shards = make_shards(tmp_path / "shards", n=32, per_shard=16)
    runs = {}
    for name, on in (("sync", False), ("async", True)):
        recipe = micro_recipe(shards, tmp_path / name, steps=5, checkpoint_every=2, keep_last=2)
        recipe["loop"]["async_checkpoint"] = on
        run_pretrain(load_run_config(recipe))
        runs[name] = tmp_path / name / "checkpoints"
    # Steps 2 and 4 in the background, 5 at once; keep_last=2 over committed ones.
    assert sorted(p.name for p in runs["async"].iterdir()) == ["step_000000004", "step_000000005"]
    for name in ("step_000000004", "step_000000005"):
        _assert_same_checkpoint(runs["sync"] / name, runs["async"] / name)
