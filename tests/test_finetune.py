"""Fine-tuning controls (text-tower locking, layer-wise LR decay, new-head LR, the finetune
recipe) and the forgetting guard (reference tasks, ``loop.max_reference_drop``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from timm.optim import param_groups_layer_decay

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.data.classification_sets import open_classification_set
from clipline.eval.embedding import embed_indexed_images
from clipline.eval.zeroshot import build_classifier
from clipline.launch.cli import main
from clipline.launch.config import build, load_run_config, read_recipe
from clipline.launch.run import run_pretrain
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from clipline.pretrain.forgetting import START_FILE
from clipline.pretrain.layer_decay import layer_ids, lr_scales
from clipline.pretrain.loss import LossConfig, model_overrides
from clipline.pretrain.model import DualEncoder, ModelConfig
from clipline.pretrain.optim import param_groups
from tests.helpers import MICRO_CFG, SHAPES, free_port, make_shards, micro_recipe, to_toml

# Two blocks per tower, so that every kind of layer (embeddings, a middle block, the last
# block with the final norm, the projection) is there.
TWO_BLOCKS = {
    **MICRO_CFG,
    "vision_cfg": {**MICRO_CFG["vision_cfg"], "layers": 2},
    "text_cfg": {**MICRO_CFG["text_cfg"], "layers": 2},
}


def _custom(config=MICRO_CFG, **kw) -> ModelConfig:
    return ModelConfig(name="custom", config=config, **kw)


def _names_by_group(model, groups) -> list[dict]:
    names = {p: n for n, p in model.named_parameters()}
    return [{**g, "params": {names[p] for p in g["params"]}} for g in groups]


def test_layer_ids_and_scales_of_a_tiny_vit_clip():
    model = DualEncoder.from_config(_custom(TWO_BLOCKS))
    ids = layer_ids(model)
    want = {
        "clip.visual.conv1.weight": ("image", 0, 4),
        "clip.visual.class_embedding": ("image", 0, 4),
        "clip.visual.positional_embedding": ("image", 0, 4),
        "clip.visual.ln_pre.weight": ("image", 0, 4),
        "clip.visual.transformer.resblocks.0.attn.in_proj_weight": ("image", 1, 4),
        "clip.visual.transformer.resblocks.1.mlp.c_fc.weight": ("image", 2, 4),
        "clip.visual.ln_post.bias": ("image", 2, 4),
        "clip.visual.proj": ("image", 3, 4),
        "clip.token_embedding.weight": ("text", 0, 4),
        "clip.positional_embedding": ("text", 0, 4),
        "clip.transformer.resblocks.0.ln_1.weight": ("text", 1, 4),
        "clip.transformer.resblocks.1.attn.out_proj.weight": ("text", 2, 4),
        "clip.ln_final.weight": ("text", 2, 4),
        "clip.text_projection": ("text", 3, 4),
    }
    assert {k: ids[k] for k in want} == want
    # Every tower parameter is in exactly one layer; the temperature in none (scale 1).
    assert set(ids) == {n for n, _ in model.named_parameters()} - {"clip.logit_scale"}

    scales = lr_scales(model, layer_decay=0.5)
    assert scales["clip.visual.conv1.weight"] == scales["clip.token_embedding.weight"] == 0.125
    assert scales["clip.transformer.resblocks.1.attn.out_proj.weight"] == 0.5
    assert scales["clip.visual.proj"] == scales["clip.logit_scale"] == 1.0

    # The optimizer groups: one decayed and one exempt group per scale, the exemptions
    # those of the plain two-group split, each parameter once.
    groups = _names_by_group(model, param_groups(model, 0.1, layer_decay=0.5))
    plain_decay, plain_exempt = _names_by_group(model, param_groups(model, 0.1))
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (1.0, 0.1), (1.0, 0.0), (0.5, 0.1), (0.5, 0.0), (0.25, 0.1), (0.25, 0.0),
        (0.125, 0.1), (0.125, 0.0),
    ]  # fmt: skip
    for g in groups:
        assert all(scales[n] == g["lr_scale"] for n in g["params"])
        assert g["params"] <= (plain_decay if g["weight_decay"] else plain_exempt)["params"]
    assert sum(len(g["params"]) for g in groups) == len(scales)
    assert "clip.positional_embedding" in groups[-1]["params"]  # exempt, at the bottom


def test_layer_decay_on_a_timm_tower_equals_timms_own(tmp_path):
    """timm's param_groups_layer_decay on resnet18 with a 32-class head, against clipline's
    groups for the same trunk under open_clip's projection to 32 dimensions."""
    torch.manual_seed(3)
    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "r18.safetensors")
    cfg = _custom(
        image_tower="timm:resnet18", image_tower_weights=str(tmp_path / "r18.safetensors")
    )
    model = DualEncoder.from_config(cfg)
    ours = {}
    for g in _names_by_group(model, param_groups(model, 0.1, layer_decay=0.6)):
        ours.update({n: (g["lr_scale"], g["weight_decay"]) for n in g["params"]})

    reference = timm.create_model("resnet18", num_classes=MICRO_CFG["embed_dim"])
    theirs = {}
    for g in _names_by_group(reference, param_groups_layer_decay(reference, 0.1, layer_decay=0.6)):
        theirs.update({n: (g["lr_scale"], g["weight_decay"]) for n in g["params"]})
    trunk = {n.removeprefix("clip.visual.trunk."): v for n, v in ours.items() if ".trunk." in n}
    assert trunk.keys() == theirs.keys() - {"fc.weight", "fc.bias"}
    for name, (scale, wd) in trunk.items():
        assert scale == pytest.approx(theirs[name][0], rel=1e-12) and wd == theirs[name][1], name
    assert ours["clip.visual.head.proj.weight"] == theirs["fc.weight"] == (1.0, 0.1)
    assert len({s for s, _ in trunk.values()}) == 9  # stem + 8 blocks, each its own rate

    # The projection on the loaded trunk is the new head; a head LR multiplies it alone.
    assert model.new_head_params() == {"clip.visual.head.proj.weight"}
    scales = lr_scales(model, layer_decay=0.6, head_lr_scale=10.0)
    assert scales["clip.visual.head.proj.weight"] == 10.0
    assert scales["clip.visual.trunk.conv1.weight"] == pytest.approx(0.6**9)
    assert scales["clip.text_projection"] == 1.0


