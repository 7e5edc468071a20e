"""Eval sets in CLIP_benchmark's webdataset layout: round trips, and clip_benchmark reads ours."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from clipline.data import benchmark_sets

CLASSNAMES = ["cat", "dog", "sea lion"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]
CB_WDS_WARNING = "ignore:WebDataset\\(shardshuffle"  # clip_benchmark's own call, not ours


def _image(i: int, mode: str = "RGB", size: tuple[int, int] = (6, 5)) -> PIL.Image.Image:
    """A small image whose pixels depend on i, so that a mix-up of samples shows."""
    rng = np.random.default_rng(i)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def _pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _classification_samples(n: int) -> list[tuple[PIL.Image.Image, int]]:
    modes = ["RGB", "L", "RGBA", "P"]  # what datasets hand us; all must read back as RGB
    return [(_image(i, modes[i % len(modes)]), i % len(CLASSNAMES)) for i in range(n)]


def _retrieval_samples(n: int) -> list[tuple[PIL.Image.Image, list[str]]]:
    return [
        (_image(100 + i), [f"caption {j} of image {i}, café ☕" for j in range(1 + i % 3)])
        for i in range(n)
    ]


def test_classification_round_trip(tmp_path):
    samples = _classification_samples(7)
    n = benchmark_sets.write_classification_set(
        tmp_path, iter(samples), CLASSNAMES, TEMPLATES, samples_per_shard=3
    )
    assert n == 7
    assert (tmp_path / "test" / "nshards.txt").read_text().strip() == "3"
    assert sorted(p.name for p in (tmp_path / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]

    dataset = benchmark_sets.read_classification_set(str(tmp_path))
    assert dataset.classnames == CLASSNAMES
    assert dataset.templates == TEMPLATES
    read = list(dataset.samples())
    assert [label for _, label in read] == [label for _, label in samples]
    for (image, _), (original, _) in zip(read, samples, strict=True):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(_pixels(image), _pixels(original))  # png is lossless


def test_retrieval_round_trip(tmp_path):
    samples = _retrieval_samples(5)
    assert benchmark_sets.write_retrieval_set(tmp_path, samples, samples_per_shard=2) == 5
    read = list(benchmark_sets.read_retrieval_set(tmp_path).samples())
    assert [captions for _, captions in read] == [captions for _, captions in samples]
    for (image, _), (original, _) in zip(read, samples, strict=True):
        np.testing.assert_array_equal(_pixels(image), _pixels(original))


@pytest.mark.parametrize("image_format", ["jpg", "jpeg", "webp"])
def test_lossy_formats_round_trip(tmp_path, image_format):
    samples = _classification_samples(3)
    benchmark_sets.write_classification_set(
        tmp_path, samples, CLASSNAMES, TEMPLATES, image_format=image_format
    )
    ext = "jpg" if image_format == "jpeg" else image_format
    assert {p.suffix for p in _tar_members(tmp_path / "test" / "0.tar")} == {f".{ext}", ".cls"}
    read = list(benchmark_sets.read_classification_set(tmp_path).samples())
    assert [label for _, label in read] == [0, 1, 2]
    assert [image.size for image, _ in read] == [image.size for image, _ in samples]


@pytest.mark.filterwarnings(CB_WDS_WARNING)
def test_clip_benchmark_reads_our_classification_set(tmp_path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    samples = _classification_samples(7)
    benchmark_sets.write_classification_set(
        tmp_path, samples, CLASSNAMES, TEMPLATES, samples_per_shard=3
    )
    dataset = build_wds_dataset("wds/ours", transform=_pixels, data_dir=str(tmp_path))
    assert dataset.classes == CLASSNAMES
    assert dataset.templates == TEMPLATES
    read = list(dataset)
    assert [label for _, label in read] == [label for _, label in samples]
    for (pixels, _), (original, _) in zip(read, samples, strict=True):
        np.testing.assert_array_equal(pixels, _pixels(original))


@pytest.mark.filterwarnings(CB_WDS_WARNING)
def test_clip_benchmark_reads_our_retrieval_set(tmp_path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    samples = _retrieval_samples(5)
    benchmark_sets.write_retrieval_set(tmp_path, samples, samples_per_shard=2, image_format="webp")
    dataset = build_wds_dataset("wds/ours", transform=_pixels, data_dir=str(tmp_path))
    read = list(dataset)
    assert [captions for _, captions in read] == [captions for _, captions in samples]
    assert [pixels.shape for pixels, _ in read] == [(5, 6, 3)] * 5


def test_rewrite_with_fewer_shards_removes_stale_shards(tmp_path):
    benchmark_sets.write_classification_set(
        tmp_path, _classification_samples(6), CLASSNAMES, TEMPLATES, samples_per_shard=2
    )
    benchmark_sets.write_classification_set(
        tmp_path, _classification_samples(3), CLASSNAMES, TEMPLATES, samples_per_shard=2
    )
    assert sorted(p.name for p in (tmp_path / "test").glob("*.tar")) == ["0.tar", "1.tar"]
    assert len(list(benchmark_sets.read_classification_set(tmp_path).samples())) == 3


def test_missing_pieces_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        benchmark_sets.read_classification_set(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nshards.txt"):
        benchmark_sets.read_retrieval_set(tmp_path)

    benchmark_sets.write_classification_set(
        tmp_path / "c", _classification_samples(2), CLASSNAMES, TEMPLATES
    )
    (tmp_path / "c" / "classnames.txt").unlink()
    with pytest.raises(ValueError, match="classnames.txt"):
        benchmark_sets.read_classification_set(tmp_path / "c")

    benchmark_sets.write_retrieval_set(tmp_path / "r", _retrieval_samples(2))
    with pytest.raises(ValueError, match="read_retrieval_set"):
        benchmark_sets.read_classification_set(tmp_path / "r")
    (tmp_path / "r" / "test" / "0.tar").unlink()
    with pytest.raises(ValueError, match="0.tar is missing"):
        benchmark_sets.read_retrieval_set(tmp_path / "r")


def test_templates_file_is_optional(tmp_path):
    benchmark_sets.write_classification_set(
        tmp_path, _classification_samples(2), CLASSNAMES, TEMPLATES
    )
    (tmp_path / "zeroshot_classification_templates.txt").unlink()
    (tmp_path / "dataset_type.txt").unlink()  # absent means classification, as in clip_benchmark
    assert benchmark_sets.read_classification_set(tmp_path).templates == []


@pytest.mark.parametrize(
    ("classnames", "templates", "labels", "match"),
    [
        (CLASSNAMES, TEMPLATES, [0, 3], "label 3"),
        (CLASSNAMES, TEMPLATES, [0, -1], "label -1"),
        (["cat", "dog\nfish"], TEMPLATES, [0], "one-line"),
        ([" cat"], TEMPLATES, [0], "surrounding whitespace"),
        (CLASSNAMES, ["a photo of a {}."], [0], "cannot be formatted"),
        (CLASSNAMES, ["a photo."], [0], "no '{c}'"),
        (CLASSNAMES, [], [0], "templates is empty"),
        ([], TEMPLATES, [0], "classnames is empty"),
        (CLASSNAMES, TEMPLATES, [], "no samples"),
    ],
)
def test_bad_classification_input(tmp_path, classnames, templates, labels, match):
    samples = [(_image(i), label) for i, label in enumerate(labels)]
    with pytest.raises(ValueError, match=match):
        benchmark_sets.write_classification_set(tmp_path, samples, classnames, templates)
    assert not (tmp_path / "test" / "nshards.txt").exists()


@pytest.mark.parametrize(
    ("captions", "match"),
    [
        ([], "non-empty list"),
        ("a caption", "non-empty list"),
        (["two\nlines"], "one-line"),
        ([""], "one-line"),
    ],
)
def test_bad_retrieval_input(tmp_path, captions, match):
    with pytest.raises(ValueError, match=match):
        benchmark_sets.write_retrieval_set(tmp_path, [(_image(0), captions)])


def test_bad_options(tmp_path):
    samples = _classification_samples(1)
    with pytest.raises(ValueError, match="image_format='bmp'"):
        benchmark_sets.write_classification_set(
            tmp_path, samples, CLASSNAMES, TEMPLATES, image_format="bmp"
        )
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        benchmark_sets.write_classification_set(
            tmp_path, samples, CLASSNAMES, TEMPLATES, samples_per_shard=0
        )


def _tar_members(path):
    import tarfile
    from pathlib import PurePosixPath

    with tarfile.open(path) as tar:
        return [PurePosixPath(name) for name in tar.getnames()]
