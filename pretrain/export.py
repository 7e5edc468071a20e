"""Self-describing encoder exports: the module that writes the format also reads it.

An export directory holds:
  image_encoder.safetensors   the image tower (open_clip key names, ``visual.*``)
  text_encoder.safetensors    the text tower (token embedding, transformer, projection)
  clipline_export.json        tower configs, embedding dim, preprocessing, tokenizer,
                              logit scale and the resolved run config

Loading needs only these files, safetensors and open_clip: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipline.pretrain.model import DualEncoder

FORMAT = "clipline-export"
VERSION = 1
META_FILE = "clipline_export.json"
IMAGE_FILE = "image_encoder.safetensors"
TEXT_FILE = "text_encoder.safetensors"


def _tokenizer_info(model: DualEncoder) -> dict[str, Any]:
    text_cfg = model.model_cfg["text_cfg"]
    if "hf_tokenizer_name" in text_cfg:
        return {
            "type": "hf",
            "name": text_cfg["hf_tokenizer_name"],
            "context_length": model.context_length,
        }
    return {
        "type": "open_clip_bpe",
        "name": "openai-clip-bpe-49408",
        "context_length": model.context_length,
    }


def export_model(
    model: DualEncoder, out_dir: str | Path, *, run_config: dict[str, Any], step: int | None = None
) -> Path:
    """Writes ``model`` (unwrapped; not DDP or compiled) as an export directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    image = {k: v for k, v in weights.items() if k.startswith("visual.")}
    temperature = ("logit_scale", "logit_bias")  # in the JSON: they belong to neither tower
    text = {k: v for k, v in weights.items() if not k.startswith(("visual.", *temperature))}
    save_file(image, out / IMAGE_FILE, metadata={"format": "pt"})
    save_file(text, out / TEXT_FILE, metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_cfg": model.model_cfg,
        "embed_dim": model.embed_dim,
        "preprocess": model.preprocess_cfg,
        "tokenizer": _tokenizer_info(model),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "log_logit_scale": float(model.logit_scale.detach()),  # the parameter itself, exact in JSON
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "step": step,
        "run_config": run_config,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_export_meta(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{export_dir} is not a clipline export: {META_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not "
            f"{FORMAT!r} v{VERSION}; re-export it with this clipline version"
        )
    return meta


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """Rebuilds the dual encoder from an export directory (strict weight loading)."""
    export_dir = Path(export_dir)
    meta = read_export_meta(export_dir)
    model = DualEncoder(meta["model_cfg"], meta["preprocess"])
    weights = {**load_file(export_dir / IMAGE_FILE), **load_file(export_dir / TEXT_FILE)}
    weights["logit_scale"] = torch.tensor([meta["log_logit_scale"]], dtype=torch.float32)
    if meta["logit_bias"] is not None:
        weights["logit_bias"] = torch.tensor([meta["logit_bias"]], dtype=torch.float32)
    model.clip.load_state_dict(weights, strict=True)
    return model.to(device).eval()