def test_new_heads_by_pattern_and_when_there_are_none(caplog):
    model = DualEncoder.from_config(_custom())
    assert model.new_head_params() == set()  # built at random: nothing is "new" on top
    with caplog.at_level(logging.WARNING):
        groups = param_groups(model, 0.1, head_lr_scale=10.0)
    assert "optim.head_lr_scale=10 is ignored" in caplog.text
    assert {g["lr_scale"] for g in groups} == {1.0}
    named = _names_by_group(
        model,
        param_groups(
            model, 0.1, head_lr_scale=3.0, head_params=["clip.visual.proj", "clip.text_*"]
        ),
    )
    fast = {n for g in named if g["lr_scale"] == 3.0 for n in g["params"]}
    assert fast == {"clip.visual.proj", "clip.text_projection"}
    with pytest.raises(ValueError, match=r"optim.head_params: 'clip.head\*' matches no parameter"):
        param_groups(model, 0.1, head_lr_scale=3.0, head_params=["clip.head*"])


def test_layer_decay_reaches_the_optimizer_step(tmp_path):
    """Through the loop: after one AdamW step without weight decay, every weight moved by
    lr * lr_scale (Adam's first update is lr * g / (|g| + eps))."""
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16)
    recipe = micro_recipe(shards, tmp_path / "run", steps=1, checkpoint_every=1)
    recipe["model"]["config"] = TWO_BLOCKS
    recipe["optim"] = {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "eps": 1e-12}
    recipe["optim"]["layer_decay"] = 0.5
    cfg = load_run_config(recipe)
    set_seed(cfg.loop.seed)  # as run_pretrain builds it
    before = DualEncoder.from_config(cfg.model, **model_overrides(cfg.loss)).state_dict()
    run_pretrain(cfg)
    after = consolidated_state(list_checkpoints(tmp_path / "run")[-1])
    for name, depth in [
        ("clip.visual.conv1.weight", 3),
        ("clip.visual.transformer.resblocks.0.mlp.c_fc.weight", 2),
        ("clip.transformer.resblocks.1.mlp.c_proj.weight", 1),
        ("clip.text_projection", 0),
    ]:
        moved = (after[name] - before[name]).abs().max().item()
        assert moved == pytest.approx(1e-3 * 0.5**depth, rel=1e-3), name


