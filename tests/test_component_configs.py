"""Each component's config checks its own fields when it is built, recipe or no recipe.

Built directly in Python these configs used to accept anything: ``OptimConfig(lr=0)`` trained
nothing, ``OptimConfig(schedule="const-cooldown")`` (open_clip's spelling) decayed by cosine, and
``StreamConfig(workers=-1)`` failed deep inside the DataLoader. Only ``RunConfig.validate`` checked them, and only on the recipe
path; it now keeps the rules that span components.
"""

import dataclasses
import tomllib

import pytest

from clipline.data.decode import DecodeConfig
from clipline.data.preprocess import PreprocessConfig
from clipline.data.stream import SourceConfig, StreamConfig
from clipline.eval.evaluators import LinearProbeTask, RetrievalTask, ZeroShotTask
from clipline.launch.cli import main
from clipline.launch.config import load_run_config, read_recipe
from clipline.pretrain.loop import LoopConfig
from clipline.pretrain.loss import LossConfig
from clipline.pretrain.model import ModelConfig
from clipline.pretrain.optim import OptimConfig

BAD = [
    (lambda: StreamConfig(shards="/d", batch_size=0), r"data.batch_size must be > 0, got 0"),
    (lambda: StreamConfig(shards="/d", workers=-1), r"data.workers must be >= 0, got -1"),
    (lambda: StreamConfig(), r"set exactly one of data.shards .* and \[\[data.sources\]\]"),
    (
        lambda: StreamConfig(shards="/d", mode="exakt"),
        r"data.mode: 'exakt' is not one of \['exact', 'resampled'\]. Did you mean 'exact'\?",
    ),
    (
        lambda: StreamConfig(sources=[SourceConfig(shards="/a", weight=2.0)]),
        r"source weights \[2.0\] need data.mode='resampled'",
    ),
    (lambda: SourceConfig(shards="/a", weight=0.0), r"weight must be > 0, got 0.0 for '/a'"),
    (lambda: DecodeConfig(min_image_size=0), r"data.decode.min_image_size must be >= 1, got 0"),
    (lambda: PreprocessConfig(std=(1.0, 0.0, 1.0)), r"preprocess.std must be > 0 in each"),
    (lambda: ModelConfig(patch_dropout=1.0), r"model.patch_dropout must be in \[0, 1\), got 1.0"),
    (
        lambda: ModelConfig(lock_image_unlocked_groups=2),
        r"model.lock_image_unlocked_groups is only read with model.lock_image=true",
    ),
    (lambda: LossConfig(kind="sigmoid"), r"unknown loss loss.kind='sigmoid'; valid: infonce"),
    (lambda: OptimConfig(lr=0.0), r"optim.lr must be > 0, got 0.0"),
    (
        lambda: OptimConfig(schedule="constant_cooldown"),
        r"optim.schedule='constant_cooldown' needs optim.cooldown_steps > 0, got 0",
    ),
    (lambda: OptimConfig(schedule="cosin"), r"optim.schedule: 'cosin' .*Did you mean 'cosine'"),
    (
        lambda: OptimConfig(schedule="const-cooldown"),
        r"optim.schedule: 'const-cooldown' .*Did you mean 'constant_cooldown'",
    ),
    (lambda: LoopConfig(), r"set exactly one of loop.steps and loop.epochs"),
    (lambda: LoopConfig(steps=10, epochs=1.0), r"set exactly one of loop.steps and loop.epochs"),
    (lambda: LoopConfig(steps=0), r"loop.steps must be > 0, got 0"),
    (lambda: LoopConfig(epochs=-1.0), r"loop.epochs must be > 0, got -1.0"),
    (lambda: LoopConfig(steps=5, accum_steps=0), r"loop.accum_steps must be > 0, got 0"),
    (lambda: LoopConfig(steps=5, log_every=0), r"loop.log_every must be > 0, got 0"),
    (lambda: LoopConfig(steps=5, keep_last=0), r"loop.keep_last must be > 0, got 0"),
    (lambda: LoopConfig(steps=5, max_nonfinite=0), r"loop.max_nonfinite must be > 0, got 0"),
    (lambda: LoopConfig(steps=5, mixed_precision="fp8"), r"loop.mixed_precision: 'fp8'"),
    (
        lambda: ZeroShotTask(name="z", root="/r", batch_size=0),
        r"evaluation 'z': batch_size=0; it must",
    ),
    (
        lambda: LinearProbeTask(name="p", root="/r", workers=-1),
        r"evaluation 'p': workers=-1; it must",
    ),
    (lambda: RetrievalTask(name="r", root="/r", ks=(0,)), r"evaluation 'r': ks=\(0,\); give"),
]


@pytest.mark.parametrize("build, message", BAD)
def test_each_component_rejects_its_bad_values_when_built_directly(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_good_values_build_and_a_replace_is_checked_again():
    loop = LoopConfig(steps=5)
    assert LoopConfig(epochs=0.5).epochs == 0.5
    with pytest.raises(ValueError, match="loop.steps must be > 0"):
        dataclasses.replace(loop, steps=0)
    stream = StreamConfig(shards="/d", workers=0)
    assert dataclasses.replace(stream, mode="resampled").mode == "resampled"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.workers=-1", "data.workers must be >= 0, got -1"),
        ("model.patch_dropout=1.5", r"model.patch_dropout must be in \[0, 1\), got 1.5"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("loop.keep_last=0", "loop.keep_last must be > 0, got 0"),
    ],
)
def test_recipe_values_meet_the_same_component_check(override, message, capsys):
    """The recipe path gives the words the component gives, and the CLI one line, exit 2."""
    with pytest.raises(ValueError, match=message):
        load_run_config("cpu-debug", ["data.shards=/d", override])
    assert main(["pretrain", "--recipe", "cpu-debug", "data.shards=/d", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_run_config_keeps_the_rules_across_components():
    with pytest.raises(ValueError, match="optim.warmup_steps=100 leaves no decay within"):
        load_run_config("cpu-debug", ["data.shards=/d", "loop.steps=100", "optim.warmup_steps=100"])
    recipe = "[[zeroshot]]\nname='a'\nroot='/x'\n[[retrieval]]\nname='a'\nroot='/y'\n"
    data = {**read_recipe("cpu-debug"), **tomllib.loads(recipe)}
    with pytest.raises(ValueError, match=r"evaluation names must be unique, got \['a', 'a'\]"):
        load_run_config(data, ["data.shards=/d"])
