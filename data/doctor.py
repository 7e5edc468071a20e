"""``clipline data doctor``: will these shards train, and how fast can this machine read them?

Everything that would stop or hang a run is found here, before a job waits in a queue for
GPUs: unreadable or cut-off tars, samples without an image or a caption, duplicate keys,
samples the stream would skip (it runs the stream's own
:class:`~clipline.data.decode.Decoder` with the same ``data.decode`` rules, so an image
over ``max_pixels`` or under ``min_image_size`` is reported under the skip reason training
counts, never fully decoded), a ``sizes.json`` that disagrees with the tars, shards that hold no
usable sample (a reader given only those raises), and too few shards for ranks x workers
(the stream's own :func:`~clipline.data.stream.epoch_shape` rule, so the two never
disagree). Then the real stream runs for a few seconds to measure samples/s per worker.

Each problem names the shard and the fix. The report is text or JSON; the CLI exits 1 when
there is any problem.
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipline.data.decode import IMAGE_EXTS, DecodeConfig, Decoder
from clipline.data.loader import build_train_loader
from clipline.data.preprocess import PreprocessConfig
from clipline.data.shard_index import IMAGE_KEYS, ShardScan, scan_shard
from clipline.data.shard_io import (
    check_local,
    list_shards,
    read_manifest,
    shard_samples,
)
from clipline.data.stream import StreamConfig, epoch_shape

log = logging.getLogger(__name__)

# Keys named per problem: enough to find them, few enough to read.
MAX_EXAMPLES = 3
# Shards this much larger than the smallest get their samples seen less often per epoch
# (every reader yields the same number of batches): worth a warning, not a failure.
UNEVEN_RATIO = 2.0
# What each of the stream's skip reasons means for one sample, in the decode check's report.
_SKIP_MEANING = {
    "corrupt_image": "does not decode",
    "image_too_large": "has more pixels than max_pixels={max_pixels}",
    "image_too_small": "has a side shorter than min_image_size={min_image_size}",
    "caption_not_utf8": "has a caption that is not UTF-8",
    "missing_image": "has no image",
    "missing_caption": "has no caption",
}


@dataclass(kw_only=True)
class DoctorConfig:
    """What to check, and for which run shape.

    Attributes:
        shards: A shard folder, glob, brace pattern or ``::`` list (as ``data.shards``).
        workers: Dataloader workers per rank (``data.workers``).
        world_size: Ranks (processes) of the planned run.
        batch_size: Samples per batch per rank (``data.batch_size``).
        full: Decode every sample instead of one per shard.
        seconds: How long to run the loader for the throughput figure; 0 skips it.
        image_size: Training image size for the loader's preprocessing (otherwise the
            default :class:`~clipline.data.preprocess.PreprocessConfig`: CLIP's numbers).
        decode: The stream's per-sample rules (``data.decode``: ``max_pixels``,
            ``min_image_size``, ...); the decode check skips what training would skip.
    """

    shards: str
    workers: int = 2
    world_size: int = 1
    batch_size: int = 64
    full: bool = False
    seconds: float = 5.0
    image_size: int = 224
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class Problem:
    """Something that would break or hang a run (or, as a warning, slow or skew it).

    Attributes:
        check: The check that found it (a key of ``DoctorReport.checks``): ``shards``,
            ``tar``, ``keys``, ``decode``, ``manifest``, ``run_shape`` or
            ``loader``.
        shard: The shard concerned, or None for the whole set.
        message: What is wrong and how to fix it.
    """

    check: str
    shard: str | None
    message: str


@dataclass
class DoctorReport:
    """The doctor's findings (``to_text`` for people, ``to_json`` for scripts).

    Attributes:
        shards: Shards found.
        samples: Usable samples found in the tars (an image and a caption).
        manifest_samples: The sum of ``sizes.json``, or None when it cannot be read.
        decoded: Samples decoded (one per shard, or all with ``full``).
        skipped: Of those, the ones training would skip, by the stream's skip reason
            (``corrupt_image``, ``image_too_large``, ``image_too_small``, ...).
        problems: What would break or hang a run; empty when healthy.
        warnings: What would not stop a run but is worth knowing.
        per_shard: ``{"shard", "samples", "keys", "manifest"}`` per shard.
        run_shape: Readers and batches per epoch for the checked run shape.
        loader: Throughput of the real stream on this machine, when measured.
        checks: ``ok`` or ``failed`` per check, in the order they ran.
    """

    shards: int = 0
    samples: int = 0
    manifest_samples: int | None = None
    decoded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    run_shape: dict[str, Any] = field(default_factory=dict)
    loader: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing would break or hang a run."""
        return not self.problems

    def to_json(self) -> str:
        """The report as JSON (``ok`` included)."""
        return json.dumps({"ok": self.ok, **asdict(self)}, indent=2, ensure_ascii=False)

    def to_text(self, spec: str = "") -> str:
        """A readable summary: one line per check, then every problem and warning."""
        manifest = "unreadable" if self.manifest_samples is None else self.manifest_samples
        lines = [
            f"shards:  {spec} ({self.shards} shards, {self.samples} usable samples; "
            f"sizes.json: {manifest})"
        ]
        failed = Counter(p.check for p in self.problems)
        for check, status in self.checks.items():
            detail = self._detail(check)
            mark = f"FAILED ({failed[check]})" if status == "failed" else status
            lines.append(f"  {check:<10} {mark}{': ' + detail if detail else ''}")
        for title, items in (("PROBLEMS", self.problems), ("warnings", self.warnings)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                for p in items:
                    where = f"{Path(p.shard).name}: " if p.shard else ""
                    lines.append(f"  - [{p.check}] {where}{p.message}")
        if self.ok:
            lines.append("result:  OK, these shards will train with this run shape")
        else:
            lines.append(
                f"result:  {len(self.problems)} problem(s): a run on these shards would fail, "
                "hang or train on other data than sizes.json promises"
            )
        return "\n".join(lines)

    def _detail(self, check: str) -> str:
        if check == "decode":
            skipped = sum(self.skipped.values())
            return f"{self.decoded} sample(s) decoded, {skipped} the stream would skip"
        if check == "run_shape" and self.run_shape:
            r = self.run_shape
            return (
                f"{r['world_size']} rank(s) x {r['readers_per_rank']} reader(s) over "
                f"{self.shards} shards; {r['batches_per_epoch']} batches of "
                f"{r['batch_size']} per rank per epoch"
            )
        if check == "loader" and self.loader:
            lo = self.loader
            return (
                f"{lo['samples_per_s']:.0f} samples/s per rank with {lo['workers']} worker(s) "
                f"({lo['samples_per_s_per_worker']:.0f} per worker; {lo['samples']} samples "
                f"in {lo['seconds']:.1f} s)"
            )
        return ""


def _examples(keys: list[str]) -> str:
    more = f", ... {len(keys) - MAX_EXAMPLES} more" if len(keys) > MAX_EXAMPLES else ""
    return ", ".join(keys[:MAX_EXAMPLES]) + more


def _check_tar(scan: ShardScan, report: DoctorReport) -> None:
    shard = scan.path
    rewrite = "rewrite it with `clipline shards` (or re-download it)"
    if scan.error is not None:
        report.problems.append(
            Problem(
                "tar",
                shard,
                f"unreadable: {scan.error}. The stream would lose the rest of this shard "
                f"every pass; {rewrite}, or delete it and re-index the folder "
                "(`clipline shards --index-only FOLDER`).",
            )
        )
    reindex = (
        "the stream skips such samples, so sizes.json over-counts unless it was written by "
        "`clipline shards --index-only`. Fix the source and rewrite the shard"
    )
    if scan.missing_image:
        report.problems.append(
            Problem(
                "keys",
                shard,
                f"{len(scan.missing_image)} sample(s) without an image "
                f"(.jpg/.jpeg/.png/.webp): {_examples(scan.missing_image)} (orphaned "
                f"caption/metadata files); {reindex}.",
            )
        )
    if scan.missing_caption:
        report.problems.append(
            Problem(
                "keys",
                shard,
                f"{len(scan.missing_caption)} sample(s) without a caption (no or empty .txt): "
                f"{_examples(scan.missing_caption)}; {reindex}.",
            )
        )
    if scan.duplicate_keys:
        report.problems.append(
            Problem(
                "keys",
                shard,
                f"duplicate sample key(s) {_examples(sorted(set(scan.duplicate_keys)))}: "
                "webdataset merges or splits such samples, or drops the rest of the shard "
                f"on a repeated file name; {rewrite} so every key is unique.",
            )
        )
    if scan.error is None and scan.samples == 0:
        report.problems.append(
            Problem(
                "tar",
                shard,
                "holds no usable sample: a reader that draws only such shards raises "
                "'a full pass ... produced no samples' and stops the run. Delete it and "
                "re-index the folder (`clipline shards --index-only FOLDER`).",
            )
        )


def _preprocess(cfg: DoctorConfig) -> PreprocessConfig:
    """CLIP's default preprocessing at ``cfg.image_size``: what most towers train on."""
    return PreprocessConfig(size=(cfg.image_size, cfg.image_size))


def _decoder(cfg: DoctorConfig) -> Decoder:
    """The stream's own decoder (so the same header checks, draft decoding and crop path
    run as in training)."""
    return Decoder(cfg.decode, _preprocess(cfg))


def _check_decode(scan: ShardScan, cfg: DoctorConfig, report: DoctorReport) -> None:
    """Runs the stream's :class:`~clipline.data.decode.Decoder` on the shard's samples and
    reports those it would skip, by the skip reasons training counts."""
    decoder = _decoder(cfg)
    meaning = {k: v.format(**asdict(cfg.decode)) for k, v in _SKIP_MEANING.items()}
    bad: list[str] = []
    skipped: Counter = Counter()
    try:
        for sample in shard_samples([scan.path]):
            if "txt" not in sample or not any(e in sample for e in IMAGE_KEYS):
                continue  # already reported by the key check
            key = sample["__key__"]
            before = skipped.copy()
            decoded = decoder(sample, seed=report.decoded, skipped=skipped, converted=Counter())
            report.decoded += 1
            if decoded is None:
                # Each skip counts one reason; a path that counts none is still a failure.
                reason = next(iter(skipped - before), "corrupt_image")
                ext = next((e for e in IMAGE_EXTS if e in sample), "txt")
                bad.append(f"{key}.{ext} {meaning.get(reason, reason)} ({reason})")
            if not cfg.full:
                break
    except (tarfile.TarError, OSError) as e:  # already reported by the tar check
        log.debug("decode check stopped at a damaged tar %s: %s", scan.path, e)
    for reason, n in skipped.items():
        report.skipped[reason] = report.skipped.get(reason, 0) + n
    if bad:
        scope = "" if cfg.full else " (the first sample checked; run --full to check all)"
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        report.problems.append(
            Problem(
                "decode",
                scan.path,
                f"{len(bad)} sample(s) the stream would drop{scope} ({counts}): "
                f"{_examples(bad)}. Rewrite the shard from the source images with `clipline "
                "shards` (it skips undecodable images; --max-side shrinks large ones), relax "
                "data.decode (--max-pixels, --min-image-size here), or find the files with "
                "--full.",
            )
        )


def _check_manifest(cfg: DoctorConfig, scans: list[ShardScan], report: DoctorReport) -> None:
    try:
        manifest = read_manifest(cfg.shards)
    except ValueError as e:
        report.problems.append(
            Problem(
                "manifest",
                None,
                f"{e} For shards from another tool, `clipline shards --index-only FOLDER` "
                "writes it without touching the tars.",
            )
        )
        return
    report.manifest_samples = sum(manifest.values())
    for scan, row in zip(scans, report.per_shard, strict=True):
        row["manifest"] = manifest.get(scan.path)
        if scan.error is None and row["manifest"] != scan.samples:
            report.problems.append(
                Problem(
                    "manifest",
                    scan.path,
                    f"sizes.json says {row['manifest']} samples but the shard holds "
                    f"{scan.samples} usable ones: epochs would be "
                    f"{'longer' if row['manifest'] > scan.samples else 'shorter'} than the "
                    "data and the step count wrong. Recount with `clipline shards "
                    f"--index-only {Path(scan.path).parent}`.",
                )
            )


def _check_run_shape(cfg: DoctorConfig, num_samples: int | None, report: DoctorReport) -> bool:
    stream_cfg = StreamConfig(
        shards=cfg.shards,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        num_samples=num_samples,
        decode=cfg.decode,
    )
    try:
        shape = epoch_shape(stream_cfg, cfg.world_size)
    except ValueError as e:  # the stream's own rule and message, fix included
        report.problems.append(Problem("run_shape", None, str(e)))
        return False
    report.run_shape = {
        "world_size": cfg.world_size,
        "readers_per_rank": shape.readers_per_rank,
        "batch_size": cfg.batch_size,
        "batches_per_epoch": shape.batches_per_epoch,
        "samples_per_epoch": shape.batches_per_epoch * cfg.batch_size * cfg.world_size,
        "num_samples": shape.num_samples,
    }
    return True


def _measure_loader(
    cfg: DoctorConfig,
    num_samples: int | None,
    report: DoctorReport,
    tokenize: Callable[[list[str]], torch.Tensor],
) -> None:
    """Run the real stream (rank 0 of the planned world) for ``cfg.seconds``."""
    stream_cfg = StreamConfig(
        shards=cfg.shards,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        num_samples=num_samples,
        decode=cfg.decode,
    )
    loader = build_train_loader(
        stream_cfg,
        preprocess=_preprocess(cfg),
        tokenize=tokenize,
        rank=0,
        world_size=cfg.world_size,
    )
    samples, skipped = 0, Counter()
    start = None  # from the first batch: worker start-up is not reading speed
    epoch = 0
    try:
        while start is None or time.perf_counter() - start < cfg.seconds:
            got = False
            for batch in loader.epoch(epoch):
                got = True
                skipped.update(batch["skipped"])
                if start is None:
                    start = time.perf_counter()
                else:
                    samples += len(batch["key"])
                if time.perf_counter() - start >= cfg.seconds:
                    break
            epoch += 1
            if not got:
                break
    except RuntimeError as e:  # e.g. a reader whose shards produced nothing
        report.problems.append(Problem("loader", None, f"the stream failed: {e}"))
        return
    elapsed = time.perf_counter() - start if start is not None else 0.0
    rate = samples / elapsed if elapsed > 0 else 0.0
    report.loader = {
        "workers": cfg.workers,
        "seconds": round(elapsed, 2),
        "samples": samples,
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(cfg.workers, 1), 1),
        "image_size": cfg.image_size,
        "skipped": dict(skipped),
    }
    if skipped:
        report.warnings.append(
            Problem("loader", None, f"the stream dropped samples while measuring: {dict(skipped)}")
        )