def test_lock_text_freezes_the_text_tower_but_its_top_groups():
    model = DualEncoder.from_config(_custom(TWO_BLOCKS, lock_text=True))
    text = [n for n, _ in model.named_parameters() if n.split(".")[1] != "visual"]
    text.remove("clip.logit_scale")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(text)
    optimised = {n for g in _names_by_group(model, param_groups(model, 0.1)) for n in g["params"]}
    assert not optimised & frozen and "clip.logit_scale" in optimised
    partly = DualEncoder.from_config(
        _custom(TWO_BLOCKS, lock_text=True, lock_text_unlocked_layers=2)
    )
    trains = {n for n, p in partly.named_parameters() if p.requires_grad and n in text}
    assert "clip.text_projection" in trains and "clip.ln_final.weight" in trains
    assert any(n.startswith("clip.transformer.resblocks.1.") for n in trains)
    assert not any(n.startswith("clip.transformer.resblocks.0.") for n in trains)
    # Both towers frozen whole: only the temperature would train.
    with pytest.raises(ValueError, match="freeze both towers whole"):
        DualEncoder.from_config(_custom(lock_text=True, lock_image=True))
    DualEncoder.from_config(_custom(lock_text=True, lock_image=True, lock_image_unlocked_groups=1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.layer_decay=0"], r"optim.layer_decay must be in \(0, 1\]"),
        (["optim.layer_decay=1.5"], r"optim.layer_decay must be in \(0, 1\]"),
        (["optim.head_lr_scale=0"], r"optim.head_lr_scale must be > 0"),
        (["model.lock_text_unlocked_layers=1"], r"only read with model.lock_text=true"),
        (["loop.max_reference_drop=-0.1"], r"loop.max_reference_drop must be >= 0"),
        (["loop.max_reference_drop=0.05"], r"no \[\[zeroshot\]\] task has reference = true"),
        (["zeroshot.1.root=/x"], r"'1' is not an index of the 1 entries"),
        (["zeroshot.root=/x"], r"name an entry, e.g. zeroshot.0.root="),
    ],
)
def test_bad_fine_tuning_settings_name_the_fix(overrides, message):
    recipe = {**read_recipe("cpu-debug"), "zeroshot": [{"name": "a", "root": "/a"}]}
    with pytest.raises(ValueError, match=message):
        load_run_config(recipe, ["data.shards=/d", *overrides])


def _reference_set(root: Path, model_section: dict) -> Path:
    """A zero-shot set labelled with what a run's initial model (``model_section``, seed 0)
    predicts, so that the run starts at acc1 = 1 and any changed prediction is a drop."""
    images = [s.image for s in generate_shapes(24, seed=7, image_size=32)]
    benchmark_sets.write_classification_set(root, ((im, 0) for im in images), SHAPES, ["a {c}."])
    set_seed(0)  # as run_pretrain builds it (loop.seed)
    model_cfg = build(ModelConfig, model_section, prefix="model.")
    model = DualEncoder.from_config(model_cfg, **model_overrides(LossConfig())).eval()
    source = open_classification_set("wds", root)
    with torch.no_grad():
        img_emb, _ = embed_indexed_images(
            model, source.indexed_items, model.preprocess_config(), 64, labels=True
        )
        classifier = build_classifier(model, SHAPES, ["a {c}."], model.tokenize)
    predicted = (img_emb @ classifier.T).argmax(dim=1).tolist()
    labelled = zip(images, predicted, strict=True)
    benchmark_sets.write_classification_set(root, labelled, SHAPES, ["a {c}."])
    return root


