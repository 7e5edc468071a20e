"""Existing shards as they are: scan them and write their manifest (``--index-only``).

:func:`index_shards` (``clipline shards --index-only``) takes shards written by another tool
(img2dataset: ``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``) as they are and writes
only ``sizes.json`` + ``index_report.json``, next to them or in a folder of links to them.
:func:`scan_shard` reads a tar's structure and captions for it and for ``clipline data
doctor``.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from clipline.data.ingest import MISSING_CAPTION, MISSING_IMAGE
from clipline.data.shard_encode import _ordered_map
from clipline.data.shard_io import TarSamples, check_local, list_shards, local_path
from clipline.data.shards import (
    ShardReport,
    _CaptionStats,
    _check_output_dir,
    _Skips,
    _write_manifest,
)

logger = logging.getLogger(__name__)

# The sample extensions the stream takes as the image (webdataset lower-cases them).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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


def scan_shard(
    path: str | Path, *, count_tokens: Callable[[list[str]], list[int]] | None = None
) -> ShardScan:
    """Read a tar's headers and captions (not its image bytes) and check its structure.

    Members are grouped as webdataset groups them (consecutive members sharing the part of
    the file name before the first dot; ``__*__`` meta files skipped). Python's ``tarfile``
    silently stops at a bad header or a cut-off file, so the end of the last member is
    checked against the file size and what follows it must be zero padding.

    Args:
        path: A local ``.tar`` file.
        count_tokens: Also count caption tokens (see ``write_samples``).

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
        scan.captions.add([caption], count_tokens([caption]) if count_tokens else None)
    return scan


def index_shards(
    spec: str | Path | list[str],
    output_dir: str | Path | None = None,
    *,
    workers: int = 1,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
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
        count_tokens: Also count caption tokens (see ``write_samples``).

    Returns:
        The report (also written as ``index_report.json`` beside ``sizes.json``).

    Raises:
        ValueError: For remote shards, shards in several folders without ``output_dir``, or an
            unreadable shard (the message names it).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    urls = list_shards(spec)
    check_local(
        urls,
        "cannot index remote shards ({url!r}); copy them locally or write sizes.json yourself",
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
        _ordered_map(partial(scan_shard, count_tokens=count_tokens), paths, workers),
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
