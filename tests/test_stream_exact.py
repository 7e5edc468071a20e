"""Data correctness of the training stream on real files: a resume on damaged shards equals
the uninterrupted run, exact epochs read every sample over epochs, and a run does not
depend on where its shards sit."""

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipline.data.stream import StreamConfig, _layout
from clipline.launch.config import load_run_config
from clipline.launch.run import plan, run_pretrain
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from tests.helpers import make_shards, micro_loader, micro_recipe, sample_ids

GARBAGE = b"\xff\xd8 not a jpeg"


def _rewrite(shard: Path, corrupt: set[str]) -> None:
    """Replaces the jpg of each sample key in ``corrupt`` by bytes no decoder accepts."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            key, ext = m.name.split(".", 1)
            if key in corrupt and ext == "jpg":
                data, m.size = GARBAGE, len(GARBAGE)
            dst.addfile(m, io.BytesIO(data))
    shard.write_bytes(out.getvalue())


def _cut(shard: Path, sample: int) -> None:
    """Truncates ``shard`` inside sample ``sample``'s first member: it and all after it are
    lost (a cut copy). sizes.json still lists the full count, as it would in the field."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.startswith(keys[sample] + "."))
    shard.write_bytes(shard.read_bytes()[: first.offset_data + 10])


def _damaged(root: Path, n: int = 52) -> Path:
    """Shards of 13 samples: 20 JPEGs corrupt in the first three, the fourth cut so its last
    6 samples are lost."""
    shards = make_shards(root, n=n, per_shard=13)
    keys = [f"{i:09d}" for i in range(n)]
    corrupt = set(keys[0:39:2])  # 20 of the first 39 samples (shards 0-2)
    for shard in sorted(shards.glob("*.tar"))[:3]:
        _rewrite(shard, corrupt)
    _cut(shards / "000003.tar", sample=7)  # samples 7..12 of 13
    return shards


def _rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


def _epoch_counts(loader, epoch: int) -> Counter:
    counts = Counter()
    for batch in loader.epoch(epoch):
        counts.update(batch["skipped"])
    return counts


# ----------------------------------------------------------------- 6: damaged data, resume


@pytest.mark.parametrize("workers", [0, 2])
def test_lost_shard_data_is_counted_per_sample_lost(tmp_path, workers, monkeypatch):
    from clipline.data import shard_io

    monkeypatch.setattr(shard_io, "RETRY_SECONDS", 0.01)
    shards = make_shards(tmp_path / "s", n=52, per_shard=13)
    _cut(shards / "000003.tar", sample=7)  # one truncation, 6 samples lost
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=workers, shuffle_buffer=8)
    loader = micro_loader(cfg)
    # A shard that cannot be read at all (here: a folder where the file was) loses all 13.
    (shards / "000001.tar").rename(tmp_path / "moved.tar")
    (shards / "000001.tar").mkdir()
    assert _epoch_counts(loader, 0) == {"truncated_tar": 6, "shard_read_error": 13}


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_on_damaged_shards_equals_the_uninterrupted_run(tmp_path, workers):
    """20 of 52 JPEGs corrupt and a cut shard: the workers run out of planned samples and
    repeat good ones; a resume from step 4 (inside those repeats) gives the same losses,
    weights and skip counts as the run that was never stopped."""
    shards = _damaged(tmp_path / "s")
    recipe = micro_recipe(shards, tmp_path / "full", steps=8, checkpoint_every=4, keep_last=3)
    recipe["data"].update(workers=workers, shuffle_buffer=8)
    run_pretrain(load_run_config(recipe))
    at4, at8 = list_checkpoints(tmp_path / "full")
    state4 = json.loads((at4 / "state.json").read_text())
    assert any(f for link in state4["stream"][0]["chain"] for f in link["fill"])  # in the fill

    resumed = tmp_path / "resumed"
    shutil.copytree(at4, resumed / "checkpoints" / at4.name)
    run_pretrain(load_run_config({**recipe, "run_dir": str(resumed)}), resume="latest")

    full, again = _rows(tmp_path / "full"), _rows(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        assert again[step]["train/loss"] == full[step]["train/loss"], step
        data = {k: v for k, v in full[step].items() if k.startswith("data/")}
        assert {k: again[step][k] for k in data} == data, step
    # 52 rows in epoch 0 and 16 of epoch 1: 20 corrupt and 6 lost to the cut each epoch,
    # fewer in the part of epoch 1 read; nothing failed counted twice.
    final = full[8]
    assert 20 <= final["data/skipped/corrupt_image"] < 40
    assert 6 <= final["data/skipped/truncated_tar"] < 12
    (last,) = list_checkpoints(resumed)[-1:]
    assert (
        json.loads((last / "state.json").read_text())["skipped"]
        == json.loads((at8 / "state.json").read_text())["skipped"]
    )
    w_full, w_again = consolidated_state(at8), consolidated_state(last)
    for k in w_full:
        assert torch.equal(w_again[k], w_full[k]), k


def test_an_old_stream_state_falls_back_to_replay(tmp_path, caplog):
    shards = _damaged(tmp_path / "s")
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=1, shuffle_buffer=8)
    it = micro_loader(cfg).epoch(0)
    want = [next(it)["key"] for _ in range(12)]
    old = micro_loader(cfg)
    first = old.epoch(0)
    for _ in range(8):
        next(first)
    state = old.state_dict()
    # What clipline wrote before the fill was saved: version 1, links without fill/failed.
    state["version"] = 1
    for link in state["chain"]:
        del link["fill"], link["failed"]
    resumed = micro_loader(cfg)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict([state])
        rest = resumed.epoch(0, start=8)
        assert [next(rest)["key"] for _ in range(4)] == want[8:]
    assert "version 1" in caplog.text and "reading and discarding 8 batches" in caplog.text


