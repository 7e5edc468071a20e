"""What every export format shares: its registry entry, the tokenizer record, the parity check
run after writing, and the ending of every reader (build the model, load its weights).

The format modules (``export_clipline``, ``export_open_clip``, ``export_hf``, ``export_onnx``)
import this module and register themselves in :data:`EXPORT_FORMATS`; :mod:`export` imports
them once and dispatches through the registry, so no format module imports another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipline.data.registry import Registry
from clipline.pretrain.model import DualEncoder

# Captions for the parity check every non-native export runs before it returns: upper case,
# punctuation, digits, and one longer than any context so that truncation is exercised.
PARITY_CAPTIONS = [
    "a photo of a cat.",
    "A DOG's toy: 3 red balls, 12 sticks!",
    "a small red circle above a large blue square " * 12,
]


class UnsupportedModel(ValueError):
    """The model uses an option the target format cannot express (raised before writing)."""


# Writes ``model`` into a folder and returns it: ``(model, out, *, run_config, step, name)``;
# each format takes the keywords it records and ignores the others.
Writer = Callable[..., Path]
# Reads a folder of the format as encoders: ``(folder, device)``.
Reader = Callable[[Path, Any], Any]


@dataclass(frozen=True, kw_only=True)
class ExportFormat:
    """One export format, as the module that writes and reads it registers it.

    Attributes:
        write: The writer, ``(model, out, *, run_config, step, name) -> folder``.
        read: The reader, ``(folder, device) -> encoders``.
        files: The files its weights, configuration and preprocessing are read from
            (what identifies the model of an export); the first marks a folder of the format.
        requires: Libraries the writer and reader import beyond clipline's own (the
            ``export`` extra); checked before either runs, so a missing one is one clear error.
        detect: Whether a folder is of this format; by default, whether it holds ``files[0]``.
    """

    write: Writer
    read: Reader
    files: tuple[str, ...]
    requires: tuple[str, ...] = ()
    detect: Callable[[Path], bool] | None = field(default=None)

    def holds(self, folder: Path) -> bool:
        """Whether ``folder`` is an export of this format."""
        if self.detect is not None:
            return self.detect(folder)
        return (folder / self.files[0]).is_file()


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format", key="format")


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


def encoders_from_weights(
    model_cfg: dict[str, Any],
    preprocess: dict[str, Any],
    weights: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
) -> DualEncoder:
    """The dual encoder an export describes, with its weights (the ending of every reader).

    The model is built from its config only (an HF text tower's pretrained weights are not
    loaded: the export holds every weight), then loaded strictly, so a missing or extra
    tensor is an error rather than a silently different model.

    Args:
        model_cfg: open_clip's model config.
        preprocess: open_clip's preprocessing config.
        weights: The whole CLIP state dict under open_clip's names; the temperature may be
            0-d (open_clip, transformers) or 1-element (clipline).
        device: Where the model goes.

    Returns:
        The model in eval mode on ``device``.
    """
    for k in ("logit_scale", "logit_bias"):  # 1-element in clipline (FSDP2 shards no 0-d)
        if k in weights:
            weights[k] = weights[k].reshape(1)
    model = DualEncoder(model_cfg, preprocess, load_hf_weights=False)
    model.clip.load_state_dict(weights, strict=True)
    return model.to(device).eval()
