"""Exports in every format reload, in their own library, to the embeddings clipline computes.

One tiny random model (MICRO_CFG: a plain ViT and CLIP's causal text transformer) is
exported once with ``--format all``; each test loads one folder the way its users would
(open_clip, transformers, onnxruntime) and compares with the clipline model.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch

from clipline.data import benchmark_sets
from clipline.launch.cli import main
from clipline.launch.run import load_encoders
from clipline.pretrain.export import export, list_export_formats
from clipline.pretrain.export_base import UnsupportedModel
from clipline.pretrain.export_clipline import export_model
from clipline.pretrain.model import DualEncoder
from tests.helpers import MICRO_CFG, micro_model

CAPTIONS = [
    "a photo of a cat.",
    "A DOG's toy: 3 red balls, 12 sticks!",
    "small red circle above a large blue square",
    "a very long caption that runs well past the sixteen token context of the micro model",
]
# Files a loader may read: nothing that needs unpickling.
SAFE_SUFFIXES = {".json", ".safetensors", ".onnx", ".txt"}


def _images(n: int = 4) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 37), (64, 48), (32, 32), (50, 77)]  # non-square: resize + centre crop matter
    return [
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, OUT) with OUT/<format>/ for every format; the model in eval mode."""
    model = micro_model(seed=3)
    with torch.no_grad():  # a temperature that is not the default, so that it must be carried
        model.logit_scale.fill_(3.0)
    out = tmp_path_factory.mktemp("export") / "micro-clip"
    written = export(model, out, format="all", run_config={"note": "test"}, step=7)
    assert written == {fmt: out / fmt for fmt in list_export_formats()}
    return model.eval(), out


@pytest.fixture(scope="module")
def reference(exported):
    """clipline's embeddings of _images() and CAPTIONS (text trimmed, as clipline runs it)."""
    model, _ = exported
    preprocess = model.image_transform(is_train=False)
    pixels_BCHW = torch.stack([preprocess(im) for im in _images()])
    with torch.no_grad():
        # One caption at a time, so that clipline trims each to its own length (all but the
        # long one): the other tools run the full context, and must agree anyway.
        lengths = [model.tokenize([c]).shape[1] for c in CAPTIONS]
        assert max(lengths[:3]) < lengths[3] == model.context_length
        txt_emb_BD = torch.cat([model.encode_text(model.tokenize([c])) for c in CAPTIONS])
        return pixels_BCHW, model.encode_image(pixels_BCHW), txt_emb_BD


def test_all_writes_self_describing_folders(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(list_export_formats())
    for path in out.rglob("*"):
        assert path.is_dir() or path.suffix in SAFE_SUFFIXES, path
    preprocess = model.preprocess_cfg
    assert {"size", "mean", "std", "interpolation", "resize_mode"} <= preprocess.keys()

    clipline_meta = json.loads((out / "clipline" / "clipline_export.json").read_text())
    open_clip_cfg = json.loads((out / "open_clip" / "open_clip_config.json").read_text())
    onnx_meta = json.loads((out / "onnx" / "onnx_export.json").read_text())
    for meta in (
        clipline_meta["preprocess"],
        open_clip_cfg["preprocess_cfg"],
        onnx_meta["preprocess"],
    ):
        assert meta == preprocess
    for tokenizer in (clipline_meta, open_clip_cfg, onnx_meta):
        assert tokenizer["tokenizer"]["context_length"] == 16
        assert tokenizer["tokenizer"]["type"] == "open_clip_bpe"
    assert clipline_meta["step"] == 7 and clipline_meta["run_config"] == {"note": "test"}
    assert onnx_meta["logit_scale"] == pytest.approx(np.exp(3.0))
    processor = json.loads((out / "hf" / "processor_config.json").read_text())["image_processor"]
    assert processor["image_mean"] == preprocess["mean"] and processor["resample"] == 3  # bicubic
    assert processor["size"] == {"shortest_edge": 32} and processor["do_center_crop"]

    # clipline's own format still round-trips exactly, and `clipline eval OUT` finds it.
    loaded = load_encoders(out)
    images_BCHW = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images_BCHW), model.encode_image(images_BCHW), rtol=0, atol=0
        )


