"""``clipline embed`` and ``clipline search``: a folder of images or a file of texts -> a faiss
index, and top-k queries against it by text or by image.

An index directory holds:
  embeddings.npy   float32 [N, D], L2-normalised (row i is item ids[i])
  ids.json         image paths relative to the folder, or the text lines
  index.faiss      faiss.IndexFlatIP over the embeddings: inner product = cosine similarity
  meta.json        kind (image/text), count, dim, the source, the model (path, content hash)
                   and the inputs that were skipped, with the reason

Items are embedded with the model's own eval preprocessing and tokenizer, through the same
``encode_image``/``encode_text`` (re-normalised in float32) as evaluation, so a search score is
exactly the cosine similarity clipline's evaluators compute. Embeddings from another model live
in another space, so ``search`` refuses an index built with different weights.

Evaluation knows no model formats: the wiring (``clipline.launch.embed``) hands over the model
as a :class:`ModelSource` (its folder, the files that identify it, and how to load it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import PIL.Image
import torch

from clipline.eval.embedding import embed_all_texts, embed_indexed_images
from clipline.eval.encoders import embed_images, embed_texts
from clipline.eval.search import as_float32, index_search

log = logging.getLogger(__name__)

FORMAT = "clipline-embeddings"
VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What PIL raises on a file that is not a decodable image (UnidentifiedImageError and
# truncated data are OSErrors; some broken headers raise SyntaxError or ValueError).
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(kw_only=True)
class ModelSource:
    """The model that embeds, as embed and search see it (given by the wiring).

    Attributes:
        folder: The model's folder (an export, or a checkpoint), recorded in the index.
        files: The files its weights, configuration and preprocessing are read from: their
            content identifies the model, so that search refuses another model's index.
        load: ``device -> encoders`` with ``image_transform``, ``tokenize`` and ``embed_dim``.
    """

    folder: Path
    files: list[Path]
    load: Callable[[str], Any]


@dataclass(kw_only=True)
class EmbedConfig:
    """What ``clipline embed`` embeds into which directory.

    Attributes:
        output_dir: The index directory to write; one that already holds an index is
            refused unless ``overwrite``.
        images: A folder, searched recursively for image files; exclusive with ``texts``.
        texts: A UTF-8 file with one text a line (blank lines are skipped).
        batch_size: Items per forward pass.
        workers: Image-decoding worker processes (0: decode in the main process).
        device: Where the model runs.
        overwrite: Replace the index already in ``output_dir``.
    """

    output_dir: str
    images: str | None = None
    texts: str | None = None
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if (self.images is None) == (self.texts is None):
            raise ValueError("give exactly one of --images FOLDER or --texts FILE")
        if self.images is not None and not Path(self.images).is_dir():
            raise ValueError(f"--images {self.images}: not a folder")
        if self.texts is not None and not Path(self.texts).is_file():
            raise ValueError(f"--texts {self.texts}: not a file (one text a line)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; it must be at least 1")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}; use 0 (main process) or more")


@dataclass(kw_only=True)
class EmbedReport:
    """What ``embed`` wrote: ``count`` items of ``dim`` floats, and what it skipped."""

    output_dir: Path
    kind: Literal["image", "text"]
    count: int
    dim: int
    skipped: list[dict[str, str]] = field(default_factory=list)


def embed(cfg: EmbedConfig, embedder: ModelSource) -> EmbedReport:
    """Embeds ``cfg.images`` or ``cfg.texts`` with the model ``embedder`` and writes an index
    directory.

    Raises:
        ValueError: Bad options, an index already in ``output_dir`` (without ``overwrite``),
            or nothing readable to embed.
    """
    _check_output_dir(Path(cfg.output_dir), cfg.overwrite)
    model_id = _model_identity(embedder.files)
    model = embedder.load(cfg.device)
    if cfg.images is not None:
        kind, source = "image", Path(cfg.images)
        ids, emb_ND, skipped = _embed_images(model, source, cfg.batch_size, cfg.workers)
    else:
        kind, source = "text", Path(cfg.texts)
        ids, emb_ND, skipped = _embed_texts(model, source, cfg.batch_size)
    if skipped:
        log.warning(
            "skipped %d unreadable inputs of %s (first: %s: %s); all are listed in %s",
            len(skipped),
            source,
            skipped[0]["id"],
            skipped[0]["error"],
            META_FILE,
        )
    if not ids:
        raise ValueError(
            f"nothing to embed in {source}: {len(skipped)} inputs skipped "
            f"(image files end in {', '.join(IMAGE_EXTENSIONS)})"
        )

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # written last: its presence marks a whole index
    np.save(out / EMBEDDINGS_FILE, emb_ND)
    (out / IDS_FILE).write_text(json.dumps(ids, ensure_ascii=False, indent=0) + "\n")
    index = faiss.IndexFlatIP(emb_ND.shape[1])  # exact: inner product = cosine similarity
    index.add(emb_ND)
    faiss.write_index(index, str(out / INDEX_FILE))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "count": len(ids),
        "dim": int(emb_ND.shape[1]),
        "source": str(source.resolve()),
        "model": {"path": str(embedder.folder.resolve()), **model_id},
        "skipped": skipped,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log.info("embedded %d %ss (%d skipped) into %s", len(ids), kind, len(skipped), out)
    return EmbedReport(
        output_dir=out, kind=kind, count=len(ids), dim=int(emb_ND.shape[1]), skipped=skipped
    )


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuses to replace an index (even a partly written one) unless told to."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: exists and is not a folder; give an index folder")
    found = [n for n in (META_FILE, EMBEDDINGS_FILE, IDS_FILE, INDEX_FILE) if (out / n).exists()]
    if found and not overwrite:
        what = "an index" if META_FILE in found else f"part of an index ({', '.join(found)})"
        count = ""
        if META_FILE in found:
            with contextlib.suppress(ValueError, KeyError, json.JSONDecodeError):
                count = f" of {read_index_meta(out)['count']} items"
        raise ValueError(
            f"-o {out} already holds {what}{count}; pass --overwrite to replace it, or "
            "choose another folder"
        )


def search(
    source: ModelSource,
    index_dir: str | Path,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 5,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """The ``k`` items of an index most similar to a text or an image query.

    Args:
        source: The model the index was built with.
        index_dir: A directory written by :func:`embed`.
        text: A text query (exclusive with ``image``).
        image: An image file as query.
        k: How many hits.
        device: Where the model runs.

    Returns:
        Hits, best first: ``{"rank", "score" (cosine similarity), "id"}``, plus ``"path"``
        for image indexes.

    Raises:
        ValueError: No or two queries, an unreadable image, a bad index directory, or an
            index built with a different model.
    """
    if (text is None) == (image is None):
        raise ValueError('give exactly one query: a text ("a black cat") or --image PATH')
    texts, images = ([text], []) if text is not None else ([], [image])
    return search_many(source, index_dir, texts=texts, images=images, k=k, device=device)[0]["hits"]


def search_many(
    source: ModelSource,
    index_dir: str | Path,
    *,
    texts: list[str] = (),
    images: list[str | Path] = (),
    k: int = 5,
    device: str = "cpu",
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Answers several queries with one model load: texts first, then images, in order.

    Returns:
        ``[{"query": text or image path, "kind": "text" | "image", "hits": [...]}]`` with
        hits as :func:`search` returns them.

    Raises:
        ValueError: No query, an unreadable image, a bad index directory, or an index built
            with a different model.
    """
    if not texts and not images:
        raise ValueError('give a query: a text ("a black cat"), --queries-file or --image PATH')
    if k < 1:
        raise ValueError(f"k={k}; it must be at least 1")
    index_dir = Path(index_dir)
    meta = read_index_meta(index_dir)
    _check_same_model(source, meta)
    model = source.load(device)
    preprocess = model.image_transform(is_train=False)
    pixels = []
    for image in images:  # every image is read before the first search: fail early
        try:
            with PIL.Image.open(image) as im:
                pixels.append(preprocess(im.convert("RGB")))
        except _UNREADABLE as exc:
            raise ValueError(f"--image {image}: cannot read it as an image ({exc})") from exc
    chunks = [
        embed_texts(model, model.tokenize(list(texts[i : i + batch_size])))
        for i in range(0, len(texts), batch_size)
    ]
    chunks += [
        embed_images(model, torch.stack(pixels[i : i + batch_size]))
        for i in range(0, len(pixels), batch_size)
    ]
    query_QD = torch.cat(chunks)
    # Memory-mapped and read-only: a large index is paged in as the search touches it.
    index = faiss.read_index(
        str(index_dir / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    )
    if index.d != query_QD.shape[1]:
        raise ValueError(
            f"{index_dir} holds {index.d}-d embeddings but the model embeds into "
            f"{query_QD.shape[1]} dimensions; search with the model the index was built with"
        )
    scores_QK, rows_QK = index_search(index, as_float32(query_QD), k)
    ids = json.loads((index_dir / IDS_FILE).read_text())
    queries = [(t, "text") for t in texts] + [(str(p), "image") for p in images]
    answers = []
    for (query, kind), scores_K, rows_K in zip(queries, scores_QK, rows_QK, strict=True):
        hits = []
        for rank, (score, row) in enumerate(zip(scores_K, rows_K, strict=True), start=1):
            hit: dict[str, Any] = {"rank": rank, "score": float(score), "id": ids[row]}
            if meta["kind"] == "image":
                hit["path"] = str(Path(meta["source"]) / ids[row])
            hits.append(hit)
        answers.append({"query": query, "kind": kind, "hits": hits})
    return answers


def format_hits(hits: list[dict[str, Any]]) -> str:
    """A plain-text table of search hits (rank, score, id)."""
    lines = [f"{'rank':>4}  {'score':>7}  id"]
    lines += [f"{h['rank']:>4}  {h['score']:>7.4f}  {h['id']}" for h in hits]
    return "\n".join(lines)


def read_index_meta(index_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of an index directory written by :func:`embed`.

    Raises:
        ValueError: The directory is not a complete index of this format.
    """
    path = Path(index_dir) / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{index_dir} is not a clipline index ({META_FILE} missing); build one with "
            "clipline embed EXPORT_DIR --images FOLDER -o INDEX_DIR"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT!r} "
            f"v{VERSION}; rebuild the index with this clipline version"
        )
    return meta


class _ImageFolder:
    """The image files of a folder as an eval set (:mod:`clipline.eval.embedding` reads it).

    Each file is decoded as its item is listed (in the loader worker that lists it), so that
    an unreadable one is known there: it comes as a blank placeholder image with its error
    as target, and is dropped after embedding, since the parts of a set must cover it whole.
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def indexed_items(
        self, part: int = 0, num_parts: int = 1
    ) -> Iterator[tuple[int, Callable[[], PIL.Image.Image], str | None]]:
        """``(index, image loader, error or None)`` for files with ``index % num_parts == part``."""
        for i in range(part, len(self.paths), num_parts):
            try:
                with PIL.Image.open(self.paths[i]) as im:
                    image = im.convert("RGB")  # decodes now, inside the try
            except _UNREADABLE as exc:
                yield i, _placeholder, f"{type(exc).__name__}: {exc}"
            else:
                yield i, partial(_same, image), None


def _placeholder() -> PIL.Image.Image:
    return PIL.Image.new("RGB", (1, 1))


def _same(image: PIL.Image.Image) -> PIL.Image.Image:
    return image


def _embed_images(
    model: Any, folder: Path, batch_size: int, workers: int
) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        return [], _stack([], model.embed_dim), []
    emb_ND, errors = embed_indexed_images(
        model,
        _ImageFolder(paths).indexed_items,
        model.image_transform(is_train=False),
        batch_size,
        labels=False,
        workers=workers,
    )
    names = [p.relative_to(folder).as_posix() for p in paths]
    readable = [i for i, error in enumerate(errors) if error is None]
    skipped = [{"id": names[i], "error": e} for i, e in enumerate(errors) if e is not None]
    return (
        [names[i] for i in readable],
        _stack([emb_ND[readable].numpy()], model.embed_dim),
        skipped,
    )


def _embed_texts(
    model: Any, path: Path, batch_size: int
) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    ids = [line for line in lines if line.strip()]
    skipped = [
        {"id": f"{path.name}:{n}", "error": "blank line"}
        for n, line in enumerate(lines, start=1)
        if not line.strip()
    ]
    if not ids:
        return ids, _stack([], model.embed_dim), skipped
    txt_emb_ND = embed_all_texts(model, ids, model.tokenize, batch_size)
    return ids, _stack([txt_emb_ND.numpy()], model.embed_dim), skipped


def _stack(chunks: list[np.ndarray], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), np.float32)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def _model_identity(files: list[Path]) -> dict[str, Any]:
    h = hashlib.sha256()
    stats = {}
    for f in files:
        h.update(f"{f.name}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        st = f.stat()
        stats[f.name] = [st.st_size, st.st_mtime_ns]
    return {"sha256": h.hexdigest(), "files": stats}


def _check_same_model(source: ModelSource, meta: dict[str, Any]) -> None:
    saved = meta["model"]
    # Same files, untouched since embedding: skip re-hashing a possibly large export.
    same_files = (
        os.path.realpath(source.folder) == os.path.realpath(saved["path"])
        and {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in source.files}
        == saved["files"]
    )
    if same_files or _model_identity(source.files)["sha256"] == saved["sha256"]:
        return
    raise ValueError(
        f"the index was built with the model at {saved['path']} (sha256 {saved['sha256'][:12]}), "
        f"not with {source.folder}; embeddings of different models are not comparable. Search "
        "with that model, or rebuild the index with clipline embed"
    )
