"""Linear probe on frozen image features: multinomial logistic regression, as in the CLIP paper.

Why scikit-learn's L-BFGS logistic regression rather than clip_benchmark's torch loop (AdamW,
learning-rate schedule, weight-decay search over a validation split): it is the CLIP paper's
own protocol ("scikit-learn's L-BFGS implementation, with maximum 1,000 iterations", the L2
strength picked on a validation split), the problem is convex so the result does not depend
on a learning rate, epochs, batch order or seed, and it is deterministic, which lets every
rank of a distributed evaluation compute the same numbers without any communication.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from clipline.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)

# Inverse L2 strengths swept when none is given: a log grid around what unit-norm CLIP
# features need (the CLIP paper swept 1e-6..1e6; the ends are never picked for such features).
DEFAULT_C_GRID = (0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0)


def fit_logistic_regression(
    feat_ND: np.ndarray, labels_N: np.ndarray, C: float, max_iter: int = 1000
):
    """A multinomial L-BFGS logistic regression on ``feat_ND`` (sklearn)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=max_iter, tol=1e-6)
    model.fit(feat_ND, labels_N)
    return model


def _logits(model, feat_ND: np.ndarray, num_classes: int) -> Tensor:
    """Log-probabilities ``[N, C]``; classes absent from training get ``-inf``."""
    logits_NC = np.full((len(feat_ND), num_classes), -np.inf, dtype=np.float64)
    logits_NC[:, model.classes_] = model.predict_log_proba(feat_ND)
    return torch.from_numpy(logits_NC)


def linear_probe(
    train_feat_ND: Tensor | np.ndarray,
    train_labels_N: Tensor | np.ndarray | Sequence[int],
    test_feat_MD: Tensor | np.ndarray,
    test_labels_M: Tensor | np.ndarray | Sequence[int],
    num_classes: int,
    *,
    C: float | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Trains a logistic-regression probe on train features, scores it on test features.

    With ``C=None`` the inverse L2 strength is picked from ``c_grid`` by top-1 accuracy on a
    random ``val_fraction`` of the training set, then the probe is refit on all of it.

    Args:
        train_feat_ND: Training features (unit image embeddings).
        train_labels_N: Their labels in ``[0, num_classes)``.
        test_feat_MD: Test features.
        test_labels_M: Their labels.
        num_classes: Number of classes.
        C: Inverse L2 strength; ``None`` sweeps ``c_grid``.
        c_grid: Values of C to try.
        val_fraction: Share of the training set held out to pick C.
        max_iter: L-BFGS iterations.
        seed: Seed of the validation split.

    Returns:
        clip_benchmark's linear-probe keys ``lp_acc1``, ``lp_acc5`` (``nan`` below 5 classes),
        ``lp_mean_per_class_recall``, plus ``lp_C``, the C used.

    Raises:
        ValueError: On empty sets, fewer than 2 training classes, or bad settings.
    """
    train_X = np.asarray(train_feat_ND, dtype=np.float64)
    train_y = np.asarray(train_labels_N, dtype=np.int64)
    test_X = np.asarray(test_feat_MD, dtype=np.float64)
    test_y = torch.as_tensor(np.asarray(test_labels_M, dtype=np.int64))
    if len(train_X) == 0 or len(test_X) == 0:
        raise ValueError(
            f"linear probe got {len(train_X)} training and {len(test_X)} test samples; "
            "both splits need samples"
        )
    if len(np.unique(train_y)) < 2:
        raise ValueError("the training split has fewer than 2 classes; a probe needs at least 2")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; it must be in (0, 1)")
    if C is None:
        if not c_grid or min(c_grid) <= 0:
            raise ValueError(f"c_grid={tuple(c_grid)}; give one or more positive values")
        order = np.random.default_rng(seed).permutation(len(train_X))
        num_val = max(1, round(val_fraction * len(train_X)))
        val, fit = order[:num_val], order[num_val:]
        if len(np.unique(train_y[fit])) < 2:
            raise ValueError("too few training samples to hold out a validation split; set C=")
        scores = {}
        for c in c_grid:
            model = fit_logistic_regression(train_X[fit], train_y[fit], c, max_iter)
            scores[c] = float((model.predict(train_X[val]) == train_y[val]).mean())
        C = max(c_grid, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
        log.info("linear probe: validation top-1 by C %s -> C=%g", scores, C)
    elif C <= 0:
        raise ValueError(f"C={C}; it must be positive")
    model = fit_logistic_regression(train_X, train_y, C, max_iter)
    metrics = classification_metrics(_logits(model, test_X, num_classes), test_y)
    return {f"lp_{name}": value for name, value in metrics.items()} | {"lp_C": float(C)}
