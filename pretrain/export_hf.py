"""transformers ``CLIPModel`` format: open_clip's standard ViT + causal text transformer.

An HF export directory is a transformers model folder, loadable with
``CLIPModel.from_pretrained(DIR)`` and ``CLIPProcessor.from_pretrained(DIR)``:
  config.json, model.safetensors              the model (weights renamed, q/k/v split)
  processor_config.json                       the processor: open_clip's eval preprocessing and
                                              the tokenizer settings (transformers 5)
  preprocessor_config.json                    the image processor alone (transformers 4)
  tokenizer.json, tokenizer_config.json       CLIP's BPE for ``CLIPTokenizer`` (transformers 5)
  vocab.json, merges.txt                      the same BPE for older transformers versions

The tokenizer is built from the BPE file open_clip bundles (OpenAI's), so nothing is
downloaded. It gives open_clip's token ids up to the end-of-text token; after it, transformers
pads with ``<|endoftext|>`` (OpenAI's convention) where open_clip pads with 0. Both models pool
at the first end-of-text token behind a causal mask, so padding never changes an embedding.
open_clip also repairs mojibake (ftfy) and unescapes HTML entities before tokenizing;
transformers' tokenizer does neither, so such captions can tokenize differently.

Only what ``CLIPModel`` can express is exported: a plain ViT image tower (class token,
pre-norm, no layer scale, pooling at the class token) and open_clip's own text transformer
(causal, pooled at the end-of-text token), with GELU or QuickGELU; anything else raises
:class:`UnsupportedModel` naming the option.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from clipline.pretrain.export_base import (
    EXPORT_FORMATS,
    ExportFormat,
    UnsupportedModel,
    check_parity,
    encoders_from_weights,
)
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.safe_load import load_safetensors

if TYPE_CHECKING:  # imported where used: transformers is an optional extra (clipline[export])
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

CONFIG_FILE = "config.json"  # with "model_type": "clip"; a checkpoint has a config.json too
PROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
FILES = (CONFIG_FILE, PROCESSOR_FILE, WEIGHTS_FILE)  # what the model is read from
REQUIRES = ("transformers",)

SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # OpenAI's names for open_clip's ids 49406, 49407
BPE_VOCAB_SIZE = 49408

# Options of open_clip's tower configs that CLIPModel represents, or that do not change the
# eval-mode function (patch dropout; the settings of timm/HF towers that are absent).
_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_VISION_FREE |= {"patch_dropout", "timm_model_pretrained", "timm_pool", "timm_proj"}
_VISION_FREE |= {"timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id"}
_TEXT_FREE |= {"eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_MODEL_FREE = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}

_INTERPOLATION = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL.Image.Resampling values


def _unsupported(model_cfg: dict[str, Any]) -> list[str]:
    """The options of ``model_cfg`` that CLIPModel cannot express, as ``key=value``."""
    # `is`, not ==: init_logit_bias=0.0 still adds a logit bias, which CLIPModel lacks.
    bad = [
        f"{k}={v!r}"
        for k, v in model_cfg.items()
        if k not in _MODEL_FREE and v is not None and v is not False
    ]
    for prefix, cfg, cls, free in (
        ("vision_cfg", model_cfg["vision_cfg"], CLIPVisionCfg, _VISION_FREE),
        ("text_cfg", model_cfg["text_cfg"], CLIPTextCfg, _TEXT_FREE),
    ):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        defaults["block_type"] = "default"  # None and "default" build the same block
        for key, value in cfg.items():
            if key not in free and value != defaults.get(key, object()):
                if not (key == "block_type" and value is None):
                    bad.append(f"{prefix}.{key}={value!r}")
    vision = model_cfg["vision_cfg"]
    for key in ("layers", "patch_size"):
        if not isinstance(vision.get(key, 0), int):
            bad.append(f"vision_cfg.{key}={vision[key]!r} (must be one int)")
    size = vision.get("image_size", 224)
    if not isinstance(size, int) and (len(size) != 2 or size[0] != size[1]):
        bad.append(f"vision_cfg.image_size={size!r} (must be square)")
    if model_cfg["text_cfg"].get("vocab_size", BPE_VOCAB_SIZE) != BPE_VOCAB_SIZE:
        bad.append(f"text_cfg.vocab_size={model_cfg['text_cfg']['vocab_size']} (CLIP's BPE: 49408)")
    return bad


def hf_config(model: DualEncoder) -> CLIPConfig:
    """The ``CLIPConfig`` of ``model``.

    Raises:
        UnsupportedModel: An option CLIPModel cannot express (named in the message).
    """
    from transformers import CLIPConfig

    cfg = model.model_cfg
    bad = _unsupported(cfg)
    if bad or type(model.clip) is not open_clip.CLIP:
        raise UnsupportedModel(
            f"transformers' CLIPModel cannot express {', '.join(bad) or type(model.clip).__name__}"
            " (it has a plain ViT image tower and CLIP's causal text transformer only; SigLIP's "
            "logit bias has no place in it either); export this model with --format open_clip "
            "or --format onnx"
        )
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    vision = {**dataclasses.asdict(CLIPVisionCfg()), **vision}
    text = {**dataclasses.asdict(CLIPTextCfg()), **text}
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # open_clip: QuickGELU or nn.GELU
    size = vision["image_size"]
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        logit_scale_init_value=float(model.logit_scale.detach()),
        vision_config={
            "hidden_size": vision["width"],
            "intermediate_size": int(vision["width"] * vision["mlp_ratio"]),
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision["width"] // vision["head_width"],
            "image_size": size if isinstance(size, int) else size[0],
            "patch_size": vision["patch_size"],
            "num_channels": 3,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,  # torch's LayerNorm default, which open_clip uses
            "projection_dim": cfg["embed_dim"],
        },
        text_config={
            "vocab_size": text["vocab_size"],
            "hidden_size": text["width"],
            "intermediate_size": int(text["width"] * text["mlp_ratio"]),
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg["embed_dim"],
            # CLIPModel pools at the first eos_token_id; open_clip at the argmax id, which is
            # the same position: end-of-text is the largest id and comes once.
            "bos_token_id": model.tokenizer.sot_token_id,
            "eos_token_id": model.tokenizer.eot_token_id,
            "pad_token_id": model.tokenizer.eot_token_id,
        },
    )


# open_clip residual-block module -> CLIPEncoderLayer module, for the tensors that map one to
# one (q, k and v are split from / joined into in_proj apart); both directions use it.
_BLOCK_NAMES = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def _blocks(src: str, dst: str, n: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip residual blocks -> CLIPEncoderLayer weights (in_proj split into q, k, v)."""
    out = {}
    for i in range(n):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        q_W, k_W, v_W = sd.pop(f"{s}.attn.in_proj_weight").chunk(3)  # [3W, W] -> 3 x [W, W]
        q_b, k_b, v_b = sd.pop(f"{s}.attn.in_proj_bias").chunk(3)
        for name, weight, bias in (("q", q_W, q_b), ("k", k_W, k_b), ("v", v_W, v_b)):
            out[f"{d}.self_attn.{name}_proj.weight"] = weight
            out[f"{d}.self_attn.{name}_proj.bias"] = bias
        for a, b in _BLOCK_NAMES:
            for p in ("weight", "bias"):
                out[f"{d}.{b}.{p}"] = sd.pop(f"{s}.{a}.{p}")
    return out


