"""Evaluation sets in CLIP_benchmark's webdataset layout: the module that writes them also reads them.

Layout (what ``clip_benchmark.datasets.builder.build_wds_dataset`` reads, so that
``clip_benchmark eval --dataset wds/<name> --dataset_root <root>`` works on our files unchanged)::

    root/
        test/nshards.txt                            number of shards, N (one folder per
                                                      split: test/ by default, train/ for
                                                      a linear probe's training split)
        test/0.tar ... test/{N-1}.tar               samples: <key>.png|jpg|webp plus
                                                      <key>.cls (ASCII int label), or
                                                      <key>.txt (captions joined by "\\n")
        classnames.txt                              classification: one class name a line
        zeroshot_classification_templates.txt       classification: one "{c}" template a line
        dataset_type.txt                            "classification" or "retrieval"

clip_benchmark splits ``txt`` on line breaks and strips each line of the metadata files, so the
writers reject captions, class names and templates that would not survive that round trip.
"""

from __future__ import annotations

import io
import logging
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import PIL.Image
import webdataset as wds

from clipline.data.shard_io import shard_samples

logger = logging.getLogger(__name__)

SPLIT = "test"  # clip_benchmark's default split
NSHARDS_FILE = "nshards.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"

# Sample-key extension -> (PIL format, save options). jpg and webp are lossy at quality 95;
# png (the default) is lossless, so what is read back is exactly what was written.
_IMAGE_FORMATS = {
    "png": ("PNG", {}),
    "jpg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"quality": 95}),
}
_FORMAT_ALIASES = {"jpeg": "jpg"}
# clip_benchmark looks the image up under any of these extensions, in this order.
_IMAGE_KEYS = "webp;png;jpg;jpeg"

# Decodes one sample's image as RGB when called (see ``indexed_items``).
ImageLoader = Callable[[], PIL.Image.Image]


class IndexedImages:
    """What every eval set offers: its samples by index, split into parts.

    A set implements :meth:`indexed_items`, whose image loaders decode when called (so a
    caller can decode on several threads); :meth:`indexed_samples` decodes in order.
    """

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, ImageLoader, Any]]:
        """``(index, image loader, target)`` for samples with ``index % num_parts == part``."""
        raise NotImplementedError

    def indexed_samples(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, PIL.Image.Image, Any]]:
        """``(index, RGB image, target)`` for samples with ``index % num_parts == part``."""
        for index, load, target in self.indexed_items(part, num_parts):
            yield index, load(), target


@dataclass(kw_only=True)
class ClassificationSet(IndexedImages):
    """A zero-shot classification set on disk.

    Attributes:
        root: The set's root folder.
        classnames: Class names; label ``i`` is ``classnames[i]``.
        templates: Prompt templates with a ``{c}`` placeholder; empty if the set has no
            ``zeroshot_classification_templates.txt``.
    """

    root: Path
    classnames: list[str]
    templates: list[str]
    split: str = SPLIT

    def samples(self) -> Iterator[tuple[PIL.Image.Image, int]]:
        """Yields ``(RGB image, label)`` pairs in shard order."""
        for _, image, label in self.indexed_samples():
            yield image, label

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, ImageLoader, int]]:
        """``(index, image loader, label)`` for the samples with ``index % num_parts == part``.

        Every part reads the tar files but decodes only its own images (when it calls their
        loaders), so ``num_parts`` processes (ranks, loader workers) share the decoding work
        without overlap.
        """
        for index, load, label in _read_shards(self.root, self.split, "cls", part, num_parts):
            yield index, load, int(label)

    def files(self) -> list[Path]:
        """The files whose contents define the set (for cache keys)."""
        return _set_files(self.root, self.split)


@dataclass(kw_only=True)
class RetrievalSet(IndexedImages):
    """An image-text retrieval set on disk (one image, one or more captions per sample).

    Attributes:
        root: The set's root folder.
    """

    root: Path
    split: str = SPLIT

    def samples(self) -> Iterator[tuple[PIL.Image.Image, list[str]]]:
        """Yields ``(RGB image, captions)`` pairs in shard order."""
        for _, image, captions in self.indexed_samples():
            yield image, captions

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, ImageLoader, list[str]]]:
        """``(index, image loader, captions)`` for samples with ``index % num_parts == part``."""
        for index, load, text in _read_shards(self.root, self.split, "txt", part, num_parts):
            # The same split clip_benchmark applies (str.splitlines).
            yield index, load, text.splitlines()

    def files(self) -> list[Path]:
        """The files whose contents define the set (for cache keys)."""
        return _set_files(self.root, self.split)


