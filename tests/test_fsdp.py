"""FSDP2 through the real training path on 2 CPU ranks (gloo): equal to DDP, resumable.

See tests/dist/train_fsdp.py for how FSDP is switched on without GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.pretrain.checkpoint import consolidated_state
from tests.helpers import make_shards, torchrun

DIST = Path(__file__).parent / "dist"


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}, rows


def test_fsdp_equals_ddp_and_resumes(tmp_path):
    shards = make_shards(tmp_path / "shards", n=64, per_shard=16)
    held = generate_shapes(12, seed=9, image_size=32)
    benchmark_sets.write_retrieval_set(tmp_path / "ret", ((s.image, [s.caption]) for s in held))
    script = DIST / "train_fsdp.py"

    torchrun(script, str(shards), str(tmp_path / "ddp"), "ddp", "4")
    torchrun(script, str(shards), str(tmp_path / "fsdp"), "fsdp", "4")
    ddp_losses, _ = _losses(tmp_path / "ddp")
    fsdp_losses, rows = _losses(tmp_path / "fsdp")
    assert sorted(fsdp_losses) == [1, 2, 3, 4]
    for step, loss in ddp_losses.items():
        assert abs(fsdp_losses[step] - loss) < 1e-4, (step, fsdp_losses[step], loss)
    # Evaluation ran on both ranks without deadlock, with the same numbers as under DDP.
    evals = [r for r in rows if "eval/ret/image_retrieval_recall@1" in r]
    assert [r["step"] for r in evals] == [2, 4]

    # Checkpoints hold the full, unsharded weights: the same tensors as DDP's.
    ddp_w = consolidated_state(tmp_path / "ddp" / "checkpoints" / "step_000000004")
    fsdp_w = consolidated_state(tmp_path / "fsdp" / "checkpoints" / "step_000000004")
    assert ddp_w.keys() == fsdp_w.keys()
    for k in ddp_w:
        torch.testing.assert_close(fsdp_w[k], ddp_w[k], rtol=1e-4, atol=1e-5, msg=k)

    # Resume from step 2 into a sharded model and optimizer == the uninterrupted run.
    resumed = tmp_path / "fsdp_resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = tmp_path / "fsdp" / "checkpoints" / "step_000000002"
    torchrun(script, str(shards), str(resumed), "fsdp", "4", str(step2))
    resumed_losses, _ = _losses(resumed)
    assert sorted(resumed_losses) == [3, 4]
    for step in (3, 4):
        assert abs(resumed_losses[step] - fsdp_losses[step]) < 1e-5
