"""A real SIGTERM mid-run: checkpoint, exit 143, resume == the uninterrupted run, step by step."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from tests.helpers import make_shards, micro_recipe, to_toml

STEPS = 60  # room to signal mid-run; tests/test_signals.py covers process groups


def _pretrain(recipe: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clipline", "pretrain", "--recipe", str(recipe), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _recipe(tmp_path: Path, shards: Path, name: str) -> Path:
    recipe = micro_recipe(shards, tmp_path / name, steps=STEPS, checkpoint_every=1000)
    recipe["data"]["workers"] = 1  # the signal must also be survived with a worker process
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(recipe))
    return path


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    shards = make_shards(tmp_path / "shards", n=256, per_shard=32)
    full = _pretrain(_recipe(tmp_path, shards, "full"))

    killed_recipe = _recipe(tmp_path, shards, "killed")
    proc = _pretrain(killed_recipe)
    deadline = time.monotonic() + 120
    while not any(r["step"] >= 10 for r in _rows(tmp_path / "killed")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "continue with --resume latest" in err
    (ckpt,) = list_checkpoints(tmp_path / "killed")
    stopped_at = json.loads((ckpt / "state.json").read_text())["step"]
    assert 10 <= stopped_at < STEPS

    resumed = _pretrain(killed_recipe, "--resume", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert full.wait(timeout=300) == 0, full.communicate()

    want = {r["step"]: r["train/loss"] for r in _rows(tmp_path / "full")}
    got = {r["step"]: r["train/loss"] for r in _rows(tmp_path / "killed")}
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    w_full = consolidated_state(list_checkpoints(tmp_path / "full")[-1])
    w_resumed = consolidated_state(list_checkpoints(tmp_path / "killed")[-1])
    for k in w_full:
        torch.testing.assert_close(w_resumed[k], w_full[k], rtol=1e-5, atol=1e-6, msg=k)
