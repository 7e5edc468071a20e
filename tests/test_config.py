"""Run configs: recipes + overrides, and clear errors for bad input before anything runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main
from clipline.launch.config import load_run_config, recipe_names
from tests.helpers import make_shards, micro_recipe, to_toml


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
    with pytest.raises(ValueError, match="unknown model name 'open_clip:ViT-Q-99'.*Did you mean"):
        load_run_config("cpu-debug", ["data.shards=/d", "model.name=open_clip:ViT-Q-99"])


def test_did_you_mean_instead_of_every_name(capsys):
    """`model.name=tiny` used to dump ~150 names; `loop.step` listed keys without a hint."""
    rc = main(["pretrain", "--recipe", "cpu-debug", "data.shards=/d", "model.name=tiny"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "Did you mean 'clipline:tiny'" in err and "open_clip:ViT-B-32" not in err
    assert len(err) < 600
    rc = main(["pretrain", "--recipe", "cpu-debug", "data.shards=/d", "loop.step=5"])
    assert rc == 2 and "Did you mean 'loop.steps'" in capsys.readouterr().err
    rc = main(["pretrain", "--recipe", "cpu-debu", "data.shards=/d"])
    assert rc == 2 and "Did you mean 'cpu-debug'" in capsys.readouterr().err
    rc = main(["pretrain", "--recipe", "cpu-debug", "data.shards=/d", "model.image_tower=resnet5"])
    assert rc == 2 and "Did you mean 'timm:resnet50'" in capsys.readouterr().err


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
        "samples_dropped_per_epoch": 0,
        "steps_per_epoch": 3,
        "total_steps": 50,
        "total_samples": 1600,
        "epochs": 50 / 3,
    }


def _clipline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clipline", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_overrides_anywhere_on_the_line(tmp_path, capsys):
    """`--recipe r run_dir=x --resume latest loop.steps=10` was rejected by argparse."""
    shards = make_shards(tmp_path / "shards", n=32, per_shard=16)
    (tmp_path / "r.toml").write_text(to_toml(micro_recipe(shards, tmp_path / "unused")))
    res = _clipline(
        "pretrain", "--recipe", "r.toml", "run_dir=runs/x", "--resume", "latest",
        "loop.steps=10", "--dry-run", "optim.lr=0.01", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)["config"]
    assert (cfg["run_dir"], cfg["loop"]["steps"], cfg["optim"]["lr"]) == ("runs/x", 10, 0.01)
    # Later overrides win, wherever they stand; a stray word is still an error.
    cfg = main_json(["pretrain", "loop.steps=3", "--recipe", str(tmp_path / "r.toml"),
                     "--dry-run", "loop.steps=6"])  # fmt: skip
    assert cfg["loop"]["steps"] == 6
    rc = main(["pretrain", "--recipe", str(tmp_path / "r.toml"), "--dry-run", "oops"])
    assert rc == 2 and "'oops' is not key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--recipe", str(tmp_path / "r.toml"), "--dry-run", "--bogus", "latest"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def main_json(argv: list[str]) -> dict:
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())["config"]


def test_dry_run_checks_what_the_start_checks(tmp_path, capsys, monkeypatch):
    """A misspelled eval-set root passed the dry run, and only the real start refused it."""
    make_shards(tmp_path / "shards", n=32, per_shard=16)
    held = generate_shapes(6, seed=1, image_size=32)
    benchmark_sets.write_retrieval_set(
        tmp_path / "sets" / "ret", ((s.image, [s.caption]) for s in held)
    )
    recipe = to_toml(micro_recipe(Path("shards"), Path("runs/r"), steps=2))
    recipe += '\n[[retrieval]]\nname = "held"\nroot = "sets/rett"\n'  # misspelled
    (tmp_path / "r.toml").write_text(recipe)

    dry = _clipline("pretrain", "--recipe", "r.toml", "--dry-run", cwd=tmp_path)
    real = _clipline("pretrain", "--recipe", "r.toml", cwd=tmp_path)
    for res in (dry, real):
        assert res.returncode == 2 and "Traceback" not in res.stderr
    error = [line for line in dry.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "sets/rett" in error[0]
    assert error[0] in real.stderr  # the same check, the same words
    assert not (tmp_path / "runs").exists()  # the dry run creates nothing

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(recipe.replace("sets/rett", "sets/ret"))
    assert main(["pretrain", "--recipe", "r.toml", "--dry-run"]) == 0
    capsys.readouterr()
    # The checkpoint to resume from is checked too.
    assert main(["pretrain", "--recipe", "r.toml", "--dry-run", "--resume", "runs/nope"]) == 2
    assert "resume='runs/nope' is not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_errors_name_flags_as_typed(tmp_path, capsys):
    """`clipline shards` told a CLI user to "set image_column=", a Python field name."""
    (tmp_path / "pairs.csv").write_text("path,caption\na.jpg,a cat\n")
    rc = main(["shards", str(tmp_path / "pairs.csv"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "pass --image-column" in err and "Did you mean 'path'" in err
    assert "set image_column=" not in err
    for argv, flag in (
        (
            ["shards", str(tmp_path / "pairs.csv"), str(tmp_path / "o"), "--workers", "0"],
            "--workers",
        ),
        (["data", "doctor", str(tmp_path), "--batch-size", "0"], "--batch-size"),
        (["search", "m", "i", "q", "-k", "0"], "-k"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
