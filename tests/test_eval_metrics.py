"""Zero-shot and retrieval metrics: known answers, brute force, and clip_benchmark's own numbers."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from clipline.data import benchmark_sets
from clipline.eval import (
    OPENAI_IMAGENET_TEMPLATES,
    RetrievalTask,
    ZeroShotTask,
    build_classifier,
    build_evaluator,
    classification_metrics,
    recall_at_k_faiss,
    retrieval,
    zeroshot_classification,
)
from tests.helpers import numpy2_safe_accuracy

REPO = Path(__file__).resolve().parents[1]
CB_WDS_WARNING = "ignore:WebDataset\\(shardshuffle"  # clip_benchmark's own call, not ours


# --- fakes whose answers are known -------------------------------------------------------


class OneHotEncoders:
    """Images are their own embedding; a text's embedding is a row of ``text_table``."""

    def __init__(self, text_table_VD: torch.Tensor):
        self.text_table_VD = text_table_VD

    def encode_image(self, image_BCHW):
        return F.normalize(image_BCHW.flatten(1).float(), dim=-1)

    def encode_text(self, text_BL):
        return self.text_table_VD[text_BL[:, 0]]


class LookupTokenizer:
    """Token id of a text = index of the vocabulary word found at its end."""

    def __init__(self, vocabulary: list[str]):
        self.vocabulary = vocabulary

    def __call__(self, texts):
        return torch.tensor([[self.vocabulary.index(t.split()[-1].rstrip("."))] for t in texts])


def test_zeroshot_known_answers():
    classnames = [f"class{c}" for c in range(6)]
    labels = [0, 1, 2, 3, 4, 5, 0, 1, 2, 2, 2, 2]
    image_ND = F.one_hot(torch.tensor(labels), 6).float()
    image_ND[0] = torch.tensor([0.6, 0.8, 0, 0, 0, 0])  # class 0 ranked 2nd: top-5 hit only
    image_ND[1] = torch.tensor([1.0, 0, 1, 1, 1, 1])  # class 1 ranked last: miss
    image_ND[2] = torch.tensor([0, 0, 0.5, 0.6, 0.4, 0])  # class 2 ranked 2nd: top-5 hit only
    # Every prompt of class c embeds to e_c, whatever the template.
    encoders = OneHotEncoders(torch.eye(6))
    tokenize = LookupTokenizer(classnames)
    batches = [
        (image_ND[s : s + 5, :, None, None], torch.tensor(labels[s : s + 5])) for s in (0, 5, 10)
    ]
    metrics = zeroshot_classification(
        encoders, batches, classnames, ["a photo of a {c}.", "a {c}."], tokenize, batch_size=4
    )
    # Recall per class: 1/2, 1/2, 4/5, 1, 1, 1.
    assert metrics == {
        "acc1": pytest.approx(9 / 12),
        "acc5": pytest.approx(11 / 12),
        "mean_per_class_recall": pytest.approx((0.5 + 0.5 + 0.8 + 3) / 6),
    }


def test_acc5_is_nan_below_five_classes_like_clip_benchmark():
    metrics = classification_metrics(torch.tensor([[2.0, 1, 0], [2.0, 1, 0]]), torch.tensor([0, 2]))
    assert metrics["acc1"] == 0.5
    assert math.isnan(metrics["acc5"])
    assert metrics["mean_per_class_recall"] == 0.5  # class 1 never occurs, so it is not averaged