def check_templates(templates: list[str]) -> None:
    """Checks that zero-shot templates work the way clip_benchmark formats them.

    clip_benchmark calls ``template.format(c=classname)``, so a template needs a ``{c}``
    placeholder (open_clip's lambdas and ``"{}"``-style templates must be rewritten).

    Args:
        templates: Prompt templates, e.g. ``["a photo of a {c}."]``.

    Raises:
        ValueError: If ``templates`` is empty, or a template lacks ``{c}``, has other
            placeholders, or does not fit on one line.
    """
    if not templates:
        raise ValueError("templates is empty; give at least one, e.g. ['a photo of a {c}.']")
    _check_lines("template", templates)
    for template in templates:
        try:
            formatted = template.format(c="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"template {template!r} cannot be formatted with .format(c=classname) ({e!r}); "
                "use '{c}' as the only placeholder and double other braces ('{{', '}}')"
            ) from e
        if "\0" not in formatted:
            raise ValueError(
                f"template {template!r} has no '{{c}}' placeholder for the class name; "
                "write e.g. 'a photo of a {c}.'"
            )


def write_classification_set(
    root: str | Path,
    samples: Iterable[tuple[PIL.Image.Image, int]],
    classnames: list[str],
    templates: list[str],
    *,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    split: str = SPLIT,
) -> int:
    """Writes a zero-shot classification set that clip_benchmark reads as ``wds/<name>``.

    Overwrites the split already at ``root``; write ``split="train"`` next to ``"test"``
    for a linear probe (clip_benchmark's ``--split``).

    Args:
        root: Folder to write into (created if needed).
        samples: ``(image, label)`` pairs with ``0 <= label < len(classnames)``.
        classnames: One name per class, in label order.
        templates: Prompt templates with a ``{c}`` placeholder, e.g. ``"a photo of a {c}."``.
        samples_per_shard: Samples per tar shard.
        image_format: ``"png"`` (lossless), ``"jpg"`` or ``"webp"`` (quality 95).
        split: The split folder under ``root``.

    Returns:
        The number of samples written.

    Raises:
        ValueError: On an empty ``samples``, a label out of range, a class name or template
            that would not survive clip_benchmark's line-based files, or bad options.
    """
    if not classnames:
        raise ValueError("classnames is empty; give one name per class, in label order")
    _check_lines("class name", classnames)
    check_templates(templates)
    num_classes = len(classnames)

    def records() -> Iterator[tuple[PIL.Image.Image, dict[str, str]]]:
        for i, (image, label) in enumerate(samples):
            label = operator.index(label)
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"sample {i} has label {label}, outside [0, {num_classes}) for "
                    f"{num_classes} classnames; labels index into classnames"
                )
            yield image, {"cls": str(label)}

    root = Path(root)
    n = _write_shards(root, records(), samples_per_shard, image_format, split)
    _write_lines(root / CLASSNAMES_FILE, classnames)
    _write_lines(root / TEMPLATES_FILE, templates)
    _write_lines(root / DATASET_TYPE_FILE, [CLASSIFICATION])
    return n


def write_retrieval_set(
    root: str | Path,
    samples: Iterable[tuple[PIL.Image.Image, list[str]]],
    *,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    split: str = SPLIT,
) -> int:
    """Writes an image-text retrieval set that clip_benchmark reads as ``wds/<name>``.

    Overwrites the split already at ``root``.

    Args:
        root: Folder to write into (created if needed).
        samples: ``(image, captions)`` pairs; each image needs at least one caption, and
            captions must be non-empty single lines (they are stored joined by ``"\\n"``).
        samples_per_shard: Samples per tar shard.
        image_format: ``"png"`` (lossless), ``"jpg"`` or ``"webp"`` (quality 95).
        split: The split folder under ``root``.

    Returns:
        The number of samples written.

    Raises:
        ValueError: On an empty ``samples``, an image without captions, a caption with a
            line break, or bad options.
    """

    def records() -> Iterator[tuple[PIL.Image.Image, dict[str, str]]]:
        for i, (image, captions) in enumerate(samples):
            if isinstance(captions, str) or not captions:
                raise ValueError(
                    f"sample {i} has captions {captions!r}; give a non-empty list of strings"
                )
            _check_lines(f"caption of sample {i}", captions)
            yield image, {"txt": "\n".join(captions)}

    root = Path(root)
    n = _write_shards(root, records(), samples_per_shard, image_format, split)
    _write_lines(root / DATASET_TYPE_FILE, [RETRIEVAL])
    return n


