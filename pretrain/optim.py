"""AdamW with CLIP's weight-decay exemptions, and the learning-rate schedule.

The schedule is a pure function of the global step: resuming at step N gives the same
learning rate as never having stopped, with no scheduler state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and schedule settings (open_clip's defaults for ViT training).

    Attributes:
        lr: Peak learning rate, reached after ``warmup_steps``.
        min_lr: Floor of the cosine decay.
        weight_decay: Decoupled weight decay on tensors with ndim >= 2 only.
        betas: Adam betas; (0.9, 0.98) is CLIP's choice for ViTs.
        eps: Adam epsilon.
        warmup_steps: Linear warmup from 0 to ``lr``.
        schedule: ``cosine`` decays to ``min_lr`` at the last step; ``constant`` holds
            ``lr``; ``constant_cooldown`` holds ``lr``, then decays linearly to ``min_lr``
            over the last ``cooldown_steps`` (open_clip's ``const-cooldown``).
        cooldown_steps: Length of the final decay of ``constant_cooldown``.
        grad_clip_norm: Max global gradient norm; 0 disables clipping (the norm is still
            computed and logged, and a non-finite norm still skips the step).
    """

    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "constant_cooldown"] = "cosine"
    cooldown_steps: int = 0
    grad_clip_norm: float = 1.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into decayed and non-decayed groups.

    Decided per tensor, never by name substrings: biases, norms and the logit scale
    (ndim < 2) and whatever the model's ``no_weight_decay()`` declares (e.g. positional
    embeddings) get no decay.
    """
    declared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in declared else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`, with torch's fused kernel.

    Fused on CPU and CUDA alike: one kernel over all tensors instead of a Python loop over
    them (measured on CPU for the 20 M-parameter tiny-224: 6 ms per step instead of 48).
    The device is only known at step time (``accelerator.prepare`` moves the model later).
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=True,
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for the optimizer step numbered ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "constant_cooldown":
        cooldown_start = total_steps - cfg.cooldown_steps
        if step < cooldown_start:
            return cfg.lr
        progress = (step - cooldown_start) / max(1, cfg.cooldown_steps)
        return cfg.lr - (cfg.lr - cfg.min_lr) * min(1.0, progress)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
