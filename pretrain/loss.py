"""Symmetric InfoNCE with cross-rank negatives.

The loss works on features only, always in fp32. Negatives from other ranks arrive through
:func:`gather_with_grad`, whose backward sends each rank the sum over ranks of the gradient
of every rank's loss with respect to its own features (Accelerate's ``gather`` is a plain
collective and would silently cut those gradients). Averaged by DDP, that is exactly the
gradient of the mean loss over the global batch.

Shape suffixes: ``B`` this rank's batch, ``W`` the world size (ranks), ``N = W * B`` the
global batch, ``D`` the embedding dimension. ``x_ND`` is every rank's ``x_BD`` stacked in
rank order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipline.data.hints import check_choices
from clipline.data.registry import Registry

log = logging.getLogger(__name__)

# Loss name (``loss.kind``) -> its module class, called with the LossConfig. A class may set
# ``model_overrides``: open_clip model-config keys the loss needs (SigLIP: a logit bias).
LOSSES: Registry[type[torch.nn.Module]] = Registry("loss", key="loss.kind")


@dataclass(kw_only=True)
class DistillConfig:
    """Distillation from a teacher (``[loss.distill]``; :mod:`clipline.pretrain.distill`).

    The loss becomes ``(1 - weight) * contrastive + weight * distill``, where ``distill``
    pulls the student's image->text and text->image similarity distributions toward the
    teacher's (see :class:`~clipline.pretrain.distill.DistillLoss`).

    Attributes:
        weight: Share of the distillation term, in [0, 1]; 0 (the default) is off: the
            plain contrastive loss, no teacher.
        temperature: Softens both distributions (student and teacher logits divided by it)
            and scales the term by its square, as in Hinton et al.'s knowledge distillation;
            1 is open_clip's ``DistillClipLoss``.
        teacher: An export directory (any format clipline reads, or a ``--format all``
            root) run as an online teacher on every batch; unset: the teacher features
            come with the batches (reinforced shards).
        teacher_precision: ``fp32``, or ``bf16`` autocast for the teacher's forward (about
            half its cost on GPUs; its features are L2-normalised again in fp32).
    """

    weight: float = 0.0
    temperature: float = 1.0
    teacher: str | None = None
    teacher_precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        check_choices(self, "loss.distill")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(
                f"loss.distill.weight must be in [0, 1] (0: off; e.g. 0.5), got {self.weight}"
            )
        if self.temperature <= 0:
            raise ValueError(f"loss.distill.temperature must be > 0, got {self.temperature}")
        if self.weight == 0 and self.teacher is not None:
            log.warning(
                "loss.distill.teacher=%r is ignored: loss.distill.weight is 0 (set it, e.g. "
                "to 0.5, to distill)",
                self.teacher,
            )


@dataclass(kw_only=True)
class LossConfig:
    """Contrastive loss settings.

    Attributes:
        kind: ``infonce`` (CLIP's softmax loss) or ``siglip`` (SigLIP's pairwise sigmoid
            loss; the model then gets a learnable logit bias, initialised to -10, and its
            temperature starts at ln 10, as in the SigLIP paper); any name in
            :func:`list_losses`.
        local_loss: Compute only this rank's rows of the global logit matrix (B x W*B per
            rank, memory linear in the global batch) instead of the full square on every
            rank. Same loss value after averaging over ranks, same gradients.
        distill: Distillation from a teacher; off unless ``distill.weight`` > 0.
    """

    kind: str = "infonce"
    local_loss: bool = False
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        LOSSES.get(self.kind)  # an unknown name fails with the valid ones, before training


def list_losses() -> list[str]:
    """The names ``loss.kind`` takes."""
    return LOSSES.names()


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward, reduce_scatter (sum) backward; both synchronous.

    Written out because ``torch.distributed.nn.functional.all_gather`` is deprecated and the
    functional collectives return asynchronous tensors; plain synchronous collectives keep
    the order of operations obvious.
    """

    @staticmethod
    def forward(ctx, x_BD: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out_ND = x_BD.new_empty((world * x_BD.shape[0], *x_BD.shape[1:]))
        dist.all_gather_single(out_ND, x_BD.contiguous())
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        grad_BD = grad_ND.new_empty((grad_ND.shape[0] // world, *grad_ND.shape[1:]))
        dist.reduce_scatter_single(grad_BD, grad_ND.contiguous(), op=dist.ReduceOp.SUM)
        return grad_BD


def gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``x`` along dim 0 (rank order), keeping gradients to all."""
    _, world = world_info()
    if world == 1:
        return x_BD
    return _GatherWithGrad.apply(x_BD)  # x_ND


@LOSSES.register("infonce")
class InfoNCELoss(torch.nn.Module):
    """CLIP's symmetric cross-entropy over image-text similarities."""

    model_overrides: ClassVar[dict[str, float]] = {}

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        img_emb_BD: torch.Tensor,
        txt_emb_BD: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean of image->text and text->image cross-entropy on this rank's rows.

        Args:
            img_emb_BD: L2-normalised image embeddings of this rank's batch.
            txt_emb_BD: L2-normalised text embeddings, row i paired with image i.
            logit_scale: exp of the learnable log temperature (a scalar).
            logit_bias: must be None: CLIP's softmax loss has no bias.

        Returns:
            The fp32 scalar loss. Averaged over ranks, it equals the loss of one process on
            the concatenated global batch.
        """
        assert logit_bias is None, "a logit bias belongs to the siglip loss"
        # fp32 whatever the autocast context: a bf16 softmax over thousands of logits is lossy.
        with torch.autocast(device_type=img_emb_BD.device.type, enabled=False):
            img_BD, txt_BD, scale = img_emb_BD.float(), txt_emb_BD.float(), logit_scale.float()
            rank, world = world_info()
            batch = img_BD.shape[0]
            all_img_ND = gather_with_grad(img_BD)  # N = world * B
            all_txt_ND = gather_with_grad(txt_BD)
            # The logits' shape depends on the branch, so it is in the comments, not the names.
            if self.cfg.local_loss:
                # Rows for local samples only; their positives sit at offset rank * B.
                logits_i2t = scale * img_BD @ all_txt_ND.T  # [B, N]
                logits_t2i = scale * txt_BD @ all_img_ND.T  # [B, N]
                labels = torch.arange(batch, device=img_BD.device) + rank * batch  # [B]
            else:
                logits_i2t = scale * all_img_ND @ all_txt_ND.T  # [N, N]: the full square
                logits_t2i = logits_i2t.T  # [N, N]
                labels = torch.arange(all_img_ND.shape[0], device=img_BD.device)  # [N]
            return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


@LOSSES.register("siglip")
class SigLipLoss(torch.nn.Module):
    """SigLIP's sigmoid loss: every image-text pair is an independent binary decision.

    Each rank scores its images against the texts of all ranks (gathered with gradients),
    normalised by its own image count, as open_clip's ``SigLipLoss`` does with its ring
    exchange; averaged over ranks it equals the loss of one process on the global batch.
    """

    model_overrides: ClassVar[dict[str, float]] = {
        "init_logit_bias": -10.0,
        "init_logit_scale": math.log(10.0),
    }

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()  # nothing to configure: every pair is scored, locally or not

    def forward(
        self,
        img_emb_BD: torch.Tensor,
        txt_emb_BD: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert logit_bias is not None, "the siglip loss needs the model's logit bias"
        with torch.autocast(device_type=img_emb_BD.device.type, enabled=False):
            img_BD, txt_BD = img_emb_BD.float(), txt_emb_BD.float()
            rank, _ = world_info()
            batch = img_BD.shape[0]
            all_txt_ND = gather_with_grad(txt_BD)
            logits_BN = logit_scale.float() * img_BD @ all_txt_ND.T + logit_bias.float()
            labels_BN = -torch.ones_like(logits_BN)  # +1 on this rank's positive pairs only
            rows_B = torch.arange(batch, device=img_BD.device)
            labels_BN[rows_B, rows_B + rank * batch] = 1.0
            return -F.logsigmoid(labels_BN * logits_BN).sum() / batch


def build_loss(cfg: LossConfig) -> torch.nn.Module:
    """The loss module ``cfg.kind`` names, inside a
    :class:`~clipline.pretrain.distill.DistillLoss` where ``cfg.distill.weight`` > 0."""
    loss = LOSSES.get(cfg.kind)(cfg)
    if cfg.distill.weight == 0:
        return loss
    from clipline.pretrain.distill import DistillLoss  # it imports this module

    return DistillLoss(loss, cfg)


def model_overrides(cfg: LossConfig) -> dict[str, float]:
    """open_clip model-config keys the loss needs (SigLIP: a bias and its initial scale)."""
    return dict(getattr(LOSSES.get(cfg.kind), "model_overrides", {}))
