"""Retrieval ranks and search indexes: brute force agrees, approximate search reports its loss."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipline.eval.retrieval import retrieval_from_embeddings, search_metrics
from clipline.eval.search import SearchIndexConfig, build_index, exact_search, index_search


def _problem(seed: int, num_images: int = 60, dim: int = 16, noise: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    img_emb_ND = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    captions_per_image = torch.randint(1, 5, (num_images,), generator=g)
    text_image_T = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    txt_emb_TD = F.normalize(
        img_emb_ND[text_image_T] + noise * torch.randn(len(text_image_T), dim, generator=g),
        dim=-1,
    )
    return img_emb_ND, txt_emb_TD, text_image_T


def _brute_force_ranks(query_QD, gallery_GD, positive_QG):
    """Position (1-based) of the first positive in a full sort of each query's scores."""
    order_QG = (query_QD @ gallery_GD.T).argsort(dim=1, descending=True)
    return positive_QG.gather(1, order_QG).float().argmax(dim=1) + 1


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_equal_brute_force(seed):
    img_emb_ND, txt_emb_TD, text_image_T = _problem(seed)
    positive_TN = text_image_T[:, None] == torch.arange(len(img_emb_ND))[None, :]
    # ks small, so that most ranks come from the full-gallery pass, some from the top k.
    metrics = retrieval_from_embeddings(img_emb_ND, txt_emb_TD, text_image_T, ks=(1, 3))
    t2i = _brute_force_ranks(txt_emb_TD, img_emb_ND, positive_TN).double()
    i2t = _brute_force_ranks(img_emb_ND, txt_emb_TD, positive_TN.T).double()
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(t2i.mean().item())
    assert metrics["image_retrieval_median_rank"] == pytest.approx(np.median(t2i.numpy()))
    assert metrics["text_retrieval_mean_rank"] == pytest.approx(i2t.mean().item())
    assert metrics["text_retrieval_median_rank"] == pytest.approx(np.median(i2t.numpy()))
    assert t2i.max() > 3 and (t2i <= 3).any()  # both paths of the rank computation ran
    for k in (1, 3):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx((t2i <= k).double().mean())
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx((i2t <= k).double().mean())


def test_query_batches_and_rank_chunks_do_not_change_results(monkeypatch):
    # The package re-exports the function `retrieval`, which hides the module's name.
    retrieval_module = importlib.import_module("clipline.eval.retrieval")

    img_emb_ND, txt_emb_TD, text_image_T = _problem(2)
    whole = retrieval_from_embeddings(img_emb_ND, txt_emb_TD, text_image_T, batch_size=10_000)
    monkeypatch.setattr(retrieval_module, "_RANK_CHUNK_ELEMENTS", 100)  # 1 query a chunk
    small = retrieval_from_embeddings(img_emb_ND, txt_emb_TD, text_image_T, batch_size=7)
    assert small == whole


def test_query_without_positive_has_no_rank():
    gallery = np.eye(3, dtype=np.float32)
    metrics = search_metrics(gallery[:2], gallery, np.array([0, 7]), np.arange(3), ks=(1, 10))
    # recall@10: k is capped at the 3 gallery items, yet the query without a positive misses.
    assert metrics == {"recall@1": 0.5, "recall@10": 0.5, "mean_rank": 1.0, "median_rank": 1.0}


