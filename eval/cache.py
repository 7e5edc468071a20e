"""Embeddings cached on disk, keyed by the model's weights and the data's bytes.

A key is the SHA-256 of: the model's fingerprint (its weights, or an id the caller vouches
for), the fingerprint of the files that define the data, and whatever else changes the
embeddings (preprocessing, split, ...). Any change to either gives a new key, so a stale
file is never read; old files are left for the user to delete. Files are safetensors
(no pickle), written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)


def model_fingerprint(encoders: Any) -> str:
    """SHA-256 of a ``torch.nn.Module``'s state dict (names, dtypes, shapes and bytes).

    Raises:
        ValueError: If ``encoders`` is not a module; pass ``model_id=`` instead.
    """
    if not isinstance(encoders, torch.nn.Module):
        raise ValueError(
            f"cannot fingerprint the weights of a {type(encoders).__name__} (not a "
            "torch.nn.Module) for the embedding cache; pass model_id= naming the model"
        )
    digest = hashlib.sha256()
    for name, tensor in sorted(encoders.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the contents of ``paths``, in order (names do not count, bytes do).

    Each file's hash is remembered per (path, size, mtime), so re-evaluating unchanged data
    in the same process does not read it twice.
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(_file_sha256(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


@lru_cache(maxsize=65536)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # only part of the memo key
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """SHA-256 of JSON-encodable key parts (order of the keyword arguments does not count)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def describe(obj: Any) -> str:
    """A stable description of a preprocessing or tokenizer callable for cache keys.

    ``repr`` of torchvision transforms lists their settings; a repr with a memory address
    says nothing stable, so only the type name is kept then.
    """
    text = repr(obj)
    return type(obj).__qualname__ if " at 0x" in text else text


class EmbeddingCache:
    """A folder of ``<key>.safetensors`` files, each a dict of tensors."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the tensors of ``key`` live."""
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, Tensor] | None:
        """The tensors saved under ``key``, or ``None`` when there are none."""
        path = self.path(key)
        if not path.is_file():
            return None
        log.info("embedding cache hit: %s", path)
        return load_file(path)

    def save(self, key: str, tensors: dict[str, Tensor], meta: dict[str, str] | None = None):
        """Saves ``tensors`` under ``key`` atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        log.info("embedding cache saved: %s", path)


class PixelCache:
    """One rank's preprocessed images of an eval set, kept on disk as uint8 pixels.

    A run is scored again and again on the same eval sets (every ``eval_every`` steps in
    training, every checkpoint with ``clipline eval --run``), and the decoded, resized,
    cropped pixels (:func:`~clipline.data.preprocess.eval_pixels`' output) are the same
    each time: keeping them makes every evaluation after the first read them back instead
    of decoding again. Costs ``N x 3 x H x W`` bytes of disk (150 KB per 224-px image:
    7.5 GB for ImageNet's 50,000 validation images).

    Files, under a key of the data, the transform, the Pillow version and the part:
    ``<key>.u8`` (the raw ``[N,3,H,W]`` array, read back through ``numpy.memmap``) and
    ``<key>.json`` (shape, the set indexes of the rows, their targets). Both are written
    under temporary names and renamed, the JSON last: a reader sees both or neither.
    """

    def __init__(self, root: str | Path, key: str):
        self.root, self.key = Path(root), key
        self.data_path = self.root / f"{key}.u8"
        self.meta_path = self.root / f"{key}.json"

    def load(self) -> tuple[np.ndarray, list[int], list[Any]] | None:
        """``(pixels_NCHW memmap, index, targets)``, or None when not cached (or damaged)."""
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            shape = tuple(meta["shape"])
            pixels = np.memmap(self.data_path, dtype=np.uint8, mode="c", shape=shape)
        except (OSError, ValueError, KeyError) as exc:
            log.warning(
                "pixel cache %s unreadable (%s); decoding the images again", self.meta_path, exc
            )
            return None
        log.info("pixel cache hit: %s (%d images)", self.data_path, shape[0])
        return pixels, meta["index"], meta["targets"]

    def writer(self) -> PixelWriter:
        """A writer that fills the cache batch by batch and commits it on ``close()``."""
        self.root.mkdir(parents=True, exist_ok=True)
        return PixelWriter(self)


class PixelWriter:
    """Appends uint8 batches to a temporary file; :meth:`commit` renames it into place."""

    def __init__(self, cache: PixelCache):
        self.cache = cache
        self.tmp = cache.data_path.with_name(f".{cache.data_path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in commit/abort)
        self.index: list[int] = []
        self.targets: list[Any] = []
        self.item_shape: tuple[int, ...] | None = None

    def append(self, index: list[int], pixels_BCHW: Tensor, targets: list[Any]) -> None:
        """One batch: its set indexes, its ``u8[B,3,H,W]`` pixels, its targets."""
        shape = tuple(pixels_BCHW.shape[1:])
        if self.item_shape not in (None, shape):
            raise ValueError(f"pixel cache rows {self.item_shape} and {shape} differ")
        self.item_shape = shape
        self.file.write(pixels_BCHW.contiguous().numpy().tobytes())
        self.index += [int(i) for i in index]
        self.targets += list(targets)

    def commit(self) -> None:
        """Puts the files in place (the data first, then the JSON that marks them whole)."""
        self.file.close()
        cache = self.cache
        os.replace(self.tmp, cache.data_path)
        meta = {"shape": [len(self.index), *(self.item_shape or ())], "index": self.index,
                "targets": self.targets}  # fmt: skip
        tmp_meta = cache.meta_path.with_name(f".{cache.meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, cache.meta_path)
        size_gb = cache.data_path.stat().st_size / 1e9
        log.info(
            "pixel cache saved: %s (%d images, %.2f GB)", cache.data_path, len(self.index), size_gb
        )

    def abort(self) -> None:
        """Drops the partial file."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)
