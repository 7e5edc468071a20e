"""Faults during training: non-finite losses, mixed precision keeps the loss in fp32."""

import math

import pytest
import torch
from safetensors.torch import load_file

from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain
from clipline.pretrain import loop
from clipline.pretrain.checkpoint import list_checkpoints
from clipline.pretrain.loss import InfoNCELoss
from clipline.pretrain.model import DualEncoder
from tests.helpers import make_shards, micro_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("faults") / "shards", n=64, per_shard=16)


def test_nonfinite_steps_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    calls = {"n": 0}

    class FlakyLoss(InfoNCELoss):
        # Step 1 is fine, then every loss is NaN: steps 2.. are skipped, the run stops at 3 in a row.
        def forward(self, *args):
            calls["n"] += 1
            loss = super().forward(*args)
            return loss if calls["n"] <= 2 else loss * math.nan

    monkeypatch.setattr(loop, "build_loss", FlakyLoss)
    recipe = micro_recipe(shards, tmp_path / "run", steps=8, checkpoint_every=1, max_nonfinite=3)
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive non-finite steps"):
        run_pretrain(load_run_config(recipe))
    saved = list_checkpoints(tmp_path / "run")
    assert saved, "checkpoints of the finite steps are kept"
    for ckpt in saved:
        for name, tensor in load_file(ckpt / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), f"{ckpt.name}: {name} is not finite"


def test_bf16_autocast_trains_with_fp32_loss(shards, tmp_path, monkeypatch):
    seen = []
    forward = DualEncoder.forward

    def recording_forward(self, image, text):
        seen.append(("forward", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, image, text)

    class RecordingLoss(InfoNCELoss):
        def forward(self, img, txt, scale, bias=None):
            loss = super().forward(img, txt, scale, bias)
            seen.append(("loss", loss.dtype))
            return loss

    monkeypatch.setattr(DualEncoder, "forward", recording_forward)
    monkeypatch.setattr(loop, "build_loss", RecordingLoss)
    recipe = micro_recipe(shards, tmp_path / "run", steps=2, mixed_precision="bf16")
    metrics = run_pretrain(load_run_config(recipe))
    assert math.isfinite(metrics["train/loss"])
    assert seen[:2] == [("forward", True, torch.bfloat16), ("loss", torch.float32)]
