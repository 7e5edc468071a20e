"""Exports: clipline's own format here, and the dispatcher over every format clipline writes.

clipline's format, an export directory holding:
  image_encoder.safetensors   the image tower (open_clip key names, ``visual.*``)
  text_encoder.safetensors    the text tower (token embedding, transformer, projection)
  clipline_export.json        tower configs, embedding dim, preprocessing, tokenizer,
                              logit scale and the resolved run config

Loading needs only these files, safetensors and open_clip: nothing is unpickled.

The other formats each live in the module that writes and reads them: ``export_open_clip``
(open_clip's ``local-dir:`` / hub layout), ``export_hf`` (transformers ``CLIPModel`` with its
processor and tokenizer) and ``export_onnx`` (one graph per tower). They are imported only
when asked for, so that loading a clipline export never imports transformers or onnx.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from clipline.pretrain.model import DualEncoder
from clipline.pretrain.safe_load import load_safetensors

log = logging.getLogger(__name__)

FORMAT = "clipline-export"
VERSION = 1
META_FILE = "clipline_export.json"
IMAGE_FILE = "image_encoder.safetensors"
TEXT_FILE = "text_encoder.safetensors"

# Every format ``clipline export --format`` writes; ``all`` writes each into OUT/<format>/.
FORMATS = ("clipline", "open_clip", "hf", "onnx")

# Captions for the parity check every non-native export runs before it returns: upper case,
# punctuation, digits, and one longer than any context so that truncation is exercised.
PARITY_CAPTIONS = [
    "a photo of a cat.",
    "A DOG's toy: 3 red balls, 12 sticks!",
    "a small red circle above a large blue square " * 12,
]


class UnsupportedModel(ValueError):
    """The model uses an option the target format cannot express (raised before writing)."""


def tokenizer_info(model: DualEncoder) -> dict[str, Any]:
    """How to tokenize for ``model``: what every export format records besides its weights."""
    text_cfg = model.model_cfg["text_cfg"]
    if "hf_tokenizer_name" in text_cfg:
        return {
            "type": "hf",
            "name": text_cfg["hf_tokenizer_name"],
            "context_length": model.context_length,
        }
    return {
        "type": "open_clip_bpe",  # OpenAI CLIP's BPE, as bundled with open_clip
        "name": "openai-clip-bpe-49408",
        "context_length": model.context_length,
        "lowercase": True,
        "sot_id": int(model.tokenizer.sot_token_id),
        "eot_id": int(model.tokenizer.eot_token_id),
        "pad_id": 0,  # open_clip pads with 0 after the end-of-text token
    }


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
    # The HF tower's weights are in text_encoder.safetensors: build it from its config only.
    model = DualEncoder(model_cfg, meta["preprocess"], load_hf_weights=False)
    weights = {
        **load_safetensors(export_dir / IMAGE_FILE, "export"),
        **load_safetensors(export_dir / TEXT_FILE, "export"),
    }
    weights["logit_scale"] = torch.tensor([meta["log_logit_scale"]], dtype=torch.float32)
    if meta["logit_bias"] is not None:
        weights["logit_bias"] = torch.tensor([meta["logit_bias"]], dtype=torch.float32)
    model.clip.load_state_dict(weights, strict=True)
    return model.to(device).eval()


def export(
    model: DualEncoder,
    out_dir: str | Path,
    *,
    format: str = "clipline",
    run_config: dict[str, Any],
    step: int | None = None,
    name: str | None = None,
) -> dict[str, Path]:
    """Writes ``model`` in one format, or in every format with ``format="all"``.

    ``all`` writes each format into its own subfolder, ``OUT/<format>/``: each folder is then
    a complete artefact on its own (one open_clip hub repo, one transformers model folder),
    with no second copy of the weights that an upload of the folder would carry along. A
    format that cannot express the model (e.g. transformers' ``CLIPModel`` for a timm image
    tower) is skipped with a warning under ``all``, and is an error when asked for alone.

    Every format but clipline's own is reloaded after writing and compared with ``model``
    on a few images and captions, so that an export that loads but computes something else
    fails here rather than in a user's evaluation.

    Args:
        model: The dual encoder (unwrapped; not DDP or compiled).
        out_dir: Output folder (created if needed).
        format: One of :data:`FORMATS`, or ``"all"``.
        run_config: The resolved run config, saved with clipline's format.
        step: The training step of the weights, saved with clipline's format.
        name: The open_clip model-config name of the open_clip format (default: the name
            of ``out_dir``).

    Returns:
        ``{format: folder written}``.

    Raises:
        ValueError: An unknown format, or (:class:`UnsupportedModel`) a single format that
            cannot express the model.
    """
    out = Path(out_dir)
    if format not in (*FORMATS, "all"):
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)} or 'all'")
    if name is not None and format not in ("open_clip", "all"):
        log.warning("name=%r is only used by the open_clip format; ignored", name)
    name = name or out.resolve().name
    targets = {f: out / f for f in FORMATS} if format == "all" else {format: out}
    written = {}
    with _eval_mode(model):
        for fmt, path in targets.items():
            try:
                written[fmt] = _write(fmt, model, path, run_config=run_config, step=step, name=name)
            except ModuleNotFoundError as exc:
                raise ValueError(
                    f"the {fmt} format needs {exc.name!r}, which is not installed; "
                    "pip install 'clipline[export]'"
                ) from exc
            except UnsupportedModel as exc:
                if format != "all":
                    raise
                log.warning("skipped the %s format: %s", fmt, exc)
    return written


def _write(
    fmt: str, model: DualEncoder, out: Path, *, run_config: dict, step: int | None, name: str
) -> Path:
    if fmt == "clipline":
        return export_model(model, out, run_config=run_config, step=step)
    if fmt == "open_clip":
        from clipline.pretrain.export_open_clip import export_open_clip

        return export_open_clip(model, out, name=name)
    if fmt == "hf":
        from clipline.pretrain.export_hf import export_hf

        return export_hf(model, out)
    assert fmt == "onnx", fmt
    from clipline.pretrain.export_onnx import export_onnx

    return export_onnx(model, out)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Exports see the inference graph (no patch dropout); the caller's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def parity_inputs(model: DualEncoder, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic images ``[B, 3, H, W]`` and full-context token ids ``[B, L]`` for checks."""
    size = model.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    images_BCHW = torch.randn(batch, 3, height, width, generator=g)
    captions = [PARITY_CAPTIONS[i % len(PARITY_CAPTIONS)] for i in range(batch)]
    return images_BCHW, model.tokenizer(captions)  # untrimmed: what the other formats take


def check_parity(
    model: DualEncoder,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    *,
    what: str,
    atol: float,
) -> None:
    """Raises RuntimeError unless the reloaded export embeds like ``model`` within ``atol``."""
    images_BCHW, text_BL = parity_inputs(model)
    with torch.no_grad():
        pairs = {
            "image": (encode_image(images_BCHW), model.encode_image(images_BCHW)),
            "text": (encode_text(text_BL), model.encode_text(text_BL)),
        }
    for tower, (got_BD, want_BD) in pairs.items():
        err = (got_BD.float().cpu() - want_BD.float().cpu()).abs().max().item()
        if not err <= atol:
            raise RuntimeError(
                f"{what}: reloaded {tower} embeddings differ from the model's by {err:.3g} "
                f"(> {atol:g}); the export does not reproduce this model, please report it"
            )
