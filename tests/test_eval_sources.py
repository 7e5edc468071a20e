"""Classification sets in other layouts (image folder, CSV, MNIST IDX) read like the wds ones."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import PIL.Image
import pytest

from clipline.data import benchmark_sets, builtin_data, classification_sets


def _image(i: int, size: int = 5) -> PIL.Image.Image:
    rng = np.random.default_rng(i)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    """MNIST's IDX format: zero, zero, type 0x08 (ubyte), ndim, big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fake_mnist(root, n_train: int = 12, n_test: int = 7, gz: bool = True):
    """Generated digits in MNIST's four files (no MNIST ships on this machine)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def write_image_folder(root, per_class: dict[str, int], ext: str = ".png", start: int = 0):
    """torchvision ImageFolder layout; returns [(pixels, label)] in torchvision's order."""
    expected = []
    seed = start
    for label, name in enumerate(sorted(per_class)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class[name]):
            image = _image(seed)
            image.save(root / name / f"img{j:03d}{ext}")
            expected.append((_pixels(image), label))
            seed += 1
    return expected


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_read_back(tmp_path, gz):
    arrays = write_fake_mnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = builtin_data.load_mnist(split, tmp_path)
        np.testing.assert_array_equal(images, arrays[prefix][0])
        np.testing.assert_array_equal(labels, arrays[prefix][1])
    source = classification_sets.open_classification_set("mnist", tmp_path)
    assert source.classnames == [str(d) for d in range(10)]
    assert source.templates == ['a photo of the number: "{c}".']  # clip_benchmark's
    read = list(source.indexed_samples())
    assert [i for i, _, _ in read] == list(range(7))
    assert [label for _, _, label in read] == arrays["t10k"][1].tolist()
    image = read[3][1]
    assert image.mode == "RGB" and image.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], arrays["t10k"][0][3])


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz' not found; point root"):
        builtin_data.load_mnist("test", tmp_path)
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x0d\x01"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        builtin_data.load_mnist("test", tmp_path)


@pytest.mark.skipif(
    not builtin_data.fashion_mnist_available(), reason="dataset-fashion-mnist absent"
)
def test_fashion_mnist_from_the_debian_package():
    source = classification_sets.open_classification_set(
        "fashion_mnist", builtin_data.FASHION_MNIST_DIR
    )
    assert source.classnames[0] == "T-shirt/top" and len(source) == 10_000
    index, image, label = next(source.indexed_samples(part=1, num_parts=5000))
    assert (index, image.size, label) == (1, (28, 28), 2)  # the 2nd test image is a pullover


def test_image_folder_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    expected = write_image_folder(tmp_path, {"dog": 2, "cat": 3, "ant": 1})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    source = classification_sets.open_classification_set("folder", tmp_path)
    theirs = ImageFolder(str(tmp_path))
    assert source.classnames == theirs.classes == ["ant", "cat", "dog"]
    read = list(source.indexed_samples())
    assert [label for _, _, label in read] == [t for _, t in theirs.samples]
    assert [label for _, _, label in read] == [label for _, label in expected]
    for (_, image, _), (path, _) in zip(read, theirs.samples, strict=True):
        np.testing.assert_array_equal(_pixels(image), _pixels(PIL.Image.open(path)))
    assert source.templates == []

    # classnames.txt (CLIP_benchmark's file) renames the classes, in folder order.
    (tmp_path / "classnames.txt").write_text("an ant\na cat\na dog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    source = classification_sets.open_classification_set("folder", tmp_path)
    assert source.classnames == ["an ant", "a cat", "a dog"] and source.templates == ["a {c}."]
    (tmp_path / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 class names were given but"):
        classification_sets.open_classification_set("folder", tmp_path)


def test_image_folder_splits(tmp_path):
    write_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "test", {"a": 1, "b": 1}, start=10)
    train = classification_sets.open_classification_set("folder", tmp_path, "train")
    test = classification_sets.open_classification_set("folder", tmp_path, "test")
    assert len(train) == 4 and len(test) == 2 and train.classnames == test.classnames


@pytest.mark.parametrize("labels_as", ["names", "indices"])
def test_csv(tmp_path, labels_as):
    (tmp_path / "img").mkdir()
    names = ["zebra", "ant", "zebra", "bee"]
    lines = ["path\tclass"]
    for i, name in enumerate(names):
        _image(i).save(tmp_path / "img" / f"{i}.png")
        label = name if labels_as == "names" else str(["ant", "bee", "zebra"].index(name))
        lines.append(f"img/{i}.png\t{label}")
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    kwargs = dict(csv_image_column="path", csv_label_column="class", csv_separator="\t")
    if labels_as == "indices":
        with pytest.raises(ValueError, match="class indices; give their names"):
            classification_sets.open_classification_set("csv", tmp_path / "test.csv", **kwargs)
        (tmp_path / "classnames.txt").write_text("ant\nbee\nzebra\n")
    source = classification_sets.open_classification_set("csv", tmp_path, "test", **kwargs)
    assert source.classnames == ["ant", "bee", "zebra"]  # names: sorted, like ImageFolder
    read = list(source.indexed_samples())
    assert [label for _, _, label in read] == [2, 0, 2, 1]
    np.testing.assert_array_equal(_pixels(read[2][1]), _pixels(_image(2)))
    with pytest.raises(ValueError, match=r"not \['filepath', 'label'\]"):
        classification_sets.open_classification_set(
            "csv", tmp_path / "test.csv", csv_separator="\t"
        )


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_parts_are_disjoint_and_cover_the_set(tmp_path, fmt):
    if fmt == "wds":
        samples = [(_image(i), i % 3) for i in range(11)]
        benchmark_sets.write_classification_set(
            tmp_path, samples, ["a", "b", "c"], ["a {c}."], samples_per_shard=4
        )
    else:
        write_image_folder(tmp_path, {"a": 4, "b": 4, "c": 3})
    source = classification_sets.open_classification_set(fmt, tmp_path)
    whole = [(i, _pixels(image).tobytes(), label) for i, image, label in source.indexed_samples()]
    parts = [
        [(i, _pixels(image).tobytes(), label) for i, image, label in source.indexed_samples(p, 3)]
        for p in range(3)
    ]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sorted(x for p in parts for x in p) == whole
    assert [i for i, _, _ in whole] == list(range(11))


def test_bad_format(tmp_path):
    with pytest.raises(ValueError, match="format='tfds' is not known"):
        classification_sets.open_classification_set("tfds", tmp_path)
