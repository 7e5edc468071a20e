"""Write (image, caption) pairs into webdataset shards, and find/count existing shards.

The writer is the ``clipline shards`` backend: it reads a CSV/TSV/JSONL manifest or a folder
of ``name.jpg`` + ``name.txt`` pairs and writes ``000000.tar, 000001.tar, ...`` plus

* ``sizes.json`` in open_clip's format (``{"000000.tar": n, ...}``), so open_clip's
  ``get_dataset_size`` and our own :func:`read_manifest` know the sample count without
  reading the tars;
* ``report.json``: how many samples were written and how many were skipped, by reason.

Each sample in a shard holds ``__key__`` (the running sample index, zero-padded: source keys
may contain dots or slashes that webdataset would split on), ``jpg``, ``txt`` (UTF-8) and
``json`` (``{"key": <source key or relative path>, ...meta}``).

Bad rows never stop a run: an image that is missing or does not decode, or a caption that is
missing or empty, is skipped and counted. Bad *configuration* (missing input, a column that
is not there) raises ``ValueError`` before anything is written.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
JPEG_QUALITY = 95
# Keep a few offending keys per skip reason in the report: "missing_image: 4000" alone does
# not tell a user which paths to look at.
MAX_SKIP_EXAMPLES = 5
# Fixed tar member mtime so that the same input gives byte-identical shards.
_TAR_MTIME = 0.0
_REMOTE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")

# Skip reasons (keys of ShardReport.skipped).
MISSING_IMAGE = "missing_image"
REMOTE_IMAGE = "remote_image"
CORRUPT_IMAGE = "corrupt_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
MALFORMED_ROW = "malformed_row"


@dataclass(kw_only=True)
class ShardsConfig:
    """What ``clipline shards`` converts, and where to.

    Attributes:
        input: A ``.csv`` / ``.tsv`` / ``.jsonl`` manifest, or a folder of ``name.<img>`` +
            ``name.txt`` pairs (searched recursively; jpg/jpeg/png/webp).
        output_dir: Where the shards, ``sizes.json`` and ``report.json`` go. Must not
            already hold ``*.tar`` files (stale shards would silently mix into the set).
        image_column: Manifest column with the image path (relative paths resolve against
            the manifest's folder). open_clip's CSV default is ``filepath``.
        caption_column: Manifest column with the caption (open_clip's default is ``title``).
        samples_per_shard: Samples per ``.tar``.
    """

    input: str
    output_dir: str
    image_column: str = "filepath"
    caption_column: str = "caption"
    samples_per_shard: int = 1000


@dataclass
class Sample:
    """One (image, caption) pair on its way into a shard.

    Attributes:
        key: Source key (relative path, row id, emoji codepoints, ...); stored in ``json``.
        image: A decoded ``PIL.Image.Image`` or the encoded file bytes.
        caption: The caption text.
        meta: Extra JSON-serialisable fields stored next to ``key`` in ``json``.
    """

    key: str
    image: Image.Image | bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardReport:
    """What a shard-writing run did.

    Attributes:
        written: Samples written.
        skipped: Skipped samples by reason (``missing_image``, ``corrupt_image``, ...).
        shards: Shard file names, in order, relative to the output folder.
        sizes: Samples per shard (the content of ``sizes.json``).
        skipped_examples: Up to five source keys per skip reason.
    """

    written: int
    skipped: dict[str, int]
    shards: list[str]
    sizes: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

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


class _Undecodable(Exception):
    """The image bytes do not decode to a complete image."""


def _to_jpeg_bytes(image: Image.Image | bytes) -> bytes:
    """JPEG bytes for an image: JPEG input is copied as-is once it fully decodes.

    Re-encoding a JPEG would lose quality for nothing, so only non-JPEG input is converted:
    to RGB (alpha flattened onto white, as CLIP-style pipelines see transparent pixels as
    white on the web) and encoded at quality 95.

    Raises:
        _Undecodable: If the bytes do not decode to a complete image.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        try:
            with Image.open(io.BytesIO(data)) as im:
                # load() decodes every pixel: verify() alone misses truncated JPEGs.
                im.load()
                if im.format == "JPEG":
                    return data
                return _encode_jpeg(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            logger.debug("undecodable image: %s", e)
            raise _Undecodable(str(e)) from e
    return _encode_jpeg(image)


def _encode_jpeg(im: Image.Image) -> bytes:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        im = flat
    elif im.mode != "RGB":
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_samples(
    samples: Iterable[Sample | Skipped], output_dir: str | Path, *, samples_per_shard: int
) -> ShardReport:
    """Write samples into ``output_dir/{000000..}.tar`` plus ``sizes.json`` and ``report.json``.

    The shared core of :func:`write_shards` and the demo data. Samples whose image does not
    decode or whose caption is empty are skipped and counted, never fatal.

    Args:
        samples: The samples, in the order they should appear in the shards; readers may
            interleave :class:`Skipped` markers for rows they could not use.
        output_dir: Output folder (created if needed; must hold no ``*.tar`` yet).
        samples_per_shard: Samples per shard file.

    Returns:
        The report (also written to ``output_dir/report.json``).

    Raises:
        ValueError: If ``samples_per_shard < 1`` or ``output_dir`` already holds shards.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.tar"))
    if existing:
        raise ValueError(
            f"output_dir {str(out)!r} already holds {len(existing)} shard(s) "
            f"(e.g. {existing[0].name}); stale shards would mix into the new set. "
            "Choose an empty output_dir or delete the old shards first."
        )

    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    writer: wds.TarWriter | None = None
    shard_name = ""
    written = 0

    def skip(reason: str, key: str) -> None:
        skipped[reason] += 1
        ex = examples.setdefault(reason, [])
        if len(ex) < MAX_SKIP_EXAMPLES:
            ex.append(key)

    try:
        for sample in samples:
            if isinstance(sample, Skipped):
                skip(sample.reason, sample.key)
                continue
            caption = sample.caption.strip() if sample.caption is not None else ""
            if not caption:
                skip(MISSING_CAPTION if sample.caption is None else EMPTY_CAPTION, sample.key)
                continue
            try:
                jpg = _to_jpeg_bytes(sample.image)
            except _Undecodable:
                skip(CORRUPT_IMAGE, sample.key)
                continue
            if writer is None:
                shard_name = f"{len(sizes):06d}.tar"
                sizes[shard_name] = 0
                # Write under a temporary name: a crashed run must not leave a truncated
                # .tar that list_shards() would later pick up.
                writer = wds.TarWriter(str(out / (shard_name + ".tmp")), mtime=_TAR_MTIME)
            writer.write(
                {
                    "__key__": f"{written:09d}",
                    "jpg": jpg,
                    "txt": caption,
                    "json": json.dumps(
                        {"key": sample.key, **sample.meta}, ensure_ascii=False
                    ).encode("utf-8"),
                }
            )
            sizes[shard_name] += 1
            written += 1
            if sizes[shard_name] == samples_per_shard:
                writer.close()
                writer = None
                os.replace(out / (shard_name + ".tmp"), out / shard_name)
    except BaseException:
        if writer is not None:
            writer.close()  # the .tmp stays behind: it is incomplete and not a shard
        raise
    if writer is not None:
        writer.close()
        os.replace(out / (shard_name + ".tmp"), out / shard_name)

    report = ShardReport(
        written=written,
        skipped=dict(sorted(skipped.items())),
        shards=list(sizes),
        sizes=sizes,
        skipped_examples=examples,
    )
    (out / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n", encoding="utf-8")
    report.to_json(out / "report.json")
    if written == 0:
        logger.warning("no samples written to %s; skipped: %s", out, report.skipped)
    else:
        logger.info(
            "wrote %d samples in %d shards to %s; skipped %s",
            written,
            len(sizes),
            out,
            report.skipped or "none",
        )
    return report


def _row_sample(
    image_value: Any, caption: Any, key: str, base_dir: Path, meta: dict[str, Any]
) -> Sample | Skipped:
    """Turn one manifest row into a Sample (reading the image file) or a Skipped."""
    if caption is None or not isinstance(caption, str):
        return Skipped(MISSING_CAPTION, key)
    if not caption.strip():
        return Skipped(EMPTY_CAPTION, key)
    if image_value is None or not str(image_value).strip():
        return Skipped(MISSING_IMAGE, key)
    image_value = str(image_value).strip()
    if _REMOTE_RE.match(image_value):
        # The shard writer does not download; img2dataset is the tool for URL lists.
        return Skipped(REMOTE_IMAGE, key)
    path = Path(image_value)
    if not path.is_absolute():
        path = base_dir / path
    try:
        data = path.read_bytes()
    except OSError:
        return Skipped(MISSING_IMAGE, key)
    return Sample(key=key, image=data, caption=caption, meta=meta)


def _check_columns(found: list[str], cfg: ShardsConfig, path: Path) -> None:
    missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in found]
    if not missing:
        return
    fix = []
    if cfg.image_column in missing:
        fix.append("set image_column=<one of the columns found>")
    if cfg.caption_column in missing:
        fix.append("set caption_column=<one of the columns found>")
    raise ValueError(
        f"{str(path)!r} has no column(s) {missing}; columns found: {found}. "
        f"Fix: {' and '.join(fix)} (e.g. open_clip's CSVs use filepath/title), "
        "or rename the column(s) in the file."
    )


def _read_table(path: Path, cfg: ShardsConfig) -> Iterator[Sample | Skipped]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = f.readline()
        f.seek(0)
        # open_clip writes tab-separated files named *.csv (its --csv-separator defaults to
        # "\t"), so trust the header line over the extension for .csv files.
        tab = path.suffix.lower() in (".tsv", ".tab") or ("\t" in header and "," not in header)
        reader = csv.DictReader(f, delimiter="\t" if tab else ",")
        _check_columns(list(reader.fieldnames or []), cfg, path)
        for i, row in enumerate(reader):
            image_value = row.get(cfg.image_column)
            key = str(image_value).strip() if image_value else f"row{i}"
            yield _row_sample(
                image_value, row.get(cfg.caption_column), key, path.parent, {"row": i}
            )


def _read_jsonl(path: Path, cfg: ShardsConfig) -> Iterator[Sample | Skipped]:
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
            yield _row_sample(
                image_value, row.get(cfg.caption_column), key, path.parent, {"row": i}
            )


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
            caption = txt.read_text(encoding="utf-8")
        except FileNotFoundError:
            yield Skipped(MISSING_CAPTION, key)
            continue
        except (OSError, UnicodeDecodeError):
            yield Skipped(MALFORMED_ROW, key)
            continue
        yield _row_sample(str(img), caption, key, root, {})


def iter_input(cfg: ShardsConfig) -> Iterator[Sample | Skipped]:
    """Read the configured input lazily, one sample (or skip marker) per row/file.

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
            f"input {cfg.input!r} does not exist; pass a .csv/.tsv/.jsonl file or a folder "
            "of name.jpg + name.txt pairs."
        )
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab"):
        it = _read_table(path, cfg)
    elif suffix in (".jsonl", ".ndjson"):
        it = _read_jsonl(path, cfg)
    else:
        raise ValueError(
            f"input {cfg.input!r} has unsupported type {suffix!r}; use .csv, .tsv, .jsonl "
            "or a folder of name.jpg + name.txt pairs."
        )
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
        cfg: Input, output folder, manifest columns and shard size.

    Returns:
        The report (also written to ``<output_dir>/report.json``).

    Raises:
        ValueError: For a missing input, an unsupported input type, a missing column,
            or an output folder that already holds shards.
    """
    samples = iter_input(cfg)
    return write_samples(samples, cfg.output_dir, samples_per_shard=cfg.samples_per_shard)


def _is_remote(url: str) -> bool:
    return bool(_REMOTE_RE.match(url)) and not url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _split_outside_braces(spec: str) -> list[str]:
    """Split on ',' except inside '{...}', where commas belong to brace alternatives."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def list_shards(spec: str | Path | list[str]) -> list[str]:
    """Expand a shard specification into a list of shard URLs/paths.

    Accepts a directory (all ``*.tar`` in it, sorted), a brace pattern
    (``/x/{000000..000009}.tar``), a glob (``/x/*.tar``), or several of these separated by
    ``::`` (open_clip's multi-source separator) or by commas outside braces. Remote URLs
    (``s3://``, ``https://``, ``pipe:``) pass through unchecked.

    Args:
        spec: The specification, or a list of them.

    Returns:
        Shard paths/URLs in order.

    Raises:
        ValueError: If the spec is empty, a directory has no shards, or a local shard
            does not exist.
    """
    specs = [str(s) for s in spec] if isinstance(spec, list | tuple) else [str(spec)]
    parts = [
        p.strip() for s in specs for chunk in s.split("::") for p in _split_outside_braces(chunk)
    ]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}; pass a folder, a pattern or a list.")
    shards: list[str] = []
    for part in parts:
        if not _is_remote(part) and Path(_local(part)).is_dir():
            found = sorted(str(p) for p in Path(_local(part)).glob("*.tar"))
            if not found:
                raise ValueError(
                    f"no *.tar shards in folder {part!r}; write some with `clipline shards` "
                    "or point at the folder that holds them."
                )
            shards.extend(found)
        elif not _is_remote(part) and any(c in part for c in "*?["):
            found = sorted(glob.glob(_local(part)))
            if not found:
                raise ValueError(f"glob {part!r} matches no files; check the path.")
            shards.extend(found)
        else:
            shards.extend(braceexpand.braceexpand(part))
    missing = [s for s in shards if not _is_remote(s) and not Path(_local(s)).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(
            f"shard(s) not found: {missing[:3]}{more}; "
            "check the path/pattern (brace ranges like {000000..000009} must match the "
            "file names) or write the shards with `clipline shards`."
        )
    return shards


def read_manifest(shards_dir_or_pattern: str | Path | list[str]) -> dict[str, int]:
    """Sample counts per shard, from the ``sizes.json`` next to each shard.

    ``sizes.json`` is open_clip's format: ``{"000000.tar": n, ...}`` keyed by file name, in
    the shards' folder.

    Args:
        shards_dir_or_pattern: Anything :func:`list_shards` accepts (local shards only).

    Returns:
        ``{shard path: sample count}`` in shard order.

    Raises:
        ValueError: If a shard is remote, a ``sizes.json`` is missing, or it lacks a shard.
    """
    shards = list_shards(shards_dir_or_pattern)
    cache: dict[Path, dict[str, int]] = {}
    counts: dict[str, int] = {}
    for shard in shards:
        if _is_remote(shard):
            raise ValueError(
                f"cannot read sizes.json for remote shard {shard!r}; give the sample count "
                "explicitly (e.g. num_samples=...) or copy sizes.json next to local shards."
            )
        folder = Path(_local(shard)).parent
        if folder not in cache:
            sizes_path = folder / "sizes.json"
            if not sizes_path.is_file():
                raise ValueError(
                    f"no sizes.json in {str(folder)!r} (needed for shard {shard!r}); "
                    "shards written by `clipline shards` have one, otherwise write "
                    '{"<shard>.tar": <count>, ...} there or give the sample count explicitly.'
                )
            cache[folder] = {k: int(v) for k, v in json.loads(sizes_path.read_text()).items()}
        name = Path(shard).name
        if name not in cache[folder]:
            raise ValueError(
                f"{str(folder / 'sizes.json')!r} has no entry for {name!r} "
                f"(it lists {len(cache[folder])} shards); rewrite the shards or add the entry."
            )
        counts[shard] = cache[folder][name]
    return counts
