"""Towers, losses and evaluators are dispatched by name through one registry pattern: each
lists its names, fails on an unknown one with the close matches, and takes new entries
registered by a plugin, which a recipe then names like a built-in."""

from __future__ import annotations

import copy
import json
import math
import typing

import pytest

from clipline.eval.evaluators import (
    EVALUATORS,
    LinearProbeTask,
    RetrievalTask,
    ZeroShotTask,
    list_evaluators,
)
from clipline.launch.cli import main
from clipline.launch.config import RunConfig, load_run_config
from clipline.launch.run import load_encoders, run_pretrain
from clipline.pretrain.loss import LOSSES, InfoNCELoss, LossConfig, list_losses, model_overrides
from clipline.pretrain.model import ModelConfig
from clipline.pretrain.towers import TOWERS, list_towers, register_tower
from tests.helpers import MICRO_CFG, make_shards, micro_recipe

# A plugin, as a user's module registers its own tower and loss when it is imported.
BUILT: list[str] = []


@register_tower("plugin", slot="model", names=lambda: ["micro"])
def _plugin_tower(base, cfg, model_cfg):
    BUILT.append(base)
    return copy.deepcopy(MICRO_CFG)


@LOSSES.register("plugin_infonce")
class PluginLoss(InfoNCELoss):
    model_overrides = {"init_logit_scale": math.log(5.0)}
    calls = 0

    def forward(self, *args, **kwargs):
        PluginLoss.calls += 1
        return super().forward(*args, **kwargs)


def test_each_registry_lists_its_names():
    assert TOWERS.names()[:5] == ["clipline", "custom", "open_clip", "timm", "hf"]
    model_names = list_towers("model")
    assert {"clipline:tiny", "clipline:tiny-224", "custom", "open_clip:ViT-B-32"} <= set(
        model_names
    )
    assert "timm:resnet18" in list_towers("image") and "timm:resnet18" not in model_names
    assert list_towers("text") == []  # hf: takes any local directory; nothing to list
    assert set(list_towers()) == {*model_names, *list_towers("image")}
    assert list_losses()[:2] == ["infonce", "siglip"]
    assert list_evaluators() == ["zeroshot", "retrieval", "linear_probe"]
    classes = [EVALUATORS.get(kind).task for kind in list_evaluators()]
    assert classes == [ZeroShotTask, RetrievalTask, LinearProbeTask]
    # Every evaluator kind is a run-config section holding its tasks, and tasks() keeps the
    # registry's order whatever the recipe's.
    hints = typing.get_type_hints(RunConfig)
    assert all(hints[kind] == list[EVALUATORS.get(kind).task] for kind in list_evaluators())
    recipe = {
        "data": {"shards": "/d"},
        "linear_probe": [{"name": "p", "root": "/p"}],
        "retrieval": [{"name": "r", "root": "/r"}],
        "zeroshot": [{"name": "z", "root": "/z"}],
    }
    assert [t.name for t in load_run_config(recipe, ["loop.steps=200"]).tasks()] == ["z", "r", "p"]


def test_unknown_names_fail_with_close_matches(capsys):
    cases = [
        (["loss.kind=infonse"], "loss.kind='infonse'.*valid: infonce, siglip.*'infonce'"),
        (
            ["model.name=open_clip:ViT-B-23"],
            "unknown model name.*Did you mean 'open_clip:ViT-B-32'",
        ),
        (["model.name=clipline:tinny"], "Did you mean 'clipline:tiny'.*Valid names: clipline:tiny"),
        (["model.image_tower=timm:resnet81"], "image tower.*Did you mean 'timm:resnet18'"),
        (["model.image_tower=hf:/x"], "image tower 'hf:/x'.*Valid names: timm:<any of"),
        (["model.text_tower=bert"], "text tower 'bert'.*Valid names: hf:<local directory"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            load_run_config("cpu-debug", ["data.shards=/d", *overrides])
        # The command line: one line with the fix, exit 2, before anything runs.
        rc = main(["pretrain", "--recipe", "cpu-debug", "--dry-run", "data.shards=/d", *overrides])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="evaluator kind 'zeroshoot'.*Did you mean 'zeroshot'"):
        EVALUATORS.get("zeroshoot")
    with pytest.raises(ValueError, match="unknown model name 'custom:x'.*Did you mean 'custom'"):
        ModelConfig(name="custom:x").resolve()


def test_registered_tower_and_loss_train_by_name(tmp_path):
    """A recipe names a plugin's tower and loss; the run builds and trains with them, and
    its checkpoint loads back through the same names."""
    assert "plugin:micro" in list_towers("model") and "plugin_infonce" in list_losses()
    assert model_overrides(LossConfig(kind="plugin_infonce")) == {"init_logit_scale": math.log(5)}
    recipe = micro_recipe(make_shards(tmp_path / "shards", n=32), tmp_path / "run", steps=2)
    recipe["model"] = {"name": "plugin:micro"}
    recipe["loss"] = {"kind": "plugin_infonce"}
    BUILT.clear()
    PluginLoss.calls = 0
    metrics = run_pretrain(load_run_config(recipe))
    assert set(BUILT) == {"micro"} and PluginLoss.calls == 2
    assert math.isfinite(metrics["train/loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["name"] == "plugin:micro" and saved["loss"]["kind"] == "plugin_infonce"
    BUILT.clear()
    model = load_encoders(str(tmp_path / "run"), "cpu")
    assert model.embed_dim == MICRO_CFG["embed_dim"] and BUILT == ["micro"]
