"""Image-text retrieval: recall@k, mean and median rank, under CLIP_benchmark's metric names.

Semantics (``clip_benchmark/metrics/zeroshot_retrieval.py``): each image has one or more
captions; a text's positive is its image, an image's positives are all its captions.

- ``image_retrieval_recall@k`` (text -> image): share of texts whose image is in the top k.
- ``text_retrieval_recall@k`` (image -> text): share of images with *any* of their captions
  in the top k (CLIP-paper recall, not the share of captions found).
- ``*_mean_rank``, ``*_median_rank`` (ours; clip_benchmark has none): the 1-based rank of the
  first positive in the query's ranking of the whole gallery, averaged / median over queries.

Ties (several images sharing a caption such as "A frog." give image -> text scores that are
exactly equal) are resolved as clip_benchmark resolves them: its recall@k is "a positive is
among ``torch.topk(scores, k)``" with one ``topk`` call per k on the CPU, and ``topk`` orders
equal scores by its own selection algorithm (neither lower index first nor stable, and not
the same for k=1 and k=10). Exact search here scores with torch too and takes the same
``torch.topk(row, k)`` for each k wherever the k-th and (k+1)-th best scores of a row are
equal, so that the tied items that make the top k are the ones clip_benchmark's make. A rank
counts only strictly higher scores (``1 +`` the number of gallery items scoring above the best
positive): ties are in the query's favour, whatever the order.

Shape suffixes: ``Q`` queries, ``G`` gallery items, ``D`` the embedding dimension, ``K`` the
items of a top-k list, ``S`` the queries sampled to measure an approximate index; a set has
``N`` images and ``T`` texts (``B`` images a batch, ``C``/``H``/``W`` their channels, height and
width). Exact search scores ``M`` queries at a time, keeps their ``J`` best items (the largest
k + 1) and looks again at the ``R`` rows tied at the k-th place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from clipline.eval.encoders import Encoders, embed_images, embed_texts
from clipline.eval.search import (
    SearchIndexConfig,
    as_float32,
    build_index,
    exact_search,
    index_search,
)

log = logging.getLogger(__name__)

# Score-matrix elements computed at once by exact search (256 MiB of float32; 64 queries at a
# time on a 1M gallery, enough for BLAS to run near full speed), so memory stays bounded on
# large galleries, and a CLIP_benchmark-sized set is scored in one block, as it scores it.
_RANK_CHUNK_ELEMENTS = 1 << 26
_MISS = np.iinfo(np.int64).max  # "first positive" position of a query whose top k has none


def search_metrics(
    query_QD: Tensor | np.ndarray,
    gallery_GD: Tensor | np.ndarray,
    query_labels_Q: Tensor | np.ndarray,
    gallery_labels_G: Tensor | np.ndarray,
    ks: Sequence[int],
    batch_size: int = 1024,
    index: SearchIndexConfig | None = None,
    ranks: bool = True,
) -> dict[str, float]:
    """Recall@k (and ranks) of queries against a gallery; positives share a label.

    With images labelled ``0..N-1`` and each caption labelled with its image's index, this
    covers both directions with several captions per image.

    Exact search (the default) scores inner products (cosine similarity for unit vectors)
    with torch in blocks of queries of bounded memory, and resolves tied scores as
    clip_benchmark does (module docstring). Unlike clip_benchmark, whose ``torch.topk``
    fails when k exceeds the gallery size, k is capped at the gallery size.

    Ranks: ``1 +`` the number of gallery items scoring above the best positive (ties in the
    query's favour). A query with no positive in the gallery has no rank and is left out of
    the mean and median. Ranks need the exact scores, so they are reported for exact search
    only.

    With an approximate index (``index.kind`` ``"ivf"``/``"hnsw"`` on a gallery of at least
    ``index.min_gallery``), recall comes from the index, and a sample of
    ``index.recall_sample`` queries is also searched exactly to report what it loses:
    ``ann_overlap@K`` (share of the exact top K the index returns, K = largest k) and
    ``ann_recall_loss@k`` (exact minus approximate recall@k on the sample).

    Args:
        query_QD: Query embeddings ``[Q, D]``.
        gallery_GD: Gallery embeddings ``[G, D]``.
        query_labels_Q: Integer label of each query.
        gallery_labels_G: Integer label of each gallery item.
        ks: The k values, each at least 1.
        batch_size: Queries per approximate-index search call.
        index: The search index settings; ``None`` is exact search.
        ranks: Whether to compute ``mean_rank`` and ``median_rank`` (exact search only).

    Returns:
        ``{"recall@k": ...}`` for each k, plus ``mean_rank``/``median_rank`` and, for an
        approximate index, ``ann_overlap@K`` and ``ann_recall_loss@k``.

    Raises:
        ValueError: On empty inputs, mismatched shapes, or a k below 1.
    """
    query_QD, gallery_GD = as_float32(query_QD), as_float32(gallery_GD)
    query_labels_Q, gallery_labels_G = np.asarray(query_labels_Q), np.asarray(gallery_labels_G)
    num_queries, dim = query_QD.shape
    num_gallery = gallery_GD.shape[0]
    if (
        num_queries == 0
        or num_gallery == 0
        or gallery_GD.shape[1] != dim
        or query_labels_Q.shape != (num_queries,)
        or gallery_labels_G.shape != (num_gallery,)
    ):
        raise ValueError(
            f"got query {query_QD.shape}, gallery {gallery_GD.shape}, query labels "
            f"{query_labels_Q.shape}, gallery labels {gallery_labels_G.shape}; need [Q, D], "
            "[G, D], [Q], [G] with Q, G > 0"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={tuple(ks)}; give one or more k values, each at least 1")
    index = index or SearchIndexConfig()
    max_k = min(max(ks), num_gallery)

    faiss_index = build_index(gallery_GD, index)
    start = time.perf_counter()
    if faiss_index is None:
        hit_Q_at, rank_Q = _exact_hits_and_ranks(
            query_QD, gallery_GD, query_labels_Q, gallery_labels_G, ks
        )
        metrics = {f"recall@{k}": float(hit_Q_at[k].mean()) for k in ks}
        if ranks:
            found = rank_Q[~np.isnan(rank_Q)]
            metrics["mean_rank"] = float(found.mean()) if len(found) else float("nan")
            metrics["median_rank"] = float(np.median(found)) if len(found) else float("nan")
    else:
        _, ids_QK = index_search(faiss_index, query_QD, max_k, batch_size)
        first_hit_Q = _first_hit(ids_QK, query_labels_Q, gallery_labels_G)
        metrics = {f"recall@{k}": float((first_hit_Q < k).mean()) for k in ks}
    log.debug(
        "%s search: %d queries x %d gallery in %.1f s",
        "exact" if faiss_index is None else index.kind, num_queries, num_gallery,
        time.perf_counter() - start,
    )  # fmt: skip

    if faiss_index is not None and index.recall_sample > 0:
        start = time.perf_counter()
        rng = np.random.default_rng(index.seed)
        sample = np.sort(rng.choice(num_queries, min(index.recall_sample, num_queries), False))
        _, exact_ids_SK = exact_search(query_QD[sample], gallery_GD, max_k, batch_size)
        overlap = np.mean(
            [
                # -1 pads a short approximate list; it must not match (nor repeat) anything.
                len(np.intersect1d(exact_ids_SK[i], ids_QK[q][ids_QK[q] >= 0])) / max_k
                for i, q in enumerate(sample)
            ]
        )
        metrics[f"ann_overlap@{max_k}"] = float(overlap)
        exact_hit_S = _first_hit(exact_ids_SK, query_labels_Q[sample], gallery_labels_G)
        for k in ks:
            exact = (exact_hit_S < k).mean()
            approx = (first_hit_Q[sample] < k).mean()
            metrics[f"ann_recall_loss@{k}"] = float(exact - approx)
        log.info(
            "%s index on %d queries sampled of %d: top-%d overlap with exact search %.4f, "
            "recall loss %s (measured in %.1f s)",
            index.kind, len(sample), num_queries, max_k, overlap,
            {k: round(metrics[f"ann_recall_loss@{k}"], 4) for k in ks},
            time.perf_counter() - start,
        )  # fmt: skip
    return metrics


def _first_hit(
    ids_QK: np.ndarray, query_labels_Q: np.ndarray, gallery_labels_G: np.ndarray
) -> np.ndarray:
    """0-based position of the first positive in each top-k list; :data:`_MISS` when absent.

    The miss marker exceeds any k, so that ``first_hit < k`` is false for a miss even when
    k was capped at a gallery smaller than k.
    """
    valid_QK = ids_QK >= 0  # approximate indexes pad short result lists with -1
    match_QK = valid_QK & (
        gallery_labels_G[np.where(valid_QK, ids_QK, 0)] == query_labels_Q[:, None]
    )
    return np.where(match_QK.any(axis=1), match_QK.argmax(axis=1), _MISS)


def _exact_hits_and_ranks(
    query_QD: np.ndarray,
    gallery_GD: np.ndarray,
    query_labels_Q: np.ndarray,
    gallery_labels_G: np.ndarray,
    ks: Sequence[int],
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """``{k: positive in the top k}`` per query, as clip_benchmark decides it, and ranks.

    Scores are torch's fp32 matmul, as clip_benchmark's are, in blocks of queries. One
    ``topk`` of K+1 items per row answers every k whose top-k set is unique (the k-th and
    (k+1)-th scores differ); rows with a tie across that boundary take ``torch.topk(row, k)``
    itself, whose choice among equal scores is clip_benchmark's (module docstring). Ranks:
    ``1 +`` the number of scores above the best positive; NaN without a positive.
    """
    num_gallery = len(gallery_GD)
    gallery_DG = torch.from_numpy(gallery_GD).T
    labels_G = torch.from_numpy(gallery_labels_G)
    top = min(max(ks) + 1, num_gallery)
    hit_Q_at = {k: np.zeros(len(query_QD), dtype=bool) for k in ks}  # {k: bool[Q]}
    rank_Q = np.full(len(query_QD), np.nan)
    rows = max(1, _RANK_CHUNK_ELEMENTS // num_gallery)
    for start in range(0, len(query_QD), rows):
        stop = min(start + rows, len(query_QD))
        scores_MG = torch.from_numpy(query_QD[start:stop]) @ gallery_DG
        positive_MG = labels_G[None, :] == torch.from_numpy(query_labels_Q[start:stop])[:, None]
        values_MJ, ids_MJ = torch.topk(scores_MG, top, dim=1)
        found_MJ = positive_MG.gather(1, ids_MJ)
        for k in ks:
            if k >= num_gallery:  # the whole gallery is the top k
                hit_Q_at[k][start:stop] = positive_MG.any(dim=1).numpy()
                continue
            hit_M = found_MJ[:, :k].any(dim=1)
            tied_R = torch.nonzero(values_MJ[:, k - 1] == values_MJ[:, k]).flatten()
            if len(tied_R):
                ids_RK = torch.topk(scores_MG[tied_R], k, dim=1)[1]
                hit_M[tied_R] = positive_MG[tied_R].gather(1, ids_RK).any(dim=1)
            hit_Q_at[k][start:stop] = hit_M.numpy()
        best_M = torch.where(positive_MG, scores_MG, -torch.inf).max(dim=1).values
        rank_M = 1 + (scores_MG > best_M[:, None]).sum(dim=1)
        rank_Q[start:stop] = torch.where(positive_MG.any(dim=1), rank_M, torch.nan).numpy()
    return hit_Q_at, rank_Q


def recall_at_k_faiss(
    query_QD: Tensor | np.ndarray,
    gallery_GD: Tensor | np.ndarray,
    query_labels_Q: Tensor | np.ndarray,
    gallery_labels_G: Tensor | np.ndarray,
    ks: Sequence[int],
    batch_size: int = 1024,
) -> dict[int, float]:
    """``{k: recall@k}`` by exact search; see :func:`search_metrics`."""
    metrics = search_metrics(
        query_QD, gallery_GD, query_labels_Q, gallery_labels_G, ks, batch_size, ranks=False
    )
    return {k: metrics[f"recall@{k}"] for k in ks}


def retrieval_from_embeddings(
    img_emb_ND: Tensor | np.ndarray,
    txt_emb_TD: Tensor | np.ndarray,
    text_image_T: Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 1024,
    index: SearchIndexConfig | None = None,
    ranks: bool = True,
) -> dict[str, float]:
    """Retrieval metrics from embeddings, in both directions (see the module docstring).

    Args:
        img_emb_ND: Unit image embeddings ``[N, D]``.
        txt_emb_TD: Unit text embeddings ``[T, D]``.
        text_image_T: Index of each text's image.
        ks: The k values of recall@k.
        batch_size: Queries per approximate-index search call (exact search bounds memory itself).
        index: Search index settings (``None``: exact); applies to both galleries.
        ranks: Whether to report mean and median rank (exact search only).

    Returns:
        ``image_retrieval_*`` (text -> image) and ``text_retrieval_*`` (image -> text) metrics:
        ``recall@k`` for each k, ``mean_rank``, ``median_rank``, and for an approximate index
        ``ann_overlap@K`` and ``ann_recall_loss@k``.
    """
    image_labels_N = np.arange(len(img_emb_ND))
    text_labels_T = np.asarray(text_image_T)
    t2i = search_metrics(
        txt_emb_TD, img_emb_ND, text_labels_T, image_labels_N, ks, batch_size, index, ranks
    )
    i2t = search_metrics(
        img_emb_ND, txt_emb_TD, image_labels_N, text_labels_T, ks, batch_size, index, ranks
    )
    # clip_benchmark's key order: both directions for each k.
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i.pop(f"recall@{k}")
        metrics[f"text_retrieval_recall@{k}"] = i2t.pop(f"recall@{k}")
    metrics.update({f"image_retrieval_{name}": v for name, v in t2i.items()})
    metrics.update({f"text_retrieval_{name}": v for name, v in i2t.items()})
    return metrics


def retrieval(
    encoders: Encoders,
    batches: Iterable[tuple[Tensor, Sequence[Sequence[str]]]],
    tokenize: Callable[[list[str]], Tensor],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    index: SearchIndexConfig | None = None,
    ranks: bool = True,
) -> dict[str, float]:
    """Zero-shot image-text retrieval with CLIP_benchmark's metric names and semantics.

    Args:
        encoders: The model.
        batches: ``(image_BCHW, captions)`` pairs; ``captions[b]`` lists the captions of image
            ``b`` (at least one each).
        tokenize: Maps a list of strings to token ids ``[B, L]``.
        ks: The k values (capped at the gallery size; see :func:`search_metrics`).
        batch_size: Captions per ``encode_text`` call, and queries per approximate-index search call.
        index: Search index settings (``None``: exact).
        ranks: Whether to report mean and median rank.

    Returns:
        The metrics of :func:`retrieval_from_embeddings`.

    Raises:
        ValueError: On no images, an image without captions, or a caption count that does
            not match the batch.
    """
    img_embs, texts, text_image = [], [], []  # text_image[t]: index of the image of text t
    image_index = 0
    for image_BCHW, captions in batches:
        if len(captions) != len(image_BCHW):
            raise ValueError(
                f"a batch has {len(image_BCHW)} images but {len(captions)} caption lists; "
                "give one list of captions per image"
            )
        for caps in captions:
            check_captions(image_index, caps)
            texts.extend(caps)
            text_image.extend([image_index] * len(caps))
            image_index += 1
        img_embs.append(embed_images(encoders, image_BCHW))
    if not img_embs:
        raise ValueError("batches is empty; retrieval needs at least one image")

    txt_emb_TD = torch.cat(
        [
            embed_texts(encoders, tokenize(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
    )
    return retrieval_from_embeddings(
        torch.cat(img_embs), txt_emb_TD, text_image, ks, batch_size, index, ranks
    )


def check_captions(image_index: int, captions: Sequence[str]) -> None:
    """Raises ValueError unless ``captions`` is a non-empty list of strings."""
    if isinstance(captions, str) or not captions:
        raise ValueError(
            f"image {image_index} has captions {captions!r}; give a non-empty list of strings"
        )
