"""Nearest-neighbour search by inner product: exact (faiss, batched) or approximate (IVF, HNSW).

Kept apart from the metrics so that ``clipline search`` and the retrieval evaluator share one
implementation of "top-k gallery items of each query".
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

# faiss warns, and k-means degrades, below this many training points per IVF list.
_MIN_POINTS_PER_LIST = 39
_IVF_STORAGE = {
    "flat": None,
    "fp16": faiss.ScalarQuantizer.QT_fp16,
    "sq8": faiss.ScalarQuantizer.QT_8bit,
}


@dataclass(kw_only=True)
class SearchIndexConfig:
    """Which index answers top-k queries over a gallery of unit vectors.

    Attributes:
        kind: ``"flat"``: exact search (faiss brute force, queries in batches).
            ``"ivf"``: faiss ``IndexIVFFlat``/``IndexIVFScalarQuantizer`` (k-means cells;
            searches ``nprobe`` cells).
            ``"hnsw"``: faiss ``IndexHNSWFlat`` (graph; slow to build on large galleries).
        min_gallery: Galleries smaller than this are searched exactly whatever ``kind`` says
            (an approximate index only pays off on large galleries).
        nlist: IVF cells; 0 picks ``round(sqrt(G))``, at most ``G // 39``.
        nprobe: IVF cells visited per query; more is slower and closer to exact.
        ivf_storage: How IVF stores the gallery: ``"fp16"`` (half precision: half the memory
            and about twice the search speed of ``"flat"``, with the same top-10 overlap in
            our measurements, since scanning the cells is bound by memory traffic),
            ``"flat"`` (float32) or ``"sq8"`` (8 bits a dimension: faster again, slightly lossy).
        train_size: IVF k-means training points; 0 picks ``64 * nlist`` (at most G).
        kmeans_iters: IVF k-means iterations.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width; more is slower and closer to exact.
        recall_sample: Queries searched exactly too, to measure what the approximate index
            loses (0 skips the measurement).
        seed: Seed of the training-point and query samples.
    """

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    min_gallery: int = 0
    nlist: int = 0
    nprobe: int = 32
    ivf_storage: Literal["fp16", "flat", "sq8"] = "fp16"
    train_size: int = 0
    kmeans_iters: int = 10
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 128
    recall_sample: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index kind={self.kind!r}; use 'flat', 'ivf' or 'hnsw'")
        if self.ivf_storage not in _IVF_STORAGE:
            raise ValueError(
                f"index ivf_storage={self.ivf_storage!r}; use one of {sorted(_IVF_STORAGE)}"
            )
        for name in ("nprobe", "kmeans_iters", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"index {name}={getattr(self, name)}; it must be at least 1")
        for name in ("min_gallery", "nlist", "train_size", "recall_sample"):
            if getattr(self, name) < 0:
                raise ValueError(f"index {name}={getattr(self, name)}; it must be 0 or more")

    def is_exact_for(self, num_gallery: int) -> bool:
        """Whether a gallery of this size is searched exactly."""
        return self.kind == "flat" or num_gallery < self.min_gallery


def as_float32(x) -> np.ndarray:
    """A C-contiguous float32 numpy view or copy of a tensor or array (faiss's input)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_search(
    query_QD: np.ndarray, gallery_GD: np.ndarray, k: int, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (``faiss.knn``), ``batch_size`` queries at a time.

    Memory beyond the inputs stays at one batch of results plus faiss's blocked score tiles;
    no index copy of the gallery is made.

    Returns:
        ``(scores_QK, ids_QK)``, best first.
    """
    num_queries = len(query_QD)
    k = min(k, len(gallery_GD))
    scores_QK = np.empty((num_queries, k), np.float32)
    ids_QK = np.empty((num_queries, k), np.int64)
    for start in range(0, num_queries, batch_size):
        stop = min(start + batch_size, num_queries)
        scores_QK[start:stop], ids_QK[start:stop] = faiss.knn(
            query_QD[start:stop], gallery_GD, k, metric=faiss.METRIC_INNER_PRODUCT
        )
    return scores_QK, ids_QK


def build_index(gallery_GD: np.ndarray, cfg: SearchIndexConfig) -> faiss.Index | None:
    """Builds the approximate index ``cfg`` asks for, or ``None`` for exact search.

    Args:
        gallery_GD: Gallery vectors (float32, C-contiguous).
        cfg: The index settings.

    Returns:
        A trained, filled faiss index, or ``None`` when the search is exact.
    """
    num_gallery, dim = gallery_GD.shape
    if cfg.is_exact_for(num_gallery):
        return None
    start = time.perf_counter()
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
        index.add(gallery_GD)
    else:
        max_lists = max(1, num_gallery // _MIN_POINTS_PER_LIST)
        nlist = min(cfg.nlist or round(math.sqrt(num_gallery)), max_lists)
        quantizer = faiss.IndexFlatIP(dim)
        if cfg.ivf_storage == "flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, _IVF_STORAGE[cfg.ivf_storage], faiss.METRIC_INNER_PRODUCT
            )
        index.cp.niter = cfg.kmeans_iters
        index.cp.seed = cfg.seed
        train_size = min(num_gallery, cfg.train_size or 64 * nlist)
        rng = np.random.default_rng(cfg.seed)
        train = gallery_GD[np.sort(rng.choice(num_gallery, train_size, replace=False))]
        index.train(train)
        index.add(gallery_GD)
        index.nprobe = min(cfg.nprobe, nlist)
    log.info(
        "built %s index over %d x %d in %.1f s", cfg.kind, num_gallery, dim,
        time.perf_counter() - start,
    )  # fmt: skip
    return index


def index_search(
    index: faiss.Index, query_QD: np.ndarray, k: int, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from a faiss index, ``batch_size`` queries at a time.

    Returns:
        ``(scores_QK, ids_QK)``, best first; ids are -1 where the index found fewer than k.
    """
    num_queries = len(query_QD)
    k = min(k, index.ntotal)
    scores_QK = np.empty((num_queries, k), np.float32)
    ids_QK = np.empty((num_queries, k), np.int64)
    for start in range(0, num_queries, batch_size):
        stop = min(start + batch_size, num_queries)
        scores_QK[start:stop], ids_QK[start:stop] = index.search(query_QD[start:stop], k)
    return scores_QK, ids_QK
