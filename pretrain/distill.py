"""Distillation from a teacher: the loss term, and where the teacher's features come from.

The student learns from the pairs (the contrastive loss) and from a teacher's view of the
batch: the teacher's image->text and text->image similarity distributions over the
(global) batch, which the student's distributions are pulled toward by a soft
cross-entropy, as in open_clip's ``DistillClipLoss`` and MobileCLIP's ensemble version
(their open_clip patch, ``DistillClipLoss.get_logits_ensemble``)::

    loss = (1 - w) * contrastive + w * distill

Teacher features reach the loss in the micro-batch dicts: ``teacher_image`` and
``teacher_text``, ``f32[B, sum(D_t)]``, each teacher's part L2-normalised, parts
concatenated in teacher order (:class:`TeacherSpec` gives the parts' widths and the
teachers' logit scales). A :class:`TeacherSource` puts them there before the student's
forward: :class:`OnlineTeacher` runs an export on each batch; stored features (reinforced
shards) arrive with the batches (:class:`StoredTeacher`).

Shape suffixes as in :mod:`clipline.pretrain.loss`, plus ``T`` the teachers' concatenated
width ``sum(D_t)``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from clipline.data.preprocess import PreprocessConfig
from clipline.pretrain.export import find_export, load_exported
from clipline.pretrain.loss import DistillConfig, LossConfig, gather_with_grad

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TeacherSpec:
    """What the teacher features in a batch are: one entry per teacher, in their order.

    Attributes:
        dims: Each teacher's embedding width; its features are that slice of the
            concatenated ``teacher_image`` / ``teacher_text`` columns.
        logit_scales: Each teacher's logit scale (exp of its learned temperature), which
            turns its cosine similarities into its logits.
    """

    dims: list[int]
    logit_scales: list[float]

    def __post_init__(self) -> None:
        self.dims, self.logit_scales = [int(d) for d in self.dims], list(self.logit_scales)
        if not self.dims or len(self.dims) != len(self.logit_scales):
            raise ValueError(
                f"a teacher spec needs one dim and one logit scale per teacher, got dims="
                f"{self.dims} and logit_scales={self.logit_scales}"
            )
        if min(self.dims) < 1 or min(self.logit_scales) <= 0:
            raise ValueError(f"teacher dims and logit scales must be > 0, got {self}")

    @property
    def width(self) -> int:
        """Columns of the concatenated teacher features, ``sum(dims)``."""
        return sum(self.dims)


class TeacherSource(Protocol):
    """Where teacher features come from; :class:`DistillLoss` asks it once per step."""

    spec: TeacherSpec | None  # known at the latest after the first complete()

    def complete(self, micro: list[dict[str, Any]], student: PreprocessConfig) -> None:
        """Puts ``teacher_image`` and ``teacher_text`` (``f32[B, T]`` on the batch's device,
        each teacher's part L2-normalised) into every micro-batch dict that lacks them.

        ``student`` describes the batch's ``image``: the student's size and normalisation.
        """


def teacher_probs(
    a_MT: torch.Tensor, b_NT: torch.Tensor, spec: TeacherSpec, temperature: float
) -> torch.Tensor:
    """The teachers' row distributions over ``b``, averaged after the softmax.

    ``softmax(scale_t * a_t @ b_t.T / temperature)`` per teacher ``t`` (its columns of the
    concatenated features), averaged over teachers: MobileCLIP's ``average_after_softmax``
    ensemble; with one teacher, open_clip's ``DistillClipLoss`` targets. ``[M, N]``.
    """
    bounds = list(itertools.accumulate(spec.dims, initial=0))
    probs_MN = sum(
        F.softmax(scale * a_MT[:, lo:hi] @ b_NT[:, lo:hi].T / temperature, dim=1)
        for scale, lo, hi in zip(spec.logit_scales, bounds[:-1], bounds[1:], strict=True)
    )
    return probs_MN / len(spec.dims)


def _soft_cross_entropy(target_MN: torch.Tensor, logits_MN: torch.Tensor) -> torch.Tensor:
    return -(target_MN * F.log_softmax(logits_MN, dim=1)).sum(dim=1).mean()


def distill_loss(
    img_emb_BD: torch.Tensor,
    txt_emb_BD: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_img_BT: torch.Tensor,
    teacher_txt_BT: torch.Tensor,
    spec: TeacherSpec,
    *,
    temperature: float = 1.0,
    local_loss: bool = False,
) -> torch.Tensor:
    """The distillation term on this rank's rows, in fp32.

    ``temperature**2 * (CE(p_i2t, q_i2t) + CE(p_t2i, q_t2i)) / 2``, where ``q`` is the
    student's softmax of ``logit_scale * cos / temperature`` over the global batch, ``p``
    the teachers' (:func:`teacher_probs`, the same temperature), and ``CE(p, q) = -sum p
    log q`` averaged over rows. With temperature 1 and one teacher this is open_clip's
    ``DistillClipLoss`` distillation term. The text->image distributions are computed as
    their own row softmaxes (MobileCLIP's multi-process path transposes the averaged
    image->text probabilities instead, which are then not distributions).

    The student's features are gathered from all ranks with gradients (as the contrastive
    loss gathers them), the teachers' without. ``local_loss``: only this rank's rows
    (``B x N``); averaged over ranks, the same value and gradients as the full square.
    """
    # fp32 whatever the autocast context, as the contrastive losses.
    with torch.autocast(device_type=img_emb_BD.device.type, enabled=False):
        img_BD, txt_BD, scale = img_emb_BD.float(), txt_emb_BD.float(), logit_scale.float()
        t_img_BT, t_txt_BT = teacher_img_BT.detach().float(), teacher_txt_BT.detach().float()
        all_img_ND, all_txt_ND = gather_with_grad(img_BD), gather_with_grad(txt_BD)
        all_t_img_NT, all_t_txt_NT = gather_with_grad(t_img_BT), gather_with_grad(t_txt_BT)
        if local_loss:  # rows for this rank's samples: [B, N]
            s_i2t = scale * img_BD @ all_txt_ND.T
            s_t2i = scale * txt_BD @ all_img_ND.T
            p_i2t = teacher_probs(t_img_BT, all_t_txt_NT, spec, temperature)
            p_t2i = teacher_probs(t_txt_BT, all_t_img_NT, spec, temperature)
        else:  # the full square on every rank: [N, N]
            s_i2t = scale * all_img_ND @ all_txt_ND.T
            s_t2i = s_i2t.T
            p_i2t = teacher_probs(all_t_img_NT, all_t_txt_NT, spec, temperature)
            p_t2i = teacher_probs(all_t_txt_NT, all_t_img_NT, spec, temperature)
        ce_i2t = _soft_cross_entropy(p_i2t, s_i2t / temperature)
        ce_t2i = _soft_cross_entropy(p_t2i, s_t2i / temperature)
        return temperature**2 * 0.5 * (ce_i2t + ce_t2i)


class DistillLoss(nn.Module):
    """``(1 - w) * contrastive + w * distill`` (:func:`distill_loss`), w = ``distill.weight``.

    Built by :func:`~clipline.pretrain.loss.build_loss` around the contrastive loss
    (InfoNCE or SigLIP) where ``loss.distill.weight`` > 0. The teacher is no submodule:
    it is never in the model's parameters, the optimizer, a checkpoint or a DDP/FSDP
    wrapper. After each call, :attr:`parts` holds the two terms (detached) for the metrics.
    """

    def __init__(
        self, contrastive: nn.Module, cfg: LossConfig, source: TeacherSource | None = None
    ):
        super().__init__()
        self.contrastive, self.cfg, self.local_loss = contrastive, cfg.distill, cfg.local_loss
        self.source = source if source is not None else teacher_source(cfg.distill)
        self.parts: dict[str, torch.Tensor] = {}

    def step_inputs(
        self, micro: list[dict[str, Any]], student: PreprocessConfig
    ) -> dict[str, torch.Tensor]:
        """The teacher features of a step's micro-batches, concatenated in their order (the
        order in which the loop concatenates the students' cached features)."""
        self.source.complete(micro, student)
        spec = self.source.spec
        assert spec is not None, "a teacher source knows its spec once it completed a batch"
        inputs = {k: torch.cat([b[k] for b in micro]) for k in ("teacher_image", "teacher_text")}
        for key, value in inputs.items():
            if value.ndim != 2 or value.shape[1] != spec.width:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}, but the teacher spec {spec} "
                    f"needs [batch, {spec.width}]; the reinforced shards and their metadata "
                    "disagree: write them again with clipline reinforce"
                )
        return inputs

    def forward(
        self, img_emb_BD, txt_emb_BD, logit_scale, logit_bias=None, *, teacher_image, teacher_text
    ) -> torch.Tensor:
        """The fp32 scalar loss.

        Args:
            img_emb_BD, txt_emb_BD, logit_scale, logit_bias: What the contrastive loss takes.
            teacher_image, teacher_text: ``f32[B, T]`` rows paired with the student's rows
                (:meth:`step_inputs`).
        """
        assert self.source.spec is not None, "step_inputs() comes first"
        contrastive = self.contrastive(img_emb_BD, txt_emb_BD, logit_scale, logit_bias)
        distill = distill_loss(
            img_emb_BD,
            txt_emb_BD,
            logit_scale,
            teacher_image,
            teacher_text,
            self.source.spec,
            temperature=self.cfg.temperature,
            local_loss=self.local_loss,
        )
        self.parts = {"loss_contrastive": contrastive.detach(), "loss_distill": distill.detach()}
        w = self.cfg.weight
        return (1 - w) * contrastive + w * distill