def test_retrieval_known_answers():
    # Images are e_0, e_1, e_2; texts are unit vectors whose components are the image scores.
    text_table = torch.tensor(
        [
            [0.8, 0.6, 0.0],  # A, image 0: ranks 0 > 1 > 2
            [0.6, 0.8, 0.0],  # B, image 0: ranks 1 > 0 > 2
            [0.0, 0.7, 0.51**0.5],  # C, image 1: ranks 2 > 1 > 0
            [0.96, 0.28, 0.0],  # D, image 2: ranks 0 > 1 > 2
            [0.0, 0.28, 0.96],  # E, image 2: ranks 2 > 1 > 0
        ]
    )
    encoders = OneHotEncoders(text_table)
    tokenize = LookupTokenizer(list("ABCDE"))
    batches = [
        (torch.eye(3)[:2, :, None, None], [["A", "B"], ["C"]]),
        (torch.eye(3)[2:, :, None, None], [["D", "E"]]),
    ]
    metrics = retrieval(encoders, batches, tokenize, ks=(1, 2, 10), batch_size=2)
    # Image -> text order by score: image 0: D A B ..., image 1: B C A ..., image 2: E C ...
    assert metrics == {
        "image_retrieval_recall@1": pytest.approx(2 / 5),  # A, E
        "text_retrieval_recall@1": pytest.approx(1 / 3),  # image 2
        "image_retrieval_recall@2": pytest.approx(4 / 5),  # all but D
        "text_retrieval_recall@2": pytest.approx(1.0),
        "image_retrieval_recall@10": 1.0,  # k capped at the 3 images
        "text_retrieval_recall@10": 1.0,
        # First-positive ranks: texts A..E 1, 2, 2, 3, 1; images 2, 2, 1.
        "image_retrieval_mean_rank": pytest.approx(9 / 5),
        "image_retrieval_median_rank": 2.0,
        "text_retrieval_mean_rank": pytest.approx(5 / 3),
        "text_retrieval_median_rank": 2.0,
    }


# --- equivalence with brute force and with clip_benchmark's functions --------------------


