"""``model.pretrained``: each format written by its own library, read back by clipline.

Every source here is written by the library users have it from (open_clip's factory and
``save_for_hf``, transformers' ``save_pretrained``, clipline's export and checkpointer), from
tiny models with perturbed weights (so that a swapped or zero tensor shows), and clipline's
model built from it must embed as the source library's own model does on the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch
from open_clip.push_to_hf_hub import save_for_hf
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

from clipline.launch.cli import main
from clipline.launch.run import load_encoders
from clipline.pretrain.checkpoint import (
    consolidated_state,
    list_checkpoints,
    read_config,
    read_step,
    save_checkpoint,
    training_state,
)
from clipline.pretrain.export import export
from clipline.pretrain.export_hf import (
    hf_tokenizer,
    image_features,
    open_clip_preprocess,
    text_features,
)
from clipline.pretrain.model import DualEncoder, ModelConfig
from clipline.pretrain.pretrained import pretrained_config
from tests.helpers import MICRO_CFG, free_port, make_shards, micro_recipe, to_toml

CAPTIONS = ["a photo of a cat.", "A DOG's toy: 3 red balls!", "a small red circle " * 12]


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Moves every tensor off its initial value (zero biases, unit norms) reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def _build(path: Path | str, **kw) -> DualEncoder:
    return DualEncoder.from_config(ModelConfig(pretrained=str(path), **kw)).eval()


def _assert_same_embeddings(
    ours: DualEncoder, image_fn, text_fn, text_ids, atol=1e-6, captions=CAPTIONS
) -> None:
    """``text_ids``: the source tokenizer's ids of ``captions``."""
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), image_fn(images), atol=atol, rtol=0)
        want = text_fn(text_ids)
        torch.testing.assert_close(ours.encode_text(text_ids), want, atol=atol, rtol=0)
        # What training and evaluation feed it: its own tokenizer, trimmed where exact.
        got = ours.encode_text(ours.tokenize(captions))
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def oc(tmp_path_factory):
    """An open_clip model made by open_clip's factory, saved as users have such weights."""
    root = tmp_path_factory.mktemp("open_clip")
    (root / "cfg").mkdir()
    (root / "cfg" / "open_clip_config.json").write_text(json.dumps({"model_cfg": MICRO_CFG}))
    spec = f"local-dir:{root / 'cfg'}"  # open_clip's factory, without its global registry
    torch.manual_seed(0)
    model = open_clip.create_model(spec, load_weights=False)
    _perturb(model, seed=0)
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, root / "oc.safetensors")
    torch.save(state, root / "oc.pt")
    optimizer = torch.optim.AdamW(model.parameters())
    # open_clip_train's checkpoint: the DDP-wrapped model's keys, with its optimizer.
    train_ckpt = {
        "epoch": 3,
        "name": "run",
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer": optimizer.state_dict(),
    }
    torch.save(train_ckpt, root / "epoch_3.pt")
    # open_clip's hub layout; CLIP's BPE tokenizer has no files to save (it ships with open_clip).
    no_files = SimpleNamespace(save_pretrained=lambda _: None)
    save_for_hf(model, no_files, MICRO_CFG, root / "hub", safe_serialization="both")
    return SimpleNamespace(root=root, model=model, tokenizer=tokenizer, state=state)


@pytest.mark.parametrize("source", ["oc.safetensors", "oc.pt", "epoch_3.pt", "hub", "hub-bin-only"])
def test_open_clip_weights_embed_as_open_clip(oc, source):
    path = oc.root / source
    if source == "hub-bin-only":  # the hub layout as older uploads have it: a .bin alone
        path = oc.root / "hub-bin-only"
        shutil.copytree(oc.root / "hub", path, dirs_exist_ok=True)
        (path / "open_clip_model.safetensors").unlink()
    # A bare file has no config: model.name says the architecture. A folder brings its own.
    kw = {"name": "custom", "config": MICRO_CFG} if path.is_file() else {"name": "pretrained"}
    ours = _build(path, **kw)
    for k, v in oc.state.items():
        assert torch.equal(ours.clip.state_dict()[k].reshape(v.shape), v), k
    text_ids = oc.tokenizer(CAPTIONS)
    assert torch.equal(ours.tokenizer(CAPTIONS), text_ids)  # the tokenizer came with them
    assert ours.preprocess_cfg["mean"] == list(oc.model.visual.image_mean)
    _assert_same_embeddings(
        ours,
        lambda x: oc.model.encode_image(x, normalize=True),
        lambda t: oc.model.encode_text(t, normalize=True),
        text_ids,
    )


HF_EPS = 1e-6  # not torch's default: must reach open_clip's LayerNorms


