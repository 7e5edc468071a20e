"""Exports: one dispatcher over every format clipline writes and reads.

Each format lives in the module that writes and reads it and registers itself in
:data:`~clipline.pretrain.export_base.EXPORT_FORMATS`: ``export_clipline`` (clipline's own:
per-tower safetensors and one JSON), ``export_open_clip`` (open_clip's ``local-dir:`` / hub
layout), ``export_hf`` (transformers ``CLIPModel`` with its processor and tokenizer) and
``export_onnx`` (one graph per tower). They are imported here, once, to register them; the
libraries of the transformers and ONNX formats (the ``export`` extra) are imported only when
one of those formats is written or read, so a clipline export never needs them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Imported once, here, to register their formats, in the order ``--format all`` writes them
# and folders are recognised (clipline's own first).
# isort: off
from clipline.pretrain import export_clipline  # noqa: F401
from clipline.pretrain import export_open_clip  # noqa: F401
from clipline.pretrain import export_hf  # noqa: F401
from clipline.pretrain import export_onnx  # noqa: F401

# isort: on
from clipline.pretrain.export_base import EXPORT_FORMATS, UnsupportedModel
from clipline.pretrain.model import DualEncoder

log = logging.getLogger(__name__)


def list_export_formats() -> list[str]:
    """Every format ``clipline export --format`` writes (``all`` writes each into
    ``OUT/<format>/``), clipline's own first."""
    return EXPORT_FORMATS.names()


def export(
    model: DualEncoder,
    out_dir: str | Path,
    *,
    format: str = "clipline",
    run_config: dict[str, Any],
    step: int | None = None,
    name: str | None = None,
) -> dict[str, Path]:
    """Writes ``model`` in one format, or in every format with ``format="all"``.

    ``all`` writes each format into its own subfolder, ``OUT/<format>/``: each folder is then
    a complete artefact on its own (one open_clip hub repo, one transformers model folder),
    with no second copy of the weights that an upload of the folder would carry along. A
    format that cannot express the model (e.g. transformers' ``CLIPModel`` for a timm image
    tower) is skipped with a warning under ``all``, and is an error when asked for alone.

    Every format but clipline's own is reloaded after writing and compared with ``model``
    on a few images and captions, so that an export that loads but computes something else
    fails here rather than in a user's evaluation.

    Args:
        model: The dual encoder (unwrapped; not DDP or compiled).
        out_dir: Output folder (created if needed).
        format: One of :func:`list_export_formats`, or ``"all"``.
        run_config: The resolved run config, saved with clipline's format.
        step: The training step of the weights, saved with clipline's format.
        name: The open_clip model-config name of the open_clip format (default: the name
            of ``out_dir``).

    Returns:
        ``{format: folder written}``.

    Raises:
        ValueError: An unknown format (with the close matches), a format whose library is
            not installed, or (:class:`~clipline.pretrain.export_base.UnsupportedModel`) a
            single format that cannot express the model.
    """
    out = Path(out_dir)
    if format != "all":
        EXPORT_FORMATS.get(format)  # an unknown name fails here, listing the valid ones
    if name is not None and format not in ("open_clip", "all"):
        log.warning("name=%r is only used by the open_clip format; ignored", name)
    name = name or out.resolve().name
    targets = {f: out / f for f in list_export_formats()} if format == "all" else {format: out}
    written = {}
    with _eval_mode(model):
        for fmt, path in targets.items():
            entry = EXPORT_FORMATS.get(fmt)
            try:
                _require(entry.requires)
                written[fmt] = entry.write(model, path, run_config=run_config, step=step, name=name)
            except ModuleNotFoundError as exc:
                raise ValueError(
                    f"the {fmt} format needs {exc.name!r}, which is not installed; "
                    "pip install 'clipline[export]'"
                ) from exc
            except UnsupportedModel as exc:
                if format != "all":
                    raise
                log.warning("skipped the %s format: %s", fmt, exc)
    return written


def _require(modules: tuple[str, ...]) -> None:
    """Imports ``modules``: a missing one raises ModuleNotFoundError before anything runs."""
    for module in modules:
        importlib.import_module(module)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Exports see the inference graph (no patch dropout); the caller's mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def find_export(path: str | Path) -> tuple[str, Path] | None:
    """``(format, folder)`` of an export folder of any format clipline writes, or of the root
    that ``clipline export --format all`` wrote (its first format in
    :func:`list_export_formats` order); ``None`` for anything else (a checkpoint or run
    directory, a missing path)."""
    path = Path(path)
    for fmt in list_export_formats():
        if EXPORT_FORMATS.get(fmt).holds(path):
            return fmt, path
    for fmt in list_export_formats():  # the --format all root
        if (path / fmt).is_dir() and find_export(path / fmt) == (fmt, path / fmt):
            return fmt, path / fmt
    return None


def load_exported(fmt: str, folder: Path, device: str | torch.device = "cpu") -> Any:
    """The encoders of an export folder found by :func:`find_export`.

    clipline, open_clip and hf exports load as the :class:`DualEncoder` that was exported
    (identical embeddings); an ONNX export as :class:`~clipline.pretrain.export_onnx.OnnxEncoders`
    (onnxruntime, CPU unless ``device`` is a CUDA device), which embeds but does not train.

    Raises:
        ValueError: The format's library is not installed (naming the pip extra).
    """
    entry = EXPORT_FORMATS.get(fmt)
    try:
        _require(entry.requires)
        return entry.read(folder, device)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"{folder} is a {fmt} export, whose reader needs {exc.name!r}, which is not "
            "installed; pip install 'clipline[export]', or use the export's clipline format"
        ) from exc


def export_files(fmt: str, folder: Path) -> list[Path]:
    """The files an export's weights, configuration and preprocessing are read from."""
    return [folder / name for name in EXPORT_FORMATS.get(fmt).files]