# --- open_clip -----------------------------------------------------------------------------


def _assert_open_clip_matches(oc_model, preprocess, tokenizer, model, reference):
    pixels_BCHW, img_emb_BD, txt_emb_BD = reference
    theirs_BCHW = torch.stack([preprocess(im) for im in _images()])
    torch.testing.assert_close(theirs_BCHW, pixels_BCHW, rtol=0, atol=0)
    text_BL = tokenizer(CAPTIONS)
    assert text_BL.shape[1] == model.context_length  # open_clip's untrimmed path
    with torch.no_grad():
        torch.testing.assert_close(
            oc_model.encode_image(theirs_BCHW, normalize=True), img_emb_BD, rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            oc_model.encode_text(text_BL, normalize=True), txt_emb_BD, rtol=0, atol=1e-6
        )
        assert oc_model.logit_scale.item() == model.logit_scale.item()


def test_open_clip_local_dir(exported, reference):
    model, out = exported
    spec = f"local-dir:{out / 'open_clip'}"
    oc_model, _, preprocess = open_clip.create_model_and_transforms(spec)
    tokenizer = open_clip.get_tokenizer(spec)
    _assert_open_clip_matches(oc_model.eval(), preprocess, tokenizer, model, reference)


def test_open_clip_registered_name_and_pretrained_file(exported, reference, monkeypatch):
    from open_clip import factory

    # add_model_config changes open_clip's module-level registry: undo it after the test.
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    model, out = exported
    open_clip.add_model_config(out / "open_clip" / "model_configs")
    assert "micro-clip" in open_clip.list_models()  # named after the output folder
    oc_model, _, preprocess = open_clip.create_model_and_transforms(
        "micro-clip", pretrained=str(out / "open_clip" / "open_clip_model.safetensors")
    )
    tokenizer = open_clip.get_tokenizer("micro-clip")
    _assert_open_clip_matches(oc_model.eval(), preprocess, tokenizer, model, reference)


def test_open_clip_name_must_not_replace_a_builtin(tmp_path):
    with pytest.raises(ValueError, match="built-in"):
        export(micro_model(), tmp_path / "x", format="open_clip", run_config={}, name="ViT-B-32")
    with pytest.raises(ValueError, match="file stem"):
        export(micro_model(), tmp_path / "x", format="open_clip", run_config={}, name="a/b")
    assert not (tmp_path / "x").exists()


# --- transformers --------------------------------------------------------------------------


