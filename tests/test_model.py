"""Dual encoder: registry, temperature, normalisation, weight-decay groups, schedule."""

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from clipline.launch.config import load_run_config
from clipline.pretrain.model import DualEncoder, ModelConfig
from clipline.pretrain.optim import OptimConfig, build_optimizer, lr_at, param_groups
from clipline.pretrain.towers import list_towers
from tests.helpers import MICRO_CFG, global_batch, micro_model


def test_registry_resolves_prefixes():
    assert ModelConfig(name="open_clip:ViT-B-32").resolve()["embed_dim"] == 512
    assert ModelConfig(name="clipline:tiny").resolve()["vision_cfg"]["image_size"] > 0
    assert "clipline:tiny" in list_towers("model")
    with pytest.raises(ValueError, match="Did you mean 'open_clip:ViT-B-32'.*Valid names"):
        ModelConfig(name="ViT-B-32").resolve()  # no prefix: never guessed


def test_custom_config_needs_all_keys():
    with pytest.raises(ValueError, match="embed_dim, vision_cfg and text_cfg"):
        ModelConfig(name="custom", config={"embed_dim": 8}).resolve()


def test_embeddings_are_unit_norm_and_temperature_is_clip_init():
    model = micro_model()
    images, texts = global_batch(4)
    img, txt, scale, bias = model(images, texts)
    assert bias is None  # CLIP-style: no logit bias
    assert img.shape == txt.shape == (4, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)


def test_logit_scale_is_clamped_at_100():
    model = micro_model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


def test_no_weight_decay_on_small_tensors_and_declared_ones():
    model = DualEncoder(MICRO_CFG)
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "clip.logit_scale" in no_decay_names and "clip.positional_embedding" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "clip.text_projection" in {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2


def _open_clip_train_exclude():
    """The ``exclude`` lambda of the installed open_clip_train/main.py, compiled from its source
    (it lives inside ``main()``, so it cannot be imported)."""
    path = importlib.util.find_spec("open_clip_train.main").origin
    tree = ast.parse(Path(path).read_text())
    found = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["exclude"]
        and isinstance(node.value, ast.Lambda)
    ]
    assert len(found) == 1, f"open_clip_train's exclude lambda not found in {path}"
    return eval(compile(ast.Expression(found[0]), path, "eval"))


@pytest.mark.parametrize("name", ["open_clip:ViT-B-32", "open_clip:RN50"])
def test_open_clip_weight_decay_rule_matches_open_clip_train(name):
    model = DualEncoder.from_config(ModelConfig(name=name))
    # open_clip's trainer on the open_clip model itself (DualEncoder.clip), with its lambda.
    exclude = _open_clip_train_exclude()
    named = list(model.clip.named_parameters())
    want_no_decay = {f"clip.{n}" for n, p in named if exclude(n, p) and p.requires_grad}
    want_decay = {f"clip.{n}" for n, p in named if not exclude(n, p) and p.requires_grad}

    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.3, weight_decay_rule="open_clip"))
    names = {p: n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    assert {names[p] for p in decay["params"]} == want_decay
    assert {names[p] for p in no_decay["params"]} == want_no_decay
    # The two rules differ exactly on what the model declares in no_weight_decay() with
    # ndim >= 2: positional embeddings, which open_clip decays and clipline does not (open_clip's
    # ViT class embedding is 1-D: decayed by neither).
    declared = model.no_weight_decay()
    assert "clip.positional_embedding" in declared & want_decay
    ours, _ = param_groups(model, 0.3)
    assert {names[p] for p in ours["params"]} == want_decay - declared


def test_weight_decay_rule_is_validated():
    with pytest.raises(ValueError, match=r"optim.weight_decay_rule: 'timm' is not one of"):
        load_run_config("cpu-debug", ["data.shards=/d", "optim.weight_decay_rule=timm"])
    cfg = load_run_config("cpu-debug", ["data.shards=/d", "optim.weight_decay_rule=open_clip"])
    assert cfg.optim.weight_decay_rule == "open_clip"


def test_schedule_is_a_pure_function_of_step():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(0.0)
    assert lr_at(60, OptimConfig(lr=1.0, warmup_steps=10, schedule="constant"), 110) == 1.0
    cooldown = OptimConfig(lr=1.0, warmup_steps=10, schedule="constant_cooldown", cooldown_steps=20)
    assert [lr_at(s, cooldown, 110) for s in (5, 60, 89, 90, 100, 110)] == pytest.approx(
        [0.6, 1.0, 1.0, 1.0, 0.5, 0.0]
    )


@pytest.mark.parametrize("name", ["micro", "clipline:tiny"])
def test_trimming_padding_columns_is_exact(name):
    model = micro_model() if name == "micro" else DualEncoder.from_config(ModelConfig(name=name))
    captions = ["a red circle", "grinning face, an emoji from smileys & emotion", "x"]
    full_BL = model.tokenizer(captions)
    trimmed_BL = model.tokenize(captions)
    longest = int((full_BL != 0).sum(dim=1).max())
    assert trimmed_BL.shape == (3, longest) and longest < full_BL.shape[1]
    assert torch.equal(trimmed_BL, full_BL[:, :longest])
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(trimmed_BL), model.encode_text(full_BL), rtol=1e-5, atol=1e-6
        )


