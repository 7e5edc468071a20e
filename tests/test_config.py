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


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr=nan"),
        ("loop.checkpoint_minutes=inf", "loop.checkpoint_minutes=inf"),
        ("optim.betas=[0.9, -inf]", r"optim.betas\[1\]=-inf"),
        ("model.config={width = nan}", "model.config.width=nan"),  # untyped values too
    ],
)
def test_nonfinite_numbers_are_rejected_naming_the_key(override, message):
    with pytest.raises(ValueError, match=f"^{message}: must be a finite number$"):
        load_run_config("cpu-debug", ["data.shards=/d", override])


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


def test_dry_run_prints_resolved_config_and_plan(tmp_path, capsys, monkeypatch):
    import json

    from tests.helpers import make_shards

    shards = make_shards(tmp_path / "s", n=96, per_shard=16)
    monkeypatch.setenv("WORLD_SIZE", "2")
    overrides = [f"data.shards={shards}", "data.batch_size=8", "loop.accum_steps=2"]
    rc = main(["pretrain", "--recipe", "cpu-debug", *overrides, "--dry-run"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["data"]["batch_size"] == 8
    # 96 samples / (2 ranks x 1 worker x 8) = 6 micro-batches per epoch = 3 steps of 2.
    assert out["plan"] == {
        "world_size": 2,
        "global_batch": 32,
        "shards": 6,
        "samples_per_epoch": 96,
        "steps_per_epoch": 3,
        "total_steps": 50,
        "total_samples": 1600,
        "epochs": 50 / 3,
    }
