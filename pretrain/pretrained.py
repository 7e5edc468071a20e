"""Starting from pretrained weights: ``model.pretrained = PATH``.

``PATH`` is one of (nothing is downloaded; nothing is unpickled):
  a weights file            ``.safetensors``, or ``.pt``/``.bin``/``.pth`` read with
                            ``torch.load(weights_only=True)``: a bare open_clip state dict or
                            open_clip_train's checkpoint (``{"state_dict": {"module.…"}}``);
                            it carries no config, so ``model.name`` names the architecture
  an open_clip folder       ``open_clip_config.json`` + ``open_clip_model.safetensors`` (or
                            ``open_clip_pytorch_model.bin``): open_clip's hub layout, as
                            ``save_for_hf`` and ``clipline export --format open_clip`` write it
  a clipline export         ``clipline_export.json`` + per-tower safetensors
  a transformers folder     a ``CLIPModel`` as ``save_pretrained`` writes it (``config.json``,
                            ``model.safetensors``) with its tokenizer files; converted to
                            open_clip's CLIP (export_hf's key mapping, backwards)
  a clipline checkpoint     a checkpoint directory, or a run directory (its latest): the model
                            weights only; the optimizer, step and data position start afresh

Every format but the bare file carries its config: the architecture, the preprocessing and the
tokenizer then come with the weights (``model.name = "pretrained"``). A ``model.name`` naming
another architecture is an error listing the differences, rather than one of the two silently
winning; ``model.preprocess`` still overrides single preprocessing settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import (
    HF_CONFIG_NAME,
    HF_SAFE_WEIGHTS_NAME,
    HF_WEIGHTS_NAME,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
)
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from clipline.pretrain import export_hf
from clipline.pretrain.checkpoint import consolidated_state, read_config, resolve_checkpoint
from clipline.pretrain.export import find_export, load_exported
from clipline.pretrain.export_clipline import HF_TEXT_DIR, read_export_meta
from clipline.pretrain.export_open_clip import read_open_clip_config
from clipline.pretrain.model import PRETRAINED, DualEncoder, ModelConfig
from clipline.pretrain.safe_load import load_safetensors, load_weights_only

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Files a transformers tokenizer is read from (fast, or the BPE pair the slow one reads).
_HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# open_clip config keys that do not change which weights the model has or what it computes
# in evaluation; left out when the weights' config is compared with model.name's.
_NOT_ARCHITECTURE = {"patch_dropout", "timm_model_pretrained", "hf_model_pretrained"}
_NOT_ARCHITECTURE |= {"hf_model_name", "hf_tokenizer_name", "tokenizer_kwargs", "pad_id"}
_NOT_ARCHITECTURE |= {"init_logit_scale", "init_logit_bias", "output_tokens", "output_dict"}
_SHOWN = 8  # keys listed per kind in errors


@dataclass(frozen=True, kw_only=True)
class Pretrained:
    """Pretrained weights, and the model they go into.

    Attributes:
        path: Where they were read from.
        kind: The format, in words (for messages).
        model_cfg: The open_clip model config to build: the weights' own, or ``model.name``'s
            for a bare weights file. The tokenizer follows from it (an HF tokenizer folder in
            ``text_cfg.hf_tokenizer_name``, else open_clip's CLIP BPE).
        preprocess: open_clip's preprocessing config (the weights' own, then
            ``model.preprocess`` on top).
        weights: open_clip ``CLIP`` state dict (no ``clip.`` prefix); None where only the
            config was read (:func:`pretrained_config`).
    """

    path: Path
    kind: str
    model_cfg: dict[str, Any]
    preprocess: dict[str, Any]
    weights: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class _Found:
    kind: str
    own_cfg: dict[str, Any] | None  # None: the format carries no config
    preprocess: dict[str, Any]
    read_weights: Callable[[], dict[str, torch.Tensor]]


def load_pretrained(path: str | Path, model_cfg: ModelConfig) -> Pretrained:
    """Reads ``model.pretrained``: the weights, the model config and preprocessing to build.

    Args:
        path: The ``model.pretrained`` path (relative paths from the current directory).
        model_cfg: The model config; its ``name`` names the architecture of a bare weights
            file and must agree with a format's own config (or be ``"pretrained"``).

    Returns:
        :class:`Pretrained` with ``weights`` under open_clip's names, temperature 1-element.

    Raises:
        ValueError: a missing path or an open_clip tag (nothing downloads), a format not
            understood, a pickle holding code, or a ``model.name`` that disagrees.
    """
    found = _find(Path(path))
    resolved = _resolve(Path(path), found, model_cfg)
    weights = found.read_weights()
    for k in ("logit_scale", "logit_bias"):  # 0-d in open_clip and transformers
        if k in weights:
            weights[k] = weights[k].reshape(1)
    return dataclasses.replace(resolved, weights=weights)


def pretrained_config(model_cfg: ModelConfig) -> Pretrained:
    """:func:`load_pretrained` without reading the weights (config files only, for
    ``ModelConfig.resolve`` and the start checks)."""
    assert model_cfg.pretrained is not None
    path = Path(model_cfg.pretrained)
    return _resolve(path, _find(path), model_cfg)


def load_into(model: DualEncoder, source: Pretrained) -> None:
    """Copies ``source``'s weights into ``model`` (built from ``source.model_cfg``).

    The temperature belongs to the loss: a logit bias the loss adds keeps its initial value
    where the weights have none, and one the weights have is dropped where the loss has none.

    Raises:
        ValueError: one message listing every missing, unexpected and mis-shaped tensor.
    """
    assert source.weights is not None
    weights = dict(source.weights)
    want = model.clip.state_dict()
    if "logit_bias" in want and "logit_bias" not in weights:
        log.info("%s has no logit_bias: the loss's initial one is kept", source.path)
        weights["logit_bias"] = want["logit_bias"]
    if "logit_bias" in weights and "logit_bias" not in want:
        log.warning("%s has a logit_bias, which this loss does not use: ignored", source.path)
        del weights["logit_bias"]
    check_fits(weights, model.clip, where=f"model.pretrained {str(source.path)!r} ({source.kind})")
    model.clip.load_state_dict(weights, strict=True)
    log.info("initial weights from %s (%s)", source.path, source.kind)


def check_fits(weights: dict[str, torch.Tensor], module: nn.Module, *, where: str) -> None:
    """Raises one ValueError listing the missing, unexpected and mis-shaped tensors of
    ``weights`` against ``module``'s state dict (shapes shown); silent when they fit."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    misshaped = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, keys, show in (
        ("missing", missing, lambda k: f"{k} {list(want[k])}"),
        ("unexpected", unexpected, lambda k: f"{k} {list(have[k])}"),
        (
            "mis-shaped",
            misshaped,
            lambda k: f"{k} {list(have[k])} in the file, {list(want[k])} in the model",
        ),
    ):
        if keys:
            more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            listed = "; ".join(show(k) for k in keys[:_SHOWN])
            parts.append(f"{len(keys)} {label}: {listed}{more}")
    raise ValueError(
        f"{where} does not fit the model built from the config: {'. '.join(parts)}. Fix: set "
        "model.name (and model.config) to the architecture these weights were trained with, "
        "or point model.pretrained at weights of model.name's architecture"
    )


