import pytest
from accelerate.state import AcceleratorState


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerate keeps one process-wide state (e.g. the mixed-precision mode); a real run is
    # one process, tests run many configs in one, so each test starts clean (as accelerate's
    # own test suite does).
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def micro_shards(tmp_path_factory):
    """64 generated pairs in 4 shards of 16 (tests.helpers.make_shards), for the tests that
    only read them."""
    from tests.helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("micro_shards") / "shards", n=64, per_shard=16)


@pytest.fixture(scope="session")
def two_rank_run(micro_shards, tmp_path_factory):
    """(shards, run_dir): a real 2-rank torchrun of `clipline pretrain`'s path on
    ``micro_shards`` (tests/dist/train_two_ranks.py: 4 steps, checkpoints at 2 and 4).
    Several modules read this run; one that writes into it copies it first."""
    from pathlib import Path

    from tests.helpers import torchrun

    run_dir = tmp_path_factory.mktemp("two_rank_run") / "run"
    torchrun(Path(__file__).parent / "dist" / "train_two_ranks.py", str(micro_shards), str(run_dir))
    return micro_shards, run_dir
