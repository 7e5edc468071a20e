"""Dual encoders built from open_clip model configs.

Every tower spec resolves to one open_clip model config (``embed_dim``, ``vision_cfg``,
``text_cfg``) plus a preprocessing config, and is built through open_clip's own factory via
its ``local-dir:`` schema. That keeps one construction path for built-in names, our shipped
configs and user dicts, and makes the saved ``open_clip_config.json`` the same file open_clip
itself loads.

Shape suffixes: ``B`` batch, ``C`` image channels, ``H``/``W`` image height and width, ``L``
text length in tokens (the context, or less after :class:`Tokenize` trims padding), ``E``
the text transformer's width, ``D`` the shared embedding dimension.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from open_clip.transformer import text_global_pool
from open_clip.utils import to_2tuple
from torch import nn
from torch.nn import functional as F

from clipline.data.preprocess import PreprocessConfig
from clipline.pretrain.safe_load import check_safetensors, load_safetensors
from clipline.pretrain.towers import build_tower

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature at 1/100
PRETRAINED = "pretrained"  # model.name: the architecture that comes with model.pretrained


@dataclass(kw_only=True)
class ModelConfig:
    """Which dual encoder to build.

    Attributes:
        name: ``open_clip:<config>`` (any name in ``open_clip.list_models()``, e.g.
            ``open_clip:ViT-B-32``), ``clipline:<config>`` (configs shipped with clipline,
            e.g. ``clipline:tiny`` for CPU runs), ``custom`` with ``config`` set, or a
            prefix a plugin registered (see :mod:`clipline.pretrain.towers`).
        config: An inline open_clip model config (keys ``embed_dim``, ``vision_cfg``,
            ``text_cfg``); only with ``name = "custom"``.
        preprocess: Overrides of open_clip's preprocessing config (``mean``, ``std``,
            ``interpolation``, ``resize_mode``); the size always follows the image tower.
        lock_image: LiT: freeze the image tower (e.g. a pretrained one) and train the text
            tower to match it.
        lock_image_unlocked_groups: With ``lock_image``, leave this many final layer
            groups of the image tower trainable.
        patch_dropout: FLIP: drop this fraction of image patches in training (not in
            evaluation); trains faster per step at some accuracy cost.
        grad_checkpointing: Recompute tower activations in the backward pass instead of
            storing them: less memory, about a third more compute; same gradients.
        image_tower: ``timm:<model name>`` replaces the named config's image tower with any
            timm model (e.g. ``timm:resnet50``, ``timm:vit_small_patch16_224``) pooled by
            timm's own head pooling and projected linearly to ``embed_dim``.
        image_tower_weights: A local ``.safetensors`` file of timm weights for that tower
            (e.g. a pretrained backbone for LiT); its classifier head is ignored.
        text_tower: ``hf:<local directory>`` replaces the text tower with a HuggingFace
            transformers encoder (BERT-like: ``config.json``, weights and tokenizer files,
            as ``save_pretrained`` writes them), mean-pooled and projected by a small MLP as
            in open_clip's HF-text configs. Nothing is downloaded: the path must exist.
        lock_text: Freeze the text tower (open_clip's ``lock_text_tower``), e.g. to tune
            only the image side of a pretrained model.
        lock_text_unlocked_layers: With ``lock_text``, leave this many top layer groups of
            the text tower trainable (open_clip's count: 1 is the projection, 2 adds the
            last block with the final norm, then one block each; an HF tower never freezes
            its projection and counts encoder layers where open_clip knows them, not BERT's).
    """

    name: str = "clipline:tiny"
    config: dict[str, Any] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    patch_dropout: float = 0.0
    grad_checkpointing: bool = False
    image_tower: str | None = None
    image_tower_weights: str | None = None
    text_tower: str | None = None
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise ValueError(
                "model.lock_image_unlocked_groups is only read with model.lock_image=true"
            )
        if self.lock_text_unlocked_layers and not self.lock_text:
            raise ValueError(
                "model.lock_text_unlocked_layers is only read with model.lock_text=true"
            )
        if self.lock_text_unlocked_layers < 0:
            raise ValueError(
                f"model.lock_text_unlocked_layers must be >= 0 (0: the whole text tower is "
                f"frozen), got {self.lock_text_unlocked_layers}"
            )

    def resolve(self) -> dict[str, Any]:
        """Returns the open_clip model config: the named one with any tower replaced.

        Raises:
            ValueError: unknown model or tower name, missing tower path; with
                ``pretrained``: see :func:`~clipline.pretrain.pretrained.load_pretrained`.
        """
        if self.pretrained is not None:
            return _pretrained().pretrained_config(self).model_cfg
        if self.name == PRETRAINED:
            raise ValueError(
                f"model.name={PRETRAINED!r} builds the architecture of model.pretrained, which "
                "is not set; set model.pretrained = PATH, or name a model"
            )
        model_cfg = self._resolve_named()
        if self.image_tower is not None:
            model_cfg["vision_cfg"] = build_tower(self.image_tower, "image", self, model_cfg)
        elif self.image_tower_weights is not None:
            raise ValueError(
                "model.image_tower_weights needs model.image_tower = 'timm:<name>' "
                "(the weights are loaded into that timm model)"
            )
        if self.image_tower_weights is not None:
            if not Path(self.image_tower_weights).is_file():
                raise ValueError(
                    f"model.image_tower_weights: no such file {self.image_tower_weights}"
                )
            check_safetensors(self.image_tower_weights, "model.image_tower_weights")
        if self.text_tower is not None:
            model_cfg["text_cfg"] = build_tower(self.text_tower, "text", self, model_cfg)
        return model_cfg

    def _resolve_named(self) -> dict[str, Any]:
        if self.config is not None and self.name != "custom":
            raise ValueError(
                f"model.config is only read with model.name='custom', not {self.name!r}; "
                "remove model.config or set model.name='custom'"
            )
        return build_tower(self.name, "model", self, {})


def _pretrained() -> Any:
    # Imported when used: the pretrained readers use the export formats, which import this.
    from clipline.pretrain import pretrained

    return pretrained


def build_open_clip(
    model_cfg: dict[str, Any], preprocess: dict[str, Any], *, load_hf_weights: bool = True
) -> tuple[nn.Module, Any]:
    """Builds an open_clip model and its tokenizer from a model config dict.

    Weights are random, except an HF text tower's, which come from its directory unless
    ``load_hf_weights`` is False (when a checkpoint or export supplies them anyway).
    """
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess})
        )
        # open_clip logs a warning when no weights sit beside the config; we want random init.
        previous = logging.root.level
        logging.root.setLevel(logging.ERROR)
        try:
            model = open_clip.create_model(
                f"local-dir:{tmp}", load_weights=False, pretrained_hf=load_hf_weights
            )
            text_cfg = model_cfg["text_cfg"]
            if "hf_tokenizer_name" in text_cfg:
                # open_clip's local-dir schema looks for tokenizer files beside the config;
                # ours live where the config points.
                tokenizer = open_clip.tokenizer.HFTokenizer(
                    text_cfg["hf_tokenizer_name"],
                    context_length=text_cfg.get("context_length", 77),
                    tokenizer_mode=text_cfg.get("tokenizer_mode"),
                    **text_cfg.get("tokenizer_kwargs", {}),
                )
            else:
                tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
        finally:
            logging.root.setLevel(previous)
    return model, tokenizer


def _pooled_token(clip: nn.Module, tokenizer: Any) -> int | None:
    """The end-of-text id the text tower pools at (open_clip's or a transformers tokenizer's)."""
    if clip.text_pool_type == "eos":
        return clip.text_eos_id
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps transformers'
    return getattr(tokenizer, "eot_token_id", getattr(hf, "eos_token_id", None))


def _repeated_block_classes(module: nn.Module) -> set[str]:
    """Class names of stacked blocks: a ModuleList, or a Sequential of 2+, all of one class."""
    names = set()
    for m in module.modules():
        if isinstance(m, nn.ModuleList) or (isinstance(m, nn.Sequential) and len(m) >= 2):
            classes = {type(child).__name__ for child in m}
            if len(classes) == 1:
                names |= classes
    return names


@dataclass
class Tokenize:
    """open_clip's tokenizer, cutting each batch after its longest sequence when that is exact.

    Captions are usually far shorter than the context (77 tokens for CLIP), yet the text
    tower pays for every padded position. With a causal mask and pooling at the end-of-text
    token, positions after a sequence's last real token cannot change its embedding, so
    dropping the columns that are padding in every row of the batch is exact and saves most
    of the text tower's work. Picklable, so dataloader workers tokenise whole batches.
    """

    tokenizer: Any
    pad_id: int
    trim: bool

    def __call__(self, texts: list[str]) -> torch.Tensor:
        text_BL = self.tokenizer(texts)
        if self.trim:
            used_L = (text_BL != self.pad_id).any(dim=0)
            text_BL = text_BL[:, : int(used_L.nonzero().max()) + 1]
        return text_BL


def open_clip_preprocess_config(cfg: dict[str, Any]) -> PreprocessConfig:
    """open_clip's preprocessing config as the numbers its ``image_transform`` uses.

    Its training transform is a ``RandomResizedCrop`` with ``AugmentationCfg``'s scale,
    torchvision's default aspect ratios and always bicubic; evaluation resizes with
    ``interpolation`` (``"random"`` means bicubic there), except that a non-square
    ``"shortest"`` size goes through its ``ResizeKeepRatio`` at its default, bicubic.
    """
    oc = PreprocessCfg(**cfg)
    size = tuple(int(s) for s in to_2tuple(oc.size))
    mean = oc.mean if isinstance(oc.mean, (list, tuple)) else (oc.mean,) * 3
    std = oc.std if isinstance(oc.std, (list, tuple)) else (oc.std,) * 3
    resize_mode = oc.resize_mode or "shortest"
    if oc.interpolation not in ("bicubic", "bilinear", "random"):
        raise ValueError(
            f"model.preprocess.interpolation must be 'bicubic', 'bilinear' or 'random' (open_clip's "
            f"choices), got {oc.interpolation!r}"
        )
    interpolation = "bilinear" if oc.interpolation == "bilinear" else "bicubic"
    if resize_mode == "shortest" and size[0] != size[1]:
        interpolation = "bicubic"
    try:
        return PreprocessConfig(
            size=size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            interpolation=interpolation,
            resize_mode=resize_mode,
            fill_color=int(oc.fill_color),
            train_scale=tuple(float(s) for s in AugmentationCfg().scale),
            train_ratio=(3.0 / 4.0, 4.0 / 3.0),  # torchvision's RandomResizedCrop default
            train_interpolation="bicubic",
        )
    except ValueError as e:  # the numbers come from the model's config: name it so
        raise ValueError(f"model.{e}") from None


@functools.cache
def _clip_bpe() -> Any:
    return open_clip.tokenizer.SimpleTokenizer()


def count_clip_tokens(captions: list[str]) -> list[int]:
    """CLIP BPE tokens per caption (open_clip's tokenizer, the one most towers use), without
    the start and end tokens: the ``count_tokens`` of ``clipline shards --token-stats``.

    Module-level, so that spawned shard writers receive it by name; each process builds the
    tokenizer once.
    """
    return [len(_clip_bpe().encode(c)) for c in captions]


def _new_heads(model: DualEncoder, cfg: ModelConfig) -> frozenset[str]:
    """What :meth:`DualEncoder.new_head_params` declares for a model built from ``cfg``."""
    heads = []
    if cfg.image_tower_weights is not None:  # a loaded timm trunk under open_clip's new head
        heads.append("clip.visual.head.")
    if model.model_cfg["text_cfg"].get("hf_model_pretrained"):  # an HF encoder, projected anew
        heads.append("clip.text.proj.")
    names = [n for n, _ in model.named_parameters()]
    return frozenset(n for n in names if heads and n.startswith(tuple(heads)))


class DualEncoder(nn.Module):
    """Image tower + text tower + learnable temperature, around an open_clip CLIP model.

    ``encode_image`` / ``encode_text`` return L2-normalised embeddings, which is the whole
    "encoders" protocol evaluators rely on.
    """

    def __init__(
        self,
        model_cfg: dict[str, Any],
        preprocess: dict[str, Any] | None = None,
        *,
        load_hf_weights: bool = True,
    ):
        super().__init__()
        self.model_cfg = model_cfg
        self.clip, self.tokenizer = build_open_clip(
            model_cfg, preprocess or {}, load_hf_weights=load_hf_weights
        )
        # Trimming is exact only for open_clip's own causal text transformer pooled at EOT,
        # and only where padding is not the token it pools at (transformers' OpenAI CLIP
        # tokenizer pads with end-of-text: cutting it would move the pooling).
        pad_id = model_cfg["text_cfg"].get("pad_id", 0)
        trim = (
            isinstance(self.clip, open_clip.CLIP)
            and self.clip.attn_mask is not None
            and self.clip.text_pool_type in ("argmax", "eos")
            and pad_id != _pooled_token(self.clip, self.tokenizer)
        )
        self.tokenize = Tokenize(tokenizer=self.tokenizer, pad_id=pad_id, trim=trim)
        # FSDP2 shards every parameter along dim 0 and rejects 0-d ones; a 1-element vector
        # is the same temperature everywhere else (open_clip-format exports squeeze it back).
        for name in ("logit_scale", "logit_bias"):
            param = getattr(self.clip, name, None)
            if param is not None and param.ndim == 0:
                setattr(self.clip, name, nn.Parameter(param.detach().reshape(1)))
        # FSDP units (read by Accelerate's transformer wrap policy): each tower's repeated
        # blocks, whatever the tower (open_clip ResidualAttentionBlock, timm Block, HF layers).
        self._no_split_modules = sorted(_repeated_block_classes(self.clip))

    @classmethod
    def from_config(cls, cfg: ModelConfig, **overrides: Any) -> DualEncoder:
        """Builds the model ``cfg`` names; ``overrides`` update its open_clip config.

        With ``cfg.pretrained``, the model is built from the weights' config and starts from
        those weights (checked to fit: one error lists what does not).
        """
        source = None
        if cfg.pretrained is not None:
            source = _pretrained().load_pretrained(cfg.pretrained, cfg)
        model_cfg = {**(source.model_cfg if source else cfg.resolve()), **overrides}
        if cfg.patch_dropout:
            model_cfg["vision_cfg"] = {
                **model_cfg["vision_cfg"],
                "patch_dropout": cfg.patch_dropout,
            }
        preprocess = source.preprocess if source else cfg.preprocess
        model = cls(model_cfg, preprocess, load_hf_weights=source is None)
        if source is not None:
            _pretrained().load_into(model, source)
        if cfg.image_tower_weights is not None:
            model.load_image_tower_weights(cfg.image_tower_weights)
        if cfg.lock_image:
            model.clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups)
        if cfg.lock_text:
            model.lock_text_tower(cfg.lock_text_unlocked_layers)
        model.new_heads = _new_heads(model, cfg)
        if cfg.grad_checkpointing:
            model.clip.set_grad_checkpointing(True)
        return model

    # Parameters that start at random on top of pretrained weights (see new_head_params).
    new_heads: frozenset[str] = frozenset()

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freezes the text tower but its top ``unlocked_layers`` groups (open_clip's
        ``lock_text_tower``).

        Raises:
            ValueError: the image tower is frozen too: nothing but the temperature would train.
        """
        try:
            self.clip.lock_text_tower(unlocked_layers=unlocked_layers)
        except KeyError as e:  # open_clip 3.3 names the layers of some HF model types only
            raise ValueError(
                f"model.lock_text_unlocked_layers={unlocked_layers}: open_clip cannot find the "
                f"layers of this HF text tower (no {e} for its model type); use 0 (the encoder "
                "frozen whole, its projection trains)"
            ) from None
        towers = [
            p for n, p in self.clip.named_parameters() if n not in ("logit_scale", "logit_bias")
        ]
        if not any(p.requires_grad for p in towers):
            raise ValueError(
                "model.lock_image and model.lock_text freeze both towers whole: only the "
                "temperature would train; leave layers trainable with "
                "model.lock_image_unlocked_groups or model.lock_text_unlocked_layers, or lock "
                "one tower"
            )

    def new_head_params(self) -> set[str]:
        """Names of the new heads: parameters that start at random on top of pretrained
        weights, which ``optim.head_lr_scale`` speeds up. They are the projection of a timm
        image tower whose trunk comes from ``model.image_tower_weights``
        (``clip.visual.head.*``) and of an HF text tower (``clip.text.proj.*``). A model
        built at random has none (everything in it is new)."""
        return set(self.new_heads)

    def load_image_tower_weights(self, path: str) -> None:
        """Loads timm weights (safetensors) into the timm image tower; the head is not used."""
        trunk = self.clip.visual.trunk
        weights = load_safetensors(path, "model.image_tower_weights")
        missing, unexpected = trunk.load_state_dict(weights, strict=False)
        if missing:
            name = self.model_cfg["vision_cfg"]["timm_model_name"]
            raise ValueError(
                f"{path}: not weights of timm model {name}; missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        log.info("loaded image tower weights from %s (ignored: %s)", path, unexpected)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing config (size, mean, std, interpolation, resize_mode)."""
        cfg = dict(open_clip.get_model_preprocess_cfg(self.clip))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}

    def preprocess_config(self) -> PreprocessConfig:
        """The image input as plain numbers, for the training stream and the evaluators.

        Read from open_clip's own preprocessing config, with the choices open_clip's
        ``image_transform`` makes from it (see :func:`open_clip_preprocess_config`).
        """
        return open_clip_preprocess_config(self.preprocess_cfg)

    def image_transform(self, is_train: bool):
        """open_clip's train (random resized crop) or eval (resize + centre crop) transform."""
        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=is_train)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters the tower declares exempt from weight decay."""
        return {f"clip.{n}" for n in self.clip.no_weight_decay()}

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    # Inputs move to the model's device (a no-op in training), so evaluators can hand over
    # CPU batches without knowing where the model lives.
    def encode_image(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        image_BCHW = image_BCHW.to(self.device, non_blocking=True)
        return self.clip.encode_image(image_BCHW, normalize=True)  # img_emb_BD, unit norm

    def encode_text(self, text_BL: torch.Tensor) -> torch.Tensor:
        """Text embeddings; ``L`` may be shorter than the context (see :class:`Tokenize`)."""
        text_BL = text_BL.to(self.device, non_blocking=True)
        clip, length = self.clip, text_BL.shape[1]
        if not self.tokenize.trim or length == clip.positional_embedding.shape[0]:
            return clip.encode_text(text_BL, normalize=True)  # txt_emb_BD, unit norm
        # open_clip's CLIP.encode_text with positions and causal mask cut to L.
        cast_dtype = clip.transformer.get_cast_dtype()
        x_BLE = clip.token_embedding(text_BL).to(cast_dtype)
        x_BLE = x_BLE + clip.positional_embedding[:length].to(cast_dtype)
        x_BLE = clip.transformer(x_BLE, attn_mask=clip.attn_mask[:length, :length])
        x_BLE = clip.ln_final(x_BLE)
        eos_id = getattr(clip, "text_eos_id", None)
        x_BE = text_global_pool(x_BLE, text_BL, clip.text_pool_type, eos_token_id=eos_id)
        if isinstance(clip.text_projection, nn.Linear):
            x_BD = clip.text_projection(x_BE)
        else:
            x_BD = x_BE @ clip.text_projection
        return F.normalize(x_BD, dim=-1)  # txt_emb_BD, unit norm

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """SigLIP's learnable bias; None for CLIP-style models."""
        return getattr(self.clip, "logit_bias", None)

    def forward(
        self, image_BCHW: torch.Tensor, text_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (img_emb_BD, txt_emb_BD, exp(logit_scale), logit_bias or None)."""
        img_emb_BD = self.encode_image(image_BCHW)
        txt_emb_BD = self.encode_text(text_BL)
        return img_emb_BD, txt_emb_BD, self.clip.logit_scale.exp(), self.logit_bias