def _save_hf_clip(
    root: Path, *, text: dict, pad_token: str | None = None, added: tuple = (), **tower
) -> Any:
    """A transformers CLIPModel from a tiny CLIPConfig, saved by save_pretrained with its
    tokenizer (CLIP's BPE built offline from open_clip's vocabulary) and image processor."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tower = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, **tower}
    config = CLIPConfig(
        projection_dim=24,
        vision_config={**tower, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={**tower, "num_attention_heads": 4, "max_position_embeddings": 16, **text},
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    _perturb(model, seed=1)
    model.eval()
    model.save_pretrained(root)
    tokenizer = hf_tokenizer(SimpleTokenizer(), context_length=16)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    tokenizer.add_tokens(list(added))
    tokenizer.save_pretrained(root)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
        resample=2,  # bilinear
    )
    processor.save_pretrained(root)
    # The reference tokenizer is the saved one, as users load it (an in-memory pad_token
    # set above also splits "!" off as a special token; the saved one does not).
    saved = AutoTokenizer.from_pretrained(root)
    return SimpleNamespace(root=root, model=model, tokenizer=saved)


def _hf_ids(tokenizer: Any, captions: list[str] = CAPTIONS) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids


def _assert_embeds_as_transformers(ours, hf_model, text_ids, captions=CAPTIONS) -> None:
    """As transformers' own features, normalised (its attention kernels: within 1e-5)."""
    _assert_same_embeddings(
        ours,
        lambda x: image_features(hf_model, x),
        lambda t: text_features(hf_model, t),
        text_ids,
        atol=1e-5,
        captions=captions,
    )


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """OpenAI's settings (eos 49407, the largest id, padded with end-of-text), GELU and a
    LayerNorm eps that is not torch's default."""
    text = {"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407}
    text |= {"pad_token_id": 49407}
    root = tmp_path_factory.mktemp("hf") / "clip"
    return _save_hf_clip(root, text=text, hidden_act="gelu", layer_norm_eps=HF_EPS)


def test_transformers_clip_embeds_as_transformers(hf):
    ours = _build(hf.root, name="pretrained")
    text_cfg = ours.model_cfg["text_cfg"]
    assert ours.model_cfg["quick_gelu"] is False and ours.model_cfg["embed_dim"] == 24
    assert text_cfg["norm_kwargs"] == {"eps": HF_EPS}
    assert ours.model_cfg["vision_cfg"]["norm_kwargs"] == {"eps": HF_EPS}
    text_ids = _hf_ids(hf.tokenizer)
    # The folder's tokenizer is CLIP's BPE, so open_clip's implementation of it tokenizes:
    # the same ids up to end-of-text, then padding with 0 (transformers pads with
    # end-of-text), so the padding trim stays on.
    assert "hf_tokenizer_name" not in text_cfg and ours.tokenize.trim
    ids = ours.tokenizer(CAPTIONS)
    after_eot = torch.cumsum(text_ids == 49407, dim=1) - (text_ids == 49407).int() > 0
    assert torch.equal(ids, text_ids.masked_fill(after_eot, 0))
    assert ours.preprocess_cfg["mean"] == [0.5, 0.4, 0.3]
    assert ours.preprocess_cfg["interpolation"] == "bilinear"
    assert ours.preprocess_cfg["size"] in (32, [32, 32])
    _assert_embeds_as_transformers(ours, hf.model, text_ids)


def test_transformers_clip_with_added_tokens_pooled_at_eos(tmp_path):
    """A tokenizer with added tokens (ids above end-of-text) is the folder's own, and
    CLIPModel pools at the first eos_token_id, not at the largest id: so must open_clip
    (pool_type 'eos'). Padding with '!' (id 0) leaves the trim on."""
    text = {"vocab_size": 49420, "eos_token_id": 49407, "pad_token_id": 0}
    hf = _save_hf_clip(tmp_path / "clip", text=text, pad_token="!", added=("<sku>",))
    ours = _build(tmp_path / "clip", name="pretrained")  # quick_gelu: CLIPConfig's default
    text_cfg = ours.model_cfg["text_cfg"]
    assert (text_cfg["pool_type"], text_cfg["eos_id"], text_cfg["pad_id"]) == ("eos", 49407, 0)
    assert text_cfg["hf_tokenizer_name"] == str((tmp_path / "clip").absolute())
    assert ours.model_cfg["quick_gelu"] is True and "norm_kwargs" not in text_cfg
    captions = ["a <sku> photo of a cat.", *CAPTIONS[1:]]
    text_ids = _hf_ids(hf.tokenizer, captions)
    assert text_ids[0, 2] == 49408  # the added token: argmax pooling would pick it
    assert torch.equal(ours.tokenizer(captions), text_ids) and ours.tokenize.trim
    _assert_embeds_as_transformers(ours, hf.model, text_ids, captions)


def test_transformers_clip_goes_back_to_transformers(tmp_path):
    """OpenAI's settings (CLIP's BPE, eos 49407, quick_gelu, eps 1e-5): what starts from the
    folder exports back as a CLIPModel that embeds as the original."""
    from transformers import CLIPModel

    text = {"vocab_size": 49408, "eos_token_id": 49407, "pad_token_id": 49407}
    hf = _save_hf_clip(tmp_path / "clip", text=text)
    ours = _build(tmp_path / "clip", name="pretrained")
    export(ours, tmp_path / "back", format="hf", run_config={})  # runs its own parity check
    back = CLIPModel.from_pretrained(tmp_path / "back").eval()
    text_ids = _hf_ids(hf.tokenizer)
    with torch.no_grad():
        for fn, x in ((image_features, _images()), (text_features, text_ids)):
            torch.testing.assert_close(fn(back, x), fn(hf.model, x), atol=1e-5, rtol=0)


def test_transformers_clip_without_image_processor_takes_clip_defaults(hf, tmp_path, caplog):
    for f in hf.root.iterdir():
        if f.name not in ("preprocessor_config.json", "processor_config.json"):
            shutil.copy(f, tmp_path / f.name)
    source = pretrained_config(ModelConfig(name="pretrained", pretrained=str(tmp_path)))
    assert source.preprocess["size"] == 32 and source.preprocess["interpolation"] == "bicubic"
    assert "no image processor config" in caplog.text


def test_transformers_image_processor_of_older_versions():
    """openai/clip-vit-base-patch32's preprocessor_config.json (transformers < 4.26): sizes
    as one int, the shortest edge."""
    legacy = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    got = open_clip_preprocess(legacy)
    assert (got["size"], got["resize_mode"], got["interpolation"]) == (224, "shortest", "bicubic")
    assert got["mean"] == legacy["image_mean"] and got["std"] == legacy["image_std"]


def test_transformers_clip_without_tokenizer_is_one_error(hf, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf.root / name, tmp_path / name)
    with pytest.raises(ValueError, match="without tokenizer files.*save_pretrained"):
        _build(tmp_path, name="pretrained")


def _micro_dual_encoder() -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder(MICRO_CFG)
    _perturb(model, seed=2)
    return model.eval()


def test_clipline_export_and_checkpoint(tmp_path, monkeypatch):
    source = _micro_dual_encoder()
    export(source, tmp_path / "export", format="clipline", run_config={})
    text_ids = source.tokenizer(CAPTIONS)
    ours = _build(tmp_path / "export", name="pretrained")
    _assert_same_embeddings(ours, source.encode_image, source.encode_text, text_ids)

    # A checkpoint with its optimizer state and step: only the weights are taken.
    optimizer = torch.optim.AdamW(source.parameters())
    run_config = {"model": dataclasses.asdict(ModelConfig(name="custom", config=MICRO_CFG))}
    ckpt = save_checkpoint(
        tmp_path / "run",
        step=7,
        states=training_state(source, optimizer),
        state={},
        config=run_config,
        keep_last=0,
    )
    monkeypatch.chdir(tmp_path)  # relative paths are read from the current directory
    for path in ("run", os.path.relpath(ckpt, tmp_path)):
        ours = _build(path, name="pretrained")
        _assert_same_embeddings(ours, source.encode_image, source.encode_text, text_ids)
    reference = load_encoders(tmp_path / "run")  # clipline's own checkpoint reader
    _assert_same_embeddings(ours, reference.encode_image, reference.encode_text, text_ids)


def test_mismatch_is_one_error_listing_every_key(oc, tmp_path):
    weights = {k: v.contiguous() for k, v in oc.state.items()}
    weights["visual.extra_head"] = torch.zeros(3)
    save_file(weights, tmp_path / "w.safetensors")
    other = json.loads(json.dumps(MICRO_CFG))
    other["embed_dim"] = 16  # projections mis-shaped
    other["text_cfg"]["layers"] = 2  # a text block missing from the file
    with pytest.raises(ValueError) as e:
        _build(tmp_path / "w.safetensors", name="custom", config=other)
    msg = str(e.value)
    assert str(tmp_path / "w.safetensors") in msg and "Fix:" in msg and "model.name" in msg
    assert "missing: transformer.resblocks.1." in msg
    assert "unexpected: visual.extra_head [3]" in msg
    assert "visual.proj [32, 32] in the file, [32, 16] in the model" in msg


def test_configs_that_disagree_are_errors(oc, hf):
    with pytest.raises(ValueError, match="model.name='clipline:tiny' builds a different model"):
        _build(oc.root / "hub", name="clipline:tiny")
    with pytest.raises(ValueError, match="embed_dim: 24 vs 32.*set model.name='pretrained'"):
        _build(hf.root, name="custom", config=MICRO_CFG)
    with pytest.raises(ValueError, match="carries no config, so model.name must name"):
        _build(oc.root / "oc.safetensors", name="pretrained")
    with pytest.raises(ValueError, match="model.pretrained, which is not set"):
        ModelConfig(name="pretrained").resolve()
    with pytest.raises(ValueError, match="both give the image tower's weights"):
        ModelConfig(
            name="pretrained",
            pretrained=str(oc.root / "hub"),
            image_tower="timm:resnet18",
            image_tower_weights=str(oc.root / "oc.safetensors"),
        ).resolve()
    with pytest.raises(ValueError, match="model.image_tower=.* would replace part"):
        ModelConfig(
            name="pretrained", pretrained=str(oc.root / "hub"), image_tower="timm:resnet18"
        ).resolve()
    # Agreeing is fine: model.name may repeat the weights' own config.
    assert _build(oc.root / "hub", name="custom", config=MICRO_CFG).embed_dim == 32


def test_lit_from_a_pretrained_clip(oc):
    """model.lock_image applies to the loaded weights: the pretrained image tower is frozen."""
    ours = _build(oc.root / "hub", name="pretrained", lock_image=True)
    assert torch.equal(ours.clip.visual.proj, oc.state["visual.proj"])
    assert not any(p.requires_grad for p in ours.clip.visual.parameters())
    text = [p for n, p in ours.clip.named_parameters() if not n.startswith("visual.")]
    assert text and all(p.requires_grad for p in text)


def test_nothing_downloads_and_nothing_unpickles_code(tmp_path, capsys):
    # The CLI refuses at config check: one line, exit 2, before anything is read or written.
    args = ["pretrain", "--recipe", "cpu-debug", "data.shards=/d", "--dry-run"]
    assert main([*args, "model.name=pretrained", "model.pretrained=openai"]) == 2
    assert "never downloads weights" in capsys.readouterr().err

    for tag in ("openai", "laion2b_s34b_b79k", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        with pytest.raises(ValueError, match="never downloads weights.*local file"):
            ModelConfig(name="open_clip:ViT-B-32", pretrained=tag).resolve()
    with pytest.raises(ValueError, match="no such file or directory.*current directory"):
        ModelConfig(name="pretrained", pretrained="missing/weights.safetensors").resolve()

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state_dict": {"visual.proj": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="holds more than tensors.*safetensors"):
        _build(tmp_path / "evil.pt", name="custom", config=MICRO_CFG)
    assert not marker.exists()


def test_cli_run_starts_from_pretrained_weights(oc, tmp_path):
    """A real run through the CLI under torchrun (2 CPU processes, DDP): step 1 is the first
    step, the optimizer starts empty, and the weights every rank starts from are the file's
    (a learning rate too small to move them)."""
    shards = make_shards(tmp_path / "shards", n=64)
    recipe = micro_recipe(shards, Path("run"), steps=1, checkpoint_every=1)
    recipe["model"]["pretrained"] = "weights/oc.safetensors"  # relative to the working dir
    recipe["optim"] |= {"lr": 1e-12, "weight_decay": 0.0, "warmup_steps": 0}
    (tmp_path / "weights").mkdir()
    shutil.copy(oc.root / "oc.safetensors", tmp_path / "weights" / "oc.safetensors")
    (tmp_path / "recipe.toml").write_text(to_toml(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "-m", "clipline", "pretrain", "--recipe", "recipe.toml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    assert "weights/oc.safetensors (weights file)" in res.stderr  # the log names the source

    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert read_step(ckpt) == 1
    weights = consolidated_state(ckpt, "model")
    for k, v in oc.state.items():
        torch.testing.assert_close(weights[f"clip.{k}"].reshape(v.shape), v, atol=1e-8, rtol=0)
    random_init = _micro_dual_encoder().clip.state_dict()  # the file is not an init's twin
    assert not torch.allclose(random_init["visual.proj"], oc.state["visual.proj"])
    optim = consolidated_state(ckpt, "optim")["state"]
    assert optim and {float(s["step"]) for s in optim.values()} == {1.0}  # a fresh optimizer
    # Recorded absolute: resuming or evaluating from another directory finds the weights.
    saved = read_config(ckpt)["model"]["pretrained"]
    assert Path(saved).is_absolute() and Path(saved).samefile(
        tmp_path / "weights" / "oc.safetensors"
    )
