"""Evaluation tasks end to end: set formats, templates, embedding cache, linear probe, workers."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from clipline.data import benchmark_sets
from clipline.eval import (
    LinearProbeTask,
    RetrievalTask,
    SearchIndexConfig,
    ZeroShotTask,
    build_evaluator,
    linear_probe,
)
from tests.test_eval_sources import write_fake_mnist, write_image_folder

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


class CountingTowers(torch.nn.Module):
    """A random dual encoder over 4x4 images that counts what it embeds."""

    def __init__(self, seed: int = 0, dim: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, dim, generator=g))
        self.token_emb = torch.nn.Parameter(torch.randn(1000, dim, generator=g))
        self.images_seen = 0
        self.texts_seen = 0

    def encode_image(self, image_BCHW):
        self.images_seen += len(image_BCHW)
        return F.normalize(image_BCHW.flatten(1) @ self.image_proj, dim=-1)

    def encode_text(self, text_BL):
        self.texts_seen += len(text_BL)
        return F.normalize(self.token_emb[text_BL].sum(dim=1), dim=-1)


def tokenize(texts: list[str]) -> torch.Tensor:
    """Words hashed to ids (stable across processes, unlike hash())."""

    def ids(text):
        words = [sum(map(ord, w)) * 7 % 1000 for w in text.split()][:6]
        return words + [0] * (6 - len(words))

    return torch.tensor([ids(t) for t in texts])


def preprocess(image: PIL.Image.Image) -> torch.Tensor:
    image = image.convert("RGB").resize((4, 4), PIL.Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _image(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))


def _retrieval_samples(n: int, start: int = 0):
    return [
        (_image(start + i), [f"thing {i} number {j} of {start}" for j in range(1 + i % 3)])
        for i in range(n)
    ]


def test_retrieval_embeddings_are_cached_by_weights_and_data(tmp_path):
    benchmark_sets.write_retrieval_set(tmp_path / "set", _retrieval_samples(9), samples_per_shard=4)
    task = RetrievalTask(name="r", root=str(tmp_path / "set"), cache_dir=str(tmp_path / "c"))
    evaluate = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)
    model = CountingTowers()
    first = evaluate(model)
    assert (model.images_seen, model.texts_seen) == (9, 18)
    second = evaluate(model)
    assert (model.images_seen, model.texts_seen) == (9, 18)  # loaded, not embedded
    assert second == first
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1

    # Other weights, other key.
    other = CountingTowers(seed=1)
    assert evaluate(other) != first and other.images_seen == 9
    # Other data bytes (one image changed), other key.
    samples = _retrieval_samples(9)
    samples[4] = (_image(99), samples[4][1])
    benchmark_sets.write_retrieval_set(tmp_path / "set", samples, samples_per_shard=4)
    evaluate(model)
    assert model.images_seen == 18
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 3


def test_cache_needs_a_module_or_a_model_id(tmp_path):
    class Plain:
        def __init__(self):
            self.towers = CountingTowers()

        def encode_image(self, x):
            return self.towers.encode_image(x)

        def encode_text(self, x):
            return self.towers.encode_text(x)

    benchmark_sets.write_retrieval_set(tmp_path / "set", _retrieval_samples(3))
    task = RetrievalTask(name="r", root=str(tmp_path / "set"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="pass model_id="):
        build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(Plain())
    evaluate = build_evaluator(task, preprocess=preprocess, tokenize=tokenize, model_id="m1")
    model = Plain()
    evaluate(model)
    evaluate(model)
    assert model.towers.images_seen == 3


def test_retrieval_task_with_an_approximate_index(tmp_path):
    benchmark_sets.write_retrieval_set(tmp_path, _retrieval_samples(120), samples_per_shard=50)
    task = RetrievalTask(
        name="r", root=str(tmp_path), index=SearchIndexConfig(kind="ivf", nlist=3, nprobe=3)
    )
    metrics = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(CountingTowers())
    # nprobe = nlist visits every cell: approximate search is exact here.
    assert metrics["image_retrieval_ann_recall_loss@10"] == 0
    # Overlap can miss by ties: the toy tokenizer gives some captions identical embeddings.
    assert metrics["text_retrieval_ann_overlap@10"] > 0.99
    assert "image_retrieval_mean_rank" not in metrics  # ranks need exact search
    exact = build_evaluator(
        RetrievalTask(name="r", root=str(tmp_path)), preprocess=preprocess, tokenize=tokenize
    )(CountingTowers())
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == exact[f"image_retrieval_recall@{k}"]


def _classification_samples(n: int):
    return [(_image(i), i % len(CLASSES)) for i in range(n)]


def test_zeroshot_formats_agree(tmp_path):
    """The same images and labels as wds shards, an image folder and a CSV: same metrics."""
    samples = _classification_samples(30)
    benchmark_sets.write_classification_set(tmp_path / "wds", samples, CLASSES, ["a {c}."])
    (tmp_path / "csv").mkdir()
    rows = ["filepath,label"]
    for i, (image, label) in enumerate(samples):
        folder = tmp_path / "folder" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
        image.save(tmp_path / "csv" / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{CLASSES[label]}")
    (tmp_path / "csv" / "test.csv").write_text("\n".join(rows) + "\n")

    model = CountingTowers()
    results = {}
    for fmt, root in (
        ("wds", tmp_path / "wds"),
        ("folder", tmp_path / "folder"),
        ("csv", tmp_path / "csv" / "test.csv"),
    ):
        task = ZeroShotTask(name=fmt, format=fmt, root=str(root), templates="simple")
        results[fmt] = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(model)
    # The folder reads class by class, the others in writing order: the same multiset.
    assert results["wds"] == results["folder"] == results["csv"]
    assert 0 < results["wds"]["acc1"] < results["wds"]["acc5"] < 1


def test_mnist_format_with_builtin_names_and_templates(tmp_path):
    arrays = write_fake_mnist(tmp_path, n_test=20)
    task = ZeroShotTask(name="mnist", format="mnist", root=str(tmp_path), batch_size=8)
    model = CountingTowers()
    metrics = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(model)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert model.images_seen == 20 and model.texts_seen == 10  # 10 digits x 1 template
    assert len(arrays["t10k"][1]) == 20


def test_templates_by_name_file_or_list(tmp_path):
    benchmark_sets.write_classification_set(
        tmp_path, _classification_samples(6), CLASSES, ["a {c}."]
    )
    model = CountingTowers()

    def prompts_embedded(templates) -> int:
        task = ZeroShotTask(name="t", root=str(tmp_path), templates=templates)
        before = model.texts_seen
        build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(model)
        return model.texts_seen - before

    (tmp_path / "mine.txt").write_text("a {c}.\nthe {c}.\nmy {c}.\n")
    assert prompts_embedded(None) == 6  # the set's own file
    assert prompts_embedded("openai_imagenet") == 6 * 80
    assert prompts_embedded("simple") == 6
    assert prompts_embedded(str(tmp_path / "mine.txt")) == 6 * 3
    assert prompts_embedded(["x {c}", "y {c}"]) == 6 * 2
    with pytest.raises(ValueError, match="neither a built-in set"):
        prompts_embedded("imagenet")


def test_linear_probe_equals_sklearn_and_separates_separable_data():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16))
    train_y, test_y = rng.integers(0, 5, 200), rng.integers(0, 5, 100)
    train_X = centres[train_y] + 1.2 * rng.standard_normal((200, 16))
    test_X = centres[test_y] + 1.2 * rng.standard_normal((100, 16))
    metrics = linear_probe(train_X, train_y, test_X, test_y, 5, C=0.5)
    reference = LogisticRegression(C=0.5, max_iter=1000, tol=1e-6).fit(train_X, train_y)
    assert metrics["lp_acc1"] == pytest.approx((reference.predict(test_X) == test_y).mean())
    assert metrics["lp_C"] == 0.5
    assert 0.5 < metrics["lp_acc1"] < 1 and metrics["lp_acc5"] == 1.0

    swept = linear_probe(train_X, train_y, test_X, test_y, 5, c_grid=(1e-4, 1.0))
    assert swept["lp_C"] == 1.0  # 1e-4 regularises everything away

    separable = linear_probe(centres, np.arange(5), centres, np.arange(5), 7, C=100.0)
    assert separable["lp_acc1"] == 1.0  # 7 classes, 2 never seen: their logits are -inf
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        linear_probe(centres, np.zeros(5), centres, np.zeros(5), 5)


def test_linear_probe_task_on_an_image_folder(tmp_path):
    # Each class is one bright channel, so a linear probe on the random features learns it.
    def class_image(label: int, seed: int) -> PIL.Image.Image:
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 60, (4, 4, 3), dtype=np.uint8)
        pixels[..., label] += 180
        return PIL.Image.fromarray(pixels)

    for split, n in (("train", 30), ("test", 12)):
        for i in range(n):
            folder = tmp_path / split / ["red", "green", "blue"][i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            class_image(i % 3, i + 1000 * (split == "test")).save(folder / f"{i}.png")
    task = LinearProbeTask(name="p", format="folder", root=str(tmp_path), C=10.0, batch_size=7)
    metrics = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(CountingTowers())
    assert metrics["lp_acc1"] == 1.0 and math.isnan(metrics["lp_acc5"])
    assert set(metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "lp_C"}

    # A test split without the "green" folder: its labels map onto the training classes.
    import shutil

    shutil.rmtree(tmp_path / "test" / "green")
    metrics = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(CountingTowers())
    assert metrics["lp_acc1"] == 1.0 and metrics["lp_mean_per_class_recall"] == 1.0
    (tmp_path / "test" / "purple").mkdir()
    class_image(0, 0).save(tmp_path / "test" / "purple" / "0.png")
    with pytest.raises(ValueError, match=r"classes \['purple'\] that the 'train' split lacks"):
        build_evaluator(task, preprocess=preprocess, tokenize=tokenize)


def test_loader_workers_give_the_same_embeddings(tmp_path):
    write_image_folder(tmp_path, {"a": 5, "b": 6})
    results = [
        build_evaluator(
            ZeroShotTask(name="w", format="folder", root=str(tmp_path), templates="simple",
                         batch_size=3, workers=workers),
            preprocess=preprocess, tokenize=tokenize,
        )(CountingTowers())
        for workers in (0, 2)
    ]  # fmt: skip
    assert results[0] == results[1]


def test_linear_probe_task_on_wds_train_and_test_splits(tmp_path):
    def samples(n: int, start: int):
        out = []
        for i in range(n):
            pixels = np.random.default_rng(start + i).integers(0, 60, (4, 4, 3), dtype=np.uint8)
            pixels[..., i % 3] += 180
            out.append((PIL.Image.fromarray(pixels), i % 3))
        return out

    names = ["red", "green", "blue"]
    benchmark_sets.write_classification_set(
        tmp_path, samples(24, 0), names, ["a {c}."], split="train"
    )
    benchmark_sets.write_classification_set(tmp_path, samples(9, 100), names, ["a {c}."])
    assert benchmark_sets.read_classification_set(tmp_path, "train").classnames == names
    task = LinearProbeTask(name="p", root=str(tmp_path), c_grid=(1.0, 10.0), batch_size=5)
    metrics = build_evaluator(task, preprocess=preprocess, tokenize=tokenize)(CountingTowers())
    assert metrics["lp_acc1"] == 1.0 and metrics["lp_C"] in (1.0, 10.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_eval_pixels_equal_open_clips_transform_per_image(tmp_path, workers):
    # The model's numbers give open_clip's eval transform split at ToTensor: PIL steps per
    # image (on a thread pool, or in loader workers), /255 + Normalize once per batch into a
    # reused buffer.
    from clipline.eval import embed_indexed_images
    from tests.helpers import micro_model

    rng = np.random.default_rng(0)
    sizes = [(40, 40), (57, 33), (32, 90), (64, 48), (33, 33)]
    images = [
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes * 3
    ]
    benchmark_sets.write_classification_set(
        tmp_path, ((im, i % 3) for i, im in enumerate(images)), ["a", "b", "c"],
        ["a {c}."], samples_per_shard=4, image_format="jpg",
    )  # fmt: skip
    model = micro_model().eval()
    transform = model.image_transform(is_train=False)
    source = benchmark_sets.read_classification_set(tmp_path)
    seen = []

    class Recording:
        def encode_image(self, image_BCHW):
            seen.append(image_BCHW.clone())
            return model.encode_image(image_BCHW)

    emb_ND, labels = embed_indexed_images(
        Recording(), source.indexed_items, model.preprocess_config(), 4, labels=True,
        workers=workers,
    )  # fmt: skip
    expected = torch.stack([transform(image) for image, _ in source.samples()])
    assert labels == [i % 3 for i in range(15)]
    if workers == 0:  # batches in set order: each one equals the transform's, bit for bit
        assert torch.equal(torch.cat(seen), expected)
    with torch.no_grad():
        reference = F.normalize(model.encode_image(expected), dim=-1)
    torch.testing.assert_close(emb_ND, reference, rtol=1e-5, atol=1e-6)


def test_image_normalizer_reuses_its_buffer_and_equals_torchvision_per_image():
    from torchvision.transforms import Normalize
    from torchvision.transforms.functional import to_tensor

    from clipline.data.decode import ImageNormalizer

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    def torchvision(batch_BCHW):  # ToTensor + Normalize on each image, as open_clip runs them
        images = [PIL.Image.fromarray(x.permute(1, 2, 0).numpy()) for x in batch_BCHW]
        return torch.stack([Normalize(mean, std)(to_tensor(im)) for im in images])

    normalize = ImageNormalizer(mean, std)
    a, b = (torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8) for _ in range(2))
    out_a = normalize(a)
    assert torch.equal(out_a, torchvision(a))
    out_b = normalize(b)
    assert out_b.data_ptr() == out_a.data_ptr()  # the same memory, rewritten
    assert torch.equal(out_b, torchvision(b))
    assert normalize(b, slot=1).data_ptr() != out_b.data_ptr()
    floats = torch.rand(2, 3, 5, 5)
    assert normalize(floats) is floats


def test_pixel_cache_skips_decoding_for_the_next_checkpoint(tmp_path, monkeypatch):
    from tests.helpers import micro_model

    rng = np.random.default_rng(1)
    images = [
        PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(9)
    ]
    benchmark_sets.write_classification_set(
        tmp_path / "set", ((im, i % 3) for i, im in enumerate(images)), ["a", "b", "c"],
        ["a {c}."], samples_per_shard=4, image_format="jpg",
    )  # fmt: skip
    decoded = []
    real = benchmark_sets.rgb_from_bytes
    monkeypatch.setattr(
        benchmark_sets, "rgb_from_bytes", lambda data: decoded.append(1) or real(data)
    )
    checkpoints = [micro_model(seed=s).eval() for s in (0, 1)]
    preprocess = checkpoints[0].preprocess_config()

    def evaluator(cache_dir):
        task = ZeroShotTask(name="z", root=str(tmp_path / "set"), batch_size=4, cache_dir=cache_dir)
        return build_evaluator(task, preprocess=preprocess, tokenize=checkpoints[0].tokenize)

    with torch.no_grad():
        expected = [evaluator(None)(m) for m in checkpoints]
        decoded.clear()
        cached = evaluator(str(tmp_path / "cache"))
        assert cached(checkpoints[0]) == expected[0] and len(decoded) == 9
        assert cached(checkpoints[1]) == expected[1] and len(decoded) == 9  # read back
        (data,) = (tmp_path / "cache" / "pixels").glob("*.u8")
        assert data.stat().st_size == 9 * 3 * 32 * 32
        assert not list((tmp_path / "cache" / "pixels").glob(".*tmp"))

        # A damaged file is decoded again (and rewritten), with a warning.
        data.write_bytes(data.read_bytes()[:100])
        for path in (tmp_path / "cache").glob("*.safetensors"):
            path.unlink()  # so that the images are embedded again
        assert cached(checkpoints[1]) == expected[1] and len(decoded) == 18
        assert data.stat().st_size == 9 * 3 * 32 * 32


def test_an_interrupted_evaluation_leaves_no_pixel_cache(tmp_path):
    from tests.helpers import micro_model

    write_image_folder(tmp_path / "set", {"a": 3, "b": 3})
    model = micro_model().eval()

    class Failing:
        def encode_image(self, image_BCHW):
            raise KeyboardInterrupt

        encode_text = model.encode_text

    task = ZeroShotTask(name="z", format="folder", root=str(tmp_path / "set"), templates="simple",
                        batch_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    evaluate = build_evaluator(
        task, preprocess=model.preprocess_config(), tokenize=model.tokenize,
        model_id="failing",
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        evaluate(Failing())
    assert list((tmp_path / "cache" / "pixels").iterdir()) == []
