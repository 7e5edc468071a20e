"""Towers by name: one registry of name prefixes, each resolving to part of an open_clip
model config.

A tower name is ``<prefix>:<name>`` (``open_clip:ViT-B-32``, ``timm:resnet50``,
``hf:/models/my-bert``) or a bare registered name (``custom``). The prefix alone picks the
builder, never a substring of the rest. Each prefix serves one slot of
:class:`~clipline.pretrain.model.ModelConfig`: ``model`` (``model.name``: the whole model
config), ``image`` (``model.image_tower``: its ``vision_cfg``) or ``text``
(``model.text_tower``: its ``text_cfg``). Builders register where they are defined with
:func:`register_tower`, as a plugin module would for its own towers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import open_clip

from clipline.data.hints import did_you_mean
from clipline.data.registry import Registry

if TYPE_CHECKING:
    from clipline.pretrain.model import ModelConfig

Slot = Literal["model", "image", "text"]
# (base, model config, the open_clip model config so far) -> this slot's part of it.
TowerBuilder = Callable[[str, "ModelConfig", dict[str, Any]], dict[str, Any]]

# slot -> (the ModelConfig key naming it, what its names name, for error messages)
_SLOTS: dict[str, tuple[str, str]] = {
    "model": ("model.name", "model name"),
    "image": ("model.image_tower", "image tower"),
    "text": ("model.text_tower", "text tower"),
}
# A source with more names than this is described by its usage in errors, not listed.
_MAX_LISTED = 12


@dataclass(frozen=True)
class TowerSource:
    """One registered prefix.

    Attributes:
        slot: The ``ModelConfig`` slot its names go in.
        build: Makes that slot's part of the open_clip model config from the name after the
            prefix.
        names: The names after the prefix it knows (``""``: the prefix is the whole name, as
            in ``custom``); None: any, the builder checks them (paths).
        known: Whether it builds a name after the prefix (default: one of ``names``).
        usage: How its names are written, for errors (None: its names are listed).
    """

    slot: Slot
    build: TowerBuilder
    names: Callable[[], list[str]] | None = None
    known: Callable[[str], bool] | None = None
    usage: str | None = None

    def knows(self, base: str) -> bool:
        if self.known is not None:
            return self.known(base)
        return self.names is None or base in self.names()

    def full_names(self, prefix: str) -> list[str]:
        return [f"{prefix}:{n}" if n else prefix for n in (self.names() if self.names else [])]


TOWERS: Registry[TowerSource] = Registry("tower prefix")


def register_tower(
    prefix: str,
    *,
    slot: Slot,
    names: Callable[[], list[str]] | None = None,
    known: Callable[[str], bool] | None = None,
    usage: str | None = None,
) -> Callable[[TowerBuilder], TowerBuilder]:
    """Decorator: registers a tower builder for names ``<prefix>:<name>`` in ``slot``.

    Args:
        prefix: The name prefix, without the colon (``"timm"``).
        slot: ``"model"`` (builds the whole open_clip model config), ``"image"`` (its
            ``vision_cfg``) or ``"text"`` (its ``text_cfg``).
        names: Returns the names after the prefix that it builds (``[""]``: the bare
            prefix is the name); None: the builder checks the name itself.
        known: Whether a name after the prefix is built, when that is wider or cheaper than
            membership in ``names`` (timm also takes ``resnet50.a1_in1k``).
        usage: How to write its names, shown in errors instead of listing them.

    Returns:
        A decorator that registers ``build(base, model_config, open_clip_config_so_far)``
        and returns it unchanged.
    """

    def add(build: TowerBuilder) -> TowerBuilder:
        TOWERS.add(
            prefix, TowerSource(slot=slot, build=build, names=names, known=known, usage=usage)
        )
        return build

    return add


def list_towers(slot: Slot | None = None) -> list[str]:
    """Every tower name the registry can list, of ``slot`` (all slots by default), e.g.
    ``clipline:tiny``, ``custom``, ``open_clip:ViT-B-32``, ``timm:resnet50``; prefixes that
    take any name their builder accepts (``hf:<local directory>``) add none."""
    return [
        name
        for prefix in TOWERS
        if slot is None or TOWERS.get(prefix).slot == slot
        for name in TOWERS.get(prefix).full_names(prefix)
    ]


def build_tower(
    spec: str, slot: Slot, cfg: ModelConfig, model_cfg: dict[str, Any]
) -> dict[str, Any]:
    """The part of the open_clip model config that ``spec`` names in ``slot``.

    Raises:
        ValueError: ``spec`` has no prefix registered for ``slot``, or a name its source
            does not know; the message lists the valid names and the close matches.
    """
    prefix, _, base = spec.partition(":")
    source = TOWERS.get(prefix) if prefix in TOWERS else None
    if source is None or source.slot != slot or not source.knows(base):
        key, what = _SLOTS[slot]
        sources = [(p, TOWERS.get(p)) for p in TOWERS if TOWERS.get(p).slot == slot]
        listing = []
        for p, s in sources:
            names = s.full_names(p)
            if s.usage is not None or not names or len(names) > _MAX_LISTED:
                listing.append(s.usage or f"{p}:<name>")
            else:
                listing += names
        raise ValueError(
            f"unknown {what} {spec!r} ({key}).{did_you_mean(spec, list_towers(slot))} "
            f"Valid names: {', '.join(listing)}"
        )
    return source.build(base, cfg, model_cfg)


def _clipline_config_names() -> list[str]:
    root = resources.files("clipline.pretrain") / "model_configs"
    return sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json"))


@register_tower("clipline", slot="model", names=_clipline_config_names)
def _clipline_config(base: str, cfg: ModelConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    path = resources.files("clipline.pretrain") / "model_configs" / f"{base}.json"
    return json.loads(path.read_text())


@register_tower(
    "custom",
    slot="model",
    names=lambda: [""],
    usage="custom (with model.config: embed_dim, vision_cfg, text_cfg)",
)
def _custom_config(base: str, cfg: ModelConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.config or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.config.keys():
        raise ValueError(
            "model.name='custom' needs model.config with keys embed_dim, vision_cfg and "
            f"text_cfg (open_clip's model-config format); got {cfg.config!r}"
        )
    return json.loads(json.dumps(cfg.config))


# open_clip alone has ~150 names: errors say where they are instead of listing them.
@register_tower(
    "open_clip",
    slot="model",
    names=open_clip.list_models,
    usage="open_clip:<any of python -c 'import open_clip; print(open_clip.list_models())'>",
)
def _open_clip_config(base: str, cfg: ModelConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    return open_clip.get_model_config(base)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_knows(name: str) -> bool:
    import timm

    return timm.is_model(name)


@register_tower(
    "timm",
    slot="image",
    names=_timm_names,
    known=_timm_knows,
    usage="timm:<any of timm.list_models()>",
)
def _timm_vision_cfg(name: str, cfg: ModelConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "timm_model_name": name,
        "timm_model_pretrained": False,  # weights only ever come from image_tower_weights
        "timm_pool": "",  # timm's own pooling: tokens for ViTs, average for conv nets
        "timm_proj": "linear",
        "image_size": model_cfg["vision_cfg"].get("image_size", 224),
    }


@register_tower(
    "hf",
    slot="text",
    usage="hf:<local directory holding config.json, weights and tokenizer files; never downloaded>",
)
def _hf_text_cfg(path: str, cfg: ModelConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    if not Path(path, "config.json").is_file():
        raise ValueError(
            f"model.text_tower 'hf:{path}': expected 'hf:<local directory>' holding "
            "config.json, the weights and tokenizer files (what save_pretrained writes); "
            "clipline never downloads models"
        )
    config = json.loads(Path(path, "config.json").read_text())
    return {
        "hf_model_name": path,
        "hf_tokenizer_name": path,
        "hf_model_pretrained": True,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "mlp",
        # CLIP-style captions are short; the tower's own limit caps it.
        "context_length": min(77, int(config.get("max_position_embeddings", 77))),
    }
