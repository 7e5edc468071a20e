"""Faults during training: non-finite losses, mixed precision keeps the loss in fp32."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipline.launch.cli import main
from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain
from clipline.pretrain import loop
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from clipline.pretrain.loss import InfoNCELoss, LossConfig
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.optim import FiniteStepGuard, OptimConfig, build_optimizer
from tests.helpers import global_batch, make_shards, micro_model, micro_recipe, to_toml, torchrun

DIST = Path(__file__).parent / "dist"


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
        for name, tensor in consolidated_state(ckpt).items():
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


def _all_finite(ckpt) -> None:
    for name, tensor in consolidated_state(ckpt).items():
        assert torch.isfinite(tensor).all(), f"{ckpt.name}: {name} is not finite"
    optimizer_state = consolidated_state(ckpt, "optim")
    for key, moments in optimizer_state.get("state", {}).items():
        for name, tensor in moments.items():
            assert torch.isfinite(tensor).all(), f"{ckpt.name}: optimizer {key}.{name}"


def test_huge_lr_never_writes_nonfinite_weights_and_fails_the_cli(shards, tmp_path, capsys):
    # The field report: optim.lr=1e39 (inf in fp32) has finite gradients, so the gradient
    # check passed and every checkpoint held NaN/inf; the run exited 0 and wrote DONE.
    run_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(to_toml(micro_recipe(shards, run_dir, steps=8, checkpoint_every=1)))
    cmd = [sys.executable, "-m", "clipline", "pretrain", "--recipe", str(recipe)]
    res = subprocess.run(
        [*cmd, "optim.lr=1e39", "loop.max_nonfinite=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    # One line naming the count and the newest checkpoint, no traceback.
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = [x for x in res.stderr.splitlines() if "consecutive non-finite steps" in x]
    assert line.startswith("clipline pretrain: stopped: 3 consecutive non-finite steps"), line
    assert "newest checkpoint: " in line and "step_000000002" in line, line
    assert not (run_dir / "DONE").exists()
    saved = list_checkpoints(run_dir)
    assert [c.name for c in saved] == ["step_000000001", "step_000000002"]
    for ckpt in saved:
        _all_finite(ckpt)

    # Non-finite numbers never get that far: one line naming the key, exit 2, no run dir.
    res = subprocess.run(
        [*cmd, "optim.lr=nan", f"run_dir={tmp_path / 'nan'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == "clipline pretrain: error: optim.lr=nan: must be a finite number"
    for value in ("inf", "-inf"):  # in this process: the same CLI entry point, faster
        argv = ["pretrain", "--recipe", str(recipe), f"optim.lr={value}", f"run_dir={tmp_path}/nan"]
        assert main(argv) == 2
        assert f"optim.lr={value}: must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists()


def _adamw_state(model, optimizer):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    moments = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return weights, moments


def _assert_same(before, after):
    assert before[0].keys() == after[0].keys() and before[1].keys() == after[1].keys()
    for name, tensor in before[0].items():
        assert torch.equal(tensor, after[0][name]), name
    for name, moments in before[1].items():
        assert moments.keys() == after[1][name].keys(), name
        for k, v in moments.items():
            assert torch.equal(v, after[1][name][k]), (name, k)


@pytest.mark.parametrize("first_step", [True, False])
def test_skipped_update_leaves_weights_and_adamw_state_untouched(first_step):
    model = micro_model()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    guard = FiniteStepGuard(optimizer)
    images, texts = global_batch(8)

    def backward():
        optimizer.zero_grad(set_to_none=True)
        img, txt, scale, _ = model(images, texts)
        InfoNCELoss(LossConfig())(img, txt, scale).backward()
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()

    if not first_step:
        for _ in range(3):  # sane settings: the bounds prove each step finite, no copy taken
            assert guard.step(backward(), 1.0)
        assert guard.snapshot_steps == 0 and optimizer.state
    with torch.no_grad():
        model.clip.text_projection[0, 0] = 100.0
    before = _adamw_state(model, optimizer)
    grad_norm = backward()
    decayed = optimizer.param_groups[0]
    # lr=1e39 is inf in fp32; 3e38 is finite, but lr / (1 - beta1^t) is not; with
    # lr * weight_decay = 1e37 only the one weight of 100 overflows.
    for lr, weight_decay in ((1e39, 0.1), (3e38, 0.1), (1e25, 1e12)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        decayed["weight_decay"] = weight_decay
        assert not guard.step(grad_norm, 1.0), (lr, weight_decay)
        _assert_same(before, _adamw_state(model, optimizer))
    assert guard.snapshot_steps == 3
    # A step the bounds cannot clear but that is finite is taken (and measured).
    for group in optimizer.param_groups:
        group["lr"] = 1e27
    decayed["weight_decay"] = 0.1
    assert guard.step(grad_norm, 1.0) and guard.snapshot_steps == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fsdp_ranks_agree_when_one_shard_overflows(shards, tmp_path):
    run_dir = tmp_path / "run"
    torchrun(DIST / "nonfinite_fsdp.py", str(shards), str(run_dir))
    stopped = [(run_dir / f"stopped_{r}.txt").read_text() for r in (0, 1)]
    assert stopped[0] == stopped[1] and "3 consecutive non-finite steps at step 2" in stopped[0]
    initial = load_file(run_dir / "initial.safetensors")
    saved = list_checkpoints(run_dir)
    assert [c.name for c in saved] == ["step_000000001", "step_000000002"]
    for ckpt in saved:  # every step skipped: the gathered weights are the initial ones
        _all_finite(ckpt)
        weights = consolidated_state(ckpt)
        assert weights.keys() == initial.keys()
        for name, tensor in initial.items():
            assert torch.equal(weights[name], tensor), (ckpt.name, name)
