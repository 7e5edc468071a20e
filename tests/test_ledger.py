"""The sample ledger (``loop.sample_ledger``): what a run trained on, step by step.

A kill -9 of a real ``clipline pretrain`` and ``--resume latest`` leave the ledger equal to
the uninterrupted run's, epoch by epoch; a 2-rank torchrun run's ledger holds both ranks'
samples; ``clipline data ledger`` counts a corrupt sample as skipped.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from clipline.data.ledger import read_rows
from clipline.launch.cli import main
from clipline.pretrain.checkpoint import list_checkpoints
from tests.helpers import free_port, make_shards, micro_recipe, to_toml
from tests.test_stream import _append_corrupt_sample

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _recipe(where: Path, shards: Path, run: Path, **loop) -> Path:
    path = where / f"{run.name}.toml"
    path.write_text(to_toml(micro_recipe(shards, run, sample_ledger=True, **loop)))
    return path


def _clipline_pretrain(recipe: Path, *extra: str) -> list[str]:
    return ["-m", "clipline", "pretrain", "--recipe", str(recipe), *extra]


def _pretrain(recipe: Path, *extra: str, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, *_clipline_pretrain(recipe, *extra)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV
    )


def _rank_rows(run: Path) -> dict[str, list[dict]]:
    return {p.name: read_rows(p) for p in sorted((run / "ledger").glob("rank_*.jsonl"))}


def _per_epoch(run: Path) -> dict[int, Counter]:
    """epoch -> ``url#key`` -> times, over every rank's file."""
    out: dict[int, Counter] = defaultdict(Counter)
    for rows in _rank_rows(run).values():
        for row in rows:
            for b in row["batches"]:
                out[b["epoch"]].update(f"{u}#{k}" for u, k in zip(b["url"], b["key"], strict=True))
    return dict(out)