def _resolve(path: Path, found: _Found, cfg: ModelConfig) -> Pretrained:
    """The model config and preprocessing to build, from the weights' and ``cfg``'s."""
    where = f"model.pretrained {str(path)!r} ({found.kind})"
    if cfg.image_tower_weights is not None:
        raise ValueError(
            f"model.image_tower_weights={cfg.image_tower_weights!r} and {where} both give the "
            "image tower's weights; the pretrained weights hold the whole model: unset one"
        )
    named = dataclasses.replace(cfg, pretrained=None)
    if found.own_cfg is None:
        if cfg.name == PRETRAINED:
            raise ValueError(
                f"{where} carries no config, so model.name must name its architecture (e.g. "
                "model.name='open_clip:ViT-B-32', or 'custom' with model.config), not "
                f"{PRETRAINED!r}"
            )
        return Pretrained(
            path=path, kind=found.kind, model_cfg=named.resolve(), preprocess=dict(cfg.preprocess)
        )
    own = {k: v for k, v in found.own_cfg.items() if k != "init_logit_bias"}  # the loss's
    if cfg.name == PRETRAINED:
        for key in ("config", "image_tower", "text_tower"):
            if getattr(cfg, key) is not None:
                raise ValueError(
                    f"model.{key}={getattr(cfg, key)!r} would replace part of the architecture "
                    f"of {where}, which holds the whole model; unset model.{key}"
                )
    else:
        _check_agrees(own, named.resolve(), where, cfg.name)
    return Pretrained(
        path=path,
        kind=found.kind,
        model_cfg=own,
        preprocess={**found.preprocess, **cfg.preprocess},
    )


