"""Checkpoints: ``run_dir/checkpoints/step_000123/`` written atomically.

Layout of one checkpoint:
  model.safetensors   the DualEncoder's full (unsharded) weights
  optimizer.pt        full optimizer state keyed by parameter name (torch.distributed's
                      full state dict: the same file under DDP, FSDP or one process;
                      tensors and plain types, loaded with weights_only=True)
  state.json          step, epoch and counters of the loop; "stream": each rank's stream
                      position (epoch, per-worker list positions; data.loader.TrainLoader)
  config.json         the resolved run config
  ema.safetensors     the EMA of the weights (pretrain/ema.py), when loop.ema_decay > 0

A checkpoint is assembled in ``step_N.tmp`` and renamed into place, so a process killed
while saving never leaves a directory that ``resume="latest"`` would pick.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from clipline.pretrain.safe_load import load_safetensors, load_weights_only

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model and optimizer state on CPU, gathered from any wrapping (DDP, FSDP2, compile).

    A collective under FSDP: call it on every rank. Rank 0 gets the states; under FSDP the
    other ranks get empty dicts.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Writes checkpoint ``step`` (call on the main process only) and prunes old ones.

    ``model_state`` and ``optimizer_state`` come from :func:`full_state_dicts`;
    ``extra_weights`` are more full state dicts, each saved as ``<name>.safetensors``.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    for stale in root.glob("*.tmp"):  # left by a process killed while saving
        shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
    for name, tensors in (extra_weights or {}).items():
        save_file(
            tensors, tmp / f"{name}.safetensors", metadata={"format": "pt", "step": str(step)}
        )
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in tmp.iterdir():  # the rename is only atomic for data already on disk
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    log.info("saved checkpoint %s", final)
    return final


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """Maps ``resume`` (None, ``latest``, or a checkpoint path) to a checkpoint directory.

    Raises:
        ValueError: an explicit path that is not a checkpoint directory.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "model.safetensors").is_file():
        raise ValueError(
            f"resume={resume!r} is not a checkpoint directory (no model.safetensors); "
            f"pass 'latest' or one of {[str(p) for p in list_checkpoints(run_dir)]}"
        )
    return path


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Loads ``model.safetensors`` into an unwrapped model (strict)."""
    model.load_state_dict(load_safetensors(ckpt / "model.safetensors", "checkpoint"), strict=True)


def load_checkpoint(ckpt: Path, *, model: nn.Module) -> dict[str, Any]:
    """Restores the (unwrapped) model's weights in place; returns the saved loop state."""
    load_weights(model, ckpt)
    return json.loads((ckpt / "state.json").read_text())


def load_optimizer_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restores the optimizer of a wrapped model (DDP, FSDP2 or none); on every rank."""
    saved = load_weights_only(ckpt / "optimizer.pt", "optimizer state", map_location="cpu")
    set_optimizer_state_dict(
        model, optimizer, saved, options=StateDictOptions(full_state_dict=True)
    )


def read_config(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "config.json").read_text())


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint directory (``step_N``) that :func:`list_checkpoints` listed."""
    match = _STEP_DIR.match(ckpt.name)
    assert match is not None, f"{ckpt} is not a step_N checkpoint directory"
    return int(match.group(1))


def read_step(ckpt: Path) -> int:
    """The training step a checkpoint was saved at."""
    return json.loads((ckpt / "state.json").read_text())["step"]


def model_files(ckpt: Path) -> list[Path]:
    """The files a checkpoint's model is read from: its weights and its run config."""
    return [ckpt / "model.safetensors", ckpt / "config.json"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's latest checkpoint.

    Raises:
        ValueError: the path is neither, or the run has no complete checkpoint yet.
    """
    path = Path(path)
    if checkpoint_dir(path).is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ValueError(f"run directory {path} has no complete checkpoint yet")
        path = found[-1]
    if not (path / "model.safetensors").is_file():
        raise ValueError(
            f"{path} is neither an export (clipline_export.json, open_clip_config.json, a "
            "transformers CLIP config.json or onnx_export.json, or the folder `clipline export "
            "--format all` wrote), a checkpoint (model.safetensors) nor a run directory "
            "(checkpoints/)"
        )
    return path