def _report(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["data", "ledger", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_kill_9_and_resume_keeps_the_uninterrupted_ledger(tmp_path, capsys):
    # Relative shard and run paths, as a user types them in a recipe.
    make_shards(tmp_path / "shards", n=64, per_shard=16)  # 8 batches of 8: an epoch
    steps = 24
    loop = {"steps": steps, "checkpoint_every": 4, "keep_last": 20}
    full_recipe = _recipe(tmp_path, Path("shards"), Path("full"), **loop)
    killed_recipe = _recipe(tmp_path, Path("shards"), Path("killed"), **loop)
    full = _pretrain(full_recipe, cwd=tmp_path)
    proc = _pretrain(killed_recipe, cwd=tmp_path)
    run = tmp_path / "killed"
    deadline = time.monotonic() + 240
    # Kill -9 two or more steps after a checkpoint: those steps are in the ledger, not saved.
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        ckpts = list_checkpoints(run)
        rows = _rank_rows(run).get("rank_00000.jsonl", [])
        if ckpts and rows and rows[-1]["step"] >= int(ckpts[-1].name.removeprefix("step_")) + 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = int(list_checkpoints(run)[-1].name.removeprefix("step_"))
    ledger = run / "ledger" / "rank_00000.jsonl"
    assert read_rows(ledger)[-1]["step"] > saved
    with open(ledger, "ab") as f:  # what a kill in the middle of a row's write leaves
        f.write(b'{"step":99,"batches":[{"epoch":')

    resumed = _pretrain(killed_recipe, "--resume", "latest", cwd=tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "rank_00000.jsonl: cut " in err and f"bytes of rows past step {saved} " in err
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err

    assert [r["step"] for r in read_rows(ledger)] == list(range(1, steps + 1))
    got, want = _per_epoch(run), _per_epoch(tmp_path / "full")
    assert sorted(got) == [0, 1, 2]
    assert got == want
    for epoch in range(3):  # exact mode: every sample once per epoch
        assert len(got[epoch]) == 64 and set(got[epoch].values()) == {1}

    report = _report(run, capsys)
    assert report["manifest_samples"] == report["samples_per_epoch"] == 64
    assert report["steps"] == [1, steps]
    for e in report["epochs"]:
        assert (e["complete"], e["seen_0"], e["seen_1"], e["seen_2plus"]) == (True, 0, 64, 0)


def test_two_rank_torchrun_ledger_holds_both_ranks(tmp_path, capsys):
    make_shards(tmp_path / "shards", n=64, per_shard=16)  # 4 steps of 2 x 8: an epoch
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, tmp_path / "shards", run, steps=6)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, *_clipline_pretrain(recipe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]

    rows = _rank_rows(run)
    assert sorted(rows) == ["rank_00000.jsonl", "rank_00001.jsonl"]
    for rank_rows in rows.values():
        assert [r["step"] for r in rank_rows] == list(range(1, 7))
        assert all(len(r["batches"][0]["key"]) == 8 for r in rank_rows)
    first = [
        {
            f"{u}#{k}"
            for r in rank_rows
            if r["step"] <= 4
            for b in r["batches"]
            for u, k in zip(b["url"], b["key"], strict=True)
        }
        for rank_rows in rows.values()
    ]
    assert len(first[0]) == len(first[1]) == 32 and not first[0] & first[1]  # each its half

    epochs = _per_epoch(run)
    assert len(epochs[0]) == 64 and set(epochs[0].values()) == {1}
    assert sum(epochs[1].values()) == 32  # steps 5 and 6: half of epoch 1
    report = _report(run, capsys)
    assert report["ranks"] == 2 and report["samples_per_epoch"] == 64
    e0, e1 = report["epochs"]
    assert (e0["complete"], e0["seen_0"], e0["seen_1"], e0["seen_2plus"]) == (True, 0, 64, 0)
    assert (e1["complete"], e1["taken"], e1["seen_0"], e1["seen_1"]) == (False, 32, 32, 32)


def test_report_counts_a_corrupt_sample_as_skipped(tmp_path, capsys):
    shards = make_shards(tmp_path / "shards", n=31, per_shard=16)
    _append_corrupt_sample(shards / "000001.tar", "zz_corrupt")  # 32 samples: 4 batches of 8
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, shards, run, steps=4)
    assert main(["pretrain", "--recipe", str(recipe)]) == 0

    report = _report(run, capsys)
    (epoch,) = report["epochs"]
    assert epoch["skipped"] == {"corrupt_image": 1}
    # Its slot is filled by a repeat of a good sample; the corrupt one is never seen.
    assert (epoch["seen_0"], epoch["seen_1"], epoch["seen_2plus"]) == (1, 30, 1)
    assert epoch["complete"] and epoch["taken"] == 32
    assert "zz_corrupt" not in str(_per_epoch(run))

    capsys.readouterr()
    assert main(["data", "ledger", str(run)]) == 0
    text = capsys.readouterr().out
    assert (
        "epoch 0 (complete): seen 0 times 1, once 30, 2+ times 1; skipped: corrupt_image 1" in text
    )

    # A run without a ledger: one line saying how to get one, exit 2.
    assert main(["data", "ledger", str(tmp_path / "shards")]) == 2
    assert "loop.sample_ledger=true" in capsys.readouterr().err


def test_resume_on_one_rank_of_a_two_rank_run_keeps_the_uninterrupted_ledger(tmp_path, capsys):
    # 32 samples: an epoch is 2 steps of 2 x 8 on 2 ranks, 4 steps of 8 on 1 rank.
    make_shards(tmp_path / "shards", n=32, per_shard=16)
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, tmp_path / "shards", run, steps=3, checkpoint_every=1, keep_last=5)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, *_clipline_pretrain(recipe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    assert {len(rows) for rows in _rank_rows(run).values()} == {3}

    # Back to step 1 (16 of epoch 0's samples taken) on 1 rank: the 16 unread ones are its
    # steps 2-3, epoch 1 its steps 4-7. Both ranks' rows past step 1 are cut, rank 1's by
    # the new world's rank 0.
    step_1 = run / "checkpoints" / "step_000000001"
    assert main(["pretrain", "--recipe", str(recipe), "--resume", str(step_1), "loop.steps=7"]) == 0
    rows = _rank_rows(run)
    assert [r["step"] for r in rows["rank_00000.jsonl"]] == list(range(1, 8))
    assert [r["step"] for r in rows["rank_00001.jsonl"]] == [1]

    full = tmp_path / "full"  # uninterrupted, 2 epochs
    assert (
        main(["pretrain", "--recipe", str(_recipe(tmp_path, tmp_path / "shards", full, steps=8))])
        == 0
    )
    got, want = _per_epoch(run), _per_epoch(full)
    assert sorted(got) == [0, 1]
    assert got == want
    for epoch in (0, 1):  # exact mode: every sample once per epoch
        assert len(got[epoch]) == 32 and set(got[epoch].values()) == {1}
    report = _report(run, capsys)
    for e in report["epochs"]:
        assert (e["complete"], e["seen_0"], e["seen_1"], e["seen_2plus"]) == (True, 0, 32, 0)