def _flat(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """An open_clip model config as ``key -> value`` with open_clip's defaults filled in."""
    out = {k: v for k, v in model_cfg.items() if k not in ("vision_cfg", "text_cfg")}
    out.setdefault("quick_gelu", False)
    for part, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        full = {**dataclasses.asdict(cls()), **model_cfg[part]}
        out |= {f"{part}.{k}": v for k, v in full.items()}
    out = json.loads(json.dumps(out))  # tuples and lists compare alike
    return {k: v for k, v in out.items() if k.rpartition(".")[2] not in _NOT_ARCHITECTURE}


def _check_agrees(own: dict[str, Any], named: dict[str, Any], where: str, name: str) -> None:
    a, b = _flat(own), _flat(named)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:_SHOWN])
        more = f"; ... ({len(diff) - _SHOWN} more)" if len(diff) > _SHOWN else ""
        raise ValueError(
            f"{where} has its own model config, and model.name={name!r} builds a different "
            f"model ({len(diff)} difference(s), the weights' vs model.name's: {shown}{more}); "
            f"set model.name={PRETRAINED!r} to build the weights' own architecture"
        )


def _find(path: Path) -> _Found:
    """What ``path`` holds, in which format; reads config files only."""
    if not path.exists():
        raise ValueError(_not_found(path))
    if path.is_file():
        return _weights_file(path)
    found = find_export(path)
    if found is None:
        try:
            ckpt = resolve_checkpoint(path)
        except ValueError as e:
            raise ValueError(
                f"model.pretrained: {e}; or a weights file (.safetensors, .pt, .bin)"
            ) from None
        return _checkpoint(ckpt)
    fmt, folder = found
    if fmt == "onnx":
        raise ValueError(
            f"model.pretrained {str(path)!r} is an ONNX export, which holds no trainable "
            "weights; point it at the clipline, open_clip or transformers export of the model"
        )
    readers = {"clipline": _clipline_export, "open_clip": _open_clip_dir, "hf": _hf_clip}
    return readers[fmt](folder)


def _not_found(path: Path) -> str:
    name = str(path)
    tags = {tag for _, tag in open_clip.list_pretrained()}
    if name in tags or name.startswith(("hf-hub:", "timm/", "laion/", "openai/")):
        return (
            f"model.pretrained={name!r} looks like an open_clip pretrained tag or hub name; "
            "clipline never downloads weights. Fetch them where you have network, e.g. "
            "`open_clip.create_model('ViT-B-32', pretrained='openai')` and save its "
            "state_dict with safetensors.torch.save_file, or `hf download <repo> --local-dir "
            "DIR` for an open_clip or transformers repository, and set model.pretrained to "
            "that local file or folder (with model.name for a bare file)"
        )
    return (
        f"model.pretrained={name!r}: no such file or directory ({path.absolute()}; relative "
        "paths are read from the current directory); give a weights file, an export folder, "
        "a transformers CLIP folder or a clipline checkpoint/run directory"
    )


