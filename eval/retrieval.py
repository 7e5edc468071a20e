"""Image-text retrieval recall@k with an exact faiss index, under CLIP_benchmark's metric names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

from clipline.eval.encoders import Encoders, embed_images, embed_texts


def recall_at_k_faiss(
    query_QD: Tensor | np.ndarray,
    gallery_GD: Tensor | np.ndarray,
    query_labels_Q: Tensor | np.ndarray,
    gallery_labels_G: Tensor | np.ndarray,
    ks: Sequence[int],
    batch_size: int = 1024,
) -> dict[int, float]:
    """Share of queries with at least one positive among their top-k gallery items.

    A query and a gallery item are a positive pair when their labels are equal. With images
    labelled ``0..N-1`` and each caption labelled with its image's index, this covers both
    directions with several captions per image (CLIP-paper recall, as in clip_benchmark).

    The search is exact (``faiss.IndexFlatIP`` on inner products, i.e. cosine similarity for
    unit vectors), with queries in batches. Unlike clip_benchmark, whose ``torch.topk`` fails
    when k exceeds the gallery size, k is capped at the gallery size (then every query with a
    positive counts as a hit), so tiny debug sets still report every k asked for.

    Args:
        query_QD: Query embeddings ``[Q, D]``.
        gallery_GD: Gallery embeddings ``[G, D]``.
        query_labels_Q: Integer label of each query.
        gallery_labels_G: Integer label of each gallery item.
        ks: The k values, each at least 1.
        batch_size: Queries per faiss search.

    Returns:
        ``{k: recall@k}`` for each k in ``ks``.

    Raises:
        ValueError: On empty inputs, mismatched shapes, or a k below 1.
    """
    query_QD = np.ascontiguousarray(query_QD, dtype=np.float32)
    gallery_GD = np.ascontiguousarray(gallery_GD, dtype=np.float32)
    query_labels_Q = np.asarray(query_labels_Q)
    gallery_labels_G = np.asarray(gallery_labels_G)
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

    index = faiss.IndexFlatIP(dim)
    index.add(gallery_GD)
    max_k = min(max(ks), num_gallery)
    hits = dict.fromkeys(ks, 0)
    for start in range(0, num_queries, batch_size):
        _, topk_BK = index.search(query_QD[start : start + batch_size], max_k)
        match_BK = gallery_labels_G[topk_BK] == query_labels_Q[start : start + batch_size, None]
        # Rank of the first positive; max_k (never a hit) when none is retrieved.
        first_hit_B = np.where(match_BK.any(axis=1), match_BK.argmax(axis=1), max_k)
        for k in ks:
            hits[k] += int((first_hit_B < k).sum())
    return {k: hits[k] / num_queries for k in ks}


def retrieval(
    encoders: Encoders,
    batches: Iterable[tuple[Tensor, Sequence[Sequence[str]]]],
    tokenize: Callable[[list[str]], Tensor],
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot image-text retrieval with CLIP_benchmark's metric names and semantics.

    - ``image_retrieval_recall@k``: text -> image; share of texts whose image is in the top k.
    - ``text_retrieval_recall@k``: image -> text; share of images with any of their texts in
      the top k.

    Args:
        encoders: The model.
        batches: ``(image_BCHW, captions)`` pairs; ``captions[b]`` lists the captions of image
            ``b`` (at least one each).
        tokenize: Maps a list of strings to token ids ``[B, L]``.
        ks: The k values (capped at the gallery size; see :func:`recall_at_k_faiss`).
        batch_size: Captions per ``encode_text`` call, and queries per faiss search.

    Returns:
        Both recalls for each k, keyed as above.

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
            if isinstance(caps, str) or not caps:
                raise ValueError(
                    f"image {image_index} has captions {caps!r}; give a non-empty list of strings"
                )
            texts.extend(caps)
            text_image.extend([image_index] * len(caps))
            image_index += 1
        img_embs.append(embed_images(encoders, image_BCHW))
    if not img_embs:
        raise ValueError("batches is empty; retrieval needs at least one image")

    img_emb_ND = torch.cat(img_embs)
    txt_emb_TD = torch.cat(
        [
            embed_texts(encoders, tokenize(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
    )
    image_labels_N = np.arange(len(img_emb_ND))
    text_labels_T = np.asarray(text_image)
    t2i = recall_at_k_faiss(txt_emb_TD, img_emb_ND, text_labels_T, image_labels_N, ks, batch_size)
    i2t = recall_at_k_faiss(img_emb_ND, txt_emb_TD, image_labels_N, text_labels_T, ks, batch_size)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = t2i[k]
        metrics[f"text_retrieval_recall@{k}"] = i2t[k]
    return metrics
