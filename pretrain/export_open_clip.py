"""open_clip's own layout, loadable by open_clip (and CLIP_benchmark) without clipline.

An open_clip export directory holds:
  open_clip_config.json         {"model_cfg", "preprocess_cfg"}: open_clip's hub layout, read by
                                ``open_clip.create_model_and_transforms("local-dir:DIR")``;
                                plus "tokenizer", clipline's description (open_clip ignores it)
  open_clip_model.safetensors   the whole CLIP state dict, open_clip's key names
  model_configs/<name>.json     the bare model config, for the named route:
                                ``open_clip.add_model_config("DIR/model_configs")``, then
                                ``create_model_and_transforms(name, pretrained=".../open_clip_model.safetensors")``

The named route takes open_clip's default preprocessing unless told otherwise
(``force_preprocess_cfg``); ``local-dir:`` reads it from the config.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import open_clip
from safetensors.torch import save_file
from torch import nn

from clipline.pretrain.export_base import (
    EXPORT_FORMATS,
    ExportFormat,
    check_parity,
    encoders_from_weights,
    tokenizer_info,
)
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.safe_load import load_safetensors

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
MODEL_CONFIGS_DIR = "model_configs"
FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what the model is read from; the first marks the folder

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def export_open_clip(model: DualEncoder, out_dir: str | Path, *, name: str) -> Path:
    """Writes ``model`` in open_clip's layout and checks that open_clip reloads it exactly.

    Args:
        model: The dual encoder (unwrapped, in eval mode).
        out_dir: Output folder (created if needed).
        name: The model-config name for ``open_clip.add_model_config`` (a file stem).

    Raises:
        ValueError: ``name`` is not a plain file stem, or is one of open_clip's built-in
            model names (registering it would replace open_clip's config in the process).
    """
    if not _NAME.match(name):
        raise ValueError(
            f"open_clip model name {name!r} must be a plain file stem (letters, digits, '.', "
            "'_', '-'); pass another with --name"
        )
    if (Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").is_file():
        raise ValueError(
            f"open_clip model name {name!r} is one of open_clip's built-in configs, which "
            f"registering the export would replace; pass another with --name, e.g. my-{name}"
        )
    out = Path(out_dir)
    (out / MODEL_CONFIGS_DIR).mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    for k in ("logit_scale", "logit_bias"):  # 1-element in clipline (FSDP2); 0-d in open_clip
        if k in weights:
            weights[k] = weights[k].reshape(())
    save_file(weights, out / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {
        "model_cfg": model.model_cfg,
        "preprocess_cfg": model.preprocess_cfg,
        "tokenizer": tokenizer_info(model),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (out / MODEL_CONFIGS_DIR / f"{name}.json").write_text(json.dumps(model.model_cfg, indent=2))

    reloaded, _, _ = load_open_clip(out, device=model.device)
    check_parity(
        model,
        lambda image: reloaded.encode_image(image.to(model.device), normalize=True),
        lambda text: reloaded.encode_text(text.to(model.device), normalize=True),
        what=f"open_clip export {out}",
        atol=1e-5,  # the same modules and weights; only clipline's padding trim differs
    )
    return out


def read_open_clip_config(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{export_dir} is not an open_clip export: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


def load_open_clip(
    export_dir: str | Path, device: Any = "cpu"
) -> tuple[nn.Module, Any, open_clip.tokenizer.SimpleTokenizer | Any]:
    """Loads an open_clip export the way open_clip users do (``local-dir:``).

    Returns:
        ``(model, eval preprocess, tokenizer)``, the model in eval mode on ``device``.
    """
    read_open_clip_config(export_dir)  # a clear error before open_clip's
    spec = f"local-dir:{Path(export_dir)}"
    # open_clip warns that `pretrained` is ignored with local-dir: nothing to act on.
    previous = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
        tokenizer = open_clip.get_tokenizer(spec)
    finally:
        logging.root.setLevel(previous)
    return model.eval(), preprocess, tokenizer


def register_open_clip_config(export_dir: str | Path) -> str:
    """Registers the export's model config with open_clip; returns the name to create it by."""
    configs = sorted((Path(export_dir) / MODEL_CONFIGS_DIR).glob("*.json"))
    if len(configs) != 1:
        raise ValueError(
            f"{Path(export_dir) / MODEL_CONFIGS_DIR} should hold one model config, found "
            f"{[p.name for p in configs]}; re-export with clipline export --format open_clip"
        )
    open_clip.add_model_config(configs[0])
    return configs[0].stem


def load_open_clip_encoders(export_dir: str | Path, device: Any = "cpu") -> DualEncoder:
    """An open_clip export as clipline's dual encoder: the same modules and weights, so it
    embeds exactly as the model that was exported (what ``clipline eval``/``embed`` load)."""
    config = read_open_clip_config(export_dir)
    weights = load_safetensors(Path(export_dir) / WEIGHTS_FILE, "open_clip export weights")
    return encoders_from_weights(config["model_cfg"], config["preprocess_cfg"], weights, device)


def _write(model: DualEncoder, out: Path, *, name: str, **_: Any) -> Path:
    return export_open_clip(model, out, name=name)


EXPORT_FORMATS.add(
    "open_clip", ExportFormat(write=_write, read=load_open_clip_encoders, files=FILES)
)
