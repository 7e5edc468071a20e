"""What the image tower takes, as plain numbers: size, normalisation, resizing and crop.

data/ knows no model. The wiring (``clipline.launch``) asks the model once for its
:class:`PreprocessConfig` (``DualEncoder.preprocess_config()``, read from open_clip's own
``PreprocessCfg``, in the spirit of timm's ``resolve_data_config``) and hands the numbers
to the training stream and the evaluators; they build their steps from them with
torchvision's functional ops, the same operations in the same order as open_clip's
transforms, so the pixels are the same bit for bit (tests compare them).

* Training (:class:`~clipline.data.decode.Decoder`): a random resized crop (``train_scale``,
  ``train_ratio``, ``train_interpolation``) to ``size``, then ``(x / 255 - mean) / std``.
* Evaluation (:func:`eval_pixels`): resize by ``resize_mode`` with ``interpolation``, a
  centre crop (padded with ``fill_color`` where ``longest`` leaves the image smaller), then
  the same normalisation once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.functional import pil_modes_mapping

# CLIP's (OpenAI's) image statistics: open_clip's and timm's default for CLIP towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(kw_only=True)
class PreprocessConfig:
    """The image tower's input, as numbers (open_clip's ``PreprocessCfg`` plus the crop).

    Attributes:
        size: Output ``(height, width)`` in pixels.
        mean: Per-channel mean (RGB, on the 0..1 scale) subtracted before dividing by ``std``.
        std: Per-channel standard deviation (RGB, on the 0..1 scale).
        interpolation: Evaluation resize filter: ``"bicubic"`` or ``"bilinear"``.
        resize_mode: Evaluation resize: ``"shortest"`` (the shorter side to the output,
            then a centre crop), ``"longest"`` (the longer side, then a centre crop padded
            with ``fill_color``) or ``"squash"`` (straight to ``size``, aspect ignored).
        fill_color: Grey level (0..255) of the padding ``resize_mode="longest"`` adds.
        train_scale: Training crop: the range of the crop's area as a fraction of the image.
        train_ratio: Training crop: the range of its aspect ratio (width / height).
        train_interpolation: Training crop resize filter.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    fill_color: int = 0
    train_scale: tuple[float, float] = (0.9, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        # TOML and JSON give lists; equal configs must compare (and hash into keys) alike.
        self.size = tuple(self.size)  # type: ignore[assignment]
        self.mean, self.std = tuple(self.mean), tuple(self.std)  # type: ignore[assignment]
        self.train_scale = tuple(self.train_scale)  # type: ignore[assignment]
        self.train_ratio = tuple(self.train_ratio)  # type: ignore[assignment]
        if len(self.size) != 2 or not all(isinstance(s, int) and s >= 1 for s in self.size):
            raise ValueError(
                f"preprocess.size must be (height, width), two integers >= 1; got {self.size!r}"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(
                    f"preprocess.{name} must be 3 finite numbers (R, G, B); got {values!r}"
                )
        if not all(s > 0 for s in self.std):
            raise ValueError(f"preprocess.std must be > 0 in each channel; got {self.std!r}")
        for name in ("interpolation", "train_interpolation"):
            if getattr(self, name) not in _INTERPOLATIONS:
                raise ValueError(
                    f"preprocess.{name} must be one of {list(_INTERPOLATIONS)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"preprocess.resize_mode must be one of {list(_RESIZE_MODES)}, "
                f"got {self.resize_mode!r}"
            )
        if not 0 <= self.fill_color <= 255:
            raise ValueError(f"preprocess.fill_color must be in 0..255, got {self.fill_color}")
        for name in ("train_scale", "train_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(
                    f"preprocess.{name} must be a range (low, high) with 0 < low <= high; "
                    f"got {(lo, hi)!r}"
                )

    @property
    def train_resample(self) -> int:
        """The PIL filter of the training crop's resize."""
        return pil_modes_mapping[_INTERPOLATIONS[self.train_interpolation]]


def eval_pixels(cfg: PreprocessConfig, image: Image.Image) -> torch.Tensor:
    """One image resized and centre-cropped for evaluation: ``u8[3,H,W]``, not normalised.

    open_clip's eval transform up to its ``ToTensor``, in the same order (resize, crop,
    then the conversion to RGB); :class:`~clipline.data.decode.ImageNormalizer` does the
    rest once per batch. PIL and numpy only, no torch arithmetic: safe to run on threads.
    """
    height, width = cfg.size
    mode = _INTERPOLATIONS[cfg.interpolation]
    if cfg.resize_mode == "squash":
        image = F.resize(image, [height, width], mode)
    else:
        w, h = image.size
        ratio_h, ratio_w = h / height, w / width
        if cfg.resize_mode == "shortest" and height == width:
            image = F.resize(image, height, mode)  # torchvision's shorter-side resize
        else:
            ratio = max(ratio_h, ratio_w) if cfg.resize_mode == "longest" else min(ratio_h, ratio_w)
            image = F.resize(image, [round(h / ratio), round(w / ratio)], mode)
        # open_clip pads with fill_color only after a "longest" resize (its CenterCropOrPad).
        fill = cfg.fill_color if cfg.resize_mode == "longest" else 0
        image = _center_crop_or_pad(image, height, width, fill)
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def _center_crop_or_pad(image: Image.Image, height: int, width: int, fill: int) -> Image.Image:
    """The centre ``height x width``; sides shorter than that padded with ``fill`` first."""
    w, h = image.size
    if width > w or height > h:
        left, top = max(width - w, 0) // 2, max(height - h, 0) // 2
        right, bottom = (max(width - w, 0) + 1) // 2, (max(height - h, 0) + 1) // 2
        image = F.pad(image, [left, top, right, bottom], fill=fill)
        w, h = image.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return F.crop(image, top, left, height, width)
