"""Wiring of ``clipline embed`` and ``clipline search``: the model a path names, located and
loaded by pretrain's readers, handed to eval's embedder and searcher
(:mod:`clipline.eval.embed`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from clipline.eval.embed import ModelSource
from clipline.launch.run import load_encoders
from clipline.pretrain.checkpoint import model_files, resolve_checkpoint
from clipline.pretrain.export import export_files, find_export


def model_source(path: str | Path) -> ModelSource:
    """The model at ``path``: an export of any format (or a ``--format all`` root), a
    checkpoint or a run directory (its latest checkpoint).

    Raises:
        ValueError: The path is none of these.
    """
    found = find_export(path)
    if found is not None:
        folder, files = found[1], export_files(*found)
    else:
        folder = resolve_checkpoint(path)
        files = model_files(folder)
    return ModelSource(folder=folder, files=files, load=partial(load_encoders, path))