def _inline(value) -> str:
    """A TOML inline table, as a command-line override takes one."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_forgetting_guard_stops_the_run_and_a_resume_keeps_the_start(tmp_path):
    shards = make_shards(tmp_path / "shards", n=48, per_shard=16)
    run_dir = tmp_path / "run"
    recipe = micro_recipe(shards, run_dir, steps=4, eval_every=1, checkpoint_every=100)
    recipe["optim"]["lr"] = 1e-2
    recipe["zeroshot"] = [{"name": "ref", "root": "ref", "reference": True}]
    recipe["loop"]["max_reference_drop"] = 0.001
    _reference_set(tmp_path / "ref", recipe["model"])
    (tmp_path / "r.toml").write_text(to_toml(recipe))

    # Relative paths, as users write them: the eval set resolves against the working dir.
    cmd = [sys.executable, "-m", "clipline", "pretrain", "--recipe", "r.toml"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = [x for x in res.stderr.splitlines() if "max_reference_drop" in x]
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1 and not list((run_dir / "checkpoints").glob("*.tmp"))
    stop = int(saved[0].name.removeprefix("step_"))
    assert 1 <= stop < 4
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == stop
    assert line.startswith(f"clipline pretrain: stopped at step {stop}: reference task 'ref' acc1")
    assert f"fell from 1.0000 (step 0) to {final['eval/ref/acc1']:.4f}" in line
    assert f"> loop.max_reference_drop=0.001; checkpoint kept: {saved[0]}" in line
    assert final["eval/ref/delta"] == pytest.approx(final["eval/ref/acc1"] - 1.0)
    assert final["eval/ref/delta"] < -0.001
    assert not (run_dir / "DONE").exists()
    rows = _rows(run_dir)
    (start,) = [r for r in rows if r["step"] == 0]
    assert start["eval/ref/acc1"] == 1.0 and start["eval/ref/delta"] == 0.0
    deltas = {r["step"]: r["eval/ref/delta"] for r in rows if "eval/ref/delta" in r}
    assert sorted(deltas) == list(range(stop + 1))
    start_file = json.loads((run_dir / START_FILE).read_text())
    assert start_file["ref"]["step"] == 0 and start_file["ref"]["metrics"]["acc1"] == 1.0

    # Resumed with a looser limit, it runs to the end within it, still measured against the
    # start: re-measuring on the resumed weights would have made the start < 1.
    argv = ["pretrain", "--recipe", str(tmp_path / "r.toml"), f"run_dir={run_dir}"]
    argv += [f"zeroshot.0.root={tmp_path / 'ref'}", "--resume", "latest"]
    assert main([*argv, "loop.max_reference_drop=1.0"]) == 0
    assert (run_dir / "DONE").exists()
    after = [r for r in _rows(run_dir) if r["step"] > stop and "eval/ref/delta" in r]
    assert [r["step"] for r in after] == list(range(stop + 1, 5))
    for r in after:
        assert r["eval/ref/delta"] == pytest.approx(r["eval/ref/acc1"] - 1.0)
    assert json.loads((run_dir / START_FILE).read_text()) == start_file


def test_finetune_recipe_validates_and_trains(tmp_path):
    shards = make_shards(tmp_path / "shards", n=32, per_shard=16)
    _reference_set(tmp_path / "ref", {"name": "custom", "config": MICRO_CFG})
    argv = [
        "pretrain", "--recipe", "finetune", f"run_dir={tmp_path / 'run'}",
        f"data.shards={shards}", "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=32",
        "model.name=custom", f"model.config={_inline(MICRO_CFG)}",
        f"zeroshot.0.root={tmp_path / 'ref'}", "zeroshot.0.templates=['a {c}.']",
        "loop.steps=2", "loop.eval_every=1", "loop.mixed_precision=no", "optim.warmup_steps=1",
    ]  # fmt: skip
    cfg = load_run_config("finetune", argv[3:])
    assert (cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.weight_decay) == (1e-5, 0.7, 0.1)
    assert cfg.loop.max_reference_drop == 0.05 and cfg.zeroshot[0].reference
    assert main([*argv, "--dry-run"]) == 0
    assert main(argv) == 0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["step"] == 2 and "eval/reference/delta" in final


def test_forgetting_guard_stops_every_rank_of_a_torchrun(tmp_path):
    """2 gloo ranks: both evaluate, agree, save the one checkpoint together and exit 3; rank
    0 alone says why."""
    shards = make_shards(tmp_path / "shards", n=64, per_shard=16)
    recipe = micro_recipe(shards, tmp_path / "run", steps=4, eval_every=1, checkpoint_every=100)
    recipe["optim"]["lr"] = 1e-2
    recipe["zeroshot"] = [{"name": "ref", "root": "ref", "reference": True}]
    recipe["loop"]["max_reference_drop"] = 0.001
    _reference_set(tmp_path / "ref", recipe["model"])
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    rank = 'python -m clipline pretrain --recipe r.toml; echo $? > "rc.$RANK"'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "--no-python", "bash", "-c", rank]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]  # bash's status: the ranks' are in rc.*
    assert [(tmp_path / f"rc.{r}").read_text() for r in (0, 1)] == ["3\n"] * 2, res.stderr[-3000:]
    (saved,) = list_checkpoints(tmp_path / "run")
    lines = [x for x in res.stderr.splitlines() if "max_reference_drop" in x]
    assert len(lines) == 1 and f"checkpoint kept: {saved}" in lines[0], res.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["step"] == int(saved.name.removeprefix("step_")) and final["eval/ref/delta"] < 0


def test_layers_of_an_hf_text_tower_and_a_resnet(tmp_path):
    from tests.test_towers import tiny_bert

    model = DualEncoder.from_config(_custom(text_tower=f"hf:{tiny_bert(tmp_path / 'bert')}"))
    ids = layer_ids(model)
    text = {n: v for n, v in ids.items() if v[0] == "text"}
    assert text["clip.text.transformer.embeddings.word_embeddings.weight"] == ("text", 0, 4)
    assert text["clip.text.transformer.encoder.layer.1.output.dense.weight"] == ("text", 2, 4)
    head = {n for n in text if n.startswith("clip.text.proj.")}
    assert head and all(text[n] == ("text", 3, 4) for n in head)
    assert set(text) == {n for n, _ in model.named_parameters() if n.startswith("clip.text.")}
    # Its projection starts at random on the loaded encoder: the new head.
    assert model.new_head_params() == head
    bert = f"hf:{tmp_path / 'bert'}"
    locked = DualEncoder.from_config(_custom(text_tower=bert, lock_text=True))
    trains = {
        n for n, p in locked.named_parameters() if p.requires_grad and n.startswith("clip.text.")
    }
    assert trains == head  # open_clip's HF lock freezes the encoder, never the projection
    with pytest.raises(ValueError, match="model.lock_text_unlocked_layers=1: open_clip cannot"):
        DualEncoder.from_config(
            _custom(text_tower=bert, lock_text=True, lock_text_unlocked_layers=1)
        )

    resnet = DualEncoder.from_config(ModelConfig(name="open_clip:RN50"))
    image = {n: v for n, v in layer_ids(resnet).items() if v[0] == "image"}
    assert set(image) == {n for n, _ in resnet.named_parameters() if n.startswith("clip.visual.")}
    assert image["clip.visual.bn3.weight"] == ("image", 0, 6)
    assert image["clip.visual.layer4.0.conv1.weight"] == ("image", 4, 6)
    assert image["clip.visual.attnpool.c_proj.weight"] == ("image", 5, 6)