def _weights_file(path: Path) -> _Found:
    if path.suffix != ".safetensors" and path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"model.pretrained {str(path)!r}: unknown weights file type {path.suffix!r}; "
            f"expected .safetensors or one of {list(_TORCH_SUFFIXES)} (torch.save of tensors)"
        )
    return _Found("weights file", None, {}, lambda: _read_weights(path))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(path, "model.pretrained")
    return _read_torch_file(path)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A bare state dict or open_clip_train's checkpoint, unwrapped as open_clip does it."""
    try:
        data = load_weights_only(path, "model.pretrained", map_location="cpu")
    except ValueError as e:
        raise ValueError(
            f"model.pretrained {str(path)!r} holds more than tensors and plain values, so it "
            "was not loaded (unpickling it could run code); where you trust it, convert it: "
            "safetensors.torch.save_file(state_dict, 'x.safetensors'), and point "
            f"model.pretrained at that file ({e})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # open_clip_train: epoch, name, state_dict, optimizer
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(
            f"model.pretrained {str(path)!r} is not a state dict (name -> tensor) nor a "
            "checkpoint dict with one under 'state_dict'"
        )
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        if data and all(k.startswith(prefix) for k in data):
            data = {k.removeprefix(prefix): v for k, v in data.items()}
    return data


def _open_clip_dir(folder: Path) -> _Found:
    config = read_open_clip_config(folder)
    model_cfg = json.loads(json.dumps(config["model_cfg"]))
    text_cfg = model_cfg["text_cfg"]
    if "hf_model_name" in text_cfg and not Path(text_cfg["hf_model_name"]).is_dir():
        raise ValueError(
            f"model.pretrained {str(folder)!r}: its text tower is transformers' "
            f"{text_cfg['hf_model_name']!r}, which is not a local folder; clipline never "
            "downloads: save that model's config and tokenizer in a folder and put its path "
            "in text_cfg.hf_model_name of open_clip_config.json"
        )
    name = text_cfg.get("hf_tokenizer_name")
    if name and not Path(name).is_dir():
        # open_clip's local-dir schema reads the tokenizer from the folder itself.
        if not any((folder / f).is_file() for f in _HF_TOKENIZER_FILES):
            raise ValueError(
                f"model.pretrained {str(folder)!r}: its tokenizer {name!r} is not a local "
                "folder and the folder holds no tokenizer files (tokenizer.json); save the "
                "tokenizer beside the weights (tokenizer.save_pretrained(folder))"
            )
        text_cfg["hf_tokenizer_name"] = str(folder.absolute())
    safe, pickled = folder / HF_SAFE_WEIGHTS_NAME, folder / HF_WEIGHTS_NAME
    if not safe.is_file() and not pickled.is_file():
        raise ValueError(
            f"model.pretrained {str(folder)!r} has {HF_CONFIG_NAME} but no weights "
            f"({HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME})"
        )
    weights = safe if safe.is_file() else pickled
    preprocess = dict(config.get("preprocess_cfg", {}))
    return _Found("open_clip folder", model_cfg, preprocess, lambda: _read_weights(weights))


def _clipline_export(folder: Path) -> _Found:
    meta = read_export_meta(folder)
    model_cfg = meta["model_cfg"]
    if model_cfg["text_cfg"].get("hf_model_name") == HF_TEXT_DIR:  # bundled beside weights
        bundled = str(folder.absolute() / HF_TEXT_DIR)
        text = {**model_cfg["text_cfg"], "hf_model_name": bundled, "hf_tokenizer_name": bundled}
        model_cfg = {**model_cfg, "text_cfg": text}

    def read() -> dict[str, torch.Tensor]:
        return _clip_weights(load_exported("clipline", folder).state_dict())

    return _Found("clipline export", model_cfg, dict(meta["preprocess"]), read)


def _hf_clip(folder: Path) -> _Found:
    """A transformers CLIPModel folder as open_clip's CLIP, with its own tokenizer."""
    config = export_hf.read_hf_config(folder)
    model_cfg = export_hf.open_clip_model_config(config, folder)
    if not any((folder / f).is_file() for f in _HF_TOKENIZER_FILES):
        raise ValueError(
            f"model.pretrained {str(folder)!r} is a transformers CLIP model without tokenizer "
            "files (tokenizer.json, or vocab.json + merges.txt); save its tokenizer beside "
            "it: CLIPTokenizer.from_pretrained(<where it came from>).save_pretrained(folder)"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    # CLIP's own BPE (OpenAI's and LAION's folders) is tokenized by open_clip's implementation
    # of it: the same ids up to end-of-text (it pads with 0, which no pooled token sees), and
    # the model stays exportable in every format and reads as `clipline eval` reads the
    # folder. Any other vocabulary (added tokens, another BPE) is the folder's tokenizer.
    if tokenizer.get_vocab() != export_hf.clip_bpe_vocab(SimpleTokenizer()):
        model_cfg["text_cfg"] |= {"hf_tokenizer_name": str(folder.absolute())}
        if tokenizer.pad_token_id is not None:
            model_cfg["text_cfg"]["pad_id"] = int(tokenizer.pad_token_id)
    preprocess = _hf_preprocess(folder, model_cfg["vision_cfg"]["image_size"])

    def read() -> dict[str, torch.Tensor]:
        for name in (export_hf.WEIGHTS_FILE, "pytorch_model.bin"):
            if (folder / name).is_file():
                return export_hf.open_clip_state_dict(_read_weights(folder / name), config)
        raise ValueError(
            f"model.pretrained {str(folder)!r} has no {export_hf.WEIGHTS_FILE} (a sharded "
            "model? save it with save_pretrained(folder, max_shard_size='100GB'))"
        )

    return _Found("transformers CLIPModel folder", model_cfg, preprocess, read)


def _hf_preprocess(folder: Path, image_size: int | list[int]) -> dict[str, Any]:
    """The image processor's settings; CLIP's own defaults where the folder has none."""
    proc_file, combined = folder / export_hf.PROCESSOR_FILE, folder / "processor_config.json"
    if proc_file.is_file():
        return export_hf.open_clip_preprocess(json.loads(proc_file.read_text()))
    if combined.is_file() and "image_processor" in (data := json.loads(combined.read_text())):
        return export_hf.open_clip_preprocess(data["image_processor"])
    log.warning(
        "%s has no image processor config: CLIPImageProcessor's defaults (OpenAI's mean and "
        "std, bicubic resize of the shortest edge, centre crop) at the model's image size",
        folder,
    )
    return {
        "size": image_size,
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _checkpoint(ckpt: Path) -> _Found:
    """A clipline checkpoint's model weights, built as its run built them."""
    saved = ModelConfig(**read_config(ckpt)["model"])
    saved = dataclasses.replace(saved, image_tower_weights=None)  # the checkpoint holds them
    if saved.pretrained is not None:  # that run started from weights: its config came with them
        source = pretrained_config(saved)
        model_cfg, preprocess = source.model_cfg, source.preprocess
    else:
        model_cfg, preprocess = saved.resolve(), dict(saved.preprocess)

    def read() -> dict[str, torch.Tensor]:
        return _clip_weights(consolidated_state(ckpt, "model"))

    return _Found(f"clipline checkpoint {ckpt.name}", model_cfg, preprocess, read)


def _clip_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A :class:`DualEncoder` state dict under open_clip's CLIP names."""
    return {k.removeprefix("clip."): v for k, v in state.items()}
