"""Training on reinforced shards: replay one stored view per sample, with its teacher features.

:class:`ReplayDecoder` takes the training decoder's place when the run distills from stored
teacher embeddings (:mod:`clipline.data.reinforce`). Per sample it draws one of the ``K``
stored views, a pure function of the stream's augmentation seed (so of data seed, epoch
and sample: resumes and any worker count replay the same view), crops exactly that box
instead of a random one, and adds to the batch

* ``teacher_image`` ``f16[B,ΣD]``: the teachers' embeddings of that view;
* ``teacher_text`` ``f16[B,ΣD]``: their embeddings of the caption the decoder chose;
* ``teacher_spec``: the teachers' widths and logit scales (``dims``, ``logit_scales``);

(:class:`~clipline.data.loader.ModelReady` moves both to the device as float32). A sample
without a readable member, or whose member does not fit its image, is skipped and counted
(``missing_reinforcement``, ``corrupt_reinforcement``) like any other bad sample.

The view's pixels are the teacher's pixels: full-resolution decoding (JPEG draft decoding
would give the student other pixels than the teacher embedded, so it is off here) and the
transparency handling the shards were reinforced with.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipline.data.decode import IMAGE_EXTS, DecodeConfig, Decoder, _batch_tensor, to_rgb
from clipline.data.preprocess import PreprocessConfig
from clipline.data.reinforce import (
    MEMBER,
    ReinforceManifest,
    caption_list,
    decode_member,
    read_manifests,
    view_index,
    view_pixels,
)

log = logging.getLogger(__name__)


class ReplayDecoder(Decoder):
    """The training decoder replaying stored views (see the module docstring).

    Its items' image entry is ``(u8[3,H,W] pixels, f16[ΣD] teacher image feature, f16[ΣD]
    teacher text feature)``; :meth:`collate_batch` turns a batch of them into the three
    batch entries.
    """

    def __init__(
        self, cfg: DecodeConfig, preprocess: PreprocessConfig, manifest: ReinforceManifest
    ):
        super().__init__(replace(cfg, alpha=manifest.alpha, draft=False), preprocess)
        self.dim = sum(manifest.dims)
        # What the features are, for the loss (pretrain/distill.py's TeacherSpec fields).
        self.spec = {"dims": manifest.dims, "logit_scales": manifest.logit_scales}
        self._box: np.ndarray | None = None  # the view of the sample being decoded
        self._seen: tuple[int, int] | None = None  # its image's (width, height)

    def _decode(
        self, sample: dict[str, Any], seed: int, skipped: Counter, converted: Counter
    ) -> tuple[str, Any, str] | None:
        data = sample.get(MEMBER)
        if not data:
            skipped["missing_reinforcement"] += 1
            return None
        try:
            stored = decode_member(data, self.dim)
        except ValueError as e:
            log.debug("sample %s: %s", sample.get("__key__"), e)
            skipped["corrupt_reinforcement"] += 1
            return None
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is not None and zlib.crc32(sample[ext]) != stored.image_crc:
            skipped["corrupt_reinforcement"] += 1  # views of another image
            return None
        view = view_index(seed, len(stored.boxes))
        self._box, self._seen = stored.boxes[view], None
        out = super()._decode(sample, seed, skipped, converted)
        if out is None:
            return None
        captions = caption_list(sample)
        if self._seen != stored.image_size or len(captions) != len(stored.text):
            # Boxes of another image size, or embeddings of other captions.
            skipped["corrupt_reinforcement"] += 1
            return None
        key, pixels, caption = out
        chosen = seed % len(captions)  # the decoder's own draw among the captions
        assert captions[chosen] == caption, (captions, caption)
        teacher_image = torch.from_numpy(stored.image[view].copy())  # f16[ΣD]
        teacher_text = torch.from_numpy(stored.text[chosen].copy())  # f16[ΣD]
        return key, (pixels, teacher_image, teacher_text), caption

    def _pixels(self, img: Image.Image, seed: int) -> tuple[torch.Tensor, str | None]:
        self._seen = img.size
        rgb, kind = to_rgb(img, self.cfg.alpha)
        spec = self.preprocess
        return view_pixels(rgb, self._box, spec.size, spec.train_resample), kind

    def collate_batch(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        pixels, teacher_image, teacher_text = zip(*images, strict=True)
        shape = (len(images), self.dim)
        return {
            "image": self.collate(pixels),
            "teacher_image": torch.stack(teacher_image, out=_batch_tensor(shape, torch.float16)),
            "teacher_text": torch.stack(teacher_text, out=_batch_tensor(shape, torch.float16)),
            "teacher_spec": self.spec,
        }


def replay_decoder(
    cfg: DecodeConfig, preprocess: PreprocessConfig, urls: list[str], *, fix: str
) -> ReplayDecoder:
    """The decoder for training on the reinforced shards ``urls``.

    Warns where a setting is ignored: the student's crop range (the stored boxes are
    replayed) and ``data.decode.alpha`` (the teacher's pixels rule).

    Raises:
        ValueError: shards without reinforcement (naming the missing ``reinforce.json``
            and ``fix``), or sources reinforced with different teachers.
    """
    manifest = read_manifests(urls, fix=fix)
    crop = (list(preprocess.train_scale), list(preprocess.train_ratio))
    if crop != (list(manifest.scale), list(manifest.ratio)):
        log.warning(
            "the model's training crop (scale %s, ratio %s) is ignored: the reinforced shards' "
            "stored crops (scale %s, ratio %s) are replayed",
            *crop,
            manifest.scale,
            manifest.ratio,
        )
    if cfg.alpha != manifest.alpha:
        log.warning(
            "data.decode.alpha=%r is ignored: the shards were reinforced with alpha=%r, and "
            "the student must see the teacher's pixels",
            cfg.alpha,
            manifest.alpha,
        )
    return ReplayDecoder(cfg, preprocess, manifest)
