"""``clipline evalset``: a CSV or a folder of images with labels or captions -> an eval set in
CLIP_benchmark's webdataset layout, which ``clipline eval --zeroshot/--retrieval NAME=OUT`` and
``clip_benchmark eval --dataset wds/NAME --dataset_root OUT`` both read.

Inputs:
  zeroshot   a folder of class folders (``IN/<class>/<image>``, torchvision's ImageFolder), or
             a CSV/TSV with an image-path column and a label column (a class name, or a class
             index with ``--classnames``); templates from ``--templates`` (a built-in name or
             a file), else the input's ``zeroshot_classification_templates.txt``
  retrieval  a CSV/TSV with an image-path column and a caption column (an image on several
             rows gets several captions; a cell may hold a JSON list of captions), or a
             folder of ``name.<ext>`` images each with ``name.txt`` (one caption a line)

Relative image paths are relative to the CSV's folder. Images are stored losslessly (PNG) by
default, so the set scores exactly as its source images do.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import PIL.Image

from clipline.data import benchmark_sets, classification_sets
from clipline.data.hints import did_you_mean
from clipline.data.ingest import csv_caption, table_delimiter
from clipline.eval.evaluators import BUILTIN_TEMPLATES, resolve_templates

# What PIL raises on a file that is not a decodable image.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(kw_only=True)
class EvalsetConfig:
    """What ``clipline evalset`` builds, from what.

    Attributes:
        kind: ``zeroshot`` (images with class labels) or ``retrieval`` (images with captions).
        input: A CSV/TSV file or a folder (see the module docstring).
        output_dir: The set's root (``clipline eval --zeroshot NAME=OUTPUT_DIR``).
        image_column: CSV column of image paths.
        label_column: CSV column of labels (zeroshot).
        caption_column: CSV column of captions (retrieval).
        classnames: A file of class names, one a line in label order (zeroshot).
        templates: Prompt templates (zeroshot): a built-in name or a file of one a line.
        split: The split folder to write (``test``: what clip_benchmark reads by default).
        samples_per_shard: Samples per tar shard.
        image_format: ``png`` (lossless), ``jpg`` or ``webp``.
        overwrite: Replace a split already written at ``output_dir``.
    """

    kind: Literal["zeroshot", "retrieval"]
    input: str
    output_dir: str
    image_column: str = "filepath"
    label_column: str = "label"
    caption_column: str = "caption"
    classnames: str | None = None
    templates: str | None = None
    split: str = benchmark_sets.SPLIT
    samples_per_shard: int = 1000
    image_format: str = "png"
    overwrite: bool = False


def make_evalset(cfg: EvalsetConfig) -> dict[str, Any]:
    """Builds the set; returns a summary (kind, samples, classes, where, how to score it).

    Raises:
        ValueError: A missing input, column, caption or class name; an unreadable image; an
            existing split without ``overwrite``.
    """
    source = Path(cfg.input)
    if not source.exists():
        raise ValueError(f"{cfg.input}: no such file or folder")
    out = Path(cfg.output_dir)
    if (out / cfg.split / benchmark_sets.NSHARDS_FILE).is_file() and not cfg.overwrite:
        raise ValueError(
            f"{out} already holds a {cfg.split!r} split; pass --overwrite to replace it, or "
            "choose another folder"
        )
    common = {
        "samples_per_shard": cfg.samples_per_shard,
        "image_format": cfg.image_format,
        "split": cfg.split,
    }
    summary: dict[str, Any] = {"kind": cfg.kind, "output_dir": str(out), "split": cfg.split}
    if cfg.kind == "zeroshot":
        labelled = _open_labelled(cfg, source)
        if cfg.templates is None and not labelled.templates:
            raise ValueError(
                f"{cfg.input} has no {benchmark_sets.TEMPLATES_FILE}: give --templates "
                f"({' or '.join(sorted(BUILTIN_TEMPLATES))}, or a file of one template a line)"
            )
        templates = resolve_templates(cfg.templates, labelled.templates, cfg.input)
        samples = ((image, label) for _, image, label in _decoded(labelled, source))
        n = benchmark_sets.write_classification_set(
            out, samples, labelled.classnames, templates, **common
        )
        summary |= {"samples": n, "classes": len(labelled.classnames)}
    else:
        pairs = _captioned(cfg, source)
        n = benchmark_sets.write_retrieval_set(out, _load_pairs(pairs), **common)
        summary |= {"samples": n, "captions": sum(len(c) for _, c in pairs)}
    name = out.resolve().name
    flag = "--zeroshot" if cfg.kind == "zeroshot" else "--retrieval"
    task = "zeroshot_classification" if cfg.kind == "zeroshot" else "zeroshot_retrieval"
    summary["clipline"] = f"clipline eval EXPORT {flag} {name}={out}"
    summary["clip_benchmark"] = (
        f"clip_benchmark eval --dataset wds/{name} --dataset_root {out} --task {task}"
    )
    return summary


def _check_columns(path: Path, wanted: dict[str, str]) -> None:
    """Names a missing CSV column by the flag that sets it."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        found = next(csv.reader(f, delimiter=table_delimiter(path)), [])
    for flag, column in wanted.items():
        if column not in found:
            raise ValueError(
                f"{path} has no column {column!r}.{did_you_mean(column, found)} Columns: "
                f"{found}; pass {flag} <column>"
            )


