"""Zero-shot classification, retrieval and linear-probe evaluation (CLIP_benchmark metric names).

Imports ``clipline.data`` only: models are seen through the :class:`Encoders` protocol.
"""

from clipline.eval.cache import EmbeddingCache, files_fingerprint, model_fingerprint
from clipline.eval.embedding import embed_all_texts, embed_indexed_images
from clipline.eval.encoders import Encoders
from clipline.eval.evaluators import (
    LinearProbeTask,
    RetrievalTask,
    ZeroShotTask,
    build_evaluator,
    resolve_templates,
)
from clipline.eval.linear_probe import linear_probe
from clipline.eval.retrieval import (
    recall_at_k_faiss,
    retrieval,
    retrieval_from_embeddings,
    search_metrics,
)
from clipline.eval.search import SearchIndexConfig, build_index, exact_search, index_search
from clipline.eval.zeroshot import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    build_classifier,
    classification_metrics,
    zeroshot_classification,
)

__all__ = [
    "OPENAI_IMAGENET_TEMPLATES",
    "SIMPLE_TEMPLATES",
    "EmbeddingCache",
    "Encoders",
    "LinearProbeTask",
    "RetrievalTask",
    "SearchIndexConfig",
    "ZeroShotTask",
    "build_classifier",
    "build_evaluator",
    "build_index",
    "classification_metrics",
    "embed_all_texts",
    "embed_indexed_images",
    "exact_search",
    "files_fingerprint",
    "index_search",
    "linear_probe",
    "model_fingerprint",
    "recall_at_k_faiss",
    "resolve_templates",
    "retrieval",
    "retrieval_from_embeddings",
    "search_metrics",
    "zeroshot_classification",
]