def step_inputs(
    loss_fn: nn.Module, micro: list[dict[str, Any]], student: Any
) -> dict[str, torch.Tensor]:
    """The extra loss inputs of one optimizer step: the teacher features where ``loss_fn``
    distils (``student``: the model, whose preprocessing the batch's images follow), else
    none."""
    if not isinstance(loss_fn, DistillLoss):
        return {}
    return loss_fn.step_inputs(micro, student.preprocess_config())


# ------------------------------------------------------------------------------ sources


def find_teacher(path: str) -> tuple[str, Path]:
    """``(format, folder)`` of the export ``loss.distill.teacher`` names.

    Raises:
        ValueError: the path is missing or not an export clipline reads (with the fix).
    """
    found = find_export(path)
    if found is None:
        what = "does not exist" if not Path(path).exists() else "is not an export clipline reads"
        raise ValueError(
            f"loss.distill.teacher={path!r} {what} (resolved: {Path(path).resolve()}); give "
            "the folder `clipline export` wrote for the teacher (clipline, open_clip, hf or "
            "onnx format), or unset loss.distill.teacher to use reinforced shards"
        )
    return found


def check_teacher(cfg: DistillConfig) -> None:
    """The start's check of an online teacher: its export is there and readable in kind.

    Raises:
        ValueError: as :func:`find_teacher`.
    """
    if cfg.weight > 0 and cfg.teacher is not None:
        find_teacher(cfg.teacher)


