"""Evaluation tasks as typed configs, built into plain ``(encoders) -> metrics`` callables.

The training loop and the CLI call these callables without importing this package's
internals; keys come back un-prefixed (the caller adds ``eval/<task.name>/``).

Distributed evaluation: built with ``distributed=True`` while a ``torch.distributed``
process group is up, an evaluator embeds only its rank's part of the set, gathers the
rest, and computes the metrics on every rank: **every rank must call it** (a rank-0-only
call would wait forever on the others). Without a process group it runs alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import PIL
import PIL.Image
import torch
from torch import Tensor

from clipline.data import benchmark_sets, classification_sets
from clipline.data.registry import Registry
from clipline.eval.cache import (
    EmbeddingCache,
    PixelCache,
    cache_key,
    describe,
    files_fingerprint,
    model_fingerprint,
)
from clipline.eval.distributed import all_ranks_agree, rank_and_world, same_on_all_ranks
from clipline.eval.embedding import Preprocess, embed_all_texts, embed_indexed_images
from clipline.eval.encoders import Encoders
from clipline.eval.linear_probe import DEFAULT_C_GRID, linear_probe
from clipline.eval.retrieval import check_captions, retrieval_from_embeddings
from clipline.eval.search import SearchIndexConfig
from clipline.eval.zeroshot import (
    LOGIT_SCALE,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    build_classifier,
    classification_metrics,
)

log = logging.getLogger(__name__)

# Names usable as ``templates = "<name>"`` in a task.
BUILTIN_TEMPLATES = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}
Format = Literal["wds", "folder", "csv", "mnist", "fashion_mnist"]


@dataclass(kw_only=True)
class _Common:
    """Settings every task has.

    Attributes:
        name: Short name used in metric keys (``eval/<name>/acc1``).
        root: The set's root (see ``format``).
        batch_size: Images per ``encode_image`` call and texts per ``encode_text`` call.
        workers: DataLoader processes decoding and preprocessing images in the background
            (0: in the evaluating process, on a thread pool between forward passes: the
            better choice without an accelerator; with a GPU, workers decode during the
            forward pass).
        cache_dir: Folder of cached embeddings, keyed by model weights (or ``model_id``) and
            the data's bytes, and of the set's preprocessed images (uint8, 150 KB per 224-px
            image, under ``pixels/``), so that evaluating the next checkpoint does not
            decode them again; ``None`` disables caching.
    """

    name: str
    root: str
    batch_size: int = 256
    workers: int = 0
    cache_dir: str | None = None

    def _key(self, field: str) -> str:
        # Tasks sit in lists ([[zeroshot]], --zeroshot): the task's name says which one.
        return f"evaluation {self.name!r}: {field}"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{self._key('batch_size')}={self.batch_size}; it must be at least 1")
        if self.workers < 0:
            raise ValueError(f"{self._key('workers')}={self.workers}; it must be 0 or more")


@dataclass(kw_only=True)
class _ClassificationData(_Common):
    """Where a classification set is and how to read it (see ``clipline.data.classification_sets``).

    Attributes:
        format: ``wds`` (CLIP_benchmark's layout), ``folder`` (``root/<class>/<image>``),
            ``csv`` (image path and label columns), ``mnist`` or ``fashion_mnist`` (IDX files).
        classnames: A ``classnames.txt``-style file (one name a line, in label order) that
            overrides the set's own names.
        csv_image_column: CSV column of image paths (relative to the CSV's folder).
        csv_label_column: CSV column of labels (a class index or a class name).
        csv_separator: CSV field separator (``"\\t"`` for TSV).
    """

    format: Format = "wds"
    classnames: str | None = None
    csv_image_column: str = "filepath"
    csv_label_column: str = "label"
    csv_separator: str = ","

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in classification_sets.FORMATS:
            raise ValueError(
                f"{self._key('format')}={self.format!r}; use one of {list(classification_sets.FORMATS)}"
            )

    def open(self, split: str | None) -> classification_sets.ClassificationSource:
        return classification_sets.open_classification_set(
            self.format,
            self.root,
            split,
            classnames_file=self.classnames,
            csv_image_column=self.csv_image_column,
            csv_label_column=self.csv_label_column,
            csv_separator=self.csv_separator,
        )


@dataclass(kw_only=True)
class ZeroShotTask(_ClassificationData):
    """Zero-shot classification (CLIP_benchmark's ``zeroshot_classification``).

    Attributes:
        split: The split (``None``: the format's default, see ``clipline.data.classification_sets``).
        templates: Prompt templates with ``{c}``: a list, a built-in name
            (``"openai_imagenet"``: the CLIP paper's 80; ``"simple"``: ``"a photo of a {c}."``),
            a file with one template a line, or ``None`` for the set's own
            (``zeroshot_classification_templates.txt``, or the data set's built-ins).
        reference: A reference task of the forgetting guard during training: its ``acc1``
            is measured before the first step, its change is logged as
            ``eval/<name>/delta``, and ``loop.max_reference_drop`` stops the run when it
            falls further. Other uses of the task ignore it.
    """

    split: str | None = None
    templates: list[str] | str | None = None
    reference: bool = False


@dataclass(kw_only=True)
class LinearProbeTask(_ClassificationData):
    """A logistic-regression probe on frozen image features (CLIP paper protocol).

    Attributes:
        train_split: The split the probe is fit on.
        test_split: The split it is scored on.
        C: Inverse L2 strength; ``None`` picks it from ``c_grid`` on a validation part of
            the training split.
        c_grid: Values of C to try.
        val_fraction: Share of the training split held out to pick C.
        max_iter: L-BFGS iterations.
        seed: Seed of the validation split.
    """

    train_split: str = "train"
    test_split: str = "test"
    C: float | None = None
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    val_fraction: float = 0.2
    max_iter: int = 1000
    seed: int = 0


@dataclass(kw_only=True)
class RetrievalTask(_Common):
    """Image-text retrieval on a CLIP_benchmark-layout set (several captions per image).

    Attributes:
        split: The shard folder under ``root``.
        ks: The k values of recall@k.
        ranks: Whether to report mean and median rank of the first positive (exact search).
        index: The search index; the default is exact search. For large galleries an
            approximate one (``kind = "ivf"`` or ``"hnsw"``) reports what it loses against
            exact search on a sample of queries.
    """

    split: str = benchmark_sets.SPLIT
    ks: tuple[int, ...] = (1, 5, 10)
    ranks: bool = True
    index: SearchIndexConfig = field(default_factory=SearchIndexConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ks or min(self.ks) < 1:
            raise ValueError(
                f"{self._key('ks')}={self.ks!r}; give one or more k values, each at least 1"
            )


Task = ZeroShotTask | RetrievalTask | LinearProbeTask
# (task, *, preprocess, tokenize, distributed, model_id) -> evaluate(encoders) -> metrics
EvaluatorBuilder = Callable[..., Callable[[Encoders], dict[str, float]]]


@dataclass(frozen=True)
class EvaluatorKind:
    """One registered kind of evaluation: its task config class and what builds it."""

    task: type
    build: EvaluatorBuilder


# Kind -> task class and builder; the kind names the run config's array of tables.
EVALUATORS: Registry[EvaluatorKind] = Registry("evaluator kind")


def register_evaluator(kind: str, task: type) -> Callable[[EvaluatorBuilder], EvaluatorBuilder]:
    """Decorator: registers a builder of evaluators for tasks of class ``task`` as ``kind``.

    The builder is called as ``build(task, *, preprocess, tokenize, distributed, model_id)``
    (see :func:`build_evaluator`) and returns ``evaluate(encoders) -> metrics``.
    """

    def add(build: EvaluatorBuilder) -> EvaluatorBuilder:
        EVALUATORS.add(kind, EvaluatorKind(task=task, build=build))
        return build

    return add


def build_evaluator(
    task: Task,
    *,
    preprocess: Preprocess,
    tokenize: Callable[[list[str]], Tensor],
    distributed: bool = False,
    model_id: str | None = None,
) -> Callable[[Encoders], dict[str, float]]:
    """Builds the callable that evaluates a model on ``task``.

    The set's metadata is read and checked now, so that a wrong path or missing templates
    fail at start-up rather than at the first evaluation. Each call streams the images from
    disk again (memory stays at one batch plus the embeddings), preprocesses them and runs
    the forward passes in batches of ``task.batch_size`` under ``torch.no_grad()``, unless
    ``task.cache_dir`` holds the embeddings of these weights on these data already. The
    zero-shot text side is re-embedded every call, since it changes during training.

    Args:
        task: What to evaluate.
        preprocess: The model's :class:`~clipline.data.preprocess.PreprocessConfig`
            (``model.preprocess_config()``: batched, cacheable pixels), or any callable
            from a PIL RGB image to the model's input tensor ``[3, H, W]``.
        tokenize: Maps a list of strings to token ids ``[B, L]``.
        distributed: Split the work across the ranks of the initialised process group
            (every rank must then call the evaluator); ignored without one.
        model_id: Names the model in embedding-cache keys instead of a hash of its
            weights (e.g. an export's digest); only read when ``task.cache_dir`` is set.

    Returns:
        ``evaluate(encoders) -> {metric_name: value}`` with CLIP_benchmark's metric names.

    Raises:
        ValueError: If the set cannot be opened, or a zero-shot task has no templates.
    """
    builder = EVALUATORS.get(evaluator_kind(task)).build
    return builder(
        task, preprocess=preprocess, tokenize=tokenize, distributed=distributed, model_id=model_id
    )


def evaluator_kind(task: Task) -> str:
    """The registered kind (``zeroshot``, ``retrieval``, ...) whose task class ``task`` is.

    Raises:
        TypeError: ``task`` is no registered task class.
    """
    for kind in EVALUATORS:
        if isinstance(task, EVALUATORS.get(kind).task):
            return kind
    classes = ", ".join(EVALUATORS.get(kind).task.__name__ for kind in EVALUATORS)
    raise TypeError(f"task must be one of {classes}, got {type(task).__name__}")


def list_evaluators() -> list[str]:
    """The evaluator kinds: run-config sections (``[[zeroshot]]``) and ``clipline eval``
    flags (``--linear-probe``), in the order their metrics are reported."""
    return EVALUATORS.names()


def resolve_templates(templates: list[str] | str | None, own: list[str], where: str) -> list[str]:
    """The templates a task asks for (a list, a built-in name, a file, or the set's own).

    Raises:
        ValueError: If none result, or a name is neither built in nor a file.
    """
    if templates is None:
        resolved = own
    elif isinstance(templates, str):
        if templates in BUILTIN_TEMPLATES:
            resolved = BUILTIN_TEMPLATES[templates]
        elif Path(templates).is_file():
            resolved = benchmark_sets.read_lines(Path(templates))
        else:
            raise ValueError(
                f"templates={templates!r} is neither a built-in set "
                f"({sorted(BUILTIN_TEMPLATES)}) nor a file of one template a line"
            )
    else:
        resolved = list(templates)
    if not resolved:
        raise ValueError(
            f"{where} has no {benchmark_sets.TEMPLATES_FILE} and the task gives no templates; set "
            "templates=, e.g. 'simple' or 'openai_imagenet'"
        )
    benchmark_sets.check_templates(resolved)
    return resolved


def _cached(
    task: _Common,
    key_parts: dict,
    compute: Callable[[], dict[str, Tensor]],
    world_size: int,
    rank: int,
) -> dict[str, Tensor]:
    """``compute()``, or its result saved by an earlier call with the same key."""
    if task.cache_dir is None:
        return compute()
    cache = EmbeddingCache(task.cache_dir)
    key = cache_key(**key_parts)
    tensors = cache.load(key)
    # Only skip the (collective) computation if every rank found the file.
    if not all_ranks_agree(tensors is not None, world_size):
        tensors = compute()
        if rank == 0:
            cache.save(key, tensors, {"task": task.name})
    assert tensors is not None
    return tensors


def _pixel_cache(
    task: _Common,
    data_key: Callable[[], str],
    split: str | None,
    preprocess: Preprocess,
    rank: int,
    world_size: int,
) -> PixelCache | None:
    """Where this rank keeps its preprocessed images of the set, with ``task.cache_dir``."""
    if task.cache_dir is None:
        return None
    key = cache_key(
        kind="pixels", data=data_key(), format=getattr(task, "format", "wds"), split=split,
        preprocess=describe(preprocess), pillow=PIL.__version__, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    return PixelCache(Path(task.cache_dir) / "pixels", key)


def _model_key(encoders: Encoders, model_id: str | None) -> str:
    return f"id:{model_id}" if model_id is not None else model_fingerprint(encoders)


def _data_key(source: classification_sets.ClassificationSource) -> str:
    # Folder and CSV sets take labels from folder names or a column: the same image bytes
    # under other labels are another set.
    labels = getattr(source, "labels", None)
    return cache_key(files=files_fingerprint(source.files()), labels=labels)


def _class_image_embeddings(
    task, source, split, encoders, preprocess, model_id, rank, world_size
) -> dict[str, Tensor]:
    """``{"image": img_emb_ND, "label": i64[N]}`` of one split of a classification set,
    from the task's embedding cache when it holds these weights on these data."""

    def embed() -> dict[str, Tensor]:
        img_emb_ND, labels = embed_indexed_images(
            encoders, source.indexed_items, preprocess, task.batch_size,
            labels=True, rank=rank, world_size=world_size, workers=task.workers,
            pixel_cache=_pixel_cache(task, lambda: _data_key(source), split, preprocess, rank,
                                     world_size),
        )  # fmt: skip
        return {"image": img_emb_ND, "label": torch.tensor(labels, dtype=torch.long)}

    key = {
        "kind": "classification-images",
        "model": _model_key(encoders, model_id) if task.cache_dir else None,
        "data": _data_key(source) if task.cache_dir else None,
        "format": task.format,
        "split": split,
        "preprocess": describe(preprocess),
    }
    return _cached(task, key, embed, world_size, rank)


@register_evaluator("zeroshot", ZeroShotTask)
def _zeroshot_evaluator(task, *, preprocess, tokenize, distributed, model_id):
    source = task.open(task.split)
    templates = resolve_templates(task.templates, source.templates, task.root)
    classnames = source.classnames

    def evaluate_zeroshot(encoders: Encoders) -> dict[str, float]:
        rank, world_size = rank_and_world(distributed)
        data = _class_image_embeddings(
            task, source, task.split, encoders, preprocess, model_id, rank, world_size
        )
        classifier_CD = build_classifier(
            encoders, classnames, templates, tokenize, task.batch_size,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        logits_NC = LOGIT_SCALE * data["image"] @ classifier_CD.T
        return same_on_all_ranks(classification_metrics(logits_NC, data["label"]), world_size)

    if task.reference:  # the metric the training loop's forgetting guard watches
        evaluate_zeroshot.reference_metric = "acc1"
    return evaluate_zeroshot


@register_evaluator("retrieval", RetrievalTask)
def _retrieval_evaluator(task, *, preprocess, tokenize, distributed, model_id):
    retrieval_set = benchmark_sets.read_retrieval_set(task.root, task.split)

    def evaluate_retrieval(encoders: Encoders) -> dict[str, float]:
        rank, world_size = rank_and_world(distributed)

        def embed() -> dict[str, Tensor]:
            img_emb_ND, captions = embed_indexed_images(
                encoders, retrieval_set.indexed_items, preprocess, task.batch_size,
                labels=False, rank=rank, world_size=world_size, workers=task.workers,
                pixel_cache=_pixel_cache(
                    task, lambda: files_fingerprint(retrieval_set.files()), task.split,
                    preprocess, rank, world_size,
                ),
            )  # fmt: skip
            texts, text_image = [], []
            for image_index, caps in enumerate(captions):
                check_captions(image_index, caps)
                texts += caps
                text_image += [image_index] * len(caps)
            txt_emb_TD = embed_all_texts(
                encoders, texts, tokenize, task.batch_size, rank=rank, world_size=world_size
            )
            return {
                "image": img_emb_ND,
                "text": txt_emb_TD,
                "text_image": torch.tensor(text_image, dtype=torch.long),
            }

        key = {
            "kind": "retrieval",
            "model": _model_key(encoders, model_id) if task.cache_dir else None,
            "data": files_fingerprint(retrieval_set.files()) if task.cache_dir else None,
            "split": task.split,
            "preprocess": describe(preprocess),
            "tokenize": describe(tokenize),
        }
        data = _cached(task, key, embed, world_size, rank)
        metrics = retrieval_from_embeddings(
            data["image"], data["text"], data["text_image"], task.ks,
            index=task.index, ranks=task.ranks,
        )  # fmt: skip
        return same_on_all_ranks(metrics, world_size)

    return evaluate_retrieval


@register_evaluator("linear_probe", LinearProbeTask)
def _linear_probe_evaluator(task, *, preprocess, tokenize, distributed, model_id):
    train_source = task.open(task.train_split)
    test_source = task.open(task.test_split)
    # A test split may lack some classes (an image folder without that class's folder):
    # its labels are mapped onto the training split's classes by name.
    train_index = {name: i for i, name in enumerate(train_source.classnames)}
    unknown = [name for name in test_source.classnames if name not in train_index]
    if unknown:
        raise ValueError(
            f"task {task.name!r}: the {task.test_split!r} split has classes {unknown[:5]} that "
            f"the {task.train_split!r} split lacks; give both the same classnames file"
        )
    test_to_train = torch.tensor([train_index[name] for name in test_source.classnames])

    def evaluate_probe(encoders: Encoders) -> dict[str, float]:
        rank, world_size = rank_and_world(distributed)
        features = {
            name: _class_image_embeddings(
                task, source, split, encoders, preprocess, model_id, rank, world_size
            )
            for name, source, split in (
                ("train", train_source, task.train_split),
                ("test", test_source, task.test_split),
            )
        }
        metrics = linear_probe(
            features["train"]["image"], features["train"]["label"],
            features["test"]["image"], test_to_train[features["test"]["label"]],
            len(train_source.classnames),
            C=task.C, c_grid=task.c_grid, val_fraction=task.val_fraction,
            max_iter=task.max_iter, seed=task.seed,
        )  # fmt: skip
        return same_on_all_ranks(metrics, world_size)

    return evaluate_probe
