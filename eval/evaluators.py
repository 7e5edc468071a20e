"""Evaluation tasks as typed configs, built into plain ``(encoders) -> metrics`` callables.

The training loop and the CLI call these callables without importing this package's
internals; keys come back un-prefixed (the caller adds ``eval/<task.name>/``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import PIL.Image
import torch
from torch import Tensor

from clipline.data import evalsets
from clipline.eval.encoders import Encoders
from clipline.eval.retrieval import retrieval
from clipline.eval.zeroshot import zeroshot_classification

Target = TypeVar("Target")


@dataclass(kw_only=True)
class ZeroShotTask:
    """Zero-shot classification on a set written by ``clipline.data.evalsets``.

    Attributes:
        name: Short name used in metric keys (``eval/<name>/acc1``).
        root: The set's root folder.
        batch_size: Images per ``encode_image`` call and prompts per ``encode_text`` call.
        templates: Prompt templates with ``{c}``; ``None`` takes the set's
            ``zeroshot_classification_templates.txt``.
    """

    name: str
    root: str
    batch_size: int = 256
    templates: list[str] | None = None

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)


@dataclass(kw_only=True)
class RetrievalTask:
    """Image-text retrieval on a set written by ``clipline.data.evalsets``.

    Attributes:
        name: Short name used in metric keys (``eval/<name>/image_retrieval_recall@1``).
        root: The set's root folder.
        batch_size: Images per ``encode_image`` call, captions per ``encode_text`` call.
        ks: The k values of recall@k.
    """

    name: str
    root: str
    batch_size: int = 256
    ks: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks={self.ks!r}; give one or more k values, each at least 1")


def build_evaluator(
    task: ZeroShotTask | RetrievalTask,
    *,
    preprocess: Callable[[PIL.Image.Image], Tensor],
    tokenize: Callable[[list[str]], Tensor],
) -> Callable[[Encoders], dict[str, float]]:
    """Builds the callable that evaluates a model on ``task``.

    The set's metadata is read and checked now, so that a wrong path or missing templates
    fail at start-up rather than at the first evaluation. Each call streams the images from
    disk again (memory stays at one batch), preprocesses them and runs the forward passes in
    batches of ``task.batch_size`` under ``torch.no_grad()``. The text side is re-embedded
    every call, since it changes during training.

    Args:
        task: What to evaluate.
        preprocess: Maps a PIL RGB image to the model's input tensor ``[3, H, W]``.
        tokenize: Maps a list of strings to token ids ``[B, L]``.

    Returns:
        ``evaluate(encoders) -> {metric_name: value}`` with CLIP_benchmark's metric names.

    Raises:
        ValueError: If the set cannot be opened, or a zero-shot task has no templates.
    """
    if isinstance(task, ZeroShotTask):
        zeroshot_set = evalsets.read_classification_set(task.root)
        templates = zeroshot_set.templates if task.templates is None else task.templates
        if not templates:
            raise ValueError(
                f"task {task.name!r}: {task.root} has no {evalsets.TEMPLATES_FILE} and the task "
                "gives no templates; set templates=, e.g. clipline.eval.zeroshot.SIMPLE_TEMPLATES"
            )
        evalsets.check_templates(templates)

        def evaluate_zeroshot(encoders: Encoders) -> dict[str, float]:
            batches = (
                (image_BCHW, torch.tensor(labels, dtype=torch.long))
                for image_BCHW, labels in _batched(
                    zeroshot_set.samples(), preprocess, task.batch_size
                )
            )
            return zeroshot_classification(
                encoders, batches, zeroshot_set.classnames, templates, tokenize, task.batch_size
            )

        return evaluate_zeroshot

    if isinstance(task, RetrievalTask):
        retrieval_set = evalsets.read_retrieval_set(task.root)

        def evaluate_retrieval(encoders: Encoders) -> dict[str, float]:
            batches = _batched(retrieval_set.samples(), preprocess, task.batch_size)
            return retrieval(encoders, batches, tokenize, task.ks, task.batch_size)

        return evaluate_retrieval

    raise TypeError(f"task must be a ZeroShotTask or RetrievalTask, got {type(task).__name__}")


def _batched(
    samples: Iterable[tuple[PIL.Image.Image, Target]],
    preprocess: Callable[[PIL.Image.Image], Tensor],
    batch_size: int,
) -> Iterator[tuple[Tensor, list[Target]]]:
    images: list[Tensor] = []
    targets: list[Target] = []
    for image, target in samples:
        images.append(preprocess(image))
        targets.append(target)
        if len(images) == batch_size:
            yield torch.stack(images), targets
            images, targets = [], []
    if images:
        yield torch.stack(images), targets


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be at least 1")