def _open_labelled(cfg: EvalsetConfig, source: Path) -> classification_sets.ClassificationSource:
    if source.is_dir():
        return classification_sets.open_classification_set(
            "folder", source, None, classnames_file=cfg.classnames
        )
    _check_columns(source, {"--image-column": cfg.image_column, "--label-column": cfg.label_column})
    try:
        return classification_sets.open_classification_set(
            "csv",
            source,
            None,
            classnames_file=cfg.classnames,
            csv_image_column=cfg.image_column,
            csv_label_column=cfg.label_column,
            csv_separator=table_delimiter(source),
        )
    except ValueError as exc:
        # The CSV reader names the library's option; a CLI user sets --classnames.
        raise ValueError(str(exc).replace("classnames_file=", "--classnames")) from None


def _decoded(
    labelled: classification_sets.ClassificationSource, source: Path
) -> Iterator[tuple[int, PIL.Image.Image, int]]:
    """The set's samples; an unreadable image is one clear error, not a traceback."""
    samples = labelled.indexed_samples()
    while True:
        try:
            item = next(samples)
        except StopIteration:
            return
        except _UNREADABLE as exc:
            raise ValueError(
                f"{source}: an image cannot be read ({exc}); fix or remove it"
            ) from exc
        yield item


def _captioned(cfg: EvalsetConfig, source: Path) -> list[tuple[Path, list[str]]]:
    """``(image path, captions)`` in input order."""
    if source.is_dir():
        images = sorted(
            p
            for p in source.rglob("*")
            if p.is_file() and p.suffix.lower() in classification_sets.IMG_EXTENSIONS
        )
        if not images:
            raise ValueError(
                f"{source}: no image files ({', '.join(classification_sets.IMG_EXTENSIONS)})"
            )
        pairs = []
        for image in images:
            text = image.with_suffix(".txt")
            if not text.is_file():
                raise ValueError(
                    f"{image} has no caption file {text.name} (one caption a line) beside it"
                )
            pairs.append(
                (image, [line for line in benchmark_sets.read_lines(text) if line.strip()])
            )
        return pairs
    wanted = {"--image-column": cfg.image_column, "--caption-column": cfg.caption_column}
    _check_columns(source, wanted)
    grouped: dict[Path, list[str]] = {}
    with source.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f, delimiter=table_delimiter(source)):
            path = Path(row[cfg.image_column].strip())
            path = path if path.is_absolute() else source.parent / path
            grouped.setdefault(path, []).extend(_captions(row[cfg.caption_column]))
    if not grouped:
        raise ValueError(f"{source} has no rows")
    return list(grouped.items())


def _captions(cell: str | None) -> list[str]:
    """A caption cell, read as ``clipline shards`` reads it (one caption or a JSON list)."""
    value = csv_caption(cell)
    captions = value if isinstance(value, list) else [value or ""]
    return [c.strip() for c in captions if c.strip()]


def _load_pairs(
    pairs: list[tuple[Path, list[str]]],
) -> Iterator[tuple[PIL.Image.Image, list[str]]]:
    for path, captions in pairs:
        if not captions:
            raise ValueError(f"{path} has no caption; every image needs at least one")
        try:
            with PIL.Image.open(path) as im:
                image = im.convert("RGB")
        except _UNREADABLE as exc:
            raise ValueError(f"{path}: cannot read it as an image ({exc})") from exc
        yield image, captions
