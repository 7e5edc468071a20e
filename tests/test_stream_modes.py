"""Stream modes: exact epochs, resampling, weighted mixing of sources, few shards."""

import logging

import pytest

from clipline.data.builtin_data import generate_shapes
from clipline.data.ingest import Sample
from clipline.data.shards import write_samples
from clipline.data.stream import SourceConfig, StreamConfig, epoch_shape
from clipline.launch.config import load_run_config
from tests.helpers import make_shards, micro_loader, micro_recipe, sample_ids


def _write(out, sizes, seed=0):
    """Shards of the given sizes (one folder each, with its sizes.json); returns the spec."""
    scenes = generate_shapes(sum(sizes), seed=seed, image_size=32)
    start, parts = 0, []
    for i, n in enumerate(sizes):
        write_samples(
            (
                Sample(key=f"{j}", image=scenes[j].image, caption=scenes[j].caption)
                for j in range(start, start + n)
            ),
            out / f"part{i}",
            samples_per_shard=n,
        )
        parts.append(str(out / f"part{i}" / "000000.tar"))
        start += n
    return "::".join(parts)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return make_shards(root / "a", n=48, per_shard=8), make_shards(root / "b", n=48, per_shard=8)


def test_exact_epoch_splits_uneven_shards_into_equal_disjoint_rank_slices(tmp_path):
    spec = _write(tmp_path, [23, 2, 9, 1, 5])  # 40 samples
    per_rank = []
    for rank in range(3):
        cfg = StreamConfig(shards=spec, batch_size=4, workers=0, shuffle_buffer=4)
        per_rank.append(sample_ids(micro_loader(cfg, rank=rank, world_size=3).epoch(2)))
    assert [len(x) for x in per_rank] == [12, 12, 12]  # 40 // (3 x 4) = 3 batches each
    seen = [i for ids in per_rank for i in ids]
    assert len(set(seen)) == 36  # disjoint; 4 samples wait for another epoch


def test_exact_epochs_cover_every_sample_and_reshuffle(two_sources):
    a, b = two_sources
    cfg = StreamConfig(
        sources=[SourceConfig(shards=str(a)), SourceConfig(shards=str(b))],
        batch_size=8,
        workers=2,
        shuffle_buffer=16,
    )
    loader = micro_loader(cfg)
    e0, e1 = sample_ids(loader.epoch(0)), sample_ids(loader.epoch(1))
    assert len(e0) == len(set(e0)) == 96 and sorted(e0) == sorted(e1)
    assert e0 != e1
    assert {u.split("/")[-2] for u in e0} == {"a", "b"}


def test_resampled_weights_set_the_share_of_each_source_deterministically(two_sources):
    a, b = two_sources
    sources = [SourceConfig(shards=str(a), weight=3.0), SourceConfig(shards=str(b), weight=1.0)]
    cfg = StreamConfig(
        sources=sources,
        mode="resampled",
        num_samples=400,
        batch_size=8,
        workers=0,
        shuffle_buffer=16,
    )
    ids = sample_ids(micro_loader(cfg).epoch(0))
    assert len(ids) == 400
    share_a = sum("/a/" in i for i in ids) / len(ids)
    assert share_a == pytest.approx(0.75, abs=0.06)
    assert len(set(ids)) < len(ids)  # drawn with replacement
    assert sample_ids(micro_loader(cfg).epoch(0)) == ids  # same seed, same stream
    assert sample_ids(micro_loader(cfg).epoch(1)) != ids


def test_resampled_per_batch_mixing_keeps_each_batch_to_one_source(two_sources):
    a, b = two_sources
    sources = [SourceConfig(shards=str(a), weight=1.0), SourceConfig(shards=str(b), weight=1.0)]
    cfg = StreamConfig(
        sources=sources,
        mode="resampled",
        mix="batch",
        num_samples=320,
        batch_size=8,
        workers=2,
        shuffle_buffer=16,
    )
    origins = [{u.split("/")[-2] for u in batch["url"]} for batch in micro_loader(cfg).epoch(0)]
    assert len(origins) == 40 and all(len(o) == 1 for o in origins)
    assert 10 < sum(o == {"a"} for o in origins) < 30


