"""clipline's own export format: the module that writes it also reads it.

An export directory holding:
  image_encoder.safetensors   the image tower (open_clip key names, ``visual.*``)
  text_encoder.safetensors    the text tower (token embedding, transformer, projection)
  clipline_export.json        tower configs, embedding dim, preprocessing, tokenizer,
                              logit scale and the resolved run config

Loading needs only these files, safetensors and open_clip: nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from clipline.pretrain.export_base import (
    EXPORT_FORMATS,
    ExportFormat,
    encoders_from_weights,
    tokenizer_info,
)
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.safe_load import load_safetensors

FORMAT = "clipline-export"
VERSION = 1
META_FILE = "clipline_export.json"
IMAGE_FILE = "image_encoder.safetensors"
TEXT_FILE = "text_encoder.safetensors"


def export_model(
    model: DualEncoder, out_dir: str | Path, *, run_config: dict[str, Any], step: int | None = None
) -> Path:
    """Writes ``model`` (unwrapped; not DDP or compiled) as a clipline export directory."""
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
        "model_cfg": _bundle_hf_text(model.model_cfg, out),
        "embed_dim": model.embed_dim,
        "preprocess": model.preprocess_cfg,
        "tokenizer": tokenizer_info(model),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "log_logit_scale": float(model.logit_scale.detach()),  # the parameter itself, exact in JSON
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "step": step,
        "run_config": run_config,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


HF_TEXT_DIR = "hf_text"  # an HF text tower's config and tokenizer files, beside the weights
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".index.json")


def _bundle_hf_text(model_cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Copies an HF text tower's config and tokenizer into the export, so that it loads
    without the training machine's model directory; returns the model config to record."""
    text_cfg = model_cfg["text_cfg"]
    if "hf_model_name" not in text_cfg:
        return model_cfg
    dest = out / HF_TEXT_DIR
    dest.mkdir(exist_ok=True)
    for src_dir in {text_cfg["hf_model_name"], text_cfg.get("hf_tokenizer_name", "")} - {""}:
        if not Path(src_dir).is_dir():
            raise ValueError(
                f"HF text tower {src_dir!r} is not a local directory; clipline exports bundle "
                "the tower's config and tokenizer files from it"
            )
        for f in Path(src_dir).iterdir():
            if f.is_file() and not f.name.endswith(_HF_WEIGHT_SUFFIXES):
                shutil.copyfile(f, dest / f.name)
    bundled = {**text_cfg, "hf_model_name": HF_TEXT_DIR, "hf_tokenizer_name": HF_TEXT_DIR}
    return {**model_cfg, "text_cfg": bundled}


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
    model_cfg = meta["model_cfg"]
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_model_name") == HF_TEXT_DIR:  # bundled HF config + tokenizer
        path = str(export_dir / HF_TEXT_DIR)
        model_cfg = {**model_cfg, "text_cfg": {**text_cfg, "hf_model_name": path}}
        model_cfg["text_cfg"]["hf_tokenizer_name"] = path
    weights = {
        **load_safetensors(export_dir / IMAGE_FILE, "export"),
        **load_safetensors(export_dir / TEXT_FILE, "export"),
    }
    weights["logit_scale"] = torch.tensor([meta["log_logit_scale"]], dtype=torch.float32)
    if meta["logit_bias"] is not None:
        weights["logit_bias"] = torch.tensor([meta["logit_bias"]], dtype=torch.float32)
    # The HF tower's weights are in text_encoder.safetensors: built from its config only.
    return encoders_from_weights(model_cfg, meta["preprocess"], weights, device)


def _write(
    model: DualEncoder, out: Path, *, run_config: dict[str, Any], step: int | None, **_: Any
) -> Path:
    return export_model(model, out, run_config=run_config, step=step)


# The meta file, first, marks an export folder.
_FORMAT = ExportFormat(write=_write, read=load_export, files=(META_FILE, IMAGE_FILE, TEXT_FILE))
EXPORT_FORMATS.add("clipline", _FORMAT)