def teacher_source(cfg: DistillConfig) -> TeacherSource:
    """An :class:`OnlineTeacher` where ``cfg.teacher`` names an export, else a
    :class:`StoredTeacher` (the features come with the batches)."""
    if cfg.teacher is None:
        return StoredTeacher()
    return OnlineTeacher(cfg.teacher, precision=cfg.teacher_precision)


def _logit_scale(encoders: Any) -> float:
    """exp of the teacher's learned temperature (an ONNX export keeps it in its metadata)."""
    scale = getattr(encoders, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        return float(scale.detach().float().exp().reshape(()))
    return float(encoders.meta["logit_scale"])


class OnlineTeacher:
    """An export run on every batch: eval mode, frozen, no gradients, optionally bf16.

    The teacher sees the student's augmented view and the student's captions, through its
    own preprocessing: each caption is tokenised again with the teacher's tokenizer (the
    batch carries the caption strings), and the student's normalised crop is turned back
    into pixels, resized on the device to the teacher's size (its interpolation, with
    antialiasing) where the sizes differ, and normalised with the teacher's mean and std.
    Where size, mean and std are the student's, the teacher gets the student's tensor.
    Limit: the teacher sees the student's crop at the student's resolution, so a teacher
    with a larger input sees an upsampled crop, not the detail its own decode would give.

    Loaded on the CPU when built and moved to the batches' device on first use (an ONNX
    export stays on onnxruntime's CPU provider).
    """

    def __init__(self, path: str, *, precision: str = "fp32"):
        fmt, folder = find_teacher(path)
        try:
            self.encoders = load_exported(fmt, folder, "cpu")
        except ValueError:
            raise
        except Exception as exc:  # any reader's failure on a damaged export means the same
            raise ValueError(
                f"loss.distill.teacher={path!r}: the {fmt} export in {folder} could not be "
                f"read ({type(exc).__name__}: {exc}); export the teacher again"
            ) from exc
        if isinstance(self.encoders, nn.Module):
            self.encoders.eval().requires_grad_(False)
        self.preprocess = self.encoders.preprocess_config()
        self.spec: TeacherSpec | None = TeacherSpec(
            dims=[int(self.encoders.embed_dim)], logit_scales=[_logit_scale(self.encoders)]
        )
        self.bf16 = precision == "bf16"
        self.device = torch.device("cpu")
        log.info("online teacher %s (%s export): %s", path, fmt, self.spec)

    def pixels(self, image_BCHW: torch.Tensor, student: PreprocessConfig) -> torch.Tensor:
        """The student's normalised images as the teacher takes them."""
        t = self.preprocess
        if (student.size, student.mean, student.std) == (t.size, t.mean, t.std):
            return image_BCHW
        mean_s_C11, std_s_C11 = _stats(student, image_BCHW.device)
        x_BCHW = image_BCHW * std_s_C11 + mean_s_C11  # pixels on the 0..1 scale
        if student.size != t.size:
            x_BCHW = F.interpolate(
                x_BCHW, size=t.size, mode=t.interpolation, antialias=True, align_corners=False
            ).clamp_(0, 1)
        mean_t_C11, std_t_C11 = _stats(t, image_BCHW.device)
        return (x_BCHW - mean_t_C11) / std_t_C11

    @torch.no_grad()
    def complete(self, micro: list[dict[str, Any]], student: PreprocessConfig) -> None:
        device = micro[0]["image"].device
        if device != self.device and isinstance(self.encoders, nn.Module):
            self.encoders.to(device)
        self.device = device
        for batch in micro:
            image_BCHW = self.pixels(batch["image"], student)
            text_BL = self.encoders.tokenize(batch["caption"])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                img_BT = self.encoders.encode_image(image_BCHW).float().to(device)
                txt_BT = self.encoders.encode_text(text_BL).float().to(device)
            if self.bf16:  # unit norm again, in fp32
                img_BT, txt_BT = F.normalize(img_BT, dim=-1), F.normalize(txt_BT, dim=-1)
            batch["teacher_image"], batch["teacher_text"] = img_BT, txt_BT


def _stats(cfg: PreprocessConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A preprocessing config's mean and std as ``f32[3,1,1]`` on ``device``."""
    mean_C11 = torch.tensor(cfg.mean, dtype=torch.float32, device=device)[:, None, None]
    return mean_C11, torch.tensor(cfg.std, dtype=torch.float32, device=device)[:, None, None]


class StoredTeacher:
    """Teacher features that arrive with the batches (reinforced shards): nothing to run.

    The batches carry ``teacher_image`` and ``teacher_text``, and ``teacher_spec`` (a
    :class:`TeacherSpec` or its dict) unless the spec was given here.
    """

    def __init__(self, spec: TeacherSpec | None = None):
        self.spec = spec

    def complete(self, micro: list[dict[str, Any]], student: PreprocessConfig) -> None:
        for batch in micro:
            if "teacher_image" not in batch or "teacher_text" not in batch:
                raise ValueError(
                    "loss.distill.weight > 0 needs teacher features, and these batches have "
                    "none: set loss.distill.teacher=EXPORT_DIR (an online teacher) or train "
                    "on reinforced shards (clipline reinforce)"
                )
            spec = batch.get("teacher_spec")
            if spec is None:
                continue
            spec = spec if isinstance(spec, TeacherSpec) else TeacherSpec(**spec)
            if self.spec is not None and spec != self.spec:
                raise ValueError(
                    f"batches carry teacher features of two kinds ({self.spec} and {spec}): "
                    "train on shards reinforced with the same teachers"
                )
            self.spec = spec
        if self.spec is None:
            raise ValueError("the batches' teacher features come without a teacher_spec")