def _clustered(num: int, dim: int, seed: int):
    """Unit vectors around 50 centres, the structure an IVF index relies on."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32)
    x = centres[rng.integers(0, 50, num)] + 0.3 * rng.standard_normal((num, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("kind", "storage"), [("ivf", "flat"), ("ivf", "fp16"), ("ivf", "sq8"), ("hnsw", "flat")]
)
def test_exact_index_answers_equal_brute_force_and_approx_is_close(kind, storage):
    gallery_GD = _clustered(4000, 32, 0)
    query_QD = gallery_GD[:300] + 0.05 * _clustered(300, 32, 1)
    scores_QG = query_QD @ gallery_GD.T
    _, exact_ids = exact_search(query_QD, gallery_GD, 10, batch_size=64)
    np.testing.assert_array_equal(exact_ids, np.argsort(-scores_QG, axis=1)[:, :10])
    cfg = SearchIndexConfig(kind=kind, nprobe=8, ef_search=64, ivf_storage=storage)
    index = build_index(gallery_GD, cfg)
    _, approx_ids = index_search(index, query_QD, 10, batch_size=64)
    overlap = np.mean(
        [len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids, strict=True)]
    )
    assert overlap > 0.8


def test_approximate_index_reports_its_recall_loss(caplog):
    gallery_GD = _clustered(3000, 32, 0)
    labels_G = np.arange(3000)
    query_QD = gallery_GD[:500] + 0.3 * _clustered(500, 32, 1)
    labels_Q = np.arange(500)
    exact = search_metrics(query_QD, gallery_GD, labels_Q, labels_G, ks=(1, 10))
    # nprobe=1 of 54 lists: a deliberately lossy index, so that the loss is visible.
    cfg = SearchIndexConfig(kind="ivf", nprobe=1, recall_sample=200)
    with caplog.at_level(logging.INFO, logger="clipline.eval.retrieval"):
        approx = search_metrics(query_QD, gallery_GD, labels_Q, labels_G, ks=(1, 10), index=cfg)
    assert set(approx) == {
        "recall@1", "recall@10", "ann_overlap@10", "ann_recall_loss@1", "ann_recall_loss@10"
    }  # fmt: skip
    assert 0 < approx["ann_overlap@10"] < 1
    assert approx["ann_recall_loss@10"] > 0
    assert approx["recall@10"] < exact["recall@10"]
    # The sampled loss estimates the loss on all queries.
    assert approx["ann_recall_loss@10"] == pytest.approx(
        exact["recall@10"] - approx["recall@10"], abs=0.08
    )
    assert "top-10 overlap with exact search" in caplog.text

    # Below min_gallery the same config searches exactly.
    small = SearchIndexConfig(kind="ivf", nprobe=1, min_gallery=10_000)
    assert (
        search_metrics(query_QD, gallery_GD, labels_Q, labels_G, ks=(1, 10), index=small) == exact
    )


def test_bad_index_settings():
    with pytest.raises(ValueError, match="kind='annoy'"):
        SearchIndexConfig(kind="annoy")
    with pytest.raises(ValueError, match="nprobe=0"):
        SearchIndexConfig(nprobe=0)
    with pytest.raises(ValueError, match="ivf_storage='pq'"):
        SearchIndexConfig(ivf_storage="pq")


def test_tied_scores_are_resolved_as_clip_benchmark_resolves_them():
    # Few distinct caption vectors shared by many images (the many "A frog." of a real set),
    # and duplicated images: exact ties in both directions, at every k.
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    g = torch.Generator().manual_seed(3)
    distinct_img = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    img_emb_ND = distinct_img[torch.randint(0, 12, (150,), generator=g)]
    distinct_txt = F.normalize(torch.randn(9, 8, generator=g), dim=-1)
    text_image_T = torch.arange(150).repeat_interleave(2)
    txt_emb_TD = distinct_txt[torch.randint(0, 9, (300,), generator=g)]
    ks = (1, 2, 5, 10, 200)
    ours = retrieval_from_embeddings(img_emb_ND, txt_emb_TD, text_image_T, ks=ks)

    # clip_benchmark's own computation (zeroshot_retrieval.evaluate), on the CPU.
    scores_TN = txt_emb_TD @ img_emb_ND.T
    positive_TN = torch.zeros_like(scores_TN, dtype=torch.bool)
    positive_TN[torch.arange(300), text_image_T] = True
    for k in ks[:-1]:  # clip_benchmark's topk cannot take k beyond the gallery
        t2i = (recall_at_k(scores_TN, positive_TN, k) > 0).float().mean().item()
        i2t = (recall_at_k(scores_TN.T, positive_TN.T, k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-6), k
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-6), k
    # With this many ties, "lower index first" (a stable sort) would not agree (here at k=5).
    order_NT = torch.sort(scores_TN.T, dim=1, descending=True, stable=True).indices
    stable_i2t = positive_TN.T.gather(1, order_NT[:, :5]).any(dim=1).float().mean().item()
    assert stable_i2t != pytest.approx(ours["text_retrieval_recall@5"], abs=1e-6)

    # Ranks count strictly higher scores only: 1 + (scores above the best positive).
    for prefix, scores, positive in (
        ("image", scores_TN, positive_TN),
        ("text", scores_TN.T, positive_TN.T),
    ):
        best = torch.where(positive, scores, -torch.inf).max(dim=1, keepdim=True).values
        rank = (1 + (scores > best).sum(dim=1)).double()
        assert ours[f"{prefix}_retrieval_mean_rank"] == pytest.approx(rank.mean().item())
        assert ours[f"{prefix}_retrieval_median_rank"] == pytest.approx(rank.median().item())
    assert ours["image_retrieval_recall@200"] == 1.0  # k capped at the 150 images
