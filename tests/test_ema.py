"""EMA of the weights (timm's ModelEmaV3, pretrain/ema.py) through the real training path:
2 gloo ranks under DDP, checkpointed and resumed bit-exactly, evaluated beside the raw
weights, exported with ``--weights ema``; refused under FSDP2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from clipline.pretrain.export import find_export, load_exported
from clipline.pretrain.loop import LoopConfig
from tests.helpers import make_shards, micro_recipe, to_toml, torchrun

SCRIPT = Path(__file__).parent / "dist" / "train_ema.py"


@pytest.fixture
def data(tmp_path):
    shards = make_shards(tmp_path / "shards", n=64, per_shard=16)
    held = generate_shapes(12, seed=9, image_size=32)
    benchmark_sets.write_retrieval_set(tmp_path / "ret", ((s.image, [s.caption]) for s in held))
    return shards


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:09d}"


def _export(capsys, *args: str) -> tuple[int, str]:
    """`clipline export ARGS` through the CLI's entry point in this process (the same code
    as ``python -m clipline``, without a process start-up): (exit code, stderr)."""
    capsys.readouterr()
    rc = main(["export", *args])
    return rc, capsys.readouterr().err


def test_ema_under_ddp_resumes_bit_equal_evaluates_and_exports(tmp_path, data, capsys, monkeypatch):
    full = tmp_path / "full"
    torchrun(SCRIPT, str(data), str(full), "ddp", "4")
    assert [p.name for p in list_checkpoints(full)] == [_ckpt(full, s).name for s in (1, 2, 3, 4)]
    ema = {s: consolidated_state(_ckpt(full, s), "ema") for s in (1, 2, 3, 4)}
    raw = {s: consolidated_state(_ckpt(full, s), "model") for s in (1, 2, 3, 4)}
    assert ema[4].keys() == raw[4].keys()

    # timm's warmup, counted in 1-based optimizer steps: step 1 copies the weights, step 2
    # averages with decay 1 - (1 + 1/gamma) ** -power (gamma 1, power 2/3).
    decay2 = 1 - 2 ** (-2 / 3)
    for k in raw[1]:
        assert torch.equal(ema[1][k], raw[1][k]), k
        want = raw[1][k] + (1 - decay2) * (raw[2][k] - raw[1][k])
        torch.testing.assert_close(ema[2][k], want, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(ema[4][k], raw[4][k]) for k in raw[4])

    # Evaluated beside the raw weights, under the same task names.
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/ret/image_retrieval_recall@1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        raw_keys = {k.removeprefix("eval/") for k in r if k.startswith("eval/")}
        assert raw_keys == {k.removeprefix("eval_ema/") for k in r if k.startswith("eval_ema/")}

    # Resume from step 2 (relative checkpoint path) == uninterrupted, bit for bit.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(_ckpt(full, 2), _ckpt(resumed, 2))
    torchrun(SCRIPT, str(data), str(resumed), "ddp", "4", "latest")
    ema_resumed = consolidated_state(_ckpt(resumed, 4), "ema")
    for k in ema[4]:
        assert torch.equal(ema_resumed[k], ema[4][k]), k

    # Export: --weights ema writes the average, raw (default) the trained weights; both read
    # from a run directory given relative to the working directory.
    monkeypatch.chdir(tmp_path)
    for weights, want in (("ema", ema[4]), ("raw", raw[4])):
        out = tmp_path / f"export_{weights}"
        rc, err = _export(capsys, "full", str(out), "--weights", weights)
        assert rc == 0, err
        exported = load_exported(*find_export(out)).state_dict()
        for k in want:
            assert torch.equal(exported[k], want[k]), (weights, k)

    # A checkpoint without an EMA (a run with loop.ema_decay=0): one line naming the fix, exit 2.
    recipe = tmp_path / "no_ema.toml"
    recipe.write_text(to_toml(micro_recipe(data, tmp_path / "no_ema", steps=2)))
    assert main(["pretrain", "--recipe", str(recipe)]) == 0
    no_ema = _ckpt(tmp_path / "no_ema", 2)
    rc, err = _export(capsys, str(no_ema), str(tmp_path / "never"), "--weights", "ema")
    assert rc == 2, err
    assert "has no EMA" in err and "--weights raw" in err
    # An export holds one set of weights: --weights ema on it is refused the same way.
    rc, err = _export(capsys, str(tmp_path / "export_ema"), str(tmp_path / "x"), "--weights", "ema")
    assert rc == 2 and "holds one set of weights" in err, err


def test_ema_under_fsdp2_is_refused_with_the_fix(tmp_path, data):
    with pytest.raises(AssertionError, match=r"loop.ema_decay=0.9 is not supported under FSDP2"):
        torchrun(SCRIPT, str(data), str(tmp_path / "fsdp"), "fsdp", "2")


@pytest.mark.parametrize(
    "bad", [{"ema_decay": 1.0}, {"ema_decay": -0.1}, {"ema_warmup_power": 0.0}]
)
def test_bad_ema_settings_name_the_value(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"loop.{key} must be .*got {value}"):
        LoopConfig(steps=1, **bad)
