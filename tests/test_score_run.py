"""``clipline eval --run``: each checkpoint scored once per manifest, into JSONL, CSV and plots.

The numbers must be those of ``clipline eval CHECKPOINT``; a checkpoint added later is the
only one evaluated on the next call; a changed eval set starts a separate series; ``--watch``
ends when the training run writes its DONE marker.
"""

import csv
import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest

from clipline.data import benchmark_sets
from clipline.eval import score
from clipline.eval.score import ScoreConfig
from clipline.launch import score as score_wiring
from clipline.launch.cli import main
from clipline.launch.config import load_run_config
from clipline.launch.run import DONE_FILE, run_pretrain
from clipline.launch.score import score_run
from clipline.pretrain.checkpoint import list_checkpoints
from tests.helpers import make_shape_sets, micro_recipe


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    return make_shape_sets(tmp_path_factory.mktemp("score"), held_out=16)


def _train(sets: Path, run_dir: Path, steps: int, resume: str | None = None) -> None:
    recipe = micro_recipe(sets / "shards", run_dir, steps=steps, keep_last=10)
    run_pretrain(load_run_config(recipe), resume=resume)


def _task_args(sets: Path, zs: Path | None = None) -> list[str]:
    return ["--zeroshot", f"shapes={zs or sets / 'zs'}", "--retrieval", f"heldout={sets / 'ret'}"]


def _rows(run_dir: Path) -> list[dict]:
    return score.read_results(run_dir / "eval")


