"""Golden run: the ``cpu-debug`` recipe on fixed generated shards, fixed seed, 30 steps.

The per-step losses and a hash and norm of the final weights are recorded in
``tests/golden/cpu_debug.json``. A refactor must not change them: any change to what the
loop computes (batch order, augmentation, loss, optimizer, schedule, initialisation) shows
up here. Regenerate deliberately, and say why in the commit, with
``CLIPLINE_UPDATE_GOLDEN=1 pytest tests/test_golden.py``.

Losses and the norm are compared with a tolerance, so the test holds on another CPU (a
different SIMD path reorders float sums); the weight hash is compared exactly only on the
platform that recorded it (same torch version and CPU capability).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipline.pretrain.checkpoint import consolidated_state
from tests.helpers import make_shards

GOLDEN = Path(__file__).parent / "golden" / "cpu_debug.json"
STEPS = 30


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _weights_digest(ckpt: Path) -> tuple[str, float]:
    weights = consolidated_state(ckpt)  # the sharded checkpoint's model, whole
    h = hashlib.sha256()
    norm_sq = 0.0
    for name in sorted(weights):
        t = weights[name].contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
        norm_sq += float(t.double().pow(2).sum())
    return h.hexdigest(), norm_sq**0.5


def _golden_run(tmp_path: Path) -> dict:
    shards = make_shards(tmp_path / "shards", n=320, per_shard=64, seed=3, image_size=64)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "clipline",
        "pretrain",
        "--recipe",
        "cpu-debug",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"loop.steps={STEPS}",
        "loop.log_every=1",
        f"loop.checkpoint_every={STEPS}",
        "loop.seed=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    digest, norm = _weights_digest(run_dir / "checkpoints" / f"step_{STEPS:09d}")
    return {"losses": losses, "weights_sha256": digest, "weights_norm": norm}


def test_cpu_debug_golden(tmp_path):
    got = _golden_run(tmp_path)
    if os.environ.get("CLIPLINE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        # Rewritten on purpose; the checks below then hold the new values to this run.
        GOLDEN.write_text(json.dumps({**got, "platform": _platform()}, indent=2) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert len(got["losses"]) == STEPS
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-4, abs=1e-5)
    assert got["weights_norm"] == pytest.approx(want["weights_norm"], rel=1e-5)
    if want["platform"] == _platform():
        assert got["weights_sha256"] == want["weights_sha256"]
