"""End to end on CPU: CSV -> shards -> train -> checkpoint -> resume -> export -> eval.

The resume check is the real equivalence: a run resumed from its step-2 checkpoint must
reproduce the uninterrupted run's losses and final weights exactly.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main
from clipline.launch.config import load_run_config
from clipline.launch.run import load_encoders, run_pretrain
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from tests.helpers import micro_recipe

SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    scenes = generate_shapes(120, seed=3, image_size=32)
    (root / "img").mkdir()
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i, s in enumerate(scenes[:96]):
            s.image.save(root / "img" / f"{i}.png")
            writer.writerow([f"img/{i}.png", s.caption])
        (root / "img" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
        writer.writerow(["img/bad.jpg", "a corrupt file"])
        writer.writerow(["img/missing.jpg", "a file that is not there"])
    assert (
        main(["shards", str(root / "pairs.csv"), str(root / "shards"), "--samples-per-shard", "16"])
        == 0
    )
    held = scenes[96:]
    benchmark_sets.write_retrieval_set(root / "ret", ((s.image, [s.caption]) for s in held))
    labelled = [(s.image, SHAPES.index(s.shape)) for s in held if s.shape in SHAPES]
    benchmark_sets.write_classification_set(root / "zs", labelled, SHAPES, ["a {c}."])
    return root


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}  # last write wins


def test_shards_report_counts_bad_rows(workspace):
    report = json.loads((workspace / "shards" / "report.json").read_text())
    assert report["written"] == 96
    assert sum(report["skipped"].values()) == 2


def test_train_resume_export_eval(workspace, tmp_path):
    recipe = micro_recipe(workspace / "shards", tmp_path / "a")
    recipe["zeroshot"] = [{"name": "shapes", "root": str(workspace / "zs")}]
    recipe["retrieval"] = [{"name": "heldout", "root": str(workspace / "ret")}]
    cfg_a = load_run_config(recipe)
    metrics_a = run_pretrain(cfg_a)
    assert (
        metrics_a["eval/shapes/acc1"] >= 0 and "eval/heldout/image_retrieval_recall@1" in metrics_a
    )
    assert [p.name for p in list_checkpoints(cfg_a.run_dir)] == ["step_000000002", "step_000000004"]

    # "Kill" a second identical run after step 2: drop its last checkpoint, then resume.
    cfg_b = load_run_config({**recipe, "run_dir": str(tmp_path / "b")})
    run_pretrain(cfg_b)
    shutil.rmtree(list_checkpoints(cfg_b.run_dir)[-1])
    (tmp_path / "b" / "checkpoints" / "step_000000009.tmp").mkdir()  # a save killed midway
    run_pretrain(cfg_b, resume="latest")
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))
    losses_a, losses_b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert losses_a.keys() == losses_b.keys() == {1, 2, 3, 4}
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], rel=1e-6, abs=1e-6), step
    final_a = consolidated_state(list_checkpoints(cfg_a.run_dir)[-1])
    final_b = consolidated_state(list_checkpoints(cfg_b.run_dir)[-1])
    for k in final_a:
        torch.testing.assert_close(final_a[k], final_b[k], rtol=1e-5, atol=1e-6, msg=k)

    # Export, reload, and check the export computes what the trained model computes.
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "a"), str(export)]) == 0
    trained, exported = load_encoders(tmp_path / "a"), load_encoders(export)
    meta = json.loads((export / "clipline_export.json").read_text())
    assert meta["embed_dim"] == 32 and meta["tokenizer"]["context_length"] == 16
    assert meta["preprocess"]["size"] == [32, 32] and meta["run_config"]["loop"]["steps"] == 4
    images = torch.randn(3, 3, 32, 32)
    texts = trained.tokenize(["a red circle", "a blue square", "two things"])
    with torch.no_grad():
        torch.testing.assert_close(
            exported.encode_image(images), trained.encode_image(images), rtol=0, atol=0
        )
        torch.testing.assert_close(
            exported.encode_text(texts), trained.encode_text(texts), rtol=0, atol=0
        )
        assert exported.logit_scale.item() == trained.logit_scale.item()

    # Evaluate the export through the CLI: CLIP_benchmark metric names, same numbers as training.
    out = tmp_path / "metrics.json"
    rc = main(
        [
            "eval",
            str(export),
            "--zeroshot",
            f"shapes={workspace / 'zs'}",
            "--retrieval",
            f"heldout={workspace / 'ret'}",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    got = json.loads(out.read_text())
    for key in [
        "shapes/acc1",
        "shapes/acc5",
        "shapes/mean_per_class_recall",
        "heldout/image_retrieval_recall@1",
        "heldout/text_retrieval_recall@10",
    ]:
        assert key in got
    assert got["shapes/acc1"] == pytest.approx(metrics_a["eval/shapes/acc1"])
    assert got["heldout/image_retrieval_recall@5"] == pytest.approx(
        metrics_a["eval/heldout/image_retrieval_recall@5"]
    )


def test_accumulation_in_the_loop_equals_the_large_batch(workspace, tmp_path):
    # Same sample order either way (one reader), so 2 micro-batches of 4 == 1 batch of 8.
    big = micro_recipe(workspace / "shards", tmp_path / "big", steps=3)
    big["data"]["batch_size"] = 8
    acc = micro_recipe(workspace / "shards", tmp_path / "acc", steps=3, accum_steps=2)
    acc["data"]["batch_size"] = 4
    run_pretrain(load_run_config(big))
    run_pretrain(load_run_config(acc))
    losses_big, losses_acc = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    assert losses_big.keys() == losses_acc.keys() == {1, 2, 3}
    for step in losses_big:
        assert losses_acc[step] == pytest.approx(losses_big[step], rel=1e-5), step
    w_big = consolidated_state(list_checkpoints(tmp_path / "big")[-1])
    w_acc = consolidated_state(list_checkpoints(tmp_path / "acc")[-1])
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-4, atol=1e-5, msg=k)


def test_siglip_run_exports_its_bias(workspace, tmp_path):
    recipe = micro_recipe(workspace / "shards", tmp_path / "sig", steps=2)
    recipe["loss"] = {"kind": "siglip"}
    metrics = run_pretrain(load_run_config(recipe))
    assert metrics["train/loss"] > 0
    assert main(["export", str(tmp_path / "sig"), str(tmp_path / "exp")]) == 0
    trained, exported = load_encoders(tmp_path / "sig"), load_encoders(tmp_path / "exp")
    assert exported.logit_bias is not None
    assert exported.logit_bias.item() == trained.logit_bias.item() != -10.0  # it trained
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            exported.encode_image(images), trained.encode_image(images), rtol=0, atol=0
        )
