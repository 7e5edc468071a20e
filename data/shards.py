"""Write (image, caption) pairs into webdataset shards, index existing shards, find/count them.

The writer is the ``clipline shards`` backend: it reads a CSV/TSV/JSONL/Parquet manifest or a
folder of ``name.jpg`` + ``name.txt`` pairs and writes ``000000.tar, 000001.tar, ...`` plus

* ``sizes.json`` in open_clip's format (``{"000000.tar": n, ...}``), so open_clip's
  ``get_dataset_size`` and our own :func:`read_manifest` know the sample count without
  reading the tars;
* ``report.json``: samples written, skipped samples by reason (with example keys), caption
  length statistics and what happened to the image bytes.

Each sample in a shard holds ``__key__`` (the running sample index, zero-padded: source keys
may contain dots or slashes that webdataset would split on), ``jpg``, ``txt`` (UTF-8) and
``json`` (``{"key": <source key or relative path>, ...meta}``). A sample with several
captions keeps the first in ``txt`` (what open_clip and img2dataset readers take) and all of
them, first included, in ``json["captions"]`` (see :func:`sample_captions`).

Output depends only on the input and the options: rows keep their input order, ``--workers``
only parallelises image loading/encoding (results are written in input order by one
process), and tar headers carry a fixed mtime. So 1 and N workers give byte-identical shards.

Bad rows never stop a run: an image that is missing or does not decode, or a caption that is
missing or empty, is skipped and counted. Bad *configuration* (missing input, a column that
is not there) raises ``ValueError`` before anything is written.

:func:`index_shards` (``clipline shards --index-only``) takes shards written by another tool
(img2dataset: ``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``) as they are and writes
only ``sizes.json`` + ``index_report.json``, next to them or in a folder of links to them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from clipline.data.hints import did_you_mean
from clipline.data.progress import progress

# Listing and manifests live in shard_io (one module for every reader and writer); these
# names stay importable from here.
from clipline.data.shard_io import (
    TarSamples,
    is_remote,
    list_shards,
    local_path,
)
from clipline.data.shard_io import read_manifest as read_manifest

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# The sample extensions the stream takes as the image (webdataset lower-cases them).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
JPEG_QUALITY = 95
# Keep a few offending keys per skip reason in the report: "missing_image: 4000" alone does
# not tell a user which paths to look at.
MAX_SKIP_EXAMPLES = 5
# Fixed tar member mtime so that the same input gives byte-identical shards.
_TAR_MTIME = 0.0
_REMOTE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")
# Samples per task sent to a worker process: big enough to amortise the pickling round trip,
# small enough that a few chunks in flight per worker bound the memory.
_CHUNK = 16

# Skip reasons (keys of ShardReport.skipped).
MISSING_IMAGE = "missing_image"
REMOTE_IMAGE = "remote_image"
CORRUPT_IMAGE = "corrupt_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
MALFORMED_ROW = "malformed_row"
DUPLICATE = "duplicate"
UNREADABLE_SHARD = "unreadable_shard"


@dataclass(kw_only=True)
class ShardsConfig:
    """What ``clipline shards`` converts, and where to.

    Attributes:
        input: A ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` manifest, or a folder of
            ``name.<img>`` + ``name.txt`` pairs (searched recursively; jpg/jpeg/png/webp).
        output_dir: Where the shards, ``sizes.json`` and ``report.json`` go. Must not
            already hold ``*.tar`` files (stale shards would silently mix into the set).
        image_column: Manifest column with the image: a path (relative paths resolve
            against the manifest's folder) or, in Parquet, the encoded bytes (a binary
            column, or Hugging Face's ``{"bytes", "path"}`` struct). open_clip's CSV
            default is ``filepath``.
        caption_column: Manifest column with the caption (open_clip's default is ``title``).
            A list of strings (JSONL/Parquet list, or a CSV cell holding a JSON list) gives
            several captions; so do adjacent rows naming the same image.
        samples_per_shard: Samples per ``.tar``.
        workers: Processes that load, check and encode images. The output does not
            depend on it. They are spawned: a script calling :func:`write_shards` with
            ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
        max_side: Shrink images whose longer side exceeds this (aspect kept, never
            enlarged) and re-encode them as JPEG. ``None`` keeps the original size.
        jpeg_quality: Re-encode every image as JPEG at this quality (1-100). ``None``
            copies JPEG files byte for byte and encodes other formats at 95.
        dedup: Skip images whose bytes (sha256) equal an earlier written image's, counted
            as ``duplicate``. Holds one 32-byte digest per written sample in memory.
        token_stats: Also count CLIP BPE tokens per caption (open_clip's tokenizer, the
            one most towers use) and how many captions a 77-token context would cut.
            Off by default: it ties the report to one tokenizer and costs some CPU.
    """

    input: str
    output_dir: str
    image_column: str = "filepath"
    caption_column: str = "caption"
    samples_per_shard: int = 1000
    workers: int = 1
    max_side: int | None = None
    jpeg_quality: int | None = None
    dedup: bool = False
    token_stats: bool = False


@dataclass
class Sample:
    """One (image, caption) pair on its way into a shard.

    Attributes:
        key: Source key (relative path, row id, emoji codepoints, ...); stored in ``json``.
        image: A decoded ``PIL.Image.Image``, the encoded file bytes, or the path of an image
            file (read by a writer process, so that reading happens in parallel).
        caption: The caption text, or several captions (the first goes into ``txt``). ``None``
            means the row had no caption.
        meta: Extra JSON-serialisable fields stored next to ``key`` in ``json``.
    """

    key: str
    image: Image.Image | bytes | Path
    caption: str | list[str] | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardReport:
    """What a shard-writing (or indexing) run did.

    Attributes:
        written: Samples written (for an index: usable samples, i.e. with image + caption).
        skipped: Skipped samples by reason (``missing_image``, ``corrupt_image``, ...).
        shards: Shard file names, in order, relative to the output folder.
        sizes: Samples per shard (the content of ``sizes.json``).
        skipped_examples: Up to five source keys per skip reason.
        captions: ``count`` (captions stored) and ``per_sample``/``chars``/``words``
            statistics (min, mean, median, p95, max; nearest-rank percentiles); with
            ``token_stats`` also ``tokens`` (CLIP BPE, without start/end tokens) and
            ``over_77_tokens`` (captions a 77-token context truncates).
        images: ``copied`` (original bytes), ``reencoded`` (converted to JPEG or to
            ``jpeg_quality``), ``resized`` (shrunk to ``max_side``), ``bytes`` (image bytes
            stored). Empty for an index.
        sources: For an index in its own folder: link name -> the shard it points at.
    """

    written: int
    skipped: dict[str, int]
    shards: list[str]
    sizes: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    captions: dict[str, Any] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise the report; also write it to ``path`` when given.

        Args:
            path: Optional file to write the JSON to.

        Returns:
            The JSON text.
        """
        text = json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


@dataclass
class Skipped:
    """A row a reader found unusable before any image decoding (missing file, no caption).

    Readers yield these in place of a :class:`Sample` so that :func:`write_samples` counts
    every skip in one place.
    """

    reason: str
    key: str


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """All captions of a webdataset sample: ``json["captions"]`` if present, else ``[txt]``.

    The one reader of the multi-caption layout, for the stream (which picks one per
    epoch) and for evaluation (which uses all).

    Args:
        sample: A raw webdataset sample (``txt``/``json`` as bytes or already decoded).

    Returns:
        The captions, in stored order; empty if the sample has no caption.
    """
    meta = sample.get("json")
    if isinstance(meta, bytes | str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = None
    if isinstance(meta, dict):
        caps = meta.get("captions")
        if isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps):
            return caps
    txt = sample.get("txt")
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8", errors="replace")
    return [txt.strip()] if isinstance(txt, str) and txt.strip() else []


# ---------------------------------------------------------------------------------------------
# Image encoding (runs in the writer processes)


class _Undecodable(Exception):
    """The image bytes do not decode to a complete image."""


@dataclass(frozen=True)
class _EncodeOptions:
    max_side: int | None = None
    jpeg_quality: int | None = None
    dedup: bool = False
    token_stats: bool = False


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


def _clean_captions(caption: str | list[str] | None) -> list[str] | str:
    """Stripped non-empty captions, or the skip reason if there are none."""
    if caption is None:
        return MISSING_CAPTION
    raw = [caption] if isinstance(caption, str) else list(caption)
    if not all(isinstance(c, str) for c in raw):
        return MISSING_CAPTION
    caps = [c.strip() for c in raw]
    caps = [c for c in caps if c]
    return caps or EMPTY_CAPTION


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
    tokens = _count_tokens(caps) if opts.token_stats else None
    return _Encoded(sample.key, jpg, caps, sample.meta, how, digest, tokens)


@functools.cache
def _bpe() -> Any:
    # Imported on demand: only --token-stats ties the data tools to open_clip.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _count_tokens(captions: list[str]) -> list[int]:
    return [len(_bpe().encode(c)) for c in captions]


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


# ---------------------------------------------------------------------------------------------
# Report helpers


class _Skips:
    """Skip counts by reason, with a few example keys each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, key: str, n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_SKIP_EXAMPLES:
            ex.append(key)


def length_stats(hist: Counter[int]) -> dict[str, float]:
    """min/mean/median/p95/max of a histogram ``{value: count}`` (nearest-rank percentiles).

    Histograms keep the memory bounded by the number of distinct lengths, however many
    captions there are.

    Args:
        hist: Counts per integer value.

    Returns:
        The statistics; all zero for an empty histogram.
    """
    n = hist.total()
    if n == 0:
        return {"min": 0, "mean": 0.0, "median": 0, "p95": 0, "max": 0}
    values = sorted(hist)

    def rank(q: float) -> int:
        need, seen = max(1, math.ceil(q * n)), 0
        for v in values:
            seen += hist[v]
            if seen >= need:
                return v
        return values[-1]

    mean = sum(v * c for v, c in hist.items()) / n
    return {
        "min": values[0],
        "mean": round(mean, 2),
        "median": rank(0.5),
        "p95": rank(0.95),
        "max": values[-1],
    }


class _CaptionStats:
    # The context length of CLIP's text tower: longer captions are cut when tokenised.
    CONTEXT = 77

    def __init__(self) -> None:
        self.chars: Counter[int] = Counter()
        self.words: Counter[int] = Counter()
        self.per_sample: Counter[int] = Counter()
        self.tokens: Counter[int] = Counter()

    def add(self, captions: list[str], tokens: list[int] | None = None) -> None:
        self.per_sample[len(captions)] += 1
        for c in captions:
            self.chars[len(c)] += 1
            self.words[len(c.split())] += 1
        for n in tokens or ():
            self.tokens[n] += 1

    def update(self, other: _CaptionStats) -> None:
        for name in ("chars", "words", "per_sample", "tokens"):
            getattr(self, name).update(getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": self.chars.total(),
            "per_sample": length_stats(self.per_sample),
            "chars": length_stats(self.chars),
            "words": length_stats(self.words),
        }
        if self.tokens:
            out["tokens"] = length_stats(self.tokens)
            # + start and end of text tokens
            out[f"over_{self.CONTEXT}_tokens"] = sum(
                c for n, c in self.tokens.items() if n + 2 > self.CONTEXT
            )
        return out


def _check_output_dir(out: Path) -> None:
    existing = sorted(out.glob("*.tar"))
    if existing:
        raise ValueError(
            f"output_dir {str(out)!r} already holds {len(existing)} shard(s) "
            f"(e.g. {existing[0].name}); stale shards would mix into the new set. "
            "Choose an empty output_dir or delete the old shards first."
        )


def _write_manifest(
    out: Path, report: ShardReport, *, report_name: str = "report.json", merge: bool = False
) -> None:
    """Write ``sizes.json`` and the report; ``merge`` keeps entries of other shards there."""
    sizes = dict(report.sizes)
    sizes_path = out / "sizes.json"
    if merge and sizes_path.is_file():
        try:
            old = json.loads(sizes_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        # Indexing part of a folder must not drop the other shards' counts.
        kept = {k: int(v) for k, v in old.items() if k not in sizes and (out / k).is_file()}
        sizes = dict(sorted({**kept, **sizes}.items()))
    # Replace atomically: a run may be reading sizes.json right now.
    tmp = out / "sizes.json.tmp"
    tmp.write_text(json.dumps(sizes, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, sizes_path)
    report.to_json(out / report_name)


# ---------------------------------------------------------------------------------------------
# Writing


def write_samples(
    samples: Iterable[Sample | Skipped],
    output_dir: str | Path,
    *,
    samples_per_shard: int,
    workers: int = 1,
    max_side: int | None = None,
    jpeg_quality: int | None = None,
    dedup: bool = False,
    token_stats: bool = False,
    show_progress: bool = False,
    expected: int | None = None,
) -> ShardReport:
    """Write samples into ``output_dir/{000000..}.tar`` plus ``sizes.json`` and ``report.json``.

    The shared core of :func:`write_shards` and the demo data. Samples whose image does not
    decode or whose caption is empty are skipped and counted, never fatal.

    Args:
        samples: The samples, in the order they should appear in the shards; readers may
            interleave :class:`Skipped` markers for rows they could not use.
        output_dir: Output folder (created if needed; must hold no ``*.tar`` yet).
        samples_per_shard: Samples per shard file.
        workers: Processes that read and encode images; the output does not depend on it.
        max_side: See :class:`ShardsConfig`.
        jpeg_quality: See :class:`ShardsConfig`.
        dedup: See :class:`ShardsConfig`.
        token_stats: See :class:`ShardsConfig`.
        show_progress: Show a progress bar on stderr (samples done, written, skipped, rate).
        expected: The number of samples expected (e.g. input rows), for the bar's
            percentage and ETA; an upper bound is fine.

    Returns:
        The report (also written to ``output_dir/report.json``).

    Raises:
        ValueError: If an option is out of range or ``output_dir`` already holds shards.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 pixel (or None to keep sizes), got {max_side}")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise ValueError(
            f"jpeg_quality must be in 1..100 (or None to copy JPEGs), got {jpeg_quality}"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_output_dir(out)

    # Imported here, not at module level: webdataset imports torch, and every writer process
    # (spawned) imports this module; without it a worker starts in a fraction of the time.
    import webdataset as wds

    opts = _EncodeOptions(
        max_side=max_side, jpeg_quality=jpeg_quality, dedup=dedup, token_stats=token_stats
    )
    skips = _Skips()
    caption_stats = _CaptionStats()
    images: Counter[str] = Counter({"copied": 0, "reencoded": 0, "resized": 0, "bytes": 0})
    seen: set[bytes] = set()
    sizes: dict[str, int] = {}
    writer: Any = None  # a webdataset.TarWriter while a shard is open
    shard_name = ""
    written = 0

    results = _ordered_map(partial(_encode_chunk, opts=opts), _chunks(samples, _CHUNK), workers)
    bar = progress(total=expected, unit="img", desc="shards", disable=not show_progress)
    try:
        for chunk in results:
            for item in chunk:
                if isinstance(item, Skipped):
                    skips.add(item.reason, item.key)
                    continue
                if item.digest is not None:
                    if item.digest in seen:
                        skips.add(DUPLICATE, item.key)
                        continue
                    seen.add(item.digest)
                if writer is None:
                    shard_name = f"{len(sizes):06d}.tar"
                    sizes[shard_name] = 0
                    # Write under a temporary name: a crashed run must not leave a truncated
                    # .tar that list_shards() would later pick up.
                    writer = wds.TarWriter(str(out / (shard_name + ".tmp")), mtime=_TAR_MTIME)
                meta = {"key": item.key, **item.meta}
                if len(item.captions) > 1:
                    meta["captions"] = item.captions
                writer.write(
                    {
                        "__key__": f"{written:09d}",
                        "jpg": item.jpg,
                        "txt": item.captions[0],
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                    }
                )
                caption_stats.add(item.captions, item.tokens)
                images[item.how] += 1
                images["bytes"] += len(item.jpg)
                sizes[shard_name] += 1
                written += 1
                if sizes[shard_name] == samples_per_shard:
                    writer.close()
                    writer = None
                    os.replace(out / (shard_name + ".tmp"), out / shard_name)
                    logger.info(
                        "%s done: %d samples written, %d skipped so far",
                        shard_name,
                        written,
                        skips.counts.total(),
                    )
            bar.set_postfix({"written": written, "skipped": skips.counts.total()}, refresh=False)
            bar.update(len(chunk))
        if bar.total is not None and bar.n < bar.total:
            bar.total = bar.n  # rows that shared an image, or a row count that over-estimated
    except BaseException:
        if writer is not None:
            writer.close()  # the .tmp stays behind: it is incomplete and not a shard
        raise
    finally:
        results.close()  # stops the worker processes early on an error
        bar.close()
    if writer is not None:
        writer.close()
        os.replace(out / (shard_name + ".tmp"), out / shard_name)

    report = ShardReport(
        written=written,
        skipped=dict(sorted(skips.counts.items())),
        shards=list(sizes),
        sizes=sizes,
        skipped_examples=dict(sorted(skips.examples.items())),
        captions=caption_stats.to_dict(),
        images=dict(images),
    )
    _write_manifest(out, report)
    # No warning for 0 written: write_shards raises, naming the input and the reasons.
    logger.info(
        "wrote %d samples in %d shards to %s; skipped %s",
        written,
        len(sizes),
        out,
        report.skipped or "none",
    )
    return report


# ---------------------------------------------------------------------------------------------
# Readers: each yields, in input order, one Sample or Skipped per image.


@dataclass
class _Row:
    key: str
    image: Any  # a path string, or bytes (Parquet)
    captions: list[Any]  # one entry per row; an entry may itself be a list
    meta: dict[str, Any]


def _group_rows(rows: Iterable[_Row | Skipped]) -> Iterator[_Row | Skipped]:
    """Merge adjacent rows that name the same image into one row with all their captions.

    Only adjacent rows: grouping across the whole file would hold it all in memory.
    COCO-style caption files list an image's captions together; elsewhere a repeated image
    stays a separate sample (``--dedup`` catches it).
    """
    current: _Row | None = None
    for row in rows:
        if (
            isinstance(row, _Row)
            and current is not None
            and row.image is not None
            and isinstance(row.image, str | bytes)
            and row.image == current.image
        ):
            current.captions.extend(row.captions)
            continue
        if current is not None:
            yield current
            current = None
        if isinstance(row, _Row):
            current = row
        else:
            yield row
    if current is not None:
        yield current


def _flatten(captions: list[Any]) -> str | list[str] | None:
    """One caption value out of a group's row values (each a string, a list or None)."""
    flat: list[Any] = []
    for c in captions:
        if c is None:
            continue
        flat.extend(c if isinstance(c, list | tuple) else [c])
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else flat


def _row_sample(row: _Row, base_dir: Path) -> Sample | Skipped:
    """Turn one (grouped) manifest row into a Sample or a Skipped."""
    caption = _flatten(row.captions)
    caps = _clean_captions(caption)
    if isinstance(caps, str):
        return Skipped(caps, row.key)
    value = row.image
    if isinstance(value, bytes | bytearray | memoryview):
        return Sample(key=row.key, image=bytes(value), caption=caption, meta=row.meta)
    if value is None or not str(value).strip():
        return Skipped(MISSING_IMAGE, row.key)
    value = str(value).strip()
    if _REMOTE_RE.match(value):
        # The shard writer does not download; img2dataset is the tool for URL lists.
        return Skipped(REMOTE_IMAGE, row.key)
    path = Path(value)
    if not path.is_absolute():
        path = base_dir / path
    # The file is read by a writer process (in parallel), not here.
    return Sample(key=row.key, image=path, caption=caption, meta=row.meta)


def _check_columns(found: list[str], cfg: ShardsConfig, path: Path) -> None:
    missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in found]
    if not missing:
        return
    fix = []
    if cfg.image_column in missing:
        fix.append("pass --image-column <one of the columns found> (image_column= in Python)")
    if cfg.caption_column in missing:
        fix.append("pass --caption-column <one of them> (caption_column= in Python)")
    hints = "".join(did_you_mean(c, found) for c in missing)
    raise ValueError(
        f"{str(path)!r} has no column(s) {missing}; columns found: {found}.{hints} "
        f"Fix: {' and '.join(fix)} (e.g. open_clip's CSVs use filepath/title), "
        "or rename the column(s) in the file."
    )


def table_delimiter(path: Path) -> str:
    """The field separator of a CSV/TSV file: a tab for ``.tsv``/``.tab``, and for a ``.csv``
    whose header line has tabs and no commas (open_clip writes tab-separated files named
    ``*.csv``: its --csv-separator defaults to "\\t"); else a comma."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = f.readline()
    tab = path.suffix.lower() in (".tsv", ".tab") or ("\t" in header and "," not in header)
    return "\t" if tab else ","


def csv_caption(cell: str | None) -> str | list[str] | None:
    """A CSV cell: a caption, or a JSON list of captions (``["a dog", "a brown dog"]``)."""
    if cell is not None and cell.lstrip().startswith("[") and cell.rstrip().endswith("]"):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(c, str) for c in value):
            return value
    return cell


def _read_table(path: Path, cfg: ShardsConfig) -> Iterator[_Row | Skipped]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f, delimiter=table_delimiter(path))
        _check_columns(list(reader.fieldnames or []), cfg, path)
        for i, row in enumerate(reader):
            image_value = row.get(cfg.image_column)
            key = str(image_value).strip() if image_value else f"row{i}"
            caption = csv_caption(row.get(cfg.caption_column))
            yield _Row(key, image_value, [caption], {"row": i})


def _read_jsonl(path: Path, cfg: ShardsConfig) -> Iterator[_Row | Skipped]:
    checked = False
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield Skipped(MALFORMED_ROW, f"line {i + 1}")
                continue
            if not isinstance(row, dict):
                yield Skipped(MALFORMED_ROW, f"line {i + 1}")
                continue
            if not checked:
                # JSONL has no header: the first object stands for the schema.
                _check_columns(list(row), cfg, path)
                checked = True
            image_value = row.get(cfg.image_column)
            key = str(image_value).strip() if image_value else f"line{i + 1}"
            yield _Row(key, image_value, [row.get(cfg.caption_column)], {"row": i})


def _read_parquet(path: Path, cfg: ShardsConfig) -> Iterator[_Row | Skipped]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ValueError("reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a non-Parquet file
        raise ValueError(f"{str(path)!r} is not a readable Parquet file: {e}") from e
    _check_columns(list(pf.schema_arrow.names), cfg, path)
    # Row groups at a time: a Parquet file of image bytes can be far larger than memory.
    i = 0
    for batch in pf.iter_batches(batch_size=256, columns=[cfg.image_column, cfg.caption_column]):
        images = batch.column(cfg.image_column).to_pylist()
        captions = batch.column(cfg.caption_column).to_pylist()
        for image_value, caption in zip(images, captions, strict=True):
            if isinstance(image_value, dict):
                # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}.
                image_value = image_value.get("bytes") or image_value.get("path")
            if isinstance(image_value, str) and image_value.strip():
                key = image_value.strip()
            else:
                key = f"row{i}"
            yield _Row(key, image_value, [caption], {"row": i})
            i += 1


def _read_folder(root: Path) -> Iterator[Sample | Skipped]:
    images = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not images:
        logger.warning("no %s images found under %s", "/".join(IMAGE_EXTENSIONS), root)
    for img in images:
        key = img.relative_to(root).as_posix()
        txt = img.with_suffix(".txt")
        try:
            # One caption per file, as in img2dataset's output: a line break is part of it.
            caption = txt.read_text(encoding="utf-8")
        except FileNotFoundError:
            yield Skipped(MISSING_CAPTION, key)
            continue
        except (OSError, UnicodeDecodeError):
            yield Skipped(MALFORMED_ROW, key)
            continue
        # Absolute: _row_sample resolves relative paths against the folder, and img is
        # already under it (a relative folder would be joined twice: every image missing).
        yield _row_sample(_Row(key, str(img.absolute()), [caption], {}), root)


_TABLE_READERS: dict[str, Callable[[Path, ShardsConfig], Iterator[_Row | Skipped]]] = {
    ".csv": _read_table,
    ".tsv": _read_table,
    ".tab": _read_table,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
}


def iter_input(cfg: ShardsConfig) -> Iterator[Sample | Skipped]:
    """Read the configured input lazily, one sample (or skip marker) per image.

    Args:
        cfg: The shard config.

    Returns:
        An iterator; the column check runs before the first item is produced.

    Raises:
        ValueError: If the input does not exist, has an unsupported type, or lacks a
            configured column.
    """
    path = Path(cfg.input)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise ValueError(
            f"input {cfg.input!r} does not exist; pass a .csv/.tsv/.jsonl/.parquet file or a "
            "folder of name.jpg + name.txt pairs."
        )
    suffix = path.suffix.lower()
    if suffix not in _TABLE_READERS:
        raise ValueError(
            f"input {cfg.input!r} has unsupported type {suffix!r}; use .csv, .tsv, .jsonl, "
            ".parquet or a folder of name.jpg + name.txt pairs (existing webdataset shards: "
            "`clipline shards --index-only`)."
        )
    rows = _group_rows(_TABLE_READERS[suffix](path, cfg))
    it = (r if isinstance(r, Skipped) else _row_sample(r, path.parent) for r in rows)
    # Generators run lazily: prime the first item now so that a wrong column raises here,
    # before write_samples creates the output folder.
    first = next(it, None)

    def chained() -> Iterator[Sample | Skipped]:
        if first is not None:
            yield first
            yield from it

    return chained()


def write_shards(cfg: ShardsConfig) -> ShardReport:
    """Convert the configured input into webdataset shards (``clipline shards``).

    Args:
        cfg: Input, output folder, manifest columns, shard size and image options.

    Returns:
        The report (also written to ``<output_dir>/report.json``).

    Raises:
        ValueError: For a missing input, an unsupported input type, a missing column,
            an option out of range, an output folder that already holds shards, or when
            no sample could be written (after writing ``report.json``: the message names
            the skip reasons).
    """
    samples = iter_input(cfg)
    report = write_samples(
        samples,
        cfg.output_dir,
        samples_per_shard=cfg.samples_per_shard,
        workers=cfg.workers,
        max_side=cfg.max_side,
        jpeg_quality=cfg.jpeg_quality,
        dedup=cfg.dedup,
        token_stats=cfg.token_stats,
        show_progress=True,
        expected=count_input_rows(cfg),
    )
    if report.written == 0:
        raise ValueError(_nothing_written(cfg, report))
    return report


def _nothing_written(cfg: ShardsConfig, report: ShardReport) -> str:
    """Why a run wrote no sample, and the likely fix, in one line."""
    where = f"{cfg.output_dir}/report.json"
    if not report.skipped:
        return (
            f"no samples written from {cfg.input!r}: it holds no rows or images "
            f"({'/'.join(IMAGE_EXTENSIONS)} files); see {where}"
        )
    reasons = ", ".join(
        f"{reason}: {n} (e.g. {report.skipped_examples.get(reason, ['?'])[0]!r})"
        for reason, n in report.skipped.items()
    )
    fixes = {
        MISSING_IMAGE: "image paths resolve against the manifest's folder; check "
        f"--image-column={cfg.image_column!r} and that the files exist",
        MISSING_CAPTION: "a folder needs name.txt beside each name.jpg; a manifest needs "
        f"--caption-column={cfg.caption_column!r}",
        EMPTY_CAPTION: "the captions are empty",
        CORRUPT_IMAGE: "the image files do not decode",
        REMOTE_IMAGE: "the images are URLs: download them first (e.g. with img2dataset)",
    }
    fix = "; ".join(fixes[r] for r in report.skipped if r in fixes)
    return (
        f"no samples written from {cfg.input!r}: every one was skipped ({reasons})"
        f"{'; ' + fix if fix else ''}; see {where}"
    )


def count_input_rows(cfg: ShardsConfig) -> int | None:
    """Rows of the input, cheaply (for a progress bar): an upper bound on its samples.

    Lines for CSV/TSV/JSONL (a caption with a line break counts twice), the row count in a
    Parquet footer, image files in a folder; None where the input cannot be read.
    """
    path = Path(cfg.input)
    try:
        if path.is_dir():
            return sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        lines, last = 0, b""
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                lines += block.count(b"\n")
                last = block
        if last and not last.endswith(b"\n"):
            lines += 1  # a last line without a line break
        header = 1 if suffix in (".csv", ".tsv", ".tab") else 0
        return max(0, lines - header)
    except Exception:  # a count for a progress bar is never worth failing a run
        return None


# ---------------------------------------------------------------------------------------------
# Existing shards: scan (structure, counts, captions) and index without rewriting.


@dataclass
class ShardScan:
    """What one tar holds, grouped into samples the way webdataset groups them.

    Attributes:
        path: The shard.
        samples: Usable samples: an image (jpg/jpeg/png/webp) and a non-empty ``txt``.
        keys: Samples (key groups) of any kind.
        missing_image: Keys of samples without an image member.
        missing_caption: Keys of samples without a ``txt`` member, or with an empty one.
        duplicate_keys: Keys that occur in more than one group, or twice in one (webdataset
            raises on the latter and drops the rest of the shard).
        error: Why the tar is unreadable (bad header, truncated data, garbage), else None.
        captions: Caption statistics of the usable samples.
    """

    path: str
    samples: int = 0
    keys: int = 0
    missing_image: list[str] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    duplicate_keys: list[str] = field(default_factory=list)
    error: str | None = None
    captions: _CaptionStats = field(default_factory=_CaptionStats, repr=False)


def scan_shard(path: str | Path, *, token_stats: bool = False) -> ShardScan:
    """Read a tar's headers and captions (not its image bytes) and check its structure.

    Members are grouped as webdataset groups them (consecutive members sharing the part of
    the file name before the first dot; ``__*__`` meta files skipped). Python's ``tarfile``
    silently stops at a bad header or a cut-off file, so the end of the last member is
    checked against the file size and what follows it must be zero padding.

    Args:
        path: A local ``.tar`` file.
        token_stats: Also count caption tokens (see :class:`ShardsConfig`).

    Returns:
        The scan; ``error`` is set when the tar cannot be read to its end.
    """
    scan = ShardScan(path=str(path))
    groups: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            tar = TarSamples(f, seekable=True, read=lambda ext: ext == "txt", checked=True)
            try:
                groups.extend(sample for _, sample in tar)
            finally:
                scan.duplicate_keys = tar.duplicates
    except (tarfile.TarError, OSError, EOFError) as e:
        # A sample cut off by the damage is not among the groups: its missing members say
        # nothing about the data.
        msg = str(e) or type(e).__name__
        scan.error = msg if msg.startswith("truncated") else f"truncated or damaged tar: {msg}"
    scan.keys = len(groups)
    for members in groups:
        key = members["__key__"]
        if not any(e in members for e in IMAGE_KEYS):
            scan.missing_image.append(key)
            continue
        txt = members.get("txt")
        caption = txt.decode("utf-8", errors="replace").strip() if txt else ""
        if not caption:
            scan.missing_caption.append(key)
            continue
        scan.samples += 1
        scan.captions.add([caption], _count_tokens([caption]) if token_stats else None)
    return scan


def index_shards(
    spec: str | Path | list[str],
    output_dir: str | Path | None = None,
    *,
    workers: int = 1,
    token_stats: bool = False,
) -> ShardReport:
    """Write ``sizes.json`` + ``index_report.json`` for existing shards; the tars stay as they are.

    For shards written by another tool (img2dataset, a previous pipeline). The count per
    shard is its usable samples (image + caption: what the stream trains on); the others are
    reported as skipped.

    Args:
        spec: The shards: a folder, a glob, a brace pattern or a list (see :func:`list_shards`).
        output_dir: ``None`` writes the manifest next to the shards (they must share one
            folder; entries of other shards already in that ``sizes.json`` are kept). A folder (empty of ``*.tar``) gets a symlink per shard plus the
            manifest: point training at it when the shards' folder is read-only.
            Links keep the shards' file names unless two collide; then they are numbered.
        workers: Processes scanning shards in parallel.
        token_stats: Also count caption tokens (see :class:`ShardsConfig`).

    Returns:
        The report (also written as ``index_report.json`` beside ``sizes.json``).

    Raises:
        ValueError: For remote shards, shards in several folders without ``output_dir``, or an
            unreadable shard (the message names it).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    urls = list_shards(spec)
    remote = [u for u in urls if is_remote(u)]
    if remote:
        raise ValueError(
            f"cannot index remote shards ({remote[0]!r}); copy them locally or write "
            "sizes.json yourself (a local folder whose name starts with pipe: is read as a "
            "folder when written ./pipe:... or as an absolute path)."
        )
    paths = [Path(local_path(u)).resolve() for u in urls]
    if output_dir is None:
        folders = sorted({str(p.parent) for p in paths})
        if len(folders) > 1:
            raise ValueError(
                f"the shards are in {len(folders)} folders ({folders[:2]}...); sizes.json is "
                "per folder: give an output folder to collect links to them all, or index "
                "each folder on its own."
            )
        out = paths[0].parent
        names = [p.name for p in paths]
    else:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _check_output_dir(out)
        names = [p.name for p in paths]
        if len(set(names)) < len(names):
            names = [f"{i:06d}.tar" for i in range(len(paths))]

    skips = _Skips()
    captions = _CaptionStats()
    sizes: dict[str, int] = {}
    for name, scan in zip(
        names,
        _ordered_map(partial(scan_shard, token_stats=token_stats), paths, workers),
        strict=True,
    ):
        if scan.error is not None:
            raise ValueError(
                f"shard {scan.path!r} is unreadable: {scan.error}. Re-download or rewrite it, "
                "or leave it out of the spec; nothing was written."
            )
        sizes[name] = scan.samples
        if scan.duplicate_keys:
            logger.warning(
                "%s has duplicate sample keys (e.g. %s); webdataset merges or splits such "
                "samples. See `clipline data doctor`.",
                scan.path,
                scan.duplicate_keys[0],
            )
        for reason, keys in (
            (MISSING_IMAGE, scan.missing_image),
            (MISSING_CAPTION, scan.missing_caption),
        ):
            for key in keys:
                skips.add(reason, f"{name}:{key}")
        captions.update(scan.captions)

    sources: dict[str, str] = {}
    if output_dir is not None:
        for name, p in zip(names, paths, strict=True):
            (out / name).symlink_to(p)
            sources[name] = str(p)
    report = ShardReport(
        written=sum(sizes.values()),
        skipped=dict(sorted(skips.counts.items())),
        shards=names,
        sizes=sizes,
        skipped_examples=dict(sorted(skips.examples.items())),
        captions=captions.to_dict(),
        sources=sources,
    )
    # Never index_report -> report.json: next to shards from `clipline shards` that would
    # overwrite the writer's own report.
    _write_manifest(out, report, report_name="index_report.json", merge=output_dir is None)
    logger.info("indexed %d samples in %d shards into %s", report.written, len(names), out)
    return report