def test_no_trimming_for_a_text_tower_without_causal_mask():
    cfg = {
        **MICRO_CFG,
        "text_cfg": {**MICRO_CFG["text_cfg"], "no_causal_mask": True, "pool_type": "last"},
    }
    model = DualEncoder(cfg)
    assert not model.tokenize.trim
    assert model.tokenize(["a b"]).shape[1] == 16


def test_siglip_models_get_a_bias_and_siglip_init():
    model = micro_model(loss="siglip")
    assert model.logit_bias.item() == -10.0
    assert math.isclose(model.logit_scale.exp().item(), 10.0, rel_tol=1e-5)


def _custom(**kw) -> ModelConfig:
    return ModelConfig(name="custom", config=MICRO_CFG, **kw)


def test_lit_locks_the_image_tower_and_the_optimizer_skips_it():
    model = DualEncoder.from_config(_custom(lock_image=True))
    visual = [p for n, p in model.named_parameters() if n.startswith("clip.visual.")]
    assert visual and not any(p.requires_grad for p in visual)
    decay, no_decay = param_groups(model, 0.2)
    optimised = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert not optimised & {id(p) for p in visual}
    partly = DualEncoder.from_config(_custom(lock_image=True, lock_image_unlocked_groups=1))
    assert any(
        p.requires_grad for n, p in partly.named_parameters() if n.startswith("clip.visual.")
    )


def test_patch_dropout_only_in_training():
    model = DualEncoder.from_config(_custom(patch_dropout=0.5))
    assert model.model_cfg["vision_cfg"]["patch_dropout"] == 0.5
    images, _ = global_batch(2)
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = model.encode_image(images), model.encode_image(images)
        assert not torch.allclose(a, b)  # different patches dropped
        model.eval()
        torch.testing.assert_close(model.encode_image(images), model.encode_image(images))


def test_grad_checkpointing_gives_the_same_gradients():
    from clipline.pretrain.loss import InfoNCELoss, LossConfig

    images, texts = global_batch(4)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = DualEncoder.from_config(_custom(grad_checkpointing=ckpt))
        InfoNCELoss(LossConfig())(*model(images, texts)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_timm_image_tower_trains_and_exports(tmp_path):
    from clipline.pretrain.export_clipline import export_model, load_export
    from clipline.pretrain.loss import InfoNCELoss, LossConfig

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "resnet18",  # any timm model; random init, nothing downloaded
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 32,
        },
        "text_cfg": MICRO_CFG["text_cfg"],
    }
    model = DualEncoder.from_config(ModelConfig(name="custom", config=cfg))
    images, texts = global_batch(4)
    InfoNCELoss(LossConfig())(*model(images, texts)).backward()
    assert model.clip.visual.trunk.conv1.weight.grad is not None
    loaded = load_export(export_model(model, tmp_path / "exp", run_config={}))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0
        )
