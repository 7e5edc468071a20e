"""Exact mid-epoch resume of the stream: by sample identity, with any worker count, O(1)."""

import json

import pytest
import torch

from clipline.data.stream import StreamConfig
from tests.helpers import make_shards, micro_loader, sample_ids


def _loader(shards, workers, mode="exact", rank=0, world=1, **kw):
    kw = {"shuffle_buffer": 8, **kw}
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=workers, mode=mode, **kw)
    return micro_loader(cfg, rank=rank, world_size=world)


def _take(loader, epoch, n, start=0):
    it = loader.epoch(epoch, start=start)
    batches = [next(it) for _ in range(n)]
    # A checkpoint holds what json can: the state must survive the round trip.
    return batches, json.loads(json.dumps(loader.state_dict()))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("resume") / "s", n=104, per_shard=13)


def test_resume_with_the_same_workers_gives_the_same_batches(shards):
    full = list(_loader(shards, workers=2).epoch(1))
    first, state = _take(_loader(shards, workers=2), 1, 7)  # 7: mid-round for 2 workers
    resumed = _loader(shards, workers=2)
    resumed.load_state_dict([state])
    rest = list(resumed.epoch(1, start=7))
    assert len(first) + len(rest) == len(full) == resumed.batches_per_epoch == 26
    for a, b in zip(first + rest, full, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"])  # same crops: augmentation is per sample


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 0), (0, 2)])
def test_resume_with_other_workers_sees_each_sample_of_the_epoch_once(shards, before, after):
    full = sample_ids(_loader(shards, workers=0).epoch(0))
    assert len(full) == len(set(full)) == 104
    first, state = _take(_loader(shards, workers=before), 0, 8)
    resumed = _loader(shards, workers=after)
    resumed.load_state_dict([state])
    rest = list(resumed.epoch(0, start=8))
    assert len(first) + len(rest) == 26  # the rank's batch count does not change
    seen = sample_ids(first) + sample_ids(rest)
    assert sorted(seen) == sorted(full)  # none repeated, none skipped


def test_two_worker_changes_in_one_epoch_stay_exact(shards):
    full = sorted(sample_ids(_loader(shards, workers=1).epoch(0)))
    first, state = _take(_loader(shards, workers=2), 0, 5)
    middle_loader = _loader(shards, workers=3)
    middle_loader.load_state_dict([state])
    middle, state = _take(middle_loader, 0, 9, start=5)
    assert len(state["chain"]) == 2  # the state records the change, as a few integers
    last_loader = _loader(shards, workers=1)
    last_loader.load_state_dict([state])
    last = list(last_loader.epoch(0, start=14))
    assert len(first) + len(middle) + len(last) == 26
    assert sorted(sample_ids(first) + sample_ids(middle) + sample_ids(last)) == full
    # The next epoch starts afresh with the new worker count.
    assert sorted(sample_ids(last_loader.epoch(1))) == full


def test_resampled_resume_continues_the_seeded_sequence(shards):
    kw = {"mode": "resampled", "num_samples": 60}
    full = [b["key"] for b in _loader(shards, workers=2, **kw).epoch(3)]
    first, state = _take(_loader(shards, workers=2, **kw), 3, 4)
    resumed = _loader(shards, workers=2, **kw)
    resumed.load_state_dict([state])
    rest = [b["key"] for b in resumed.epoch(3, start=4)]
    assert [b["key"] for b in first] + rest == full
    assert len(full) == 15
    # Another worker count shares the epoch's remaining draws: the same multiset of samples.
    other = _loader(shards, workers=3, **kw)
    other.load_state_dict([state])
    rest = [k for b in other.epoch(3, start=4) for k in b["key"]]
    assert sorted([k for b in first for k in b["key"]] + rest) == sorted(sum(full, []))


def test_resume_reads_only_what_is_left(shards, monkeypatch):
    """O(1): a resumed worker opens no shard whose samples were all consumed."""
    from clipline.data import shard_io

    opened = []
    real_open = shard_io.open_shard

    def recording_open(url, **kwargs):
        opened.append(url)
        return real_open(url, **kwargs)

    monkeypatch.setattr(shard_io, "open_shard", recording_open)
    loader = _loader(shards, workers=0, shuffle_buffer=1)  # read order == emit order
    _, state = _take(loader, 0, 20)
    plan = loader.stream.plan(0, state["chain"])
    segments = plan.lanes[0].segments
    assert [stop - first for _, first, stop in segments[:6]] == [13] * 6  # samples 0..77
    opened.clear()
    resumed = _loader(shards, workers=0, shuffle_buffer=1)
    resumed.load_state_dict([state])
    assert len(list(resumed.epoch(0, start=20))) == 6
    # Samples 80..103 live in the 7th and 8th shards; the first six are never opened again.
    assert [u for u in opened if u.endswith(".tar")] == [segments[6][0], segments[7][0]]


def test_a_changed_data_config_falls_back_to_replay(shards, caplog):
    first, state = _take(_loader(shards, workers=0), 0, 3)
    other = _loader(shards, workers=0, seed=1)
    other.load_state_dict([state])
    assert len(list(other.epoch(0, start=3))) == 23
    assert "data settings changed" in caplog.text


def test_training_saves_the_stream_state_and_resumes_with_other_workers(tmp_path, caplog):
    import logging
    import shutil

    from clipline.launch.config import load_run_config
    from clipline.launch.run import run_pretrain
    from clipline.pretrain.checkpoint import list_checkpoints
    from tests.helpers import micro_recipe

    shards = make_shards(tmp_path / "s", n=64, per_shard=16)
    recipe = micro_recipe(shards, tmp_path / "run", steps=4, checkpoint_every=2)
    run_pretrain(load_run_config(recipe))
    first, last = list_checkpoints(tmp_path / "run")
    (saved,) = json.loads((first / "state.json").read_text())["stream"]  # one per rank
    assert (saved["epoch"], saved["batches"], saved["chain"][0]["workers"]) == (0, 2, 1)
    shutil.rmtree(last)
    recipe["data"]["workers"] = 2
    with caplog.at_level(logging.WARNING):
        run_pretrain(load_run_config(recipe), resume="latest")
    assert "reading and discarding" not in caplog.text  # no replay: the state was used
    (final,) = json.loads((list_checkpoints(tmp_path / "run")[-1] / "state.json").read_text())[
        "stream"
    ]
    assert final["batches"] == 4 and [link["workers"] for link in final["chain"]] == [1, 2]
