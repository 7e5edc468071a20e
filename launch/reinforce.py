"""``clipline reinforce``: teachers' embeddings of K stored views of every sample, once.

The data side (boxes, views, the stored member, the shard rewrite, the manifest) is
:mod:`clipline.data.reinforce`; this module loads the teacher exports, embeds views and
captions with each teacher's own preprocessing and tokenizer, and runs the shards in
parallel. Each shard is committed by an atomic rename when complete; a restart (after a
kill) skips committed shards and redoes the others, and the output depends only on the
input and the settings (seeded boxes, batches formed per shard), not on ``--workers`` or
on where a run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipline.data.decode import ImageNormalizer
from clipline.data.preprocess import PreprocessConfig
from clipline.data.progress import progress
from clipline.data.reinforce import (
    MANIFEST,
    ReinforcedShard,
    ReinforceManifest,
    TeacherInfo,
    reinforce_shard,
    view_pixels,
)
from clipline.data.shard_io import shard_name, shard_sizes

log = logging.getLogger(__name__)
_DEFAULT_CROP = PreprocessConfig()  # open_clip's training crop range, clipline's default


@dataclass(kw_only=True)
class ReinforceConfig:
    """What ``clipline reinforce`` writes.

    Attributes:
        shards: The shards to reinforce (anything ``data.shards`` takes; with ``sizes.json``).
        output_dir: Where the reinforced shards, ``sizes.json`` and ``reinforce.json`` go.
        teachers: Export folders (any format clipline reads), in feature order.
        augmentations: Views stored per sample (K).
        seed: Seeds the views' boxes.
        workers: Processes, each reinforcing whole shards with its own teachers.
        scale: The crop's area range, as the student's ``train_scale`` (open_clip's default).
        ratio: The crop's aspect range, as ``train_ratio``.
        alpha: How transparent images are flattened, as ``data.decode.alpha``.
        batch_size: Views per teacher forward.
        device: Where the teachers run.
    """

    shards: str
    output_dir: str
    teachers: list[str]
    augmentations: int
    seed: int = 0
    workers: int = 1
    scale: tuple[float, float] = _DEFAULT_CROP.train_scale
    ratio: tuple[float, float] = _DEFAULT_CROP.train_ratio
    alpha: str = "white"
    batch_size: int = 256
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)  # type: ignore[assignment]
        if not self.teachers:
            raise ValueError("give at least one --teacher EXPORT (an export folder)")
        if self.augmentations < 1:
            raise ValueError(f"--augmentations must be >= 1, got {self.augmentations}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        # The same checks as the student's crop numbers (a range 0 < low <= high).
        PreprocessConfig(train_scale=self.scale, train_ratio=self.ratio)


class Teachers:
    """The teacher exports, embedding views and captions as the manifest describes."""

    def __init__(self, paths: list[str], device: str = "cpu"):
        from clipline.pretrain.export import export_files, find_export, load_exported

        self.device = torch.device(device)
        self.models, self.preprocess, self.info = [], [], []
        for path in paths:
            found = find_export(path)
            if found is None:
                raise ValueError(
                    f"--teacher {path!r} is not an export folder; write one with `clipline "
                    "export CHECKPOINT_OR_RUN_DIR OUT` (any format clipline reads)"
                )
            fmt, folder = found
            model = load_exported(fmt, folder, self.device)
            if isinstance(model, torch.nn.Module):
                model.eval()
            pp = model.preprocess_config()
            scale = getattr(model, "logit_scale", None)
            if isinstance(scale, torch.Tensor):
                scale = float(scale.detach().exp())
            else:  # ONNX: the export's metadata holds the multiplier
                scale = float(model.meta["logit_scale"])
            digest = hashlib.sha256()
            for file in sorted(export_files(fmt, folder)):
                digest.update(file.name.encode() + file.read_bytes())
            self.models.append(model)
            self.preprocess.append(pp)
            self.info.append(
                TeacherInfo(
                    path=str(path),
                    name=Path(folder).resolve().name,
                    format=fmt,
                    sha256=digest.hexdigest(),
                    dim=int(model.embed_dim),
                    logit_scale=scale,
                    size=list(pp.size),
                    mean=list(pp.mean),
                    std=list(pp.std),
                    interpolation=pp.train_interpolation,
                )
            )

    @torch.inference_mode()
    def embed_views(self, views: list[tuple[Image.Image, np.ndarray]]) -> np.ndarray:
        """Each teacher's embedding of each view, L2-normalised, concatenated: f16[N,ΣD]."""
        parts = []
        for model, pp in zip(self.models, self.preprocess, strict=True):
            normalize = ImageNormalizer(pp.mean, pp.std)
            pixels_NCHW = torch.stack(
                [view_pixels(rgb, box, pp.size, pp.train_resample) for rgb, box in views]
            )
            emb_ND = model.encode_image(normalize(pixels_NCHW.to(self.device))).float()
            parts.append(F.normalize(emb_ND, dim=-1))
        return torch.cat(parts, dim=1).cpu().numpy().astype(np.float16)

    @torch.inference_mode()
    def embed_texts(self, captions: list[str]) -> np.ndarray:
        """Each teacher's embedding of each caption (its own tokenizer), f16[M,ΣD]."""
        parts = []
        for model in self.models:
            emb_MD = model.encode_text(model.tokenize(captions).to(self.device)).float()
            parts.append(F.normalize(emb_MD, dim=-1))
        return torch.cat(parts, dim=1).cpu().numpy().astype(np.float16)


# Per worker process: its teachers, loaded once by the pool's initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(paths: list[str], device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["teachers"] = Teachers(paths, device)


def _run_shard(url: str, out_dir: str, manifest: ReinforceManifest, batch: int) -> ReinforcedShard:
    teachers: Teachers = _WORKER["teachers"]
    return reinforce_shard(
        url,
        Path(out_dir),
        manifest,
        embed_views=teachers.embed_views,
        embed_texts=teachers.embed_texts,
        batch_views=batch,
    )


def _check_output(out: Path, manifest: ReinforceManifest, names: set[str]) -> None:
    """Refuses an OUT with other work in it; writes the manifest of a new one."""
    path = out / MANIFEST
    if path.is_file():
        old = ReinforceManifest.from_json(path.read_text(), str(path))
        differ = old.same_work(manifest)
        if differ:
            raise ValueError(
                f"{out} holds a reinforcement with other settings ({', '.join(differ)} "
                "differ); resume it with the same settings, or choose an empty output folder"
            )
    stray = sorted(p.name for p in out.glob("*.tar") if p.name not in names)
    if stray:
        raise ValueError(
            f"{out} holds shards that are not among the input's ({stray[:3]}); choose an empty "
            "output folder"
        )
    for tmp in out.glob("*.tar.tmp*"):  # left by a killed run: never a committed shard
        tmp.unlink()
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)


