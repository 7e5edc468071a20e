"""Zero-shot classification: a classifier built from prompts, and CLIP_benchmark's metrics.

Shape suffixes: ``N`` evaluated images, ``B`` a batch of them, ``C`` classes (also image
channels in ``image_BCHW``, with ``H``/``W`` height and width), ``T`` templates, ``P = C * T``
prompts, ``K`` the predictions of a top-k list, ``D`` the embedding dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from clipline.data.benchmark_sets import check_templates
from clipline.eval.embedding import embed_all_texts
from clipline.eval.encoders import Encoders, embed_images

# The 80 prompts of the CLIP paper's ImageNet evaluation (open_clip's OPENAI_IMAGENET_TEMPLATES),
# written with clip_benchmark's "{c}" placeholder.
OPENAI_IMAGENET_TEMPLATES: list[str] = [
    "a bad photo of a {c}.",
    "a photo of many {c}.",
    "a sculpture of a {c}.",
    "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.",
    "a rendering of a {c}.",
    "graffiti of a {c}.",
    "a bad photo of the {c}.",
    "a cropped photo of the {c}.",
    "a tattoo of a {c}.",
    "the embroidered {c}.",
    "a photo of a hard to see {c}.",
    "a bright photo of a {c}.",
    "a photo of a clean {c}.",
    "a photo of a dirty {c}.",
    "a dark photo of the {c}.",
    "a drawing of a {c}.",
    "a photo of my {c}.",
    "the plastic {c}.",
    "a photo of the cool {c}.",
    "a close-up photo of a {c}.",
    "a black and white photo of the {c}.",
    "a painting of the {c}.",
    "a painting of a {c}.",
    "a pixelated photo of the {c}.",
    "a sculpture of the {c}.",
    "a bright photo of the {c}.",
    "a cropped photo of a {c}.",
    "a plastic {c}.",
    "a photo of the dirty {c}.",
    "a jpeg corrupted photo of a {c}.",
    "a blurry photo of the {c}.",
    "a photo of the {c}.",
    "a good photo of the {c}.",
    "a rendering of the {c}.",
    "a {c} in a video game.",
    "a photo of one {c}.",
    "a doodle of a {c}.",
    "a close-up photo of the {c}.",
    "a photo of a {c}.",
    "the origami {c}.",
    "the {c} in a video game.",
    "a sketch of a {c}.",
    "a doodle of the {c}.",
    "a origami {c}.",
    "a low resolution photo of a {c}.",
    "the toy {c}.",
    "a rendition of the {c}.",
    "a photo of the clean {c}.",
    "a photo of a large {c}.",
    "a rendition of a {c}.",
    "a photo of a nice {c}.",
    "a photo of a weird {c}.",
    "a blurry photo of a {c}.",
    "a cartoon {c}.",
    "art of a {c}.",
    "a sketch of the {c}.",
    "a embroidered {c}.",
    "a pixelated photo of a {c}.",
    "itap of the {c}.",
    "a jpeg corrupted photo of the {c}.",
    "a good photo of a {c}.",
    "a plushie {c}.",
    "a photo of the nice {c}.",
    "a photo of the small {c}.",
    "a photo of the weird {c}.",
    "the cartoon {c}.",
    "art of the {c}.",
    "a drawing of the {c}.",
    "a photo of the large {c}.",
    "a black and white photo of a {c}.",
    "the plushie {c}.",
    "a dark photo of a {c}.",
    "itap of a {c}.",
    "graffiti of the {c}.",
    "a toy {c}.",
    "itap of my {c}.",
    "a photo of a cool {c}.",
    "a photo of a small {c}.",
    "a tattoo of the {c}.",
]

# One prompt, for quick evaluations during training where 80 prompts per class cost too much.
SIMPLE_TEMPLATES: list[str] = ["a photo of a {c}."]

# clip_benchmark scales cosine similarities like CLIP's learned temperature at init; it does not
# change any ranking, only keeps logits comparable with clip_benchmark's.
LOGIT_SCALE = 100.0


def build_classifier(
    encoders: Encoders,
    classnames: list[str],
    templates: list[str],
    tokenize: Callable[[list[str]], Tensor],
    batch_size: int = 256,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Builds zero-shot class weights the CLIP/clip_benchmark way.

    For each class, every template is formatted with ``template.format(c=classname)`` and
    embedded; the class weight is the mean of the normalised prompt embeddings, re-normalised.

    Args:
        encoders: The model.
        classnames: Class names, in label order.
        templates: Prompt templates with a ``{c}`` placeholder.
        tokenize: Maps a list of strings to token ids ``[B, L]``.
        batch_size: Prompts per ``encode_text`` call (prompts of several classes share a batch).
        rank: This process's rank; with ``world_size > 1`` every rank must call this, each
            embeds every ``world_size``-th prompt and all get the whole classifier.
        world_size: Number of ranks.

    Returns:
        ``[C, D]`` float32 CPU tensor of unit-norm class weights.

    Raises:
        ValueError: On empty ``classnames`` or bad templates.
    """
    if not classnames:
        raise ValueError("classnames is empty; give one name per class, in label order")
    check_templates(templates)
    num_classes, num_templates = len(classnames), len(templates)
    # Class-major order, so that row c * T + t is class c formatted with template t.
    prompts = [t.format(c=name) for name in classnames for t in templates]
    prompt_emb_PD = embed_all_texts(
        encoders, prompts, tokenize, batch_size, rank=rank, world_size=world_size
    )
    prompt_emb_CTD = prompt_emb_PD.view(num_classes, num_templates, -1)
    return F.normalize(prompt_emb_CTD.mean(dim=1), dim=-1)


