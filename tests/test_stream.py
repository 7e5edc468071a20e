"""The training stream: equal batches on every rank, bad samples skipped and counted."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from clipline.data.stream import StreamConfig
from tests.helpers import make_shards, micro_loader


def _loader(shards, rank=0, world=1, workers=0, batch=8, **kw):
    cfg = StreamConfig(
        shards=str(shards), batch_size=batch, workers=workers, shuffle_buffer=16, **kw
    )
    return micro_loader(cfg, rank=rank, world_size=world)


def _append_corrupt_sample(shard: Path, key: str) -> None:
    data = shard.read_bytes()
    # Rebuild the tar with one extra sample whose jpg is garbage.
    src = tarfile.open(fileobj=io.BytesIO(data))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        for ext, payload in (("jpg", b"\xff\xd8not a jpeg at all"), ("txt", b"a broken picture")):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload))
    shard.write_bytes(out.getvalue())
    sizes_path = shard.parent / "sizes.json"  # the manifest counts what the tar holds
    sizes = json.loads(sizes_path.read_text())
    sizes[shard.name] += 1
    sizes_path.write_text(json.dumps(sizes))


def test_batches_have_the_model_shapes(tmp_path):
    loader = _loader(make_shards(tmp_path / "s"))
    batch = next(loader.epoch(0))
    # uint8 pixels by default; the loop normalises them on the device (decode.uint8_images).
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8
    # Tokens are cut after the batch's longest caption (exact for causal text towers).
    assert batch["text"].shape[0] == 8 and batch["text"].shape[1] <= 16
    assert batch["text"].dtype == torch.int64
    assert len(batch["key"]) == 8


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    shards = make_shards(tmp_path / "s", n=32, per_shard=16)
    _append_corrupt_sample(shards / "000000.tar", "zz_corrupt")
    loader = _loader(shards, batch=3)  # 33 samples, 11 batches: one refilled
    skipped, keys = {}, []
    for batch in loader.epoch(0):
        keys += batch["key"]
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert "zz_corrupt" not in keys
    assert skipped == {"corrupt_image": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(tmp_path, workers):
    from clipline.data.builtin_data import generate_shapes
    from clipline.data.ingest import Sample
    from clipline.data.shards import write_samples

    # Shards of 40, 4, 4 and 2 samples: a naive split gives rank 0 far more data than rank 1.
    scenes = generate_shapes(50, seed=1, image_size=32)
    out = tmp_path / "uneven"
    for i, (lo, hi) in enumerate([(0, 40), (40, 44), (44, 48), (48, 50)]):
        write_samples(
            (
                Sample(key=f"k{j:03d}", image=scenes[j].image, caption=scenes[j].caption)
                for j in range(lo, hi)
            ),
            out / f"part{i}",
            samples_per_shard=100,
        )
    spec = "::".join(str(out / f"part{i}" / "000000.tar") for i in range(4))
    counts = []
    for rank in range(2):
        loader = _loader(spec, rank=rank, world=2, workers=workers, batch=4, num_samples=50)
        counts.append(sum(1 for _ in loader.epoch(0)))
    assert counts[0] == counts[1] == loader.batches_per_epoch > 0


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(tmp_path):
    shards = make_shards(tmp_path / "s", n=32, per_shard=16)  # 2 shards
    with pytest.raises(ValueError, match="2 shards .* 2 ranks x 2 workers = 4 readers"):
        _loader(shards, world=2, workers=2)


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="missing.tar"):
        _loader(f"{tmp_path}/missing.tar")


def test_persistent_workers_follow_the_epoch_like_a_fresh_loader(tmp_path):
    # Resume relies on it: epoch 1 from workers that lived through epoch 0 must equal
    # epoch 1 from a loader started fresh at epoch 1.
    shards = make_shards(tmp_path / "s", n=64, per_shard=16)
    kept = _loader(shards, workers=2)
    keys0 = [k for b in kept.epoch(0) for k in b["key"]]
    keys1 = [k for b in kept.epoch(1) for k in b["key"]]
    fresh1 = [k for b in _loader(shards, workers=2).epoch(1) for k in b["key"]]
    assert keys1 == fresh1
    assert keys0 != keys1  # shard order and shuffles change with the epoch


def test_augmented_pixels_depend_only_on_the_batch_coordinates(tmp_path):
    shards = make_shards(tmp_path / "s", n=64, per_shard=16)
    kept = _loader(shards, workers=2)
    list(kept.epoch(0))
    persistent = [b["image"] for b in kept.epoch(1)]
    torch.manual_seed(123)  # the caller's RNG state must not matter
    fresh = [b["image"] for b in _loader(shards, workers=2).epoch(1)]
    assert len(persistent) == len(fresh) > 0
    for a, b in zip(persistent, fresh, strict=True):
        assert torch.equal(a, b)
    state = torch.get_rng_state()
    next(_loader(shards, workers=0).epoch(0))
    assert torch.equal(torch.get_rng_state(), state)  # in-process reading leaves it alone