def reinforce(cfg: ReinforceConfig) -> dict[str, Any]:
    """Writes the reinforced shards (``clipline reinforce``); returns the run's report.

    Raises:
        ValueError: missing shards or ``sizes.json``, a teacher that is not an export, two
            input shards with one file name, or an output folder holding other work.
    """
    t0 = time.monotonic()
    sizes = shard_sizes(cfg.shards)
    names = [shard_name(url) for url, _ in sizes]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{cfg.shards!r} has several shards with one file name; reinforced shards keep "
            "their names in one folder: reinforce each folder into its own output"
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    teachers = Teachers(cfg.teachers, cfg.device)
    manifest = ReinforceManifest(
        teachers=teachers.info,
        augmentations=cfg.augmentations,
        seed=cfg.seed,
        scale=list(cfg.scale),
        ratio=list(cfg.ratio),
        alpha=cfg.alpha,
        source=str(cfg.shards),
    )
    _check_output(out, manifest, set(names))
    todo = [url for url, _ in sizes if not (out / shard_name(url)).is_file()]
    if len(todo) < len(sizes):
        log.info(
            "%d of %d shards were reinforced before; resuming", len(sizes) - len(todo), len(sizes)
        )
    reports = _run(cfg, todo, manifest, teachers)
    expected = dict(zip(names, (n for _, n in sizes), strict=True))
    for r in reports:
        if r.samples != expected[r.shard]:
            log.warning(
                "%s holds %d samples, its sizes.json says %d", r.shard, r.samples, expected[r.shard]
            )
    tmp = out / "sizes.json.tmp"  # last: a folder with sizes.json is a complete set
    tmp.write_text(json.dumps(expected, indent=2) + "\n")
    os.replace(tmp, out / "sizes.json")
    return _summary(cfg, reports, len(sizes), time.monotonic() - t0)


def _run(
    cfg: ReinforceConfig, todo: list[str], manifest: ReinforceManifest, teachers: Teachers
) -> list[ReinforcedShard]:
    reports = []
    bar = progress(total=len(todo), unit="shard", desc="reinforce")
    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for url in todo:
                reports.append(
                    reinforce_shard(
                        url,
                        Path(cfg.output_dir),
                        manifest,
                        embed_views=teachers.embed_views,
                        embed_texts=teachers.embed_texts,
                        batch_views=cfg.batch_size,
                    )
                )
                bar.update(1)
            return reports
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        with ProcessPoolExecutor(
            max_workers=cfg.workers,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(cfg.teachers, cfg.device, threads),
        ) as pool:
            jobs = [
                pool.submit(_run_shard, url, cfg.output_dir, manifest, cfg.batch_size)
                for url in todo
            ]
            for job in as_completed(jobs):
                reports.append(job.result())
                bar.update(1)
        return reports
    finally:
        bar.close()


def _summary(
    cfg: ReinforceConfig, reports: list[ReinforcedShard], shards: int, seconds: float
) -> dict[str, Any]:
    samples = sum(r.samples for r in reports)
    views = sum(r.views for r in reports)
    member = sum(r.member_bytes for r in reports)
    skipped: dict[str, int] = {}
    for r in reports:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return {
        "output_dir": cfg.output_dir,
        "shards": shards,
        "shards_written": len(reports),
        "samples": samples,
        "reinforced": sum(r.reinforced for r in reports),
        "views": views,
        "skipped": dict(sorted(skipped.items())),
        "member_bytes": member,
        "member_bytes_per_view": round(member / views, 1) if views else None,
        "seconds": round(seconds, 2),
        "ms_per_sample": round(1000 * seconds / samples, 2) if samples else None,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("shards", "output_dir")},
    }
