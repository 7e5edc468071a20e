"""Elastic exact resume: an epoch resumed on another number of ranks (and workers) sees
every sample once, by sample key, with real torchrun processes."""

import json
from pathlib import Path

import pytest

from clipline.data.stream import StreamConfig
from tests.helpers import make_shards, micro_loader, sample_ids, torchrun

SCRIPT = Path(__file__).parent / "dist" / "stream_elastic.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 104 samples in 8 shards, batch 4: 13 batches per rank on 2 ranks, 26 on 1, 8 on 3
    return make_shards(tmp_path_factory.mktemp("elastic") / "s", n=104, per_shard=13)


@pytest.fixture(scope="module")
def epoch_ids(shards):
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=0, shuffle_buffer=8)
    ids = sample_ids(micro_loader(cfg).epoch(0))
    assert len(ids) == len(set(ids)) == 104
    return sorted(ids)


# The legs of both tests below, in launches by world size; a leg needs the report of the leg
# it resumes, so the launches run in this order. Each leg has its own loader in its launch,
# as a launch of its own would have; sharing the launches saves process start-ups.
LAUNCHES = [
    (2, [("a", None, 3, 2)]),  # (name, resumes, batches per rank, workers)
    (1, [("b1", "a", "all", 0), ("one_a", None, 5, 1)]),
    (3, [("b2", "a", 1, 1)]),
    (2, [("c", "b2", "all", 2), ("one_b", "one_a", "all", 2)]),
]


@pytest.fixture(scope="module")
def legs(shards, tmp_path_factory) -> dict[str, dict]:
    """Every leg's report, by name."""
    out = tmp_path_factory.mktemp("legs")
    reports = {}
    for nproc, launch in LAUNCHES:
        args = []
        for name, previous, take, workers in launch:
            prev = str(out / f"{previous}.json") if previous else "-"
            args += [prev, str(take), str(workers), str(out / f"{name}.json")]
        torchrun(SCRIPT, str(shards), *args, nproc=nproc)
        for name, *_ in launch:
            reports[name] = _report(out / f"{name}.json")
    return reports


def _report(path: Path) -> dict:
    report = json.loads(path.read_text())
    counts = {r["batches"] for r in report["ranks"]}
    assert len(counts) == 1, counts  # equal batch counts on every rank: no DDP hang
    report["ids"] = [i for r in report["ranks"] for i in r["ids"]]
    return report


def _check(legs, epoch_ids):
    seen = [i for leg in legs for i in leg["ids"]]
    left_out = sum(leg["ranks"][0]["left_out"] for leg in legs)
    assert len(seen) == len(set(seen))  # no sample twice
    assert set(seen) <= set(epoch_ids)
    # every sample of the epoch read once, or reported left out (the tail that fills no
    # whole batch on every new rank)
    assert len(seen) + left_out == len(epoch_ids)
    # the next epoch is planned afresh for the new world size
    last = legs[-1]
    assert sorted(i for r in last["ranks"] for i in r["next"]) == epoch_ids
    return left_out


def test_two_ranks_resume_on_one_and_on_three_then_two(legs, epoch_ids):
    first = legs["a"]  # 2 ranks, 2 workers: 24 samples read
    assert len(first["ids"]) == 24
    # 2 -> 1 (and 2 workers -> 0): the 80 unread samples are 20 whole batches
    one = legs["b1"]
    assert one["ranks"][0]["batches"] == 20
    assert _check([first, one], epoch_ids) == 0
    assert sorted(first["ids"] + one["ids"]) == epoch_ids
    # 2 -> 3 (1 worker): 80 // (3 x 4) = 6 batches per rank, 8 samples left out and reported
    three = legs["b2"]
    assert three["ranks"][0]["left_out"] == 8
    assert len(three["states"][0]["history"]) == 1
    # a second change in the same epoch, 3 -> 2 (2 workers): the 60 unread of the 72 shared out
    two = legs["c"]
    assert [r["batches"] for r in two["ranks"]] == [7, 7]
    assert _check([first, three, two], epoch_ids) == 8 + 4


def test_one_rank_resumes_on_two(legs, epoch_ids):
    first = legs["one_a"]  # 1 rank, 1 worker, 5 batches
    two = legs["one_b"]  # 2 ranks, 2 workers
    assert [r["batches"] for r in two["ranks"]] == [10, 10]  # 84 unread: 2 x 10 batches, 4 left
    assert _check([first, two], epoch_ids) == 84 - 80


def test_resampled_continues_the_draws_on_another_world_size(shards):
    """The epoch's remaining seeded draws of both old ranks, shared by the new rank."""
    from collections import Counter

    def loader(rank, world):
        cfg = StreamConfig(
            shards=str(shards),
            batch_size=4,
            workers=1,
            shuffle_buffer=8,
            mode="resampled",
            num_samples=64,
        )
        return micro_loader(cfg, rank=rank, world_size=world)

    full, consumed, states = Counter(), Counter(), []
    for rank in range(2):
        full.update(sample_ids(loader(rank, 2).epoch(2)))  # 8 batches per rank
        old = loader(rank, 2)
        it = old.epoch(2)
        consumed.update(sample_ids([next(it) for _ in range(3)]))
        states.append(json.loads(json.dumps(old.state_dict())))
    new = loader(0, 1)
    new.load_state_dict(states)
    rest = list(new.epoch(2, start=3))
    assert len(rest) == 10 and not new.left_out  # 40 draws left: 10 batches of 4
    assert consumed + Counter(sample_ids(rest)) == full


def test_training_on_two_ranks_resumes_on_one_without_replay(micro_shards, tmp_path, caplog):
    """`clipline pretrain`'s loop: a checkpoint of 2 torchrun ranks resumed by 1 process
    continues the epoch from the old ranks' positions (no replay, nothing read twice)."""
    import logging

    from clipline.launch.config import load_run_config
    from clipline.launch.run import run_pretrain
    from clipline.pretrain.checkpoint import list_checkpoints
    from tests.helpers import micro_recipe

    # micro_shards: 64 samples, 4 batches of 8 per rank on 2
    recipe = micro_recipe(micro_shards, tmp_path / "run", steps=3, checkpoint_every=3)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    torchrun(Path(__file__).parent / "dist" / "train_recipe.py", str(tmp_path / "r.json"))
    (ckpt,) = list_checkpoints(tmp_path / "run")
    states = json.loads((ckpt / "state.json").read_text())["stream"]
    assert [(s["world_size"], s["batches"]) for s in states] == [(2, 3), (2, 3)]
    recipe["loop"]["steps"] = 6  # 16 samples left of epoch 0: 2 batches on 1 rank, then epoch 1
    with caplog.at_level(logging.INFO):
        run_pretrain(load_run_config(recipe), resume="latest")
    assert "resuming epoch 0 on 1 ranks instead of 2" in caplog.text
    assert "reading and discarding" not in caplog.text and "by replay" not in caplog.text
    final = json.loads((list_checkpoints(tmp_path / "run")[-1] / "state.json").read_text())
    (stream,) = final["stream"]
    assert (stream["epoch"], stream["batches"], final["step"]) == (1, 1, 6)