def test_resampled_mode_serves_more_readers_than_shards(tmp_path):
    spec = _write(tmp_path, [30, 3])
    counts = []
    for rank in range(2):
        cfg = StreamConfig(
            shards=spec, mode="resampled", batch_size=4, workers=2, num_samples=64, shuffle_buffer=8
        )
        counts.append(sum(1 for _ in micro_loader(cfg, rank=rank, world_size=2).epoch(0)))
    assert counts == [8, 8]


def test_few_shards_can_switch_exact_mode_to_resampling_with_a_warning(tmp_path, caplog):
    shards = make_shards(tmp_path / "s", n=32, per_shard=16)
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=2, few_shards="resample")
    with caplog.at_level(logging.WARNING):
        shape = epoch_shape(cfg, world_size=2)
    assert shape.mode == "resampled" and "switching to resampled mode" in caplog.text


def test_bad_mixtures_are_clear_errors(two_sources):
    a, b = two_sources
    weighted = [SourceConfig(shards=str(a), weight=2.0), SourceConfig(shards=str(b))]
    with pytest.raises(ValueError, match="need data.mode='resampled'"):
        epoch_shape(StreamConfig(sources=weighted), 1)
    with pytest.raises(ValueError, match="exactly one of data.shards"):
        epoch_shape(StreamConfig(shards=str(a), sources=weighted), 1)
    with pytest.raises(ValueError, match="num_samples=97 but the shards hold 96"):
        epoch_shape(StreamConfig(sources=weighted[1:] * 2, num_samples=97, workers=0), 1)


def test_recipes_take_a_list_of_sources(two_sources, tmp_path):
    a, b = two_sources
    recipe = micro_recipe(a, tmp_path / "run")
    del recipe["data"]["shards"]
    recipe["data"] |= {
        "mode": "resampled",
        "sources": [{"shards": str(a), "weight": 0.7}, {"shards": str(b), "weight": 0.3}],
    }
    cfg = load_run_config(recipe)
    assert [s.weight for s in cfg.data.sources] == [0.7, 0.3]
    with pytest.raises(ValueError, match=r"data.sources\[0\].wieght"):
        recipe["data"]["sources"][0]["wieght"] = 1
        load_run_config(recipe)


def test_two_ranks_with_uneven_shards_never_hang(tmp_path):
    """torchrun, gloo: both modes (and the few-shards switch) finish, equal batches per rank."""
    import json
    from pathlib import Path

    from tests.helpers import torchrun

    spec = _write(tmp_path, [31, 2, 7, 1, 9])  # 50 samples in very uneven shards
    out = tmp_path / "report.json"
    script = Path(__file__).parent / "dist" / "stream_two_ranks.py"
    torchrun(script, spec, str(out), timeout=120)
    report = json.loads(out.read_text())
    exact = report["exact/error"]
    assert [r["batches"] for r in exact] == [12, 12]  # 50 // (2 x 4) = 6 per epoch
    ids = exact[0]["ids"] + exact[1]["ids"]
    assert len(ids) == len(set(ids)) == 96  # no sample twice in an epoch, across ranks
    for key in ("resampled/error", "exact/resample"):
        assert [r["batches"] for r in report[key]] == [12, 12]  # 48 // (2 x 4) per epoch


def test_a_shard_listed_in_sizes_json_but_absent_fails_before_training(tmp_path):
    shards = make_shards(tmp_path / "s", n=48, per_shard=16)
    (shards / "000001.tar").unlink()
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=0)
    with pytest.raises(ValueError, match=r"lists 1 shard\(s\) that are not in the folder"):
        epoch_shape(cfg, world_size=1)
