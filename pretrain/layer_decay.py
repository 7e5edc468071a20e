"""Layer-wise learning-rate decay and the learning rate of new heads, as per-parameter
``lr_scale`` factors that :func:`clipline.pretrain.optim.param_groups` turns into groups.

Each tower is split into layers from input to output the way OpenCLIP's main branch does it
(its towers' ``layer_groups()``, which open_clip 3.3 does not have yet): ``embeddings``, one
layer per transformer block (the last one with the final norm), then the projection head.
A timm image tower takes its trunk's layers from timm's own ``group_matcher`` (the
enumeration timm's ``param_groups_layer_decay`` uses), with open_clip's projection on top.
A parameter in layer ``i`` of a tower of ``n`` layers gets ``lr_scale = layer_decay ** (n - 1 -
i)``: the head learns at the full rate, the embeddings at ``layer_decay ** (n - 1)`` of it.
Parameters of no layer (the temperature, a SigLIP bias, an attention pooler) keep 1.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

# (layer name, members): members are modules or parameters, input to output.
LayerGroups = list[tuple[str, list[Any]]]


def _present(*members: Any) -> list[Any]:
    return [m for m in members if m is not None and not isinstance(m, nn.Identity)]


def _has_params(module: Any) -> bool:
    return module is not None and next(module.parameters(), None) is not None


def _blocks(embeddings: list[Any], blocks: Any, final_norm: Any, head: list[Any]) -> LayerGroups:
    """``embeddings``, ``layer.<i>`` per block (the last with ``final_norm``), ``proj``."""
    groups: LayerGroups = [("embeddings", embeddings)] if embeddings else []
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        groups.append((f"layer.{i}", [block, *_present(final_norm if last else None)]))
    if head:
        groups.append(("proj", head))
    return groups


def image_layers(visual: nn.Module) -> LayerGroups:
    """The image tower's layers, input to output (OpenCLIP main's ``layer_groups()``).

    Raises:
        ValueError: a tower whose layers clipline does not know.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        embeddings = _present(
            visual.conv1,
            getattr(visual, "class_embedding", None),
            getattr(visual, "positional_embedding", None),
            visual.ln_pre,
        )
        head = _present(visual.proj)
        return _blocks(embeddings, visual.transformer.resblocks, visual.ln_post, head)
    if isinstance(visual, ModifiedResNet):
        stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
        stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        groups = [("embeddings", stem)] + [(f"layer.{i}", [s]) for i, s in enumerate(stages)]
        return groups + ([("proj", [visual.attnpool])] if visual.attnpool is not None else [])
    if isinstance(visual, TimmModel):
        from timm.models import group_parameters

        trunk = visual.trunk
        by_layer = group_parameters(trunk, trunk.group_matcher(coarse=False))
        groups = [
            (f"layer.{i}", [trunk.get_parameter(name) for name in by_layer[i]])
            for i in sorted(by_layer)
        ]
        return groups + ([("proj", [visual.head])] if _has_params(visual.head) else [])
    raise ValueError(
        f"optim.layer_decay: clipline does not know the layers of the image tower "
        f"{type(visual).__name__}; set optim.layer_decay=1 (off)"
    )


def text_layers(clip: nn.Module) -> LayerGroups:
    """The text tower's layers, input to output: open_clip's own transformer (unpacked onto
    ``CLIP`` or under ``CustomTextCLIP.text``) or an HF encoder (``clip.text``)."""
    from open_clip.hf_configs import arch_dict
    from open_clip.hf_model import HFTextEncoder

    text = getattr(clip, "text", None)
    text = clip if text is None else text
    if isinstance(text, HFTextEncoder):
        # open_clip 3.3 names these for some model types only (not BERT's): BERT's names
        # are the default, as in open_clip's main branch.
        names = arch_dict.get(text.config.model_type, {}).get("config_names", {})
        encoder = getattr(text.transformer, "encoder", text.transformer)
        embeddings = getattr(text.transformer, names.get("token_embeddings_attr", "embeddings"))
        pooler = getattr(text.transformer, "pooler", None)
        head = [m for m in (pooler, text.pooler, text.proj) if _has_params(m)]
        return _blocks([embeddings], getattr(encoder, names.get("layer_attr", "layer")), None, head)
    embeddings = _present(
        getattr(text, "token_embedding", None),
        getattr(text, "positional_embedding", None),
        getattr(text, "cls_emb", None),
    )
    head = _present(getattr(text, "text_projection", None))
    return _blocks(embeddings, text.transformer.resblocks, getattr(text, "ln_final", None), head)


def _params(member: Any) -> list[nn.Parameter]:
    return [member] if isinstance(member, nn.Parameter) else list(member.parameters())


def layer_ids(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """``name -> (tower, layer, layers in that tower)`` for every parameter in a tower's
    layer (names as ``model.named_parameters()`` gives them: ``clip.visual.conv1.weight``).

    Args:
        model: A :class:`~clipline.pretrain.model.DualEncoder` (its ``clip`` is open_clip's).
    """
    where: dict[int, tuple[str, int, int]] = {}
    for tower, groups in (
        ("image", image_layers(model.clip.visual)),
        ("text", text_layers(model.clip)),
    ):
        for i, (_, members) in enumerate(groups):
            for member in members:
                for p in _params(member):
                    where[id(p)] = (tower, i, len(groups))
    return {name: where[id(p)] for name, p in model.named_parameters() if id(p) in where}


def head_names(model: nn.Module, patterns: list[str] | None) -> set[str]:
    """The new heads: parameters matching ``patterns`` (globs on parameter names), or, with
    ``None``, those the model declares (:meth:`DualEncoder.new_head_params`).

    Raises:
        ValueError: a pattern that matches no parameter.
    """
    names = [name for name, _ in model.named_parameters()]
    if patterns is None:
        declared = getattr(model, "new_head_params", None)
        return set(declared()) if declared is not None else set()
    found: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(
                f"optim.head_params: {pattern!r} matches no parameter; names look like "
                f"{names[:3]} ... {names[-2:]} (globs, e.g. 'clip.visual.head.*')"
            )
        found.update(matched)
    return found


def lr_scales(
    model: nn.Module,
    layer_decay: float = 1.0,
    head_lr_scale: float = 1.0,
    head_params: list[str] | None = None,
) -> dict[str, float]:
    """Every trainable parameter's learning-rate factor (``name -> lr_scale``).

    ``layer_decay ** (layers above it in its tower)`` (1 for parameters of no layer), times
    ``head_lr_scale`` for the new heads (:func:`head_names`).
    """
    layers = layer_ids(model) if layer_decay != 1.0 else {}
    heads = head_names(model, head_params) if head_lr_scale != 1.0 else set()
    if head_lr_scale != 1.0 and not heads:
        log.warning(
            "optim.head_lr_scale=%g is ignored: the model has no new heads (parameters that start "
            "at random on top of pretrained weights); name them with optim.head_params",
            head_lr_scale,
        )
    scales = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        _, layer, n = layers.get(name, ("", 0, 1))
        scales[name] = layer_decay ** (n - 1 - layer) * (head_lr_scale if name in heads else 1.0)
    return scales