def diagnose(cfg: DoctorConfig, *, tokenize: Callable[[list[str]], torch.Tensor]) -> DoctorReport:
    """Run every check on ``cfg.shards`` for the configured run shape.

    Args:
        cfg: The shards, the run shape and what to measure.
        tokenize: Captions -> token ids ``[B, L]`` for the loader measurement (a real
            tokenizer, e.g. open_clip's, for a realistic cost); unused with ``seconds=0``.

    Returns:
        The report; ``report.ok`` is False when anything would break or hang a run.
    """
    report = DoctorReport()
    if cfg.world_size < 1 or cfg.batch_size < 1 or cfg.workers < 0:
        raise ValueError(
            f"world_size={cfg.world_size}, batch_size={cfg.batch_size} and "
            f"workers={cfg.workers} must be >= 1, >= 1 and >= 0"
        )
    try:
        urls = list_shards(cfg.shards)
    except ValueError as e:
        report.problems.append(Problem("shards", None, str(e)))
        report.checks["shards"] = "failed"
        return report
    check_local(
        urls,
        "the doctor reads local shards; {url!r} is remote. Copy a few shards locally to check them",
    )
    report.shards = len(urls)

    def run(check: str, fn: Any, *args: Any) -> Any:
        before = len(report.problems)
        result = fn(*args)
        report.checks[check] = "failed" if len(report.problems) > before else "ok"
        return result

    scans = [scan_shard(u) for u in urls]
    report.samples = sum(s.samples for s in scans)
    report.per_shard = [
        {"shard": s.path, "samples": s.samples, "keys": s.keys, "manifest": None} for s in scans
    ]
    for s in scans:
        _check_tar(s, report)
    for check in ("tar", "keys"):
        report.checks[check] = "failed" if any(p.check == check for p in report.problems) else "ok"
    run("decode", lambda: [_check_decode(s, cfg, report) for s in scans if s.samples])
    run("manifest", _check_manifest, cfg, scans, report)
    # Without a readable sizes.json, check the shape on the counted samples so that a
    # too-few-shards problem still shows up in the same report.
    num_samples = None if report.manifest_samples is not None else report.samples
    shape_ok = run("run_shape", _check_run_shape, cfg, num_samples, report)

    sizes = [s.samples for s in scans if s.samples]
    if sizes and max(sizes) > UNEVEN_RATIO * min(sizes):
        report.warnings.append(
            Problem(
                "run_shape",
                None,
                f"shard sizes range from {min(sizes)} to {max(sizes)} samples: readers yield "
                "equal batch counts, so samples of small shards are seen more often per epoch. "
                "Rewrite with `clipline shards --samples-per-shard` for even shards.",
            )
        )
    if cfg.seconds > 0:
        if shape_ok and report.ok:
            run("loader", _measure_loader, cfg, num_samples, report, tokenize)
        else:
            report.checks["loader"] = "skipped (fix the problems first)"
    return report