def classification_metrics(logits_NC: Tensor, labels_N: Tensor) -> dict[str, float]:
    """CLIP_benchmark's single-label zero-shot metrics from logits.

    - ``acc1``, ``acc5``: share of samples whose label is among the top-1 / top-5 classes
      (clip_benchmark's ``accuracy``). With fewer than 5 classes ``acc5`` is ``nan``, as in
      clip_benchmark: top-5 of at most 4 classes is always right and would read as a result.
    - ``mean_per_class_recall``: recall of the argmax prediction averaged over the classes
      present in ``labels_N`` (sklearn's ``balanced_accuracy_score``, which clip_benchmark uses).

    Args:
        logits_NC: Scores ``[N, C]``; only their order within a row matters.
        labels_N: Integer labels in ``[0, C)``.

    Returns:
        ``{"acc1", "acc5", "mean_per_class_recall"}`` as floats.

    Raises:
        ValueError: On no samples, mismatched shapes, or labels outside ``[0, C)``.
    """
    num_samples, num_classes = logits_NC.shape
    labels_N = labels_N.to("cpu", torch.long)
    if num_samples == 0 or labels_N.shape != (num_samples,):
        raise ValueError(
            f"got logits of shape {tuple(logits_NC.shape)} and labels of shape "
            f"{tuple(labels_N.shape)}; need [N, C] and [N] with N > 0"
        )
    if labels_N.min() < 0 or labels_N.max() >= num_classes:
        raise ValueError(
            f"labels span [{labels_N.min()}, {labels_N.max()}] but there are {num_classes} "
            "classes; labels must index into classnames"
        )
    logits_NC = logits_NC.to("cpu", torch.float32)
    # One topk sliced for each k, as clip_benchmark does, so that ties break the same way.
    max_k = min(5, num_classes)
    topk_NK = logits_NC.topk(max_k, dim=1).indices
    hit_NK = topk_NK == labels_N[:, None]
    acc1 = hit_NK[:, :1].any(dim=1).float().mean().item()
    acc5 = hit_NK[:, :5].any(dim=1).float().mean().item() if num_classes >= 5 else math.nan

    pred_N = logits_NC.argmax(dim=1)
    count_C = torch.bincount(labels_N, minlength=num_classes)
    hits_C = torch.bincount(labels_N[pred_N == labels_N], minlength=num_classes)
    present_C = count_C > 0
    recall = (hits_C[present_C].double() / count_C[present_C]).mean().item()
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def zeroshot_classification(
    encoders: Encoders,
    batches: Iterable[tuple[Tensor, Tensor]],
    classnames: list[str],
    templates: list[str],
    tokenize: Callable[[list[str]], Tensor],
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot classification with CLIP_benchmark's metric names and semantics.

    Args:
        encoders: The model.
        batches: ``(image_BCHW, labels_B)`` pairs, images preprocessed for the model.
        classnames: Class names, in label order.
        templates: Prompt templates with a ``{c}`` placeholder.
        tokenize: Maps a list of strings to token ids ``[B, L]``.
        batch_size: Prompts per ``encode_text`` call when building the classifier.

    Returns:
        ``acc1``, ``acc5`` (``nan`` with fewer than 5 classes) and ``mean_per_class_recall``;
        see :func:`classification_metrics`.
    """
    classifier_CD = build_classifier(encoders, classnames, templates, tokenize, batch_size)
    logits, labels = [], []
    for image_BCHW, labels_B in batches:
        img_emb_BD = embed_images(encoders, image_BCHW)
        logits.append(LOGIT_SCALE * img_emb_BD @ classifier_CD.T)  # [B, C]
        labels.append(torch.as_tensor(labels_B).cpu())
    if not logits:
        raise ValueError("batches is empty; zero-shot classification needs at least one image")
    return classification_metrics(torch.cat(logits), torch.cat(labels))