def read_classification_set(root: str | Path, split: str = SPLIT) -> ClassificationSet:
    """Opens a classification set written by :func:`write_classification_set` (or clip_benchmark).

    Only the metadata is read here; images are decoded lazily by ``samples()``.

    Args:
        root: The set's root folder.
        split: The split folder under ``root``.

    Returns:
        The set, with class names and templates (empty list if the templates file is absent).

    Raises:
        ValueError: If ``root`` does not hold a classification set in this layout.
    """
    root = Path(root)
    dataset_type = _check_layout(root, split)
    if dataset_type != CLASSIFICATION:
        raise ValueError(
            f"{root} holds a {dataset_type!r} set ({root / DATASET_TYPE_FILE}); "
            "open it with read_retrieval_set"
        )
    classnames_path = root / CLASSNAMES_FILE
    if not classnames_path.is_file():
        raise ValueError(
            f"{classnames_path} not found; a classification set needs one class name a line"
        )
    templates_path = root / TEMPLATES_FILE
    templates = read_lines(templates_path) if templates_path.is_file() else []
    return ClassificationSet(
        root=root, classnames=read_lines(classnames_path), templates=templates, split=split
    )


def read_retrieval_set(root: str | Path, split: str = SPLIT) -> RetrievalSet:
    """Opens a retrieval set written by :func:`write_retrieval_set` (or clip_benchmark).

    Args:
        root: The set's root folder.
        split: The split folder under ``root``.

    Returns:
        The set; images and captions are decoded lazily by ``samples()``.

    Raises:
        ValueError: If ``root`` does not hold a retrieval set in this layout.
    """
    root = Path(root)
    dataset_type = _check_layout(root, split)
    if dataset_type != RETRIEVAL:
        raise ValueError(
            f"{root} holds a {dataset_type!r} set, not a retrieval set: clip_benchmark needs "
            f"{root / DATASET_TYPE_FILE} to read 'retrieval'; open it with read_classification_set"
        )
    return RetrievalSet(root=root, split=split)