def hf_state_dict(clip: open_clip.CLIP, config: CLIPConfig) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` weights under CLIPModel's names (every source tensor used once)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
    out = {
        "logit_scale": sd.pop("logit_scale").reshape(()),  # 0-d in CLIPModel
        "vision_model.embeddings.class_embedding": sd.pop("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": sd.pop("visual.positional_embedding"),
        "vision_model.embeddings.patch_embedding.weight": sd.pop("visual.conv1.weight"),
        # x @ proj with proj [W, D] is a bias-free Linear whose weight is proj.T.
        "visual_projection.weight": sd.pop("visual.proj").T.contiguous(),
        "text_model.embeddings.token_embedding.weight": sd.pop("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": sd.pop("positional_embedding"),
        "text_projection.weight": sd.pop("text_projection").T.contiguous(),
    }
    for a, b in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),  # sic: transformers' name
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        for p in ("weight", "bias"):
            out[f"{b}.{p}"] = sd.pop(f"{a}.{p}")
    n_vision = config.vision_config.num_hidden_layers
    n_text = config.text_config.num_hidden_layers
    out |= _blocks("visual.transformer.resblocks", "vision_model.encoder.layers", n_vision, sd)
    out |= _blocks("transformer.resblocks", "text_model.encoder.layers", n_text, sd)
    assert not sd, f"open_clip weights left unmapped: {sorted(sd)}"
    return out


def hf_tokenizer(tokenizer: SimpleTokenizer, context_length: int) -> CLIPTokenizer:
    """``CLIPTokenizer`` with open_clip's (OpenAI's) BPE vocabulary and merges."""
    from transformers import CLIPTokenizer

    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    vocab = clip_bpe_vocab(tokenizer)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def clip_bpe_vocab(tokenizer: SimpleTokenizer) -> dict[str, int]:
    """open_clip's BPE vocabulary under transformers' names (``<|startoftext|>`` etc.)."""
    vocab = dict(tokenizer.encoder)
    for token_id, name in ((tokenizer.sot_token_id, SOT), (tokenizer.eot_token_id, EOT)):
        del vocab[tokenizer.decoder[token_id]]  # open_clip names them <start_of_text> etc.
        vocab[name] = token_id
    return vocab


def image_processor(preprocess: dict[str, Any]) -> CLIPImageProcessor:
    """``CLIPImageProcessor`` doing open_clip's eval preprocessing (resize, centre crop, norm).

    Raises:
        UnsupportedModel: ``resize_mode="longest"`` (resize + pad: no CLIPImageProcessor
            setting pads), or an interpolation PIL does not name the same way.
    """
    from transformers import CLIPImageProcessor

    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else size
    mode, interpolation = preprocess.get("resize_mode", "shortest"), preprocess["interpolation"]
    if mode not in ("shortest", "squash") or interpolation not in _INTERPOLATION:
        raise UnsupportedModel(
            f"CLIPImageProcessor cannot do resize_mode={mode!r} with interpolation="
            f"{interpolation!r}; it resizes (shortest edge or both sides) with "
            f"{sorted(_INTERPOLATION)} and centre-crops, never pads"
        )
    if mode == "shortest" and height != width:
        raise UnsupportedModel(f"resize_mode='shortest' with a non-square size {size!r}")
    resize = {"shortest_edge": height} if mode == "shortest" else {"height": height, "width": width}
    return CLIPImageProcessor(
        do_resize=True,
        size=resize,
        resample=_INTERPOLATION[interpolation],
        do_center_crop=mode == "shortest",
        crop_size={"height": height, "width": width},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocess["mean"]),
        image_std=list(preprocess["std"]),
        do_convert_rgb=True,
    )


def export_hf(model: DualEncoder, out_dir: str | Path) -> Path:
    """Writes ``model`` as a transformers CLIPModel folder and checks it reloads exactly.

    Raises:
        UnsupportedModel: Before writing anything, if CLIPModel, CLIPImageProcessor or
            CLIPTokenizer cannot express the model, its preprocessing or its tokenizer.
    """
    from transformers import CLIPModel, CLIPProcessor

    config = hf_config(model)
    processor = image_processor(model.preprocess_cfg)
    if not isinstance(model.tokenizer, SimpleTokenizer) or model.tokenizer.reduction_fn:
        raise UnsupportedModel(
            f"the tokenizer {type(model.tokenizer).__name__} is not open_clip's plain CLIP BPE"
        )
    hf_model = CLIPModel(config)
    hf_model.load_state_dict(hf_state_dict(model.clip, config), strict=True)
    out = Path(out_dir)
    hf_model.save_pretrained(out)
    tokenizer = hf_tokenizer(model.tokenizer, model.context_length)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 reads processor_config.json; 4 reads these two files.
    processor.save_pretrained(out)
    _write_bpe_files(tokenizer, out)

    reloaded = CLIPModel.from_pretrained(out).to(model.device).eval()
    check_parity(
        model,
        lambda image: image_features(reloaded, image.to(model.device)),
        lambda text: text_features(reloaded, text.to(model.device)),
        what=f"transformers export {out}",
        atol=1e-5,
    )
    return out


def _write_bpe_files(tokenizer: CLIPTokenizer, out: Path) -> None:
    """vocab.json + merges.txt: what CLIPTokenizer of transformers 4 (slow and fast) reads."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # transformers 4 returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings ``[B, D]`` of a CLIPModel."""
    emb_BD = _features(model.get_image_features(pixel_values=pixel_values))
    return torch.nn.functional.normalize(emb_BD, dim=-1)


def text_features(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised text embeddings ``[B, D]`` of a CLIPModel."""
    emb_BD = _features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    return torch.nn.functional.normalize(emb_BD, dim=-1)


def _merge_blocks(
    src: str, dst: str, n: int, sd: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """CLIPEncoderLayer weights -> open_clip residual blocks (q, k, v joined): :func:`_blocks`
    backwards."""
    out = {}
    for i in range(n):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for p in ("weight", "bias"):
            out[f"{d}.attn.in_proj_{p}"] = torch.cat(
                [sd.pop(f"{s}.self_attn.{name}_proj.{p}") for name in ("q", "k", "v")]
            )
        for a, b in _BLOCK_NAMES:
            for p in ("weight", "bias"):
                out[f"{d}.{a}.{p}"] = sd.pop(f"{s}.{b}.{p}")
    return out


def open_clip_state_dict(hf_sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict:
    """CLIPModel weights under open_clip ``CLIP``'s names: :func:`hf_state_dict` backwards."""
    sd = dict(hf_sd)
    for k in [k for k in sd if k.endswith("position_ids")]:  # a buffer in older transformers
        del sd[k]
    out = {
        "logit_scale": sd.pop("logit_scale").reshape(1),  # 1-element in clipline
        "visual.class_embedding": sd.pop("vision_model.embeddings.class_embedding"),
        "visual.positional_embedding": sd.pop("vision_model.embeddings.position_embedding.weight"),
        "visual.conv1.weight": sd.pop("vision_model.embeddings.patch_embedding.weight"),
        "visual.proj": sd.pop("visual_projection.weight").T.contiguous(),
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    for a, b in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        for p in ("weight", "bias"):
            out[f"{a}.{p}"] = sd.pop(f"{b}.{p}")
    n_vision = config["vision_config"]["num_hidden_layers"]
    n_text = config["text_config"]["num_hidden_layers"]
    out |= _merge_blocks(
        "vision_model.encoder.layers", "visual.transformer.resblocks", n_vision, sd
    )
    out |= _merge_blocks("text_model.encoder.layers", "transformer.resblocks", n_text, sd)
    if sd:
        raise ValueError(
            f"CLIPModel weights {sorted(sd)[:5]} have no place in open_clip's CLIP; this "
            "transformers folder is not one clipline can read"
        )
    return out


def read_hf_config(folder: Path) -> dict[str, Any]:
    """A transformers CLIP folder's ``config.json`` with every default filled in (transformers
    writes only the values that differ from its defaults)."""
    from transformers import CLIPConfig

    return CLIPConfig.from_pretrained(folder).to_dict()


def _tower_cfg(tower: dict[str, Any], where: Path, name: str) -> dict[str, Any]:
    """What a CLIP vision/text tower and open_clip's tower config share: MLP width, LayerNorm."""
    width, hidden = tower["hidden_size"], tower["intermediate_size"]
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # open_clip builds int(width * mlp_ratio) units
        raise ValueError(
            f"{where}: {name} intermediate_size {hidden} is not int(hidden_size * ratio) for any "
            "float ratio open_clip can be given; this CLIP cannot be built by open_clip"
        )
    out: dict[str, Any] = {"width": width, "layers": tower["num_hidden_layers"]}
    out["mlp_ratio"] = mlp_ratio
    eps = tower.get("layer_norm_eps", 1e-5)
    if eps != 1e-5:  # open_clip's default is torch's; only a different one is recorded
        out["norm_kwargs"] = {"eps": eps}
    return out


def open_clip_model_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The open_clip model config of a ``CLIPConfig`` (as a full dict, :func:`read_hf_config`):
    :func:`hf_config` backwards, for any CLIPModel open_clip's CLIP can express.

    Raises:
        ValueError: naming what open_clip cannot build (activation, MLP width, eos ids).
    """
    vision, text = config["vision_config"], config["text_config"]
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ValueError(
            f"{where}: activation(s) {sorted(acts)}; open_clip has gelu or quick_gelu, "
            "the same in both towers"
        )
    patch, size = vision["patch_size"], vision["image_size"]
    if not isinstance(patch, int):
        if len(set(patch)) != 1:
            raise ValueError(f"{where}: patch_size {patch}; open_clip's ViT has square patches")
        patch = patch[0]
    image_cfg = _tower_cfg(vision, where, "vision_config")
    image_cfg |= {"image_size": size if isinstance(size, int) else list(size)}
    image_cfg |= {"head_width": vision["hidden_size"] // vision["num_attention_heads"]}
    image_cfg |= {"patch_size": patch}
    text_cfg = {
        "context_length": text["max_position_embeddings"],
        "vocab_size": text["vocab_size"],
        "heads": text["num_attention_heads"],
        **_tower_cfg(text, where, "text_config"),
    }
    eos = text.get("eos_token_id")
    if not isinstance(eos, int):
        raise ValueError(f"{where}: text_config.eos_token_id {eos!r}; expected one token id")
    # CLIPModel pools at the argmax token id for the legacy eos id 2, else at the first
    # eos_token_id: the same position as open_clip's argmax when eos is the largest id.
    if eos not in (2, text["vocab_size"] - 1):
        text_cfg |= {"pool_type": "eos", "eos_id": eos}
    return {
        "embed_dim": config["projection_dim"],
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": image_cfg,
        "text_cfg": text_cfg,
    }


def open_clip_preprocess(proc: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocessing config of a ``CLIPImageProcessor``'s settings:
    :func:`image_processor` backwards."""
    # Processors saved before transformers 4.26 give sizes as one int (the shortest edge).
    size = proc["size"] if isinstance(proc["size"], dict) else {"shortest_edge": proc["size"]}
    crop = proc.get("crop_size") or size
    if not isinstance(crop, dict) or "shortest_edge" in crop:
        side = crop if not isinstance(crop, dict) else crop["shortest_edge"]
        crop = {"height": side, "width": side}
    height, width = crop["height"], crop["width"]
    names = {v: k for k, v in _INTERPOLATION.items()}
    resample = proc.get("resample", 3)
    if resample not in names:
        raise ValueError(
            f"image processor resample={resample!r}: open_clip resizes with {sorted(_INTERPOLATION)}"
        )
    return {
        "size": height if height == width else [height, width],
        "mean": list(proc["image_mean"]),
        "std": list(proc["image_std"]),
        "interpolation": names[resample],
        "resize_mode": "shortest" if "shortest_edge" in size else "squash",
    }


def open_clip_configs(export_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(open_clip model config, preprocessing config)`` of an HF export: :func:`hf_config`
    and :func:`image_processor` backwards."""
    model_cfg = open_clip_model_config(read_hf_config(export_dir), export_dir)
    proc = json.loads((export_dir / PROCESSOR_FILE).read_text())
    return model_cfg, open_clip_preprocess(proc)


def load_hf_encoders(export_dir: str | Path, device: Any = "cpu") -> DualEncoder:
    """An HF export as clipline's dual encoder (open_clip modules, the export's weights):
    it embeds exactly as the model that was exported. Nothing is unpickled.

    Raises:
        ValueError: The folder is not a transformers CLIP model folder.
    """
    export_dir = Path(export_dir)
    if not (export_dir / PROCESSOR_FILE).is_file():
        raise ValueError(
            f"{export_dir} is not a transformers CLIP export: {PROCESSOR_FILE} is missing"
        )
    model_cfg, preprocess = open_clip_configs(export_dir)
    config = read_hf_config(export_dir)
    weights = open_clip_state_dict(
        load_safetensors(export_dir / WEIGHTS_FILE, "hf export weights"), config
    )
    return encoders_from_weights(model_cfg, preprocess, weights, device)


def load_hf(export_dir: str | Path) -> tuple[CLIPModel, CLIPProcessor]:
    """Loads an HF export: ``(CLIPModel in eval mode, CLIPProcessor)``."""
    from transformers import CLIPModel, CLIPProcessor

    export_dir = Path(export_dir)
    if not (export_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{export_dir} is not a transformers export: {CONFIG_FILE} is missing")
    return CLIPModel.from_pretrained(export_dir).eval(), CLIPProcessor.from_pretrained(export_dir)


def is_hf_clip(folder: Path) -> bool:
    """Whether ``folder`` is a transformers CLIP model folder (its config says ``clip``)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "clip"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):  # AttributeError: no dict
        return False


def _write(model: DualEncoder, out: Path, **_: Any) -> Path:
    return export_hf(model, out)


EXPORT_FORMATS.add(
    "hf",
    ExportFormat(
        write=_write, read=load_hf_encoders, files=FILES, requires=REQUIRES, detect=is_hf_clip
    ),
)