def test_scores_each_checkpoint_once_and_matches_clipline_eval(sets, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    _train(sets, run, steps=4)
    assert (run / DONE_FILE).is_file()
    assert main(["eval", "--run", str(run), *_task_args(sets)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed["new"]) == ["2", "4"]

    rows = _rows(run)
    assert {(r["step"], r["task"]) for r in rows} == {
        (s, t) for s in (2, 4) for t in ("shapes", "heldout")
    }
    assert len({r["manifest_hash"] for r in rows if r["task"] == "shapes"}) == 1
    with open(run / "eval" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == set(score.CSV_COLUMNS)
    assert {r["value"] for r in table if r["metric"] == "acc5"} == {""}  # NaN: an empty cell
    for name in ["shapes__acc1.png", "heldout__image_retrieval_recall@5.png"]:
        assert (run / "eval" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads(
        (run / "eval" / "manifests" / f"{rows[0]['manifest_hash']}.json").read_text()
    )
    assert set(manifest["versions"]) == {"clipline", "torch", "open_clip"}

    # The same numbers as evaluating each checkpoint on its own.
    for ckpt in list_checkpoints(run):
        out = tmp_path / f"{ckpt.name}.json"
        assert main(["eval", str(ckpt), *_task_args(sets), "--output", str(out)]) == 0
        alone = json.loads(out.read_text())
        step = int(ckpt.name.removeprefix("step_"))
        mine = {f"{r['task']}/{r['metric']}": r["value"] for r in rows if r["step"] == step}
        assert mine.pop("shapes/acc5") is None and math.isnan(alone.pop("shapes/acc5"))
        assert mine == pytest.approx(alone, rel=1e-6, abs=1e-7)

    # A checkpoint still being written (step_N.tmp) is invisible; a new one is scored alone.
    (run / "checkpoints" / "step_000000099.tmp").mkdir()
    _train(sets, run, steps=6, resume="latest")
    before = (run / "eval" / "results.jsonl").read_text()
    cfg = ScoreConfig(run_dir=str(run), tasks=_tasks(sets))
    report = score_run(cfg)
    assert report.scored == [(6, "shapes"), (6, "heldout")]
    assert (run / "eval" / "results.jsonl").read_text().startswith(before)
    assert score_run(cfg).scored == []  # nothing left

    # A changed eval set (new templates) is a new manifest: re-scored as a separate series,
    # old rows kept; the unchanged retrieval task is not re-run.
    zs2 = tmp_path / "zs2"
    shutil.copytree(sets / "zs", zs2)
    (zs2 / benchmark_sets.TEMPLATES_FILE).write_text("a picture of a {c}.\n")
    with caplog.at_level("WARNING"):
        report = score_run(ScoreConfig(run_dir=str(run), tasks=_tasks(sets, zs=zs2)))
    assert report.scored == [(2, "shapes"), (4, "shapes"), (6, "shapes")]
    hashes = {r["manifest_hash"] for r in _rows(run) if r["task"] == "shapes"}
    assert len(hashes) == 2
    assert "plotted as separate series" in caplog.text
    assert len(list((run / "eval" / "manifests").glob("*.json"))) == 3


def _tasks(sets: Path, zs: Path | None = None) -> list:
    from clipline.eval.evaluators import RetrievalTask, ZeroShotTask

    return [
        ZeroShotTask(name="shapes", root=str(zs or sets / "zs")),
        RetrievalTask(name="heldout", root=str(sets / "ret")),
    ]


def test_manifest_hash_follows_content_not_location(sets, tmp_path):
    task = _tasks(sets)[0]
    cache: dict = {}
    original = score.manifest_hash(score.task_manifest(task, cache))
    assert cache  # shard hashes remembered by (size, mtime)
    moved = tmp_path / "moved"
    shutil.copytree(sets / "zs", moved)
    (moved / ".cache").mkdir()  # hidden files (e.g. caches) are not data
    (moved / ".cache" / "x").write_text("1")
    same = score.task_manifest(_tasks(sets, zs=moved)[0], cache)
    assert score.manifest_hash(same) == original
    shard = moved / "test" / "0.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # tar padding: still a readable set, but other bytes
    shard.write_bytes(bytes(data))
    assert score.manifest_hash(score.task_manifest(_tasks(sets, zs=moved)[0], cache)) != original


def test_watch_until_step_timeout_and_done(sets, tmp_path):
    run = tmp_path / "run"
    _train(sets, run, steps=2)
    (run / DONE_FILE).unlink()  # as if the run were still going
    args = ["eval", "--run", str(run), *_task_args(sets), "--watch", "--poll-seconds", "0.1"]

    assert main([*args, "--until-step", "2"]) == 0
    assert {r["step"] for r in _rows(run)} == {2}
    assert main([*args, "--timeout", "0.3"]) == 1  # nothing new, never done

    # A watcher in a thread while the run trains on: it stops once DONE appears, having
    # scored the final checkpoint (written before DONE).
    rc: list[int] = []
    watcher = threading.Thread(target=lambda: rc.append(main([*args, "--timeout", "300"])))
    watcher.start()
    time.sleep(0.3)
    assert watcher.is_alive()
    _train(sets, run, steps=4, resume="latest")
    watcher.join(timeout=300)
    assert not watcher.is_alive() and rc == [0]
    assert {r["step"] for r in _rows(run)} == {2, 4}


def test_bad_usage_is_one_clear_error(sets, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["eval", "--run", str(run), *_task_args(sets), "--timeout", "1"]) == 2
    assert "only applies with --watch" in capsys.readouterr().err
    assert main(["eval", str(run), "--run", str(run), *_task_args(sets)]) == 2
    assert main(["eval", "--run", str(tmp_path / "nope"), *_task_args(sets)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run / "eval").mkdir()
    with score_wiring._exclusive(run / "eval"):
        assert main(["eval", "--run", str(run), *_task_args(sets)]) == 2
    assert "another `clipline eval --run`" in capsys.readouterr().err


def test_checkpoint_pruned_before_loading_is_skipped(sets, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000000002").mkdir(parents=True)
    load = score_wiring.load_encoders

    def pruned_first(path, device):  # the run's keep_last wins the race
        shutil.rmtree(path)
        return load(path, device)

    monkeypatch.setattr(score_wiring, "load_encoders", pruned_first)
    report = score_run(ScoreConfig(run_dir=str(run), tasks=_tasks(sets)))
    assert report.scored == [] and _rows(run) == []
    assert "deleted before it could be scored" in caplog.text


def test_run_without_task_flags_scores_the_recipes_own_tasks(sets, tmp_path, capsys):
    """`clipline eval --run RUN` said "nothing to evaluate" though the recipe had tasks."""
    run = tmp_path / "run"
    recipe = micro_recipe(sets / "shards", run, steps=2, keep_last=10)
    recipe["zeroshot"] = [{"name": "shapes", "root": str(sets / "zs")}]
    recipe["retrieval"] = [{"name": "heldout", "root": str(sets / "ret")}]
    recipe["linear_probe"] = [
        {"name": "probe", "root": str(sets / "zs"), "train_split": "test", "max_iter": 50}
    ]
    run_pretrain(load_run_config(recipe))
    assert main(["eval", "--run", str(run)]) == 0
    new = json.loads(capsys.readouterr().out)["new"]
    assert {k.split("/")[0] for k in new["2"]} == {"shapes", "heldout", "probe"}
    # The same tasks given as flags are the same manifests: nothing is scored again.
    probe = f"probe={sets / 'zs'},train_split=test,max_iter=50"
    assert main(["eval", "--run", str(run), *_task_args(sets), "--linear-probe", probe]) == 0
    assert json.loads(capsys.readouterr().out)["new"] == {}
