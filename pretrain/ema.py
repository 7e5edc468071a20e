"""An exponential moving average of the weights: timm's ``ModelEmaV3``, wired to the loop.

The average is timm's own (``timm.utils.ModelEmaV3``: parameters and buffers, foreach lerp,
decay warmup), not a re-implementation. What clipline adds is where it lives:

* it is built from the unwrapped model after ``accelerator.prepare`` (the same device),
  and updated after every optimizer step with the 1-based step just taken, so the decay
  warmup is a pure function of the step and a resumed run continues it exactly;
* it is part of the sharded checkpoint (the ``ema`` part, beside ``model`` and ``optim``),
  saved and restored by ``pretrain.periodic.Checkpointer``;
* it is evaluated beside the raw weights (``eval_ema/<task>/<metric>``) and exported with
  ``clipline export --weights ema`` (:func:`load_ema_weights`).

Under DDP every rank holds the same average (every rank applies the same update to the
same weights). FSDP2 shards the parameters as
DTensors; ``ModelEmaV3`` deep-copies the module and lerps its ``state_dict`` tensors
pairwise, which would copy FSDP's hooks and mix sharded and plain tensors, so FSDP2 runs
are refused with a :class:`ValueError` (:func:`build_ema`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from accelerate.utils import DistributedType
from timm.utils import ModelEmaV3
from torch import nn

from clipline.pretrain.checkpoint import consolidated_state, saved_parts

if TYPE_CHECKING:  # loop.py imports this module
    from clipline.pretrain.loop import LoopConfig

log = logging.getLogger(__name__)


def build_ema(
    loop_cfg: LoopConfig,
    model: nn.Module,
    accelerator: Accelerator,
) -> ModelEmaV3 | None:
    """The run's EMA (None when ``loop.ema_decay`` is 0); a resumed run's is restored by
    ``Checkpointer.wrap``.

    Args:
        loop_cfg: ``ema_decay`` and its warmup (timm's ``use_warmup``, ``warmup_gamma``,
            ``warmup_power``: decay ``1 - (1 + step / gamma) ** -power`` capped at
            ``ema_decay``, instead of ``ema_decay`` from the second step on).
        model: The unwrapped model, after ``accelerator.prepare`` (and the checkpoint load).
        accelerator: Its distributed type decides whether an EMA can be kept.

    Raises:
        ValueError: an FSDP2 run (sharded parameters), with the settings that work.
    """
    decay = loop_cfg.ema_decay
    if decay == 0:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            f"loop.ema_decay={decay} is not supported under FSDP2 (sharded DTensor parameters: "
            "timm's ModelEmaV3 averages a full copy of the module); set loop.ema_decay=0, or "
            "train with DDP (launch/accelerate/ddp.yaml) or on one process to keep an EMA"
        )
    ema = ModelEmaV3(
        model,
        decay=decay,
        use_warmup=loop_cfg.ema_warmup,
        warmup_gamma=loop_cfg.ema_warmup_gamma,
        warmup_power=loop_cfg.ema_warmup_power,
    )
    ema.requires_grad_(False)
    return ema  # a resumed run's average is restored with the checkpoint (Checkpointer.wrap)


def load_ema_weights(model: nn.Module, ckpt: Path) -> None:
    """Loads a checkpoint's EMA weights into an unwrapped model (``--weights ema``).

    Raises:
        ValueError: the checkpoint holds no EMA, with the fix.
    """
    if "ema" not in saved_parts(ckpt):
        raise ValueError(
            f"--weights ema: checkpoint {ckpt} has no EMA (it was trained with "
            "loop.ema_decay=0); export its raw weights (--weights raw), or train with "
            "loop.ema_decay=0.999 (for example)"
        )
    model.load_state_dict(consolidated_state(ckpt, "ema"), strict=True)
