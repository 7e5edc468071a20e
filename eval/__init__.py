"""Zero-shot classification and retrieval evaluation (CLIP_benchmark metric names).

Imports ``clipline.data`` only: models are seen through the :class:`Encoders` protocol.
"""

from clipline.eval.encoders import Encoders
from clipline.eval.evaluators import RetrievalTask, ZeroShotTask, build_evaluator
from clipline.eval.retrieval import recall_at_k_faiss, retrieval
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
    "Encoders",
    "RetrievalTask",
    "ZeroShotTask",
    "build_classifier",
    "build_evaluator",
    "classification_metrics",
    "recall_at_k_faiss",
    "retrieval",
    "zeroshot_classification",
]