def _check_lines(what: str, items: list[str]) -> None:
    # clip_benchmark reads metadata with splitlines() + strip() and captions with splitlines():
    # anything that changes under that would silently read back different from what was written.
    for item in items:
        if not isinstance(item, str) or item.splitlines() != [item] or item != item.strip():
            raise ValueError(
                f"{what} {item!r} must be a non-empty one-line string without surrounding "
                "whitespace (the files store one per line)"
            )


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_lines(path: str | Path) -> list[str]:
    """Reads a metadata file the way clip_benchmark does: one stripped item a line."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _encode_image(image: PIL.Image.Image, ext: str) -> bytes:
    pil_format, options = _IMAGE_FORMATS[ext]
    if pil_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha or palette modes
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def _write_shards(
    root: Path,
    records: Iterable[tuple[PIL.Image.Image, dict[str, str]]],
    samples_per_shard: int,
    image_format: str,
    split: str,
) -> int:
    ext = _FORMAT_ALIASES.get(image_format.lower(), image_format.lower())
    if ext not in _IMAGE_FORMATS:
        raise ValueError(
            f"image_format={image_format!r} is not supported; use one of {sorted(_IMAGE_FORMATS)}"
        )
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}; it must be at least 1")
    _check_split(split)
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    # Written last: a set whose writing failed half-way has no nshards.txt and fails to open.
    (split_dir / NSHARDS_FILE).unlink(missing_ok=True)

    shards: list[str] = []
    pattern = str(split_dir).replace("%", "%%") + "/%d.tar"
    n = 0
    writer = None
    try:
        for image, fields in records:
            if writer is None:  # opened lazily so that an empty input leaves no empty shard
                writer = wds.ShardWriter(
                    pattern,
                    maxcount=samples_per_shard,
                    maxsize=math.inf,
                    post=shards.append,
                    verbose=0,
                )
            writer.write({"__key__": f"{n:09d}", ext: _encode_image(image, ext), **fields})
            n += 1
    finally:
        if writer is not None:
            writer.close()
    if n == 0:
        raise ValueError(
            f"no samples were given to write to {root}; an eval set needs at least one"
        )
    assert len(shards) == math.ceil(n / samples_per_shard), (shards, n)
    # Shards past the new count, from an earlier and larger set at the same root, would be
    # ignored by readers but mislead people listing the folder.
    i = len(shards)
    while (stale := split_dir / f"{i}.tar").exists():
        stale.unlink()
        i += 1
    (split_dir / NSHARDS_FILE).write_text(f"{len(shards)}\n")
    logger.info("wrote %d samples in %d shards to %s", n, len(shards), split_dir)
    return n


def _check_split(split: str) -> None:
    if not split or "/" in split or split in (".", ".."):
        raise ValueError(f"split={split!r}; give a folder name such as 'test' or 'train'")


def _check_layout(root: Path, split: str) -> str:
    """Fails early, naming the missing piece, rather than deep inside webdataset."""
    _check_split(split)
    if not root.is_dir():
        raise ValueError(
            f"eval set root {root} is not a folder; expected {root}/{split}/{NSHARDS_FILE} and "
            f"{root}/{split}/0.tar ... as written by clipline.data.benchmark_sets"
        )
    nshards = _num_shards(root, split)
    missing = [p for i in range(nshards) if not (p := root / split / f"{i}.tar").is_file()]
    if missing:
        raise ValueError(
            f"{root / split / NSHARDS_FILE} lists {nshards} shards but {missing[0]} is missing "
            f"({len(missing)} missing in all); rewrite the set"
        )
    type_path = root / DATASET_TYPE_FILE
    # Like clip_benchmark: no dataset_type.txt means classification.
    return type_path.read_text().strip().lower() if type_path.is_file() else CLASSIFICATION


def _num_shards(root: Path, split: str) -> int:
    path = root / split / NSHARDS_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} not found; an eval set needs {split}/{NSHARDS_FILE} holding its number "
            f"of shards {split}/0.tar ... (CLIP_benchmark's webdataset layout)"
        )
    text = path.read_text().strip()
    try:
        nshards = int(text)
    except ValueError:
        nshards = 0
    if nshards < 1:
        raise ValueError(f"{path} holds {text!r}; it must be a positive number of shards")
    return nshards


def _set_files(root: Path, split: str) -> list[Path]:
    metadata = [root / f for f in (CLASSNAMES_FILE, TEMPLATES_FILE, DATASET_TYPE_FILE)]
    shards = [root / split / f"{i}.tar" for i in range(_num_shards(root, split))]
    return [*shards, *(p for p in metadata if p.is_file())]


def _read_shards(
    root: Path, split: str, label_key: str, part: int, num_parts: int
) -> Iterator[tuple[int, ImageLoader, str]]:
    if not 0 <= part < num_parts:
        raise ValueError(f"part={part}, num_parts={num_parts}; need 0 <= part < num_parts")
    # Paths, never strings: a root such as ./pipe:cmd must stay a folder, where webdataset
    # would run "pipe:cmd/test/0.tar" as a shell command.
    paths = [root / split / f"{i}.tar" for i in range(_num_shards(root, split))]
    # No node or worker splitting: the caller picks its samples by index (``part``), so that
    # the union of the parts is exactly the set, in order. Undecoded, so a part decodes only
    # its own images.
    for index, sample in enumerate(shard_samples(paths)):
        if index % num_parts != part:
            continue
        image_key = next((k for k in _IMAGE_KEYS.split(";") if k in sample), None)
        if image_key is None or label_key not in sample:
            raise ValueError(
                f"sample {sample.get('__key__')!r} in {sample.get('__url__')} lacks an image "
                f"({_IMAGE_KEYS}) or a .{label_key} entry"
            )
        yield index, partial(rgb_from_bytes, sample[image_key]), sample[label_key].decode("utf-8")


def rgb_from_bytes(data: bytes) -> PIL.Image.Image:
    """Decodes an image file's bytes as webdataset's "pilrgb" decoder does (clip_benchmark's
    reader), so both see the same pixels."""
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")
