"""Classification sets in the layouts users already have, opened through one function.

Formats (``open_classification_set(format, root, split)``):

- ``wds``: CLIP_benchmark's webdataset layout (:mod:`clipline.data.benchmark_sets`);
  ``split`` is the shard folder under ``root`` (default ``test``).
- ``folder``: torchvision's ``ImageFolder`` layout, ``root/<class>/<image>``; class folders
  sorted by name give labels ``0..C-1`` and files are read in sorted order, as torchvision
  does. With a ``split``, the images are under ``root/<split>/<class>/``.
- ``csv``: a CSV file with an image-path column and a label column (a class index or a class
  name); relative paths are relative to the CSV's folder. ``root`` is the file, or a folder
  holding ``<split>.csv``.
- ``mnist``, ``fashion_mnist``: the four IDX files (``{train,t10k}-{images-idx3,labels-idx1}
  -ubyte[.gz]``) in ``root``; ``split`` is ``train`` or ``test`` (default).

Class names come from ``classnames.txt`` (one a line, CLIP_benchmark's file) in ``root``, or
a file given explicitly; failing that from the class folders (``folder``), the sorted label
names (``csv``) or the data set's own names (``mnist``, ``fashion_mnist``). Templates come
from ``zeroshot_classification_templates.txt`` in ``root`` where present.

Every set yields ``(index, RGB image, label)`` for one part of its samples
(``index % num_parts == part``), so that ranks and loader workers can split the work and
the union of the parts is exactly the set, in order.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import PIL.Image

from clipline.data import benchmark_sets, builtin_data

FORMATS = ("wds", "folder", "csv", "mnist", "fashion_mnist")
# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# clip_benchmark's template for mnist; Fashion-MNIST is not in clip_benchmark, and its class
# names read naturally in the CLIP paper's plainest prompt.
MNIST_TEMPLATES = ['a photo of the number: "{c}".']
FASHION_MNIST_TEMPLATES = ["a photo of a {c}."]


class ClassificationSource(Protocol):
    """What evaluation needs of a classification set, whatever its format."""

    classnames: list[str]
    templates: list[str]

    def indexed_samples(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, PIL.Image.Image, int]]:
        """Yields ``(index, RGB image, label)`` for samples with ``index % num_parts == part``."""
        ...

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, benchmark_sets.ImageLoader, int]]:
        """Like ``indexed_samples``, with a function that decodes the image when called."""
        ...

    def files(self) -> list[Path]:
        """The files whose contents define the set (for cache keys)."""
        ...


@dataclass(kw_only=True)
class ImageListSet(benchmark_sets.IndexedImages):
    """Images on disk listed with their labels (the ``folder`` and ``csv`` formats).

    Attributes:
        classnames: Class names; label ``i`` is ``classnames[i]``.
        templates: Prompt templates with ``{c}``; empty if the set has none.
        paths: Image files, in sample order.
        labels: One label per path.
        metadata: Other files that define the set (the CSV, ``classnames.txt``).
    """

    classnames: list[str]
    templates: list[str]
    paths: list[Path]
    labels: list[int]
    metadata: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, benchmark_sets.ImageLoader, int]]:
        """``(index, image loader, label)`` for samples with ``index % num_parts == part``."""
        _check_part(part, num_parts)
        for index in range(part, len(self.paths), num_parts):
            yield index, partial(_rgb_from_file, self.paths[index]), self.labels[index]

    def files(self) -> list[Path]:
        """The files whose contents define the set (for cache keys)."""
        return [*self.metadata, *self.paths]


@dataclass(kw_only=True)
class ArraySet(benchmark_sets.IndexedImages):
    """Images held as a ``uint8`` array (the IDX formats).

    Attributes:
        classnames: Class names; label ``i`` is ``classnames[i]``.
        templates: Prompt templates with ``{c}``.
        images_NHW: Grey images.
        labels_N: One label per image.
        source_files: The files the arrays were read from.
    """

    classnames: list[str]
    templates: list[str]
    images_NHW: np.ndarray
    labels_N: np.ndarray
    source_files: list[Path]

    def __len__(self) -> int:
        return len(self.labels_N)

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, benchmark_sets.ImageLoader, int]]:
        """``(index, image loader, label)`` for samples with ``index % num_parts == part``."""
        _check_part(part, num_parts)
        for index in range(part, len(self.labels_N), num_parts):
            yield index, partial(_rgb_from_grey, self.images_NHW[index]), int(self.labels_N[index])

    def files(self) -> list[Path]:
        """The files whose contents define the set (for cache keys)."""
        return list(self.source_files)


def _rgb_from_file(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def _rgb_from_grey(pixels_HW: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(pixels_HW, mode="L").convert("RGB")


def open_classification_set(
    format: str,
    root: str | Path,
    split: str | None = None,
    *,
    classnames_file: str | Path | None = None,
    csv_image_column: str = "filepath",
    csv_label_column: str = "label",
    csv_separator: str = ",",
) -> ClassificationSource:
    """Opens a classification set in one of :data:`FORMATS` (see the module docstring).

    Args:
        format: One of :data:`FORMATS`.
        root: The set's root (a folder; for ``csv`` also a file).
        split: The split, or ``None`` for the format's default (``test`` for ``wds``,
            ``mnist`` and ``fashion_mnist``; ``root`` itself for ``folder`` and ``csv``).
        classnames_file: One class name a line, in label order; overrides the set's own.
        csv_image_column: The CSV column of image paths.
        csv_label_column: The CSV column of labels (class index or class name).
        csv_separator: The CSV field separator (``"\\t"`` for TSV).

    Returns:
        The set; images are decoded lazily by ``indexed_samples``.

    Raises:
        ValueError: On an unknown format, a missing file or folder, or inconsistent labels.
    """
    root = Path(root)
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not known; use one of {list(FORMATS)}")
    explicit = _read_classnames(Path(classnames_file)) if classnames_file is not None else None
    if format == "wds":
        wds_set = benchmark_sets.read_classification_set(root, split or benchmark_sets.SPLIT)
        if explicit is not None:
            _check_count(
                explicit, len(wds_set.classnames), f"{root}/{benchmark_sets.CLASSNAMES_FILE}"
            )
            wds_set.classnames = explicit
        return wds_set
    if format in ("mnist", "fashion_mnist"):
        return _open_idx(format, root, split or "test", explicit)
    base = root if root.is_dir() else root.parent
    if explicit is None and (base / benchmark_sets.CLASSNAMES_FILE).is_file():
        classnames_file = base / benchmark_sets.CLASSNAMES_FILE
        explicit = _read_classnames(classnames_file)
    templates_path = base / benchmark_sets.TEMPLATES_FILE
    templates = benchmark_sets.read_lines(templates_path) if templates_path.is_file() else []
    metadata = [Path(p) for p in (classnames_file,) if p is not None]
    if templates:
        metadata.append(templates_path)
    if format == "folder":
        return _open_folder(root / split if split else root, explicit, templates, metadata)
    csv_path = root / f"{split}.csv" if split else root
    if split and not root.is_dir():
        raise ValueError(f"csv root {root} with split={split!r}: give a folder with {split}.csv")
    return _open_csv(
        csv_path,
        explicit,
        templates,
        metadata,
        image_column=csv_image_column,
        label_column=csv_label_column,
        separator=csv_separator,
    )


def _open_idx(format: str, root: Path, split: str, explicit: list[str] | None) -> ArraySet:
    if format == "mnist":
        images, labels = builtin_data.load_mnist(split, root)
        classnames, templates = list(builtin_data.MNIST_CLASSES), MNIST_TEMPLATES
    else:
        images, labels = builtin_data.load_fashion_mnist(split, root)
        classnames, templates = list(builtin_data.FASHION_MNIST_CLASSES), FASHION_MNIST_TEMPLATES
    if explicit is not None:
        _check_count(explicit, len(classnames), format)
        classnames = explicit
    prefix = "train" if split == "train" else "t10k"
    files = sorted(p for p in root.glob(f"{prefix}-*-ubyte*") if p.is_file())
    return ArraySet(
        classnames=classnames,
        templates=list(templates),
        images_NHW=images,
        labels_N=labels,
        source_files=files,
    )


def _open_folder(
    folder: Path, explicit: list[str] | None, templates: list[str], metadata: list[Path]
) -> ImageListSet:
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} is not a folder; expected {folder}/<class>/*.jpg")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"image folder {folder} has no class folders; expected <class>/*.jpg")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        # torchvision walks each class folder recursively, in sorted order.
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"image folder {folder} has no images with extensions {IMG_EXTENSIONS}")
    classnames = [d.name for d in class_dirs]
    if explicit is not None:
        _check_count(explicit, len(classnames), f"the class folders of {folder}")
        classnames = explicit
    return ImageListSet(
        classnames=classnames, templates=templates, paths=paths, labels=labels, metadata=metadata
    )


def _open_csv(
    path: Path,
    explicit: list[str] | None,
    templates: list[str],
    metadata: list[Path],
    *,
    image_column: str,
    label_column: str,
    separator: str,
) -> ImageListSet:
    if not path.is_file():
        raise ValueError(f"CSV file {path} not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing = [c for c in (image_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path} has columns {reader.fieldnames} but not {missing}; set "
                "csv_image_column / csv_label_column (and csv_separator for TSV)"
            )
        rows = [(row[image_column], row[label_column].strip()) for row in reader]
    if not rows:
        raise ValueError(f"{path} has no rows")
    raw_labels = [label for _, label in rows]
    if all(label.lstrip("-").isdigit() for label in raw_labels):
        labels = [int(label) for label in raw_labels]
        if explicit is None:
            raise ValueError(
                f"{path} gives class indices; give their names in {path.parent}/"
                f"{benchmark_sets.CLASSNAMES_FILE} or classnames_file= (one a line, in label order)"
            )
        classnames = explicit
        bad = [label for label in labels if not 0 <= label < len(classnames)]
        if bad:
            raise ValueError(
                f"{path}: label {bad[0]} is outside [0, {len(classnames)}) for "
                f"{len(classnames)} class names"
            )
    else:
        classnames = explicit if explicit is not None else sorted(set(raw_labels))
        index = {name: i for i, name in enumerate(classnames)}
        unknown = sorted(set(raw_labels) - index.keys())
        if unknown:
            raise ValueError(
                f"{path}: labels {unknown[:5]} are not among the class names {classnames[:5]}..."
            )
        labels = [index[label] for label in raw_labels]
    paths = [Path(p) if Path(p).is_absolute() else path.parent / p for p, _ in rows]
    return ImageListSet(
        classnames=classnames,
        templates=templates,
        paths=paths,
        labels=labels,
        metadata=[path, *metadata],
    )


def _read_classnames(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"class names file {path} not found; write one class name a line")
    names = benchmark_sets.read_lines(path)
    if not names:
        raise ValueError(f"class names file {path} is empty")
    return names


def _check_count(names: list[str], expected: int, where: str) -> None:
    if len(names) != expected:
        raise ValueError(
            f"{len(names)} class names were given but {where} has {expected} classes; give "
            "one name per class, in label order"
        )


def _check_part(part: int, num_parts: int) -> None:
    if not 0 <= part < num_parts:
        raise ValueError(f"part={part}, num_parts={num_parts}; need 0 <= part < num_parts")
