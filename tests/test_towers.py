"""Towers beyond open_clip's ViT: any timm image model and a local HF transformers text tower."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from clipline.launch.config import load_run_config
from clipline.pretrain.export_clipline import export_model, load_export
from clipline.pretrain.loss import InfoNCELoss, LossConfig
from clipline.pretrain.model import DualEncoder, ModelConfig
from tests.helpers import MICRO_CFG, global_batch

CAPTIONS = ["a red cat", "a blue dog", "smiling face with heart eyes", "a green photo of the cat"]


def tiny_bert(path) -> str:
    """A random-weight BERT with its own WordPiece vocabulary, saved like save_pretrained does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CAPTIONS * 10, trainers.WordPieceTrainer(special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **dict(
            zip(
                ["pad_token", "unk_token", "cls_token", "sep_token", "mask_token"],
                specials,
                strict=True,
            )
        ),
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def test_timm_image_tower_by_name_trains():
    model = DualEncoder.from_config(
        ModelConfig(name="custom", config=MICRO_CFG, image_tower="timm:resnet18")
    )
    images, texts = global_batch(4)
    img_emb, txt_emb, scale, bias = model(images, texts)
    assert img_emb.shape == (4, MICRO_CFG["embed_dim"])
    InfoNCELoss(LossConfig())(img_emb, txt_emb, scale, bias).backward()
    assert model.clip.visual.trunk.conv1.weight.grad.abs().sum() > 0


def test_timm_image_tower_loads_local_weights_and_locks(tmp_path):
    torch.manual_seed(3)
    backbone = timm.create_model("resnet18")  # with its 1000-class head, as checkpoints ship
    save_file(backbone.state_dict(), tmp_path / "resnet18.safetensors")
    cfg = ModelConfig(
        name="custom",
        config=MICRO_CFG,
        image_tower="timm:resnet18",
        image_tower_weights=str(tmp_path / "resnet18.safetensors"),
        lock_image=True,
    )
    model = DualEncoder.from_config(cfg)
    trunk = model.clip.visual.trunk
    torch.testing.assert_close(trunk.conv1.weight, backbone.conv1.weight, rtol=0, atol=0)
    # LiT: the pretrained trunk is frozen; the new projection to embed_dim still trains.
    assert not any(p.requires_grad for p in trunk.parameters())
    assert all(p.requires_grad for p in model.clip.visual.head.parameters())


def test_bad_tower_names_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'timm:resnet18'"):
        ModelConfig(name="clipline:tiny", image_tower="timm:resnet81").resolve()
    with pytest.raises(ValueError, match="never downloads"):
        ModelConfig(name="clipline:tiny", text_tower="hf:bert-base-uncased").resolve()
    with pytest.raises(ValueError, match="needs model.image_tower"):
        ModelConfig(name="clipline:tiny", image_tower_weights=str(tmp_path / "x")).resolve()
    with pytest.raises(ValueError, match="no such file"):
        ModelConfig(
            name="clipline:tiny", image_tower="timm:resnet18", image_tower_weights="/nope"
        ).resolve()


def test_hf_text_tower_from_local_path_trains_and_exports(tmp_path):
    from transformers import AutoModel

    path = tiny_bert(tmp_path / "bert")
    cfg = load_run_config("cpu-debug", [f"model.text_tower=hf:{path}"]).model
    cfg.name, cfg.config = "custom", MICRO_CFG
    model = DualEncoder.from_config(cfg)
    # The saved weights are loaded (not a fresh init) and the HF tokenizer is used.
    saved = AutoModel.from_pretrained(path).embeddings.word_embeddings.weight
    hf = model.clip.text.transformer.embeddings.word_embeddings.weight
    torch.testing.assert_close(hf, saved, rtol=0, atol=0)
    text_BL = model.tokenize(CAPTIONS)
    assert text_BL.shape == (4, 24) and int(text_BL[0, 0]) != 0  # [CLS] first, padded to 24

    images, _ = global_batch(4)
    img_emb, txt_emb, scale, bias = model(images, text_BL)
    InfoNCELoss(LossConfig())(img_emb, txt_emb, scale, bias).backward()
    assert hf.grad is not None and hf.grad.abs().sum() > 0

    exported = export_model(model, tmp_path / "exp", run_config={})
    (tmp_path / "bert").rename(tmp_path / "gone")  # the export carries its config + tokenizer
    loaded = load_export(exported)
    assert loaded.tokenize(CAPTIONS).tolist() == text_BL.tolist()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(text_BL), model.encode_text(text_BL))
