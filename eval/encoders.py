"""The only thing evaluation knows about a model: two functions that embed images and texts."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class Encoders(Protocol):
    """A dual encoder as evaluation sees it.

    Both methods return L2-normalised float embeddings ``[B, D]`` in a shared space. The
    encoder moves inputs to its own device; results may come back on any device and dtype.
    """

    def encode_image(self, image_BCHW: Tensor) -> Tensor:
        """Embeds preprocessed images ``[B, 3, H, W]`` into ``[B, D]``."""
        ...

    def encode_text(self, text_BL: Tensor) -> Tensor:
        """Embeds token ids ``[B, L]`` into ``[B, D]``."""
        ...


def embed_images(encoders: Encoders, image_BCHW: Tensor) -> Tensor:
    """Image embeddings as CPU float32, re-normalised.

    Re-normalising in float32 matches clip_benchmark (which normalises whatever the model
    returns) and removes the drift of bf16/fp16 outputs, so rankings across items are fair.
    """
    with torch.no_grad():
        emb_BD = encoders.encode_image(image_BCHW)
    return F.normalize(emb_BD.detach().to("cpu", torch.float32), dim=-1)


def embed_texts(encoders: Encoders, text_BL: Tensor) -> Tensor:
    """Text embeddings as CPU float32, re-normalised (see :func:`embed_images`)."""
    with torch.no_grad():
        emb_BD = encoders.encode_text(text_BL)
    return F.normalize(emb_BD.detach().to("cpu", torch.float32), dim=-1)
