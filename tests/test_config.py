"""Run configs: recipes + overrides, and clear errors for bad input before anything runs."""

import pytest

from clipline.launch.cli import main
from clipline.launch.config import load_run_config, recipe_names


def test_shipped_recipes_resolve():
    assert {"cpu-debug", "demo", "vit-b-32-cc3m"} <= set(recipe_names())
    for name in recipe_names():
        cfg = load_run_config(name, ["data.shards=/x"])
        assert cfg.data.shards == "/x"


def test_overrides_are_typed():
    cfg = load_run_config(
        "cpu-debug",
        [
            "data.shards=/d",
            "loop.steps=70",
            "optim.lr=0.01",
            "optim.betas=[0.9, 0.95]",
            "loss.local_loss=true",
        ],
    )
    assert cfg.loop.steps == 70 and cfg.optim.lr == 0.01
    assert cfg.optim.betas == (0.9, 0.95) and cfg.loss.local_loss is True


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['loop.stepz'\].*'loop.steps'"):
        load_run_config("cpu-debug", ["data.shards=/d", "loop.stepz=3"])


def test_wrong_type_names_value_and_fix():
    with pytest.raises(ValueError, match=r"data.batch_size: expected int, got 'big' \(str\)"):
        load_run_config("cpu-debug", ["data.shards=/d", "data.batch_size=big"])


def test_unknown_model_lists_names():
    with pytest.raises(
        ValueError, match="unknown model name 'open_clip:ViT-Q-99'.*open_clip:ViT-B-32"
    ):
        load_run_config("cpu-debug", ["data.shards=/d", "model.name=open_clip:ViT-Q-99"])


def test_cross_field_rules():
    with pytest.raises(ValueError, match="exactly one of loop.steps and loop.epochs"):
        load_run_config("cpu-debug", ["data.shards=/d", "loop.epochs=2"])


def test_cli_reports_errors_in_one_line_before_training(tmp_path, capsys):
    rc = main(
        [
            "pretrain",
            "--recipe",
            "cpu-debug",
            f"data.shards={tmp_path}/nope/{{000..003}}.tar",
            f"run_dir={tmp_path}/run",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope/000.tar" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_prints_resolved_config(capsys):
    assert main(["pretrain", "--recipe", "cpu-debug", "data.shards=/d", "--dry-run"]) == 0
    assert '"batch_size": 32' in capsys.readouterr().out
