"""Reading a run's sample ledger: which samples each epoch trained on, and how often.

The training loop writes ``run_dir/ledger/`` (``loop.sample_ledger = true``; see
:mod:`clipline.pretrain.ledger`): one JSONL file per rank, a row per step with each
micro-batch's epoch, samples (interned shard URL + key) and skip counts, and ``run.json``
with the shards' manifest counts. ``clipline data ledger RUN`` prints :func:`read_ledger`'s
report: per epoch, the samples of the manifests seen 0, 1 and 2+ times, and the skipped
ones by reason.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EpochCoverage:
    """One epoch's samples against the shards' manifests.

    Attributes:
        epoch: The epoch (0-based).
        taken: Sample slots recorded (repeats that filled batches short of skipped samples
            count; a finished epoch has ``samples_per_epoch``).
        seen_0: Samples of the manifests not trained on in this epoch (skipped, left out by
            the epoch's cut into whole batches, or not reached yet).
        seen_1: Samples trained on once.
        seen_2plus: Samples trained on twice or more (repeats filling short batches;
            resampled mode draws with replacement).
        skipped: Samples dropped by the loader, by reason (``data/skipped/<reason>``).
        complete: Whether every slot of the epoch is recorded.
    """

    epoch: int
    taken: int
    seen_0: int
    seen_1: int
    seen_2plus: int
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = False


@dataclass
class LedgerReport:
    """What ``clipline data ledger RUN`` prints."""

    run_dir: str
    mode: str
    ranks: int  # rank files read
    steps: list[int]  # first and last step recorded, [] when none
    manifest_samples: int
    samples_per_epoch: int
    epochs: list[EpochCoverage]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_text(self) -> str:
        span = f"steps {self.steps[0]}..{self.steps[1]}" if self.steps else "no steps"
        lines = [
            f"ledger of {self.run_dir}: {span} from {self.ranks} rank file(s); "
            f"{self.manifest_samples} samples in the manifests, {self.samples_per_epoch} per "
            f"epoch ({self.mode} mode)"
        ]
        for e in self.epochs:
            state = "complete" if e.complete else f"partial, {e.taken} of {self.samples_per_epoch}"
            skipped = ", ".join(f"{r} {n}" for r, n in sorted(e.skipped.items())) or "none"
            lines.append(
                f"epoch {e.epoch} ({state}): seen 0 times {e.seen_0}, once {e.seen_1}, "
                f"2+ times {e.seen_2plus}; skipped: {skipped}"
            )
        return "\n".join(lines)


def complete_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(bytes, row) of each row of one rank's ledger file, up to the first incomplete one.

    A last line cut by a kill mid-write ends the rows (the resumed run cuts it off).
    """
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                row = None
            if row is None:
                return
            yield len(line), row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of one rank's ledger file, URLs resolved (``url`` lists strings)."""
    urls: list[str] = []
    rows = []
    for _, row in complete_rows(path):
        urls += row.get("new_urls", [])
        for batch in row["batches"]:
            batch["url"] = [urls[i] for i in batch["url"]]
        rows.append(row)
    return rows


def read_ledger(run_dir: str | Path) -> LedgerReport:
    """The coverage of every epoch in ``run_dir``'s ledger.

    Raises:
        ValueError: ``run_dir`` has no ledger.
    """
    folder = Path(run_dir) / "ledger"
    if not (folder / "run.json").is_file():
        raise ValueError(
            f"no sample ledger in {run_dir} ({folder / 'run.json'} is missing): train with "
            "loop.sample_ledger=true to write one"
        )
    run = json.loads((folder / "run.json").read_text())
    manifest = {url: n for url, n in run["shards"]}
    seen: dict[int, Counter] = defaultdict(Counter)  # epoch -> (url, key) -> times
    skipped: dict[int, Counter] = defaultdict(Counter)
    files = sorted(folder.glob("rank_*.jsonl"))
    steps = set()
    for path in files:
        for row in read_rows(path):
            steps.add(row["step"])
            for b in row["batches"]:
                seen[b["epoch"]].update(zip(b["url"], b["key"], strict=True))
                skipped[b["epoch"]].update(b["skipped"])
    epochs = []
    for epoch in sorted(seen.keys() | skipped.keys()):
        times = seen[epoch]
        distinct: Counter = Counter(url for url, _ in times)
        unseen = sum(max(0, n - distinct[url]) for url, n in manifest.items())
        taken = sum(times.values())
        epochs.append(
            EpochCoverage(
                epoch=epoch,
                taken=taken,
                seen_0=unseen,
                seen_1=sum(1 for c in times.values() if c == 1),
                seen_2plus=sum(1 for c in times.values() if c >= 2),
                skipped=dict(skipped[epoch]),
                complete=taken == run["samples_per_epoch"],
            )
        )
    return LedgerReport(
        run_dir=str(run_dir),
        mode=run["mode"],
        ranks=len(files),
        steps=[min(steps), max(steps)] if steps else [],
        manifest_samples=sum(manifest.values()),
        samples_per_epoch=run["samples_per_epoch"],
        epochs=epochs,
    )
