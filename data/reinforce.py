"""Reinforced shards, the data side: seeded views, the stored member, the manifest, the rewrite.

``clipline reinforce`` (MobileCLIP's *dataset reinforcement*) stores, for every sample, the
parameters of ``K`` training crops and a teacher's embeddings of each crop and of the
sample's captions, so that training can distill from the teacher with no teacher forward:
the stream draws one stored view per sample and replays exactly that crop
(:mod:`clipline.data.replay`). What the teacher sees is defined here, once, for both sides:

* a **view** is a box ``(top, left, height, width)`` in the original image's pixels, drawn
  as the training crop draws it (:func:`~clipline.data.decode.crop_params`: torchvision's
  ``RandomResizedCrop``; clipline's training transform has no flip, so the box is all
  there is). Boxes are a pure function of (seed, shard name, sample key, view index).
* each model (the student, every teacher) takes the view as :func:`view_pixels` gives it:
  the full-resolution RGB image (transparency flattened as ``alpha`` says) cropped to the
  box, then resized to the model's input size with its filter. Only the resize differs.

The output is a new shard set: every sample keeps its members byte for byte, plus
:data:`MEMBER` (safetensors: ``boxes`` i32[K,4], ``image_size`` i32[2] = (width, height),
``image_crc`` i64[1] (CRC-32 of the image member's bytes: a member never pairs with another
image), ``image`` f16[K,ΣD], ``text`` f16[C,ΣD]); the same keys, the same ``sizes.json``, and
:data:`MANIFEST` describing teachers, K, seed and crop. Several teachers are concatenated
along the feature axis (each part L2-normalised), MobileCLIP's ensemble layout; the loss
averages the teachers' softmax distributions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from clipline.data.decode import IMAGE_EXTS, crop_params, to_rgb
from clipline.data.shard_io import (
    TarSamples,
    check_url,
    open_shard,
    protocol,
    read_bytes,
    shard_name,
)
from clipline.data.shards import sample_captions, tar_writer

log = logging.getLogger(__name__)

MEMBER = "reinforce.safetensors"  # the extension of the stored member in each sample
MANIFEST = "reinforce.json"  # beside the shards and their sizes.json
FORMAT, VERSION = "clipline-reinforce", 1
Box = tuple[int, int, int, int]  # (top, left, height, width) in the original image's pixels


@dataclass(kw_only=True)
class TeacherInfo:
    """One teacher as the manifest records it (enough to check and to describe it).

    Attributes:
        path: The export folder as given to ``--teacher``.
        name: The export's folder name (a label in logs).
        format: The export's format (clipline, open_clip, hf, onnx).
        sha256: Digest of the export's weight and config files.
        dim: Embedding width.
        logit_scale: The teacher's temperature multiplier, ``exp(log scale)``.
        size: Its input ``(height, width)``.
        mean: Its normalisation mean.
        std: Its normalisation std.
        interpolation: The filter its views are resized with (its training filter).
    """

    path: str
    name: str
    format: str
    sha256: str
    dim: int
    logit_scale: float
    size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str


@dataclass(kw_only=True)
class ReinforceManifest:
    """``reinforce.json``: what the reinforced shards in its folder hold.

    Attributes:
        teachers: In feature order: the member's ``image``/``text`` columns are the
            teachers' embeddings concatenated in this order.
        augmentations: Views stored per sample (K).
        seed: Seeds the boxes.
        scale: The crop's area range (fraction of the image), as ``train_scale``.
        ratio: The crop's aspect range (width / height), as ``train_ratio``.
        alpha: How transparent images were flattened before cropping.
        source: The shards that were reinforced, as given.
    """

    teachers: list[TeacherInfo]
    augmentations: int
    seed: int
    scale: list[float]
    ratio: list[float]
    alpha: str = "white"
    source: str = ""
    member: str = MEMBER
    layout: str = "concat"  # per-teacher L2-normalised parts, concatenated (MobileCLIP)
    format: str = FORMAT
    version: int = VERSION

    @property
    def dims(self) -> list[int]:
        return [t.dim for t in self.teachers]

    @property
    def logit_scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> ReinforceManifest:
        """Parses a manifest; ValueError naming ``where`` if it is not one this version reads."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format {data.get('format')!r} v{data.get('version')}")
            data["teachers"] = [TeacherInfo(**t) for t in data["teachers"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(
                f"{where} is not a {FORMAT} v{VERSION} manifest ({e}); rewrite the shards with "
                "`clipline reinforce`"
            ) from e

    def same_work(self, other: ReinforceManifest) -> list[str]:
        """The settings in which ``other`` differs from this (paths and labels aside)."""
        mine, theirs = asdict(self), asdict(other)
        for d in (mine, theirs):
            d.pop("source")
            for t in d["teachers"]:
                t.pop("path"), t.pop("name")
        return [k for k in mine if mine[k] != theirs[k]]


# ------------------------------------------------------------------------- views and pixels


def draw_boxes(
    width: int, height: int, *, k: int, seed: int, sample: str, scale, ratio
) -> np.ndarray:
    """``K`` training-crop boxes ``i32[K,4]`` of a ``width x height`` image.

    View ``j`` is :func:`~clipline.data.decode.crop_params` drawn from a generator seeded with
    ``crc32(f"{seed}/reinforce/{sample}/{j}")``: the same for any worker count, any order.
    """
    boxes = np.empty((k, 4), dtype=np.int32)
    for j in range(k):
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/reinforce/{sample}/{j}".encode()))
        boxes[j] = crop_params(height, width, scale, ratio, g)
    return boxes


def view_index(seed: int, k: int) -> int:
    """Which of ``k`` stored views a sample shows, from its augmentation ``seed`` (the
    stream's per-(seed, epoch, sample) seed): a pure function, so resumes replay it."""
    return zlib.crc32(f"view/{seed}".encode()) % k


def view_crop(rgb: Image.Image, box: Sequence[int]) -> Image.Image:
    """The view before any model's resize: the RGB image cropped to ``box``."""
    top, left, h, w = (int(v) for v in box)
    return rgb.crop((left, top, left + w, top + h))


def view_pixels(rgb: Image.Image, box: Sequence[int], size: Sequence[int], resample: int):
    """A view as one model takes it, ``u8[3,H,W]``: :func:`view_crop`, then resized to
    ``size = (height, width)`` with the PIL filter ``resample`` (torchvision's
    ``resized_crop`` on PIL images, as the training crop does without draft decoding)."""
    out = view_crop(rgb, box).resize((size[1], size[0]), resample)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)


def caption_list(sample: dict[str, Any]) -> list[str]:
    """The captions the training decoder draws from (``seed % len``), in its order; empty
    when it would skip the sample for its caption. Text embeddings are stored in this order."""
    txt = sample.get("txt")
    if isinstance(txt, bytes):
        try:
            txt = txt.decode("utf-8")
        except UnicodeDecodeError:
            return []
    txt = txt.strip() if isinstance(txt, str) else ""
    if not txt:
        return []
    if "json" in sample:
        captions = [c.strip() for c in sample_captions(sample) if c.strip()]
        if len(captions) > 1:
            return captions
    return [txt]


# ------------------------------------------------------------------------------ the member


@dataclass
class Reinforcement:
    """One sample's stored member, decoded."""

    boxes: np.ndarray  # i32[K,4]
    image_size: tuple[int, int]  # (width, height) of the image the boxes belong to
    image_crc: int  # zlib.crc32 of that image member's bytes
    image: np.ndarray  # f16[K,ΣD]
    text: np.ndarray  # f16[C,ΣD]


def encode_member(r: Reinforcement) -> bytes:
    """The member's bytes (safetensors: deterministic, no pickle)."""
    return st_save(
        {
            "boxes": np.ascontiguousarray(r.boxes, dtype=np.int32),
            "image_size": np.asarray(r.image_size, dtype=np.int32),
            "image_crc": np.asarray([r.image_crc], dtype=np.int64),
            "image": np.ascontiguousarray(r.image, dtype=np.float16),
            "text": np.ascontiguousarray(r.text, dtype=np.float16),
        }
    )


def decode_member(data: bytes, dim: int) -> Reinforcement:
    """Parses a member whose features are ``dim`` wide.

    Raises:
        ValueError: unreadable bytes, missing arrays, wrong dtypes or shapes, non-finite
            features, or boxes outside the image.
    """
    try:
        arrays = st_load(data)
    except Exception as e:  # safetensors raises its own error types for bad bytes
        raise ValueError(f"unreadable member: {e}") from e
    want = {
        "boxes": np.int32,
        "image_size": np.int32,
        "image_crc": np.int64,
        "image": np.float16,
        "text": np.float16,
    }
    for name, dtype in want.items():
        if name not in arrays or arrays[name].dtype != dtype:
            raise ValueError(f"member lacks {name} ({np.dtype(dtype).name})")
    boxes, size, crc, image, text = (arrays[n] for n in want)
    k = boxes.shape[0] if boxes.ndim == 2 else 0
    if not (k and boxes.shape[1] == 4 and size.shape == (2,) and crc.shape == (1,)):
        raise ValueError(f"bad boxes {boxes.shape} or image_size {size.shape}")
    if image.shape != (k, dim) or text.ndim != 2 or text.shape[1:] != (dim,) or not len(text):
        raise ValueError(f"features {image.shape}, {text.shape} do not fit {k} views of {dim}")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise ValueError("non-finite features")
    width, height = (int(v) for v in size)
    top, left, h, w = boxes.T
    if (top < 0).any() or (left < 0).any() or (h < 1).any() or (w < 1).any():
        raise ValueError("a box outside the image")
    if (top + h > height).any() or (left + w > width).any():
        raise ValueError("a box outside the image")
    return Reinforcement(boxes, (width, height), int(crc[0]), image, text)


# ----------------------------------------------------------------------------- manifests


def manifest_url(shard: str) -> str:
    """Where a shard's ``reinforce.json`` is: beside it, as its ``sizes.json``."""
    return shard.rsplit("/", 1)[0] + "/" + MANIFEST if "/" in shard else MANIFEST


def read_manifests(urls: list[str], *, fix: str) -> ReinforceManifest:
    """The manifest the reinforced shards ``urls`` share (one per folder; their teachers
    must agree: the features are one layout for the loss).

    Args:
        urls: The stream's shards.
        fix: What the user can do instead, for the error message.

    Raises:
        ValueError: a folder without a readable ``reinforce.json`` (naming it), or
            folders reinforced with different teachers.
    """
    found: dict[str, ReinforceManifest] = {}
    for url in urls:
        where = manifest_url(url)
        if where in found:
            continue
        if protocol(url) == "pipe":
            raise ValueError(f"pipe: shard {url!r} has no folder to find {MANIFEST} in; {fix}")
        check_url(where, allow_pipe=False)
        try:
            text = read_bytes(where)
        except Exception as e:  # missing file, HTTP 404: the same fix
            raise ValueError(
                f"{where} not found ({type(e).__name__}): the shards {url!r} carry no "
                f"reinforcement; write reinforced shards with `clipline reinforce SHARDS OUT "
                f"--teacher EXPORT --augmentations K` and train on OUT, or {fix}"
            ) from e
        found[where] = ReinforceManifest.from_json(text, where)
    first_where, first = next(iter(found.items()))
    for where, m in found.items():
        theirs = [(t.dim, t.logit_scale, t.sha256) for t in m.teachers]
        if theirs != [(t.dim, t.logit_scale, t.sha256) for t in first.teachers]:
            raise ValueError(
                f"{where} and {first_where} were reinforced with different teachers; the "
                "sources of one run must share their teachers (reinforce them alike)"
            )
    return first


# ------------------------------------------------------------------------------ rewriting


@dataclass
class ReinforcedShard:
    """What reinforcing one shard did."""

    shard: str
    samples: int = 0
    reinforced: int = 0
    views: int = 0
    member_bytes: int = 0  # bytes of the stored members (not counting tar headers)
    skipped: dict[str, int] = field(default_factory=dict)  # samples left without a member


@dataclass
class _Pending:
    sample: dict[str, Any]
    rgb: Image.Image | None = None
    crc: int = 0
    boxes: np.ndarray | None = None
    captions: list[str] = field(default_factory=list)


# (views: [(rgb, box)]) -> f16[N,ΣD]; (captions) -> f16[M,ΣD]: the teachers, from launch/
EmbedViews = Callable[[list[tuple[Image.Image, np.ndarray]]], np.ndarray]
EmbedTexts = Callable[[list[str]], np.ndarray]


def reinforce_shard(
    url: str,
    out_dir: Path,
    manifest: ReinforceManifest,
    *,
    embed_views: EmbedViews,
    embed_texts: EmbedTexts,
    batch_views: int = 256,
) -> ReinforcedShard:
    """Rewrites shard ``url`` into ``out_dir`` with every sample's :data:`MEMBER` added.

    The new shard is written under a temporary name and renamed into place when complete,
    so a finished shard is a committed one (a restart skips it) and a killed run leaves no
    partial ``.tar``. A sample whose image or caption training could not use keeps its
    members and gets no reinforcement (counted by reason; training skips it too).
    """
    name = shard_name(url)
    report = ReinforcedShard(shard=name)
    skipped: Counter = Counter()
    final = out_dir / name
    tmp = out_dir / f"{name}.tmp{os.getpid()}"
    f, seekable, close = open_shard(url, allow_pipe=False)
    writer = tar_writer(tmp)
    closed = False
    pending: list[_Pending] = []
    waiting = 0  # views in pending

    def flush() -> None:
        views = [(p.rgb, box) for p in pending if p.rgb is not None for box in p.boxes]
        texts = [c for p in pending if p.rgb is not None for c in p.captions]
        image = embed_views(views) if views else None
        text = embed_texts(texts) if texts else None
        v = t = 0
        for p in pending:
            sample = dict(p.sample)
            if p.rgb is not None:
                k, c = len(p.boxes), len(p.captions)
                member = encode_member(
                    Reinforcement(p.boxes, p.rgb.size, p.crc, image[v : v + k], text[t : t + c])
                )
                v, t = v + k, t + c
                sample[MEMBER] = member
                report.reinforced += 1
                report.views += k
                report.member_bytes += len(member)
            writer.write(sample)
        pending.clear()

    try:
        for _, sample in TarSamples(f, seekable=seekable, checked=True):
            report.samples += 1
            if MEMBER in sample:
                raise ValueError(
                    f"{url}: sample {sample['__key__']!r} already holds {MEMBER}; reinforce the "
                    "original shards, not reinforced ones"
                )
            pending.append(_prepare(sample, name, manifest, skipped))
            waiting += manifest.augmentations if pending[-1].rgb is not None else 0
            if waiting >= batch_views:
                flush()
                waiting = 0
        flush()
        writer.close()
        closed = True
        os.replace(tmp, final)  # the commit: a restart skips this shard
    except BaseException:
        if not closed:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        close()
    report.skipped = dict(sorted(skipped.items()))
    return report


def _prepare(
    sample: dict[str, Any], shard: str, manifest: ReinforceManifest, skipped: Counter
) -> _Pending:
    """The sample with its decoded image, boxes and captions, or without (counted why)."""
    out = _Pending(sample)
    captions = caption_list(sample)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or not captions:
        skipped["missing_image" if ext is None else "missing_caption"] += 1
        return out
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        rgb, _ = to_rgb(img, manifest.alpha)
        rgb.load()
    except Exception:  # PIL raises many types for bad bytes; all mean the same here
        skipped["corrupt_image"] += 1
        return out
    out.rgb, out.captions, out.crc = rgb, captions, zlib.crc32(sample[ext])
    out.boxes = draw_boxes(
        *rgb.size,
        k=manifest.augmentations,
        seed=manifest.seed,
        sample=f"{shard}#{sample['__key__']}",
        scale=manifest.scale,
        ratio=manifest.ratio,
    )
    return out