# --------------------------------------------------------- 18: every sample over epochs


def test_a_single_shard_is_read_whole_over_epochs(tmp_path):
    """One shard of 61, batches of 8: an epoch reads 56; the 5 left out are not the same
    ones every epoch (they were: the shard's last 5, never read in any epoch)."""
    shards = make_shards(tmp_path / "s", n=61, per_shard=61)
    cfg = StreamConfig(shards=str(shards), batch_size=8, workers=0, shuffle_buffer=16)
    loader = micro_loader(cfg)
    everything = {f"{shards}/000000.tar#{i:09d}" for i in range(61)}
    e0, e1 = sample_ids(loader.epoch(0)), sample_ids(loader.epoch(1))
    assert len(e0) == len(set(e0)) == len(e1) == len(set(e1)) == 56
    assert set(e0) | set(e1) == everything
    recipe = micro_recipe(shards, tmp_path / "run")
    recipe["data"]["batch_size"] = 8
    shape = plan(load_run_config(recipe), world_size=1)
    assert (shape["samples_per_epoch"], shape["samples_dropped_per_epoch"]) == (56, 5)


@pytest.mark.parametrize(
    ("sizes", "world", "workers", "batch", "num_samples"),
    [
        ([61], 1, 1, 8, None),  # one shard: 5 left out per epoch
        ([37, 24], 2, 1, 8, None),  # 2 ranks
        ([23, 2, 9, 1, 5, 17], 2, 2, 4, None),  # uneven shards, 2 ranks x 2 workers
        ([23, 2, 9, 1, 5, 17], 2, 1, 3, 20),  # a small num_samples: windows move through
    ],
)
def test_exact_epochs_read_every_sample_over_epochs(
    tmp_path, sizes, world, workers, batch, num_samples
):
    """The plan (pure arithmetic, every rank planned here): no sample twice in an epoch,
    what the dry run reports is what each epoch reads, and every sample is read within
    the epochs it takes the left-out window to move once around the data."""
    specs = []
    for i, n in enumerate(sizes):
        specs.append(str(make_shards(tmp_path / f"p{i}", n=n, per_shard=n) / "000000.tar"))
    cfg = StreamConfig(
        shards="::".join(specs), batch_size=batch, workers=workers, num_samples=num_samples
    )
    shape, layout = _layout(cfg, world)
    total = sum(sizes)
    assert shape.samples_read + shape.samples_left_out == total
    seen: set[tuple[str, int]] = set()
    # The read window moves by the left-out count each epoch: two epochs when at most half
    # is left out, else about total / read (a small num_samples walks through the data).
    epochs = max(2, -(-total // shape.samples_read))
    for epoch in range(epochs):
        read = []
        for rank in range(world):
            p = layout.plan(epoch, rank, world, workers)
            for rows in p.items:
                for lane, idx in rows.tolist():
                    ln = p.lanes[lane]
                    seg = int(ln.offsets.searchsorted(idx, side="right")) - 1
                    url, first, _ = ln.segments[seg]
                    read.append((url, first + idx - int(ln.offsets[seg])))
        assert len(read) == len(set(read)) == shape.samples_read, epoch
        seen |= set(read)
    assert seen == {(u, i) for u, n in zip(specs, sizes, strict=True) for i in range(n)}


def test_resume_stays_exact_when_an_epoch_leaves_samples_out(tmp_path):
    shards = make_shards(tmp_path / "s", n=61, per_shard=13)  # 5 shards, 61 = 15 x 4 + 1
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=2, shuffle_buffer=8)
    full = [b["key"] for b in micro_loader(cfg).epoch(3)]
    first = micro_loader(cfg)
    it = first.epoch(3)
    taken = [next(it)["key"] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    same = micro_loader(cfg)
    same.load_state_dict([state])
    assert taken + [b["key"] for b in same.epoch(3, start=5)] == full
    other = micro_loader(StreamConfig(**{**cfg.__dict__, "workers": 3}))
    other.load_state_dict([state])
    rest = [k for b in other.epoch(3, start=5) for k in b["key"]]
    assert sorted(sum(taken, []) + rest) == sorted(sum(full, []))


# ------------------------------------------------------- 19: wherever the shards sit


def test_the_same_run_from_two_folders_gives_the_same_losses(tmp_path, monkeypatch, caplog):
    here = make_shards(tmp_path / "a" / "shards", n=48, per_shard=16)
    there = tmp_path / "b" / "elsewhere" / "data"
    shutil.copytree(here, there)
    monkeypatch.chdir(tmp_path / "b")
    relative = "elsewhere/data"  # the moved copy, given relative to the working directory
    recipe = micro_recipe(here, tmp_path / "r1", steps=4, checkpoint_every=2)
    recipe["data"].update(workers=1, shuffle_buffer=8)
    run_pretrain(load_run_config(recipe))
    moved = {
        **recipe,
        "run_dir": str(tmp_path / "r2"),
        "data": {**recipe["data"], "shards": relative},
    }
    run_pretrain(load_run_config(moved))
    want, got = _rows(tmp_path / "r1"), _rows(tmp_path / "r2")
    assert [got[s]["train/loss"] for s in got] == [want[s]["train/loss"] for s in want]
    assert len(want) == 4

    # Data moved between a checkpoint and its resume: still an O(1), exact resume.
    step2 = list_checkpoints(tmp_path / "r1")[0]
    shutil.copytree(step2, tmp_path / "r3" / "checkpoints" / step2.name)
    with caplog.at_level(logging.WARNING):
        run_pretrain(load_run_config({**moved, "run_dir": str(tmp_path / "r3")}), resume="latest")
    assert "data settings changed" not in caplog.text
    assert "reading and discarding" not in caplog.text
    resumed = _rows(tmp_path / "r3")
    assert {s: resumed[s]["train/loss"] for s in resumed} == {
        s: want[s]["train/loss"] for s in (3, 4)
    }


def test_two_ranks_resume_on_damaged_shards_with_the_same_counts(tmp_path):
    """torchrun, 2 gloo processes: the resumed run's losses and skip counts (summed over
    ranks, in the metrics and in state.json) are the uninterrupted run's."""
    from tests.helpers import torchrun

    shards = _damaged(tmp_path / "s")
    script = Path(__file__).parent / "dist" / "train_damaged.py"
    torchrun(script, str(shards), str(tmp_path / "full"), "1", timeout=600)
    at4, at8 = list_checkpoints(tmp_path / "full")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    torchrun(script, str(shards), str(resumed), "1", str(at4), timeout=600)
    full, again = _rows(tmp_path / "full"), _rows(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        assert again[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-6)
        data = {k: v for k, v in full[step].items() if k.startswith("data/")}
        assert {k: again[step][k] for k in data} == data, step
    # One epoch (52 rows, 2 ranks x 6 batches of 4) holds the 20 corrupt and 6 lost samples
    # once, less the 4 it leaves out; steps 7-8 read on into the next.
    assert (
        20 + 6 - 4
        <= full[6]["data/skipped/corrupt_image"] + full[6]["data/skipped/truncated_tar"]
        <= 26
    )
    state = json.loads((list_checkpoints(resumed)[-1] / "state.json").read_text())
    assert state["skipped"] == json.loads((at8 / "state.json").read_text())["skipped"]
    assert sum(state["skipped"].values()) == sum(
        full[8][f"data/skipped/{r}"] for r in state["skipped"]
    )


def test_a_resume_inside_the_repeats_with_other_workers_finishes_the_epoch(tmp_path):
    """Both workers past their lists (repeating) at the stop: the 3 new workers have no rows
    left of their own and repeat the rank's good ones; none of the known failures again."""
    shards = _damaged(tmp_path / "s")
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=2, shuffle_buffer=8)
    full = micro_loader(cfg)
    want = _epoch_counts(full, 0)
    first = micro_loader(cfg)
    it = first.epoch(0)
    taken = [next(it) for _ in range(10)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["chain"][0]["positions"] == [28, 24] and all(state["chain"][0]["fill"])
    other = micro_loader(StreamConfig(**{**cfg.__dict__, "workers": 3}))
    other.load_state_dict([state])
    rest = list(other.epoch(0, start=10))
    assert len(taken) + len(rest) == first.batches_per_epoch == 13
    counts = Counter()
    for batch in taken + rest:
        counts.update(batch["skipped"])
    assert counts == want == {"corrupt_image": 20, "truncated_tar": 6}
