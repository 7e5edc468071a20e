"""``clipline eval`` and CLIP_benchmark's own CLI give the same numbers on the same export.

A tiny random model is exported twice from the same weights: clipline's format, which
``clipline eval`` reads, and open_clip's, which ``clip_benchmark eval --model_type open_clip``
reads (once by registered name + ``--pretrained`` file, once by ``local-dir:``). Both score
the same zero-shot and retrieval sets in CLIP_benchmark's webdataset layout, in fp32; one
retrieval set repeats captions, so that tied scores occur (before clipline ordered ties as
clip_benchmark does, its image -> text recall@5 there was 0.125 against clip_benchmark's 0.1).
"""

from __future__ import annotations

import json
import sys

import pytest

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main as clipline_main
from clipline.pretrain.export import export
from tests.helpers import micro_model, numpy2_safe_accuracy

SHAPES = ["circle", "square", "diamond", "triangle", "star", "cross"]  # generate_shapes' labels
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c} shape."]
CB_WDS_WARNING = "ignore:WebDataset\\(shardshuffle"  # clip_benchmark's own call, not ours


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark_sets")
    scenes = generate_shapes(48, seed=11, image_size=32)
    benchmark_sets.write_classification_set(
        root / "shapes",
        [(s.image, SHAPES.index(s.shape)) for s in scenes],
        SHAPES,
        TEMPLATES,
        samples_per_shard=20,
    )
    # Distinct captions here; the "repeats" set below has ties.
    seen, pairs = set(), []
    for s in generate_shapes(60, seed=12, image_size=32):
        short = f"a {s.attributes['objects'][0]['color']} {s.shape}"
        if s.caption not in seen and len(pairs) < 32:
            seen.add(s.caption)
            pairs.append((s.image, [s.caption, f"{short}, picture {len(pairs)}"]))
    benchmark_sets.write_retrieval_set(root / "captions", pairs, samples_per_shard=12)
    # Repeated captions, as in real sets (many images of "A frog."): images sharing a
    # caption tie exactly in image -> text search, and recall@k depends on which of the tied
    # captions the ranking puts first. Some images also have a caption of their own.
    repeats = [
        (s.image, [f"a {s.shape}."] + ([f"a {s.shape}, number {i}."] if i % 3 == 0 else []))
        for i, s in enumerate(generate_shapes(40, seed=13, image_size=32))
    ]
    benchmark_sets.write_retrieval_set(root / "repeats", repeats, samples_per_shard=12)
    return root


def _clip_benchmark(monkeypatch, tmp_path, *args: str) -> dict[str, float]:
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot

    monkeypatch.setattr(cb_zeroshot, "accuracy", numpy2_safe_accuracy(cb_zeroshot.accuracy))
    output = tmp_path / "clip_benchmark.json"
    argv = ["clip_benchmark", "eval", *args, "--no_amp", "--num_workers", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--batch_size", "16", "--output", str(output)])
    cli.main()
    return json.loads(output.read_text())["metrics"]


@pytest.mark.filterwarnings(CB_WDS_WARNING)
@pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.UndefinedMetricWarning"
)  # a class never predicted
def test_clipline_eval_equals_clip_benchmark(sets, tmp_path, monkeypatch, capsys):
    from open_clip import factory

    model = micro_model(seed=5)
    exports = tmp_path / "micro-cb"
    export(model, exports / "clipline", format="clipline", run_config={})
    export(model, exports / "open_clip", format="open_clip", run_config={}, name="micro-cb")

    ours_json = tmp_path / "ours.json"
    argv = ["eval", str(exports / "clipline"), "--output", str(ours_json), "--device", "cpu"]
    argv += ["--zeroshot", f"shapes={sets / 'shapes'}", "--retrieval", f"caps={sets / 'captions'}"]
    argv += ["--retrieval", f"repeats={sets / 'repeats'}"]
    assert clipline_main(argv) == 0
    ours = json.loads(ours_json.read_text())

    # The named route: register the config (undone after the test), pass the weights file.
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    factory.add_model_config(exports / "open_clip" / "model_configs")
    zeroshot = _clip_benchmark(
        monkeypatch,
        tmp_path,
        *("--dataset", "wds/shapes", "--dataset_root", str(sets / "shapes")),
        *("--task", "zeroshot_classification", "--model_type", "open_clip"),
        *("--model", "micro-cb"),
        *("--pretrained", str(exports / "open_clip" / "open_clip_model.safetensors")),
    )
    # The local-dir route: config, preprocessing and weights all from the export folder.
    retrieval = _clip_benchmark(
        monkeypatch,
        tmp_path,
        *("--dataset", "wds/captions", "--dataset_root", str(sets / "captions")),
        *("--task", "zeroshot_retrieval", "--model_type", "open_clip"),
        *("--model", f"local-dir:{exports / 'open_clip'}", "--recall_k", "1", "5", "10"),
    )
    repeats = _clip_benchmark(
        monkeypatch,
        tmp_path,
        *("--dataset", "wds/repeats", "--dataset_root", str(sets / "repeats")),
        *("--task", "zeroshot_retrieval", "--model_type", "open_clip"),
        *("--model", f"local-dir:{exports / 'open_clip'}", "--recall_k", "1", "5", "10"),
    )
    capsys.readouterr()

    assert set(zeroshot) == {"acc1", "acc5", "mean_per_class_recall"}
    assert len(retrieval) == len(repeats) == 6  # image_ and text_retrieval_recall@{1,5,10}
    for task, theirs in (("shapes", zeroshot), ("caps", retrieval), ("repeats", repeats)):
        for name, value in theirs.items():
            assert ours[f"{task}/{name}"] == pytest.approx(value, abs=1e-6), (task, name)
    # Numbers that could not agree by accident: neither 0 nor 1, and not all the same.
    assert 0 < ours["shapes/acc1"] < ours["shapes/acc5"] < 1
    assert ours["shapes/mean_per_class_recall"] != ours["shapes/acc1"]
    for direction in ("image", "text"):  # a random model: recall@1 may well be 0
        recall = {k: ours[f"caps/{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)}
        assert recall[1] < recall[5] < recall[10] < 1, recall
