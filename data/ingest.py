"""What ``clipline shards`` reads: CSV/TSV/JSONL/Parquet manifests and folders of pairs.

Each reader yields, in input order, one :class:`Sample` (an image and its captions) or one
:class:`Skipped` (a row it found unusable: missing file, no caption, a malformed line) per
image; :func:`~clipline.data.shards.write_samples` encodes and counts them. Adjacent rows
naming the same image become one sample with all their captions. Bad *configuration* (a
missing input, a column that is not there) raises ``ValueError`` before anything is
written.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from clipline.data.hints import did_you_mean
from clipline.data.shard_io import URL_RE

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Skip reasons (keys of ShardReport.skipped).
MISSING_IMAGE = "missing_image"
REMOTE_IMAGE = "remote_image"
CORRUPT_IMAGE = "corrupt_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
MALFORMED_ROW = "malformed_row"
DUPLICATE = "duplicate"
UNREADABLE_SHARD = "unreadable_shard"


class InputSpec(Protocol):
    """What the readers need of :class:`~clipline.data.shards.ShardsConfig` (see there)."""

    input: str
    image_column: str
    caption_column: str


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
class Skipped:
    """A row a reader found unusable before any image decoding (missing file, no caption).

    Readers yield these in place of a :class:`Sample` so that :func:`write_samples` counts
    every skip in one place.
    """

    reason: str
    key: str


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
    if URL_RE.match(value):
        # The shard writer does not download; img2dataset is the tool for URL lists.
        return Skipped(REMOTE_IMAGE, row.key)
    path = Path(value)
    if not path.is_absolute():
        path = base_dir / path
    # The file is read by a writer process (in parallel), not here.
    return Sample(key=row.key, image=path, caption=caption, meta=row.meta)


def _check_columns(found: list[str], cfg: InputSpec, path: Path) -> None:
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


def _read_table(path: Path, cfg: InputSpec) -> Iterator[_Row | Skipped]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f, delimiter=table_delimiter(path))
        _check_columns(list(reader.fieldnames or []), cfg, path)
        for i, row in enumerate(reader):
            image_value = row.get(cfg.image_column)
            key = str(image_value).strip() if image_value else f"row{i}"
            caption = csv_caption(row.get(cfg.caption_column))
            yield _Row(key, image_value, [caption], {"row": i})


def _read_jsonl(path: Path, cfg: InputSpec) -> Iterator[_Row | Skipped]:
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


def _read_parquet(path: Path, cfg: InputSpec) -> Iterator[_Row | Skipped]:
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


_TABLE_READERS: dict[str, Callable[[Path, InputSpec], Iterator[_Row | Skipped]]] = {
    ".csv": _read_table,
    ".tsv": _read_table,
    ".tab": _read_table,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
}


def iter_input(cfg: InputSpec) -> Iterator[Sample | Skipped]:
    """Read the configured input lazily, one sample (or skip marker) per image.

    Args:
        cfg: The input and its columns (a :class:`~clipline.data.shards.ShardsConfig`).

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


def count_input_rows(cfg: InputSpec) -> int | None:
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
