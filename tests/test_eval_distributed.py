"""2 gloo ranks evaluate exactly like 1 process: disjoint parts, uneven sizes, same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

from clipline.data import benchmark_sets, classification_sets
from clipline.eval import (
    LinearProbeTask,
    RetrievalTask,
    ZeroShotTask,
    build_evaluator,
    embed_indexed_images,
)
from clipline.eval.distributed import rank_and_world
from tests.helpers import micro_model, torchrun

DIST = Path(__file__).parent / "dist"
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


def _image(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


def write_sets(root: Path) -> None:
    """Odd sizes on purpose: 2 ranks get parts of different lengths."""
    benchmark_sets.write_classification_set(
        root / "zs", [(_image(i), i % 6) for i in range(11)], CLASSES, ["a {c}."],
        samples_per_shard=4,
    )  # fmt: skip
    benchmark_sets.write_retrieval_set(
        root / "ret",
        [(_image(100 + i), [f"a picture {i} of {w}" for w in CLASSES[: 1 + i % 3]]) for i in range(7)],
        samples_per_shard=3,
    )  # fmt: skip
    for split, n in (("train", 9), ("test", 5)):
        for i in range(n):
            folder = root / "probe" / split / CLASSES[i % 6]
            folder.mkdir(parents=True, exist_ok=True)
            _image(200 + i + 50 * (split == "test")).save(folder / f"{i}.png")


def eval_tasks(root: Path) -> list:
    return [
        ZeroShotTask(name="zs", root=str(root / "zs"), batch_size=4, workers=2),  # 2 x 2 parts
        RetrievalTask(name="ret", root=str(root / "ret"), batch_size=3),
        LinearProbeTask(name="lp", format="folder", root=str(root / "probe"), C=1.0, batch_size=2),
    ]


def evaluate_all(model, tasks: list, distributed: bool) -> dict[str, float]:
    results = {}
    with torch.no_grad():
        for task in tasks:
            evaluate = build_evaluator(
                task,
                preprocess=model.preprocess_config(),
                tokenize=model.tokenize,
                distributed=distributed,
            )
            results.update({f"{task.name}/{k}": v for k, v in evaluate(model).items()})
    return results


def gathered_embeddings(model, root: Path, distributed: bool):
    rank, world_size = rank_and_world(distributed)
    source = classification_sets.open_classification_set("wds", root / "zs")
    return embed_indexed_images(
        model, source.indexed_items, model.preprocess_config(), 3,
        labels=True, rank=rank, world_size=world_size,
    )  # fmt: skip


def test_two_ranks_evaluate_exactly_like_one_process(tmp_path):
    write_sets(tmp_path)
    torchrun(DIST / "eval_two_ranks.py", str(tmp_path), str(tmp_path))

    model = micro_model(seed=0).eval()
    expected = evaluate_all(model, eval_tasks(tmp_path), distributed=False)
    img_emb_ND, labels = gathered_embeddings(model, tmp_path, distributed=False)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"metrics_rank{rank}.json").read_text())
        assert got == expected, rank  # every rank, every metric, exactly
        tensors = load_file(tmp_path / f"embeddings_rank{rank}.safetensors")
        assert tensors["label"].tolist() == labels == [i % 6 for i in range(11)]
        # Other batch compositions may move the last bits of a forward pass, nothing more.
        torch.testing.assert_close(tensors["image"], img_emb_ND, rtol=1e-5, atol=1e-6)
    assert "ret/image_retrieval_mean_rank" in expected and "lp/lp_acc1" in expected
    # 7 images, split 4 + 3: each rank embeds its part once, then loads the cache.
    caches = [json.loads((tmp_path / f"cache_rank{r}.json").read_text()) for r in (0, 1)]
    assert caches == [
        {"first": 4, "second": 0, "same": True},
        {"first": 3, "second": 0, "same": True},
    ]