def _random_retrieval_problem(seed: int, num_images: int = 40, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    img_emb_ND = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    captions_per_image = torch.randint(1, 5, (num_images,), generator=g)
    text_image_T = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    # Captions near their image, so that recalls are neither 0 nor 1.
    txt_emb_TD = F.normalize(
        img_emb_ND[text_image_T] + 0.8 * torch.randn(len(text_image_T), dim, generator=g), dim=-1
    )
    return img_emb_ND, txt_emb_TD, text_image_T


def _brute_force_recall(query_QD, gallery_GD, positive_QG, k):
    topk_QK = (query_QD @ gallery_GD.T).topk(min(k, len(gallery_GD)), dim=1).indices
    return positive_QG.gather(1, topk_QK).any(dim=1).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_faiss_recall_equals_brute_force_and_clip_benchmark(seed):
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    img_emb_ND, txt_emb_TD, text_image_T = _random_retrieval_problem(seed)
    image_labels_N = torch.arange(len(img_emb_ND))
    positive_TN = text_image_T[:, None] == image_labels_N[None, :]
    ks = (1, 5, 10, 1000)
    t2i = recall_at_k_faiss(txt_emb_TD, img_emb_ND, text_image_T, image_labels_N, ks, batch_size=7)
    i2t = recall_at_k_faiss(img_emb_ND, txt_emb_TD, image_labels_N, text_image_T, ks, batch_size=7)
    for k in ks:
        assert t2i[k] == pytest.approx(_brute_force_recall(txt_emb_TD, img_emb_ND, positive_TN, k))
        assert i2t[k] == pytest.approx(
            _brute_force_recall(img_emb_ND, txt_emb_TD, positive_TN.T, k)
        )
    assert 0 < t2i[1] < t2i[5] < 1 and 0 < i2t[1] < i2t[5] < 1  # the test is not trivial
    for k in (1, 5, 10):  # clip_benchmark's torch.topk needs k <= gallery size
        scores_TN = txt_emb_TD @ img_emb_ND.T
        assert t2i[k] == pytest.approx((recall_at_k(scores_TN, positive_TN, k) > 0).float().mean())
        assert i2t[k] == pytest.approx(
            (recall_at_k(scores_TN.T, positive_TN.T, k) > 0).float().mean()
        )


@pytest.mark.parametrize("num_classes", [3, 10])
def test_classification_metrics_equal_clip_benchmark(num_classes):
    from clip_benchmark.metrics.zeroshot_classification import accuracy
    from sklearn.metrics import balanced_accuracy_score

    _accuracy = numpy2_safe_accuracy(accuracy)

    g = torch.Generator().manual_seed(num_classes)
    logits_NC = torch.randn(200, num_classes, generator=g)
    labels_N = torch.randint(0, num_classes, (200,), generator=g)
    logits_NC[labels_N == 0, 0] += 1.5  # make one class easy so that recalls differ by class
    ours = classification_metrics(logits_NC, labels_N)
    if num_classes >= 5:
        acc1, acc5 = _accuracy(logits_NC, labels_N, topk=(1, 5))
        assert ours["acc5"] == pytest.approx(acc5)
    else:
        (acc1,) = _accuracy(logits_NC, labels_N, topk=(1,))
        assert math.isnan(ours["acc5"])
    assert ours["acc1"] == pytest.approx(acc1)
    balanced = balanced_accuracy_score(labels_N.numpy(), logits_NC.argmax(1).numpy())
    assert ours["mean_per_class_recall"] == pytest.approx(balanced)
    assert ours["mean_per_class_recall"] != pytest.approx(ours["acc1"])


# --- our evaluators == clip_benchmark's on the same model and the same files -------------


class RandomTowers:
    """A fixed random dual encoder over 4x4 images and open_clip token ids."""

    def __init__(self, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image_proj = torch.randn(3 * 4 * 4, dim, generator=g)
        self.token_emb = torch.randn(49408, dim, generator=g)

    def encode_image(self, image_BCHW):
        return F.normalize(image_BCHW.flatten(1) @ self.image_proj, dim=-1)

    def encode_text(self, text_BL):
        return F.normalize(self.token_emb[text_BL].sum(dim=1), dim=-1)


def _preprocess(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _image(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenize():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")  # bundled BPE vocabulary: no download


def test_build_classifier_equals_clip_benchmark(tokenize):
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    model = RandomTowers()
    classnames = ["cat", "dog", "sea lion", "tree"]
    templates = OPENAI_IMAGENET_TEMPLATES[:7]
    ours_CD = build_classifier(model, classnames, templates, tokenize, batch_size=5)
    theirs_DC = zero_shot_classifier(model, tokenize, classnames, templates, "cpu", amp=False)
    torch.testing.assert_close(ours_CD, theirs_DC.T)


@pytest.mark.filterwarnings(CB_WDS_WARNING)
def test_zeroshot_evaluator_equals_clip_benchmark(tmp_path, tokenize, monkeypatch):
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot

    classnames = ["cat", "dog", "sea lion", "tree", "car", "boat"]
    templates = ["a photo of a {c}.", "a blurry photo of the {c}."]
    samples = [(_image(i), i % len(classnames)) for i in range(30)]
    benchmark_sets.write_classification_set(
        tmp_path, samples, classnames, templates, samples_per_shard=8
    )
    model = RandomTowers()

    evaluate = build_evaluator(
        ZeroShotTask(name="toy", root=str(tmp_path), batch_size=4),
        preprocess=_preprocess,
        tokenize=tokenize,
    )
    ours = evaluate(model)

    monkeypatch.setattr(cb_zeroshot, "accuracy", numpy2_safe_accuracy(cb_zeroshot.accuracy))
    dataset = build_wds_dataset("wds/toy", transform=_preprocess, data_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(dataset, batch_size=7)
    theirs = cb_zeroshot.evaluate(
        model, loader, tokenize, dataset.classes, dataset.templates, "cpu", amp=False
    )
    assert ours.keys() == theirs.keys() == {"acc1", "acc5", "mean_per_class_recall"}
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name]), name
    assert 0 < ours["acc1"] < ours["acc5"] < 1


@pytest.mark.filterwarnings(CB_WDS_WARNING)
def test_retrieval_evaluator_equals_clip_benchmark(tmp_path, tokenize):
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval

    words = "red green blue small large old new striped dotted wooden metal glass".split()
    samples = [
        (
            _image(i),
            [
                f"a {words[(i + j) % 12]} {words[(3 * i + 5 * j) % 12]} thing {i}"
                for j in range(1 + i % 3)
            ],
        )
        for i in range(20)
    ]
    benchmark_sets.write_retrieval_set(tmp_path, samples, samples_per_shard=6)
    model = RandomTowers(seed=1)

    evaluate = build_evaluator(
        RetrievalTask(name="toy", root=str(tmp_path), batch_size=3),
        preprocess=_preprocess,
        tokenize=tokenize,
    )
    ours = evaluate(model)

    dataset = build_wds_dataset("wds/toy", transform=_preprocess, data_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=6, collate_fn=image_captions_collate_fn
    )
    theirs = cb_retrieval.evaluate(
        model, loader, tokenize, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs)
    assert list(ours)[: len(theirs)] == list(theirs)  # theirs first, in their order
    assert 0 < ours["image_retrieval_recall@1"] < 1 and 0 < ours["text_retrieval_recall@1"] < 1


# --- configuration and input errors ------------------------------------------------------


def test_openai_templates_equal_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as lambdas

    assert OPENAI_IMAGENET_TEMPLATES == [t("{c}") for t in lambdas]
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80


def test_zeroshot_task_without_templates_fails_at_build(tmp_path):
    benchmark_sets.write_classification_set(tmp_path, [(_image(0), 0)], ["cat"], ["a {c}."])
    (tmp_path / "zeroshot_classification_templates.txt").unlink()
    task = ZeroShotTask(name="toy", root=str(tmp_path))
    with pytest.raises(ValueError, match="templates="):
        build_evaluator(task, preprocess=_preprocess, tokenize=LookupTokenizer(["cat"]))
    # Templates given by the task replace the set's.
    task = ZeroShotTask(name="toy", root=str(tmp_path), templates=["a {c}."])
    evaluate = build_evaluator(task, preprocess=_preprocess, tokenize=LookupTokenizer(["cat"]))
    metrics = evaluate(OneHotEncoders(torch.ones(1, 48)))
    assert metrics["acc1"] == 1.0 and math.isnan(metrics["acc5"])


def test_bad_task_and_input_values(tmp_path):
    with pytest.raises(ValueError, match="batch_size=0"):
        RetrievalTask(name="x", root="r", batch_size=0)
    with pytest.raises(ValueError, match=r"ks=\(\)"):
        RetrievalTask(name="x", root="r", ks=())
    with pytest.raises(ValueError, match="not a folder"):
        build_evaluator(
            RetrievalTask(name="x", root=str(tmp_path / "nowhere")),
            preprocess=_preprocess,
            tokenize=LookupTokenizer([]),
        )
    encoders, tokenize = OneHotEncoders(torch.eye(2)), LookupTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="cannot be formatted"):
        build_classifier(encoders, ["a", "b"], ["{}"], tokenize)
    with pytest.raises(ValueError, match="1 caption lists"):
        retrieval(encoders, [(torch.eye(2)[:, :, None, None], [["a"]])], tokenize)
    with pytest.raises(ValueError, match="image 1 has captions"):
        retrieval(encoders, [(torch.eye(2)[:, :, None, None], [["a"], []])], tokenize)
    with pytest.raises(ValueError, match="labels span"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_eval_and_evalsets_import_no_pretrain_or_launch():
    """The import DAG: eval sees models only through the Encoders protocol."""
    files = [*sorted((REPO / "eval").glob("*.py")), REPO / "data" / "benchmark_sets.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            forbidden = ("clipline.pretrain", "clipline.launch")
            if path.parent.name == "data":
                forbidden += ("clipline.eval",)
            assert not [n for n in names if n.startswith(forbidden)], (path, names)