def test_hf_tokenizer_equals_open_clip(exported):
    from transformers import CLIPTokenizer

    from clipline.pretrain.export_hf import load_hf

    model, out = exported
    hf_tok = CLIPTokenizer.from_pretrained(out / "hf")
    assert load_hf(out / "hf")[1].tokenizer.get_vocab() == hf_tok.get_vocab()
    ours_BL = model.tokenizer(CAPTIONS)  # open_clip: pads with 0 to the context length
    theirs = hf_tok(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    assert hf_tok.model_max_length == model.context_length == theirs["input_ids"].shape[1]
    eot = model.tokenizer.eot_token_id
    rows = zip(ours_BL, theirs["input_ids"], theirs["attention_mask"], strict=True)
    for ours_L, ids_L, mask_L in rows:
        n = int((ours_L == eot).nonzero()[0]) + 1  # up to and with the end-of-text token
        assert ids_L[:n].tolist() == ours_L[:n].tolist()
        assert mask_L.tolist() == [1] * n + [0] * (len(mask_L) - n)
        assert set(ours_L[n:].tolist()) <= {0} and set(ids_L[n:].tolist()) <= {eot}
    assert ours_BL[3, -1] == eot  # truncated captions end with end-of-text in both
    # Transformers 4 reads vocab.json + merges.txt (the slow and the old fast tokenizer).
    vocab = json.loads((out / "hf" / "vocab.json").read_text())
    assert vocab == hf_tok.get_vocab() and len(vocab) == 49408
    assert vocab["<|endoftext|>"] == eot and vocab["<|startoftext|>"] == 49406
    merges = (out / "hf" / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_hf_model_features_equal_clipline(exported, reference):
    from transformers import CLIPModel, CLIPProcessor

    model, out = exported
    pixels_BCHW, img_emb_BD, txt_emb_BD = reference
    hf_model = CLIPModel.from_pretrained(out / "hf").eval()
    processor = CLIPProcessor.from_pretrained(out / "hf")
    text = processor(text=CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_BD = hf_model.get_image_features(pixel_values=pixels_BCHW).pooler_output
        text_BD = hf_model.get_text_features(**text).pooler_output
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(norm(image_BD, dim=-1), img_emb_BD, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm(text_BD, dim=-1), txt_emb_BD, rtol=0, atol=1e-5)
    assert hf_model.logit_scale.item() == pytest.approx(model.logit_scale.item(), abs=1e-6)


def test_hf_image_processor_equals_open_clip_preprocessing(exported, reference):
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    _, out = exported
    pixels_BCHW = reference[0]
    # The PIL backend resizes exactly as open_clip's transform does (both are PIL bicubic).
    pil = CLIPImageProcessorPil.from_pretrained(out / "hf")
    theirs = torch.as_tensor(np.stack(pil(images=_images())["pixel_values"]))
    torch.testing.assert_close(theirs, pixels_BCHW, rtol=0, atol=1e-6)
    # transformers 5's default torchvision backend resamples a little differently: a grey
    # level or so (one level after normalisation is 1 / 255 / std).
    default = CLIPProcessor.from_pretrained(out / "hf")
    theirs = default(images=_images(), return_tensors="pt")["pixel_values"]
    assert (theirs - pixels_BCHW).abs().max() < 2.01 / 255 / min(default.image_processor.image_std)


def _with(section: str, **options) -> dict:
    return {**MICRO_CFG, section: {**MICRO_CFG[section], **options}}


@pytest.mark.parametrize(
    ("model_cfg", "preprocess", "match"),
    [
        (_with("vision_cfg", ls_init_value=0.1), {}, "vision_cfg.ls_init_value=0.1"),
        ({**MICRO_CFG, "init_logit_bias": 0.0}, {}, "init_logit_bias=0.0"),
        (_with("vision_cfg", attentional_pool=True), {}, "vision_cfg.attentional_pool=True"),
        (_with("text_cfg", pool_type="last"), {}, "text_cfg.pool_type='last'"),
        (_with("text_cfg", no_causal_mask=True), {}, "no_causal_mask"),
        ({**MICRO_CFG, "init_logit_bias": -10.0}, {}, "init_logit_bias=-10.0"),
        (MICRO_CFG, {"resize_mode": "longest"}, "resize_mode='longest'"),
    ],
)
def test_hf_rejects_what_clipmodel_cannot_express(tmp_path, model_cfg, preprocess, match):
    model = DualEncoder(model_cfg, preprocess)
    with pytest.raises(UnsupportedModel, match=match):
        export(model, tmp_path / "hf", format="hf", run_config={})
    assert not (tmp_path / "hf").exists()  # checked before anything is written


def test_all_skips_formats_that_cannot_express_the_model(tmp_path, caplog, monkeypatch):
    import clipline.pretrain.export as export_module

    monkeypatch.setattr(
        export_module, "list_export_formats", lambda: ["open_clip", "hf"]
    )  # onnx: tested above
    model = DualEncoder({**MICRO_CFG, "init_logit_bias": -10.0})  # SigLIP: CLIPModel has no bias
    with caplog.at_level(logging.WARNING):
        written = export(model, tmp_path, format="all", run_config={})
    assert list(written) == ["open_clip"]
    assert "skipped the hf format" in caplog.text and "init_logit_bias" in caplog.text
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'open_clip'}")
    assert oc_model.logit_bias.item() == model.logit_bias.item()


# --- ONNX ----------------------------------------------------------------------------------


def test_onnx_towers_equal_clipline(exported, reference):
    import onnxruntime as ort

    model, out = exported
    pixels_BCHW, img_emb_BD, txt_emb_BD = reference
    image = ort.InferenceSession(out / "onnx" / "image.onnx", providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(out / "onnx" / "text.onnx", providers=["CPUExecutionProvider"])
    assert [i.name for i in image.get_inputs()] == ["image"]
    assert [i.type for i in text.get_inputs()] == ["tensor(int64)"]
    for batch in (1, len(CAPTIONS)):  # the batch axis is dynamic
        (theirs_BD,) = image.run(None, {"image": pixels_BCHW[:batch].numpy()})
        np.testing.assert_allclose(theirs_BD, img_emb_BD[:batch].numpy(), rtol=0, atol=1e-5)
    # Full context (open_clip's tokenizer) and trimmed ids (clipline's) give the same embeddings.
    for text_BL in (model.tokenizer(CAPTIONS[:3]), model.tokenize(CAPTIONS[:3])):
        (theirs_BD,) = text.run(None, {"text": text_BL.numpy()})
        np.testing.assert_allclose(theirs_BD, txt_emb_BD[:3].numpy(), rtol=0, atol=1e-5)
    assert model.tokenize(CAPTIONS[:3]).shape[1] < model.context_length  # the trim happened
    np.testing.assert_allclose(np.linalg.norm(theirs_BD, axis=1), 1.0, atol=1e-6)


# --- command line ----------------------------------------------------------------------------


def test_cli_converts_a_clipline_export(exported, tmp_path, capsys):
    model, _ = exported
    source = export_model(model, tmp_path / "src", run_config={"a": 1}, step=5)
    assert main(["export", str(source), str(tmp_path / "oc"), "--format", "open_clip"]) == 0
    assert "(open_clip)" in capsys.readouterr().out
    assert (tmp_path / "oc" / "model_configs" / "oc.json").is_file()
    with pytest.raises(SystemExit):
        main(["export", str(source), str(tmp_path / "x"), "--format", "tflite"])
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


def test_missing_export_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "clipline.pretrain.export_onnx", raising=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs 'onnxruntime'.*clipline\[export\]"):
        export(micro_model(), tmp_path, format="onnx", run_config={})


def test_hf_quick_gelu_and_the_export_time_parity_check(tmp_path, monkeypatch):
    from clipline.pretrain import export_hf

    model = DualEncoder({**MICRO_CFG, "quick_gelu": True})  # OpenAI's activation
    export(model, tmp_path / "ok", format="hf", run_config={})  # reloads and compares inside
    assert (
        json.loads((tmp_path / "ok" / "config.json").read_text())["text_config"]["hidden_act"]
        == "quick_gelu"
    )

    # A mapping error that still loads (the wrong activation) is caught before returning.
    right_config = export_hf.hf_config

    def wrong_config(model):
        config = right_config(model)
        config.vision_config.hidden_act = "gelu"
        return config

    monkeypatch.setattr(export_hf, "hf_config", wrong_config)
    with pytest.raises(RuntimeError, match="reloaded image embeddings differ"):
        export(model, tmp_path / "bad", format="hf", run_config={})


def test_onnx_text_length_is_fixed_when_padding_matters(tmp_path):
    from clipline.pretrain.export_onnx import load_onnx

    # Without the causal mask, padding tokens change every embedding: no trimming, fixed L.
    model = DualEncoder(_with("text_cfg", no_causal_mask=True))
    assert not model.tokenize.trim
    export(model, tmp_path, format="onnx", run_config={})  # parity-checked inside
    encoders = load_onnx(tmp_path)
    assert encoders.meta["text"]["input"]["shape"] == ["B", model.context_length]
    assert encoders.text.get_inputs()[0].shape[1] == model.context_length


def test_eval_embed_and_export_read_every_format(exported, tmp_path, monkeypatch, capsys):
    """The CLI reads each folder `export --format all` wrote, and the root, as the same model
    (an HF folder used to fail with KeyError: 'model'); ONNX is read by eval and embed."""
    model, out = exported
    benchmark_sets.write_retrieval_set(
        tmp_path / "ret", [(im, [c]) for im, c in zip(_images(), CAPTIONS, strict=True)]
    )
    (tmp_path / "texts.txt").write_text("\n".join(CAPTIONS) + "\n")
    monkeypatch.chdir(tmp_path)
    sources = {fmt: out / fmt for fmt in list_export_formats()} | {"root": out}
    sources["hf"] = Path(os.path.relpath(sources["hf"]))  # a relative path too
    metrics, embeddings = {}, {}
    for name, path in sources.items():
        assert main(["eval", str(path), "--retrieval", "ret=ret", "--device", "cpu"]) == 0, name
        metrics[name] = json.loads(capsys.readouterr().out)
        cmd = ["embed", str(path), "--texts", "texts.txt", "-o", f"idx-{name}", "--device", "cpu"]
        assert main(cmd) == 0, name
        embeddings[name] = np.load(tmp_path / f"idx-{name}" / "embeddings.npy")
        capsys.readouterr()
        assert main(["search", str(path), f"idx-{name}", CAPTIONS[1], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["id"] == CAPTIONS[1]
    with torch.no_grad():
        want = torch.cat([model.encode_text(model.tokenize([c])) for c in CAPTIONS]).numpy()
    for name in ("clipline", "open_clip", "hf", "root"):  # the same modules and weights
        np.testing.assert_allclose(embeddings[name], want, atol=1e-6, err_msg=name)
        assert metrics[name] == metrics["clipline"], name
    np.testing.assert_allclose(embeddings["onnx"], want, atol=1e-5)
    assert metrics["onnx"].keys() == metrics["clipline"].keys()

    # export converts open_clip and hf folders back; an ONNX folder is refused in one line.
    for fmt in ("open_clip", "hf"):
        assert main(["export", str(sources[fmt]), f"back-{fmt}", "--format", "clipline"]) == 0
        back = load_encoders(tmp_path / f"back-{fmt}")
        for got, ref in zip(back.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(got, ref), fmt
    capsys.readouterr()
    assert main(["export", str(sources["onnx"]), "x", "--format", "clipline"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ONNX export, which cannot be converted" in err and len(err.splitlines()) == 1


def test_reading_an_hf_export_without_transformers_names_the_extra(exported, monkeypatch, capsys):
    _, out = exported
    monkeypatch.delitem(sys.modules, "clipline.pretrain.export_hf", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert main(["eval", str(out / "hf"), "--retrieval", "r=nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a hf export" in err and "clipline[export]" in err and len(err.splitlines()) == 1


def test_formats_are_listed_and_an_unknown_one_is_refused_with_close_matches(tmp_path):
    """Export formats dispatch through one registry: listed in order, an unknown name is a
    ValueError naming the valid ones and the closest, before anything is written."""
    assert list_export_formats() == ["clipline", "open_clip", "hf", "onnx"]
    with pytest.raises(ValueError, match=r"format='onxx'.*valid: clipline, open_clip, hf, onnx"):
        export(micro_model(), tmp_path / "x", format="onxx", run_config={})
    with pytest.raises(ValueError, match=r"Did you mean 'open_clip'"):
        export(micro_model(), tmp_path / "x", format="openclip", run_config={})
    assert not (tmp_path / "x").exists()
