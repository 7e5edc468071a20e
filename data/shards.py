"""Write (image, caption) pairs into webdataset shards: the ``clipline shards`` backend.

It reads a CSV/TSV/JSONL/Parquet manifest or a folder of ``name.jpg`` + ``name.txt`` pairs
(:mod:`clipline.data.ingest`), encodes the images in worker processes
(:mod:`clipline.data.shard_encode`) and writes ``000000.tar, 000001.tar, ...`` plus

* ``sizes.json`` in open_clip's format (``{"000000.tar": n, ...}``), so open_clip's
  ``get_dataset_size`` and our own :func:`~clipline.data.shard_io.read_manifest` know the sample count without
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

Shards written by another tool are indexed as they are by :mod:`clipline.data.shard_index`
(``clipline shards --index-only``), with this module's report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from clipline.data.ingest import (
    CORRUPT_IMAGE,
    DUPLICATE,
    EMPTY_CAPTION,
    IMAGE_EXTENSIONS,
    MISSING_CAPTION,
    MISSING_IMAGE,
    REMOTE_IMAGE,
    Sample,
    Skipped,
    count_input_rows,
    iter_input,
)
from clipline.data.progress import progress
from clipline.data.shard_encode import (
    _chunks,
    _encode_chunk,
    _EncodeOptions,
    _ordered_map,
)

logger = logging.getLogger(__name__)

# Keep a few offending keys per skip reason in the report: "missing_image: 4000" alone does
# not tell a user which paths to look at.
MAX_SKIP_EXAMPLES = 5
# Fixed tar member mtime so that the same input gives byte-identical shards.
_TAR_MTIME = 0.0
# Samples per task sent to a worker process: big enough to amortise the pickling round trip,
# small enough that a few chunks in flight per worker bound the memory.
_CHUNK = 16


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
            ``count_tokens`` also ``tokens`` (e.g. CLIP BPE, without start/end tokens) and
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


def tar_writer(path: str | Path) -> Any:
    """A webdataset ``TarWriter`` at ``path`` with the fixed member mtime of every clipline
    shard (the same samples give the same bytes)."""
    # Imported here, not at module level: webdataset imports torch, and every writer process
    # (spawned) imports this module; without it a worker starts in a fraction of the time.
    import webdataset as wds

    return wds.TarWriter(str(path), mtime=_TAR_MTIME)


def write_samples(
    samples: Iterable[Sample | Skipped],
    output_dir: str | Path,
    *,
    samples_per_shard: int,
    workers: int = 1,
    max_side: int | None = None,
    jpeg_quality: int | None = None,
    dedup: bool = False,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
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
        count_tokens: Counts the tokens of each caption (e.g. CLIP BPE without start/end
            tokens) for the report's ``tokens`` and ``over_77_tokens``; None counts none.
            A module-level function: spawned writer processes receive it pickled.
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

    opts = _EncodeOptions(
        max_side=max_side, jpeg_quality=jpeg_quality, dedup=dedup, count_tokens=count_tokens
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
                    writer = tar_writer(out / (shard_name + ".tmp"))
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


def write_shards(
    cfg: ShardsConfig, *, count_tokens: Callable[[list[str]], list[int]] | None = None
) -> ShardReport:
    """Convert the configured input into webdataset shards (``clipline shards``).

    Args:
        cfg: Input, output folder, manifest columns, shard size and image options.
        count_tokens: Also count each caption's tokens (see :func:`write_samples`).

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
        count_tokens=count_tokens,
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
