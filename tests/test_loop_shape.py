"""The training loop reads in one screen and takes model-ready batches from its loader."""

import ast
import inspect
from collections import Counter
from pathlib import Path

import torch

from clipline.data.loader import LoaderStats, build_train_loader
from clipline.data.stream import StreamConfig
from clipline.pretrain import loop
from tests.helpers import make_shards, micro_model
from tests.test_stream import _append_corrupt_sample


def test_train_fits_one_screen():
    lines, _ = inspect.getsourcelines(loop.train)  # the whole def, docstring included
    assert len(lines) <= 100, len(lines)


def test_loop_imports_only_the_loader_type_from_data():
    tree = ast.parse(Path(inspect.getsourcefile(loop)).read_text())
    from_data = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipline.data"):
            from_data |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("clipline.data") for a in node.names), node.names
    # The loader's type, and the config-checking helper every component config uses.
    assert from_data == {
        ("clipline.data.loader", "TrainLoader"),
        ("clipline.data.hints", "check_choices"),
    }


def _loader(shards: Path, **kw):
    model = micro_model()
    cfg = StreamConfig(shards=str(shards), batch_size=3, workers=0, shuffle_buffer=16)
    return build_train_loader(
        cfg,
        preprocess=model.preprocess_config(),
        tokenize=model.tokenize,
        rank=0,
        world_size=1,
        **kw,
    )


def test_batches_arrive_normalised_each_micro_batch_of_a_step_in_its_own_buffer(tmp_path):
    shards = make_shards(tmp_path / "s", n=32, per_shard=16)
    _append_corrupt_sample(shards / "000000.tar", "zz_corrupt")
    raw = list(_loader(shards).epoch(0))  # as the workers make them: uint8 on the CPU
    loader = _loader(shards, device="cpu", accum_steps=2)
    assert loader.batch_size == 3
    ready = []
    for batch in loader.epoch(0):
        # What the step holds: its micro-batches alive at once, as the loop keeps them.
        ready.append({**batch, "image": batch["image"].clone(), "ptr": batch["image"].data_ptr()})
    assert len(ready) == len(raw) == loader.batches_per_epoch
    normalize = loader.stream.decoder.model_input
    for got, want in zip(ready, raw, strict=True):
        assert want["image"].dtype == torch.uint8 and got["image"].dtype == torch.float32
        assert torch.equal(got["image"], normalize(want["image"], 7))
        assert torch.equal(got["text"], want["text"]) and got["key"] == want["key"]
    ptrs = [b["ptr"] for b in ready]
    assert all(ptrs[i] != ptrs[i + 1] for i in range(len(ptrs) - 1))  # a step's two buffers
    assert all(ptrs[i] == ptrs[i + 2] for i in range(len(ptrs) - 2))  # reused step after step
    # The skip and colour counts of the batches taken, in one stats object.
    skipped = sum((Counter(b["skipped"]) for b in raw), Counter())
    assert skipped == Counter(corrupt_image=1)
    assert loader.stats.skipped == skipped
    metrics = LoaderStats.as_metrics(loader.stats.vector())
    assert metrics["data/skipped/corrupt_image"] == 1 and metrics["data/converted/grey"] == 0
    # A checkpoint holds the sum over ranks; rank 0 carries it on, the others start at 0.
    total = LoaderStats.total([loader.stats.state_dict(), loader.stats.state_dict()])
    assert total["skipped"] == {"corrupt_image": 2}
    rank1 = LoaderStats(rank=1)
    rank1.load_state_dict(total)
    resumed = LoaderStats(rank=0)
    resumed.load_state_dict(total)
    assert not rank1.skipped and resumed.skipped == Counter(corrupt_image=2)
