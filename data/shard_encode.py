"""Image encoding for the shard writer: what each writer process does to a sample.

:func:`~clipline.data.shards.write_samples` sends chunks of samples to spawned processes
(:func:`_ordered_map`), which read, check and encode each image (:func:`_encode_sample`)
and send back what goes into the tar, in input order. This module is what those processes
import: it stays free of torch and webdataset, so that a worker starts in a fraction of the
time.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clipline.data.ingest import (
    CORRUPT_IMAGE,
    MISSING_IMAGE,
    Sample,
    Skipped,
    _clean_captions,
)

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95


class _Undecodable(Exception):
    """The image bytes do not decode to a complete image."""


@dataclass(frozen=True)
class _EncodeOptions:
    max_side: int | None = None
    jpeg_quality: int | None = None
    dedup: bool = False
    # Picklable (a module-level function): it travels to the spawned writer processes.
    count_tokens: Callable[[list[str]], list[int]] | None = None


@dataclass
class _Encoded:
    """A sample ready for the tar: what a writer process sends back."""

    key: str
    jpg: bytes
    captions: list[str]
    meta: dict[str, Any]
    how: str  # "copied" | "reencoded" | "resized"
    digest: bytes | None
    tokens: list[int] | None  # BPE tokens per caption, when counted


def _target_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The shrunk size for ``max_side``, or None if the image is small enough already."""
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return None
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_jpeg_bytes(image: Image.Image | bytes, opts: _EncodeOptions) -> tuple[bytes, str]:
    """JPEG bytes for an image, and how they were made (``copied``/``reencoded``/``resized``).

    A JPEG that needs neither shrinking nor a new quality is copied as-is once it fully
    decodes: re-encoding would lose quality for nothing. EXIF orientation is not applied,
    because the stream does not apply it either: a copied and a re-encoded image look the
    same to training.

    Raises:
        _Undecodable: If the bytes do not decode to a complete image.
    """
    if not isinstance(image, bytes | bytearray | memoryview):
        target = _target_size(image.size, opts.max_side)
        return _encode_jpeg(image, target, opts.jpeg_quality), "resized" if target else "reencoded"
    data = bytes(image)
    try:
        with Image.open(io.BytesIO(data)) as im:
            target = _target_size(im.size, opts.max_side)
            if target is not None:
                # JPEG DCT scaling: decode straight to >= the target size, far faster than
                # decoding every pixel of a large photo and then throwing most away.
                im.draft(None, target)
            # load() decodes every pixel: verify() alone misses truncated JPEGs.
            im.load()
            if im.format == "JPEG" and target is None and opts.jpeg_quality is None:
                return data, "copied"
            how = "resized" if target else "reencoded"
            return _encode_jpeg(im, target, opts.jpeg_quality), how
    except Exception as e:  # PIL raises many types for bad bytes; all mean the same here
        logger.debug("undecodable image: %s", e)
        raise _Undecodable(str(e)) from e


def _encode_jpeg(im: Image.Image, target: tuple[int, int] | None, quality: int | None) -> bytes:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Flatten alpha onto white: CLIP-style pipelines see transparent pixels as white.
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        im = flat
    elif im.mode != "RGB":
        im = im.convert("RGB")
    if target is not None and im.size != target:
        im = im.resize(target, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality or JPEG_QUALITY)
    return buf.getvalue()


def _encode_sample(sample: Sample | Skipped, opts: _EncodeOptions) -> _Encoded | Skipped:
    """Read, check and encode one sample (in a writer process)."""
    if isinstance(sample, Skipped):
        return sample
    caps = _clean_captions(sample.caption)
    if isinstance(caps, str):
        return Skipped(caps, sample.key)
    image = sample.image
    if isinstance(image, Path):
        try:
            image = image.read_bytes()
        except OSError:
            return Skipped(MISSING_IMAGE, sample.key)
    try:
        jpg, how = _to_jpeg_bytes(image, opts)
    except _Undecodable:
        return Skipped(CORRUPT_IMAGE, sample.key)
    digest = None
    if opts.dedup:
        # The source bytes: two copies of one file are duplicates whatever the options.
        source = image if isinstance(image, bytes | bytearray | memoryview) else jpg
        digest = hashlib.sha256(source).digest()
    tokens = opts.count_tokens(caps) if opts.count_tokens is not None else None
    return _Encoded(sample.key, jpg, caps, sample.meta, how, digest, tokens)


def _encode_chunk(chunk: list[Sample | Skipped], opts: _EncodeOptions) -> list:
    return [_encode_sample(s, opts) for s in chunk]


def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes, in input order, with bounded memory.

    ``Pool.imap`` would read the whole input ahead (all of a Parquet file's image bytes);
    here at most two tasks per worker are in flight. ``spawn`` because forking a process
    that already runs threads (torch, a test runner) can deadlock.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
