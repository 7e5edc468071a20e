"""Sharded checkpoints resume on another number of ranks (issue 13, item 2).

Real `clipline pretrain` runs write the checkpoints (one process, or 2 torchrun gloo
ranks); tests/dist/reshard.py loads them on W' ranks under DDP or FSDP2 and saves them
again; both checkpoints, consolidated by DCP in this process, hold identical weights and
optimizer state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from clipline.launch.config import load_run_config
from clipline.launch.run import run_pretrain
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from tests.helpers import micro_recipe, torchrun

DIST = Path(__file__).parent / "dist"


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list | tuple):
        return _flat(dict(enumerate(tree)), prefix)
    return {prefix.rstrip("."): tree}


def _assert_same_checkpoint(saved: Path, again: Path) -> None:
    for part in ("model", "optim"):
        want, got = _flat(consolidated_state(saved, part)), _flat(consolidated_state(again, part))
        assert want.keys() == got.keys(), part
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, got[key]), (part, key)
            else:
                assert value == got[key], (part, key)
    # The optimizer state was trained (non-zero moments), so a load that did nothing fails.
    moments = [v for k, v in _flat(consolidated_state(saved, "optim")).items() if "exp_avg" in k]
    assert moments and any(m.abs().sum() > 0 for m in moments)


def test_two_rank_checkpoint_resumes_on_one_and_three_ranks(two_rank_run, tmp_path) -> None:
    saved = list_checkpoints(two_rank_run[1])[-1]  # tests/dist/train_two_ranks.py's step 4
    assert len(list((saved / "dcp").glob("*.distcp"))) == 2  # each rank wrote its part
    torchrun(DIST / "reshard.py", str(saved), str(tmp_path / "on1"), "ddp", nproc=1)
    _assert_same_checkpoint(saved, list_checkpoints(tmp_path / "on1")[-1])
    torchrun(DIST / "reshard.py", str(saved), str(tmp_path / "on3"), "fsdp", nproc=3)
    on3 = list_checkpoints(tmp_path / "on3")[-1]
    assert len(list((on3 / "dcp").glob("*.distcp"))) == 3
    _assert_same_checkpoint(saved, on3)
    # And back from 3 FSDP2 shards to 2 DDP ranks.
    torchrun(DIST / "reshard.py", str(on3), str(tmp_path / "back"), "ddp", nproc=2)
    _assert_same_checkpoint(saved, list_checkpoints(tmp_path / "back")[-1])


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(micro_shards, tmp_path) -> None:
    run_pretrain(load_run_config(micro_recipe(micro_shards, tmp_path / "run", steps=2)))
    saved = list_checkpoints(tmp_path / "run")[-1]
    torchrun(DIST / "reshard.py", str(saved), str(tmp_path / "on2"), "fsdp", nproc=2)
    _assert_same_checkpoint(saved, list_checkpoints(tmp_path / "on2")[-1])


def test_training_resumes_on_another_world_size(two_rank_run, tmp_path) -> None:
    """The loop's own resume path: 2 ranks to step 4, then one process to step 6."""
    shards, two_ranks = two_rank_run
    shutil.copytree(two_ranks, tmp_path / "run")  # the shared run stays as the ranks left it
    recipe = micro_recipe(shards, tmp_path / "run", steps=6)
    run_pretrain(load_run_config(recipe), resume="latest")
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [
        "step_000000004",
        "step_000000006",
    ]
