"""Reinforced shards (``clipline reinforce``) and training on them: exact replay of the stored
view, stored features in the batch, bad members skipped and counted, kill-and-resume of the
writer, determinism, and training with no teacher forward."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipline.data.decode import ImageNormalizer, to_rgb
from clipline.data.loader import build_train_loader
from clipline.data.reinforce import MEMBER, decode_member, draw_boxes, view_crop
from clipline.data.replay import replay_decoder
from clipline.data.shard_io import TarSamples, list_shards
from clipline.data.shards import tar_writer
from clipline.data.stream import StreamConfig, epoch_shape
from clipline.launch.reinforce import ReinforceConfig, reinforce
from clipline.pretrain.export import export
from tests.helpers import make_shards, micro_model, micro_recipe, to_toml

K = 3
# A 64-px image and a fixed crop of a quarter of its area at aspect 1: every view is 32x32,
# the student's (and the teacher's) input size, so the per-model resize keeps the pixels and
# the student's pixels are the stored view's crop itself.
CROP = {"scale": (0.25, 0.25), "ratio": (1.0, 1.0)}


def _teacher(path: Path, seed: int = 1) -> Path:
    export(micro_model(seed=seed), path, format="clipline", run_config={}, step=0)
    return path


def _raw(out: Path) -> dict[tuple[str, str], dict]:
    """Every sample of the shards in ``out`` by (shard file name, key)."""
    samples = {}
    for url in list_shards(out):
        with open(url, "rb") as f:
            for _, s in TarSamples(f, seekable=True):
                samples[(Path(url).name, s["__key__"])] = s
    return samples


def _loader(out: Path, seed: int = 0):
    cfg = StreamConfig(shards=str(out), batch_size=8, workers=0, shuffle_buffer=32, seed=seed)
    model = micro_model()
    pp = model.preprocess_config()
    urls = epoch_shape(cfg, 1).urls
    decoder = replay_decoder(cfg.decode, pp, urls, fix="set an online teacher")
    return build_train_loader(
        cfg, preprocess=pp, tokenize=model.tokenize, rank=0, world_size=1, decoder=decoder
    )


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(original shards, reinforced shards, teacher export); some samples have 3 captions."""
    from clipline.data.builtin_data import generate_shapes
    from clipline.data.ingest import Sample
    from clipline.data.shards import write_samples

    root = tmp_path_factory.mktemp("reinforce")
    scenes = generate_shapes(32, seed=0, image_size=64)
    samples = (
        Sample(
            key=f"s{i}",
            image=s.image,
            caption=[s.caption, f"a drawing: {s.caption}", f"{s.caption}!"] if i % 2 else s.caption,
        )
        for i, s in enumerate(scenes)
    )
    write_samples(samples, root / "shards", samples_per_shard=8)
    teacher = _teacher(root / "teacher")
    reinforce(
        ReinforceConfig(
            shards=str(root / "shards"),
            output_dir=str(root / "out"),
            teachers=[str(teacher)],
            augmentations=K,
            seed=5,
            **CROP,
        )
    )
    return root / "shards", root / "out", teacher


def _views(batches, raw) -> dict[tuple[str, str], int]:
    """The stored view each sample showed, found by its teacher feature (bit equal)."""
    shown = {}
    for b in batches:
        for i, (url, key) in enumerate(zip(b["url"], b["key"], strict=True)):
            stored = decode_member(raw[(Path(url).name, key)][MEMBER], dim=32)
            match = [j for j in range(K) if np.array_equal(stored.image[j], b["teacher_image"][i])]
            assert match, (url, key)
            shown[(Path(url).name, key)] = match[0]
    return shown


def test_student_sees_the_pixels_the_teacher_embedded(reinforced):
    shards, out, teacher_dir = reinforced
    raw = _raw(out)
    assert set(raw) == set(_raw(shards))  # same shards, same keys, every sample reinforced
    assert json.loads((out / "sizes.json").read_text()) == json.loads(
        (shards / "sizes.json").read_text()
    )
    loader = _loader(out)
    batches = list(loader.epoch(0))
    assert batches[0]["teacher_image"].dtype == torch.float16
    teacher = micro_model(seed=1).eval()
    pp = teacher.preprocess_config()
    normalize = ImageNormalizer(pp.mean, pp.std)
    views = _views(batches, raw)
    for b in batches:
        for i, (url, key) in enumerate(zip(b["url"], b["key"], strict=True)):
            name = Path(url).name
            sample = raw[(name, key)]
            stored = decode_member(sample[MEMBER], dim=32)
            j = views[(name, key)]
            # The boxes are the seeded draws of the writer...
            want_boxes = draw_boxes(64, 64, k=K, seed=5, sample=f"{name}#{key}", **CROP)
            assert np.array_equal(stored.boxes, want_boxes)
            # ...and the student's pixels are that view, before any resize (it is 32x32).
            rgb, _ = to_rgb(Image.open(io.BytesIO(sample["jpg"])), "white")
            crop = torch.from_numpy(np.array(view_crop(rgb, stored.boxes[j]))).permute(2, 0, 1)
            assert torch.equal(b["image"][i], crop)
            # The teacher's embedding of the student's pixels is the stored one (fp16).
            with torch.no_grad():
                emb = teacher.encode_image(normalize(b["image"][i : i + 1].clone()))[0]
            torch.testing.assert_close(emb, b["teacher_image"][i].float(), atol=1e-3, rtol=1e-3)
            # The text feature is the teacher's embedding of the caption the student got.
            texts = json.loads(sample["json"]).get("captions") or [sample["txt"].decode()]
            tokens = teacher.tokenize(texts)
            row = b["text"][i][b["text"][i] != 0]
            (c,) = [c for c in range(len(texts)) if torch.equal(tokens[c][tokens[c] != 0], row)]
            assert torch.equal(b["teacher_text"][i], torch.from_numpy(stored.text[c]))
            with torch.no_grad():
                txt = teacher.encode_text(tokens[c : c + 1])[0]
            torch.testing.assert_close(txt, b["teacher_text"][i].float(), atol=1e-3, rtol=1e-3)
    # The draw is a pure function of (seed, epoch, sample): the same again, others next epoch.
    assert _views(list(_loader(out).epoch(0)), raw) == views
    assert _views(list(loader.epoch(1)), raw) != views
    assert len(set(views.values())) > 1


def test_bad_or_missing_reinforcement_is_skipped_and_counted(reinforced, tmp_path):
    _, out, _ = reinforced
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in ("sizes.json", "reinforce.json"):
        (damaged / f).write_bytes((out / f).read_bytes())
    urls = list_shards(out)
    for n, url in enumerate(urls):
        with open(url, "rb") as f:
            samples = [s for _, s in TarSamples(f, seekable=True)]
        if n == 0:
            del samples[0][MEMBER]  # missing
            samples[1][MEMBER] = b"\x00garbage"  # unreadable
            samples[2][MEMBER] = samples[3][MEMBER]  # another image's views
        writer = tar_writer(damaged / Path(url).name)
        for s in samples:
            writer.write(s)
        writer.close()
    loader = _loader(damaged)
    keys = [k for b in loader.epoch(0) for k in zip(b["url"], b["key"], strict=True)]
    assert loader.stats.skipped == {"missing_reinforcement": 1, "corrupt_reinforcement": 2}
    first = Path(urls[0]).name
    bad = {(first, k) for k in ("000000000", "000000001", "000000002")}
    assert not bad & {(Path(u).name, k) for u, k in keys}


def _reinforce_cmd(shards: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipline",
        "reinforce",
        str(shards),
        str(out),
        "--teacher",
        str(teacher),
        "--augmentations",
        "4",
        "--workers",
        "2",
        "--batch-size",
        "8",
        *extra,
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reinforce_resumes_after_kill_and_is_deterministic(tmp_path):
    shards = make_shards(tmp_path / "shards", n=192, per_shard=8, image_size=48)
    teacher = _teacher(tmp_path / "teacher")
    # A real run in its own process group, with 2 worker processes, killed -9 as a whole
    # once it has committed a shard (one thread per worker process, as below in-process).
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _reinforce_cmd(shards, killed, teacher),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill reaches the workers too
    )
    deadline = time.monotonic() + 240
    while not list(killed.glob("*.tar")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    committed = list(killed.glob("*.tar"))
    assert 0 < len(committed) < 24 and not (killed / "sizes.json").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = {"teachers": [str(teacher)], "augmentations": 4, "batch_size": 8}
        again = reinforce(ReinforceConfig(shards=str(shards), output_dir=str(killed), **settings))
        assert again["shards_written"] == 24 - len(committed)
        full = tmp_path / "full"
        report = reinforce(ReinforceConfig(shards=str(shards), output_dir=str(full), **settings))
        # Other settings into the same folder are refused.
        with pytest.raises(ValueError, match="other settings.*seed"):
            reinforce(ReinforceConfig(shards=str(shards), output_dir=str(full), seed=1, **settings))
    finally:
        torch.set_num_threads(threads)
    assert report["samples"] == report["reinforced"] == 192 and report["views"] == 192 * 4
    assert _files(killed) == _files(full)  # byte for byte: the resumed run is the uninterrupted one


def test_reinforce_bad_input_is_one_line(tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=8)
    cmd = _reinforce_cmd(shards, tmp_path / "out", tmp_path / "nothing")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is not an export folder" in res.stderr
    assert "clipline export" in res.stderr and "Traceback" not in res.stderr


def _pretrain(recipe: dict, path: Path, *extra: str) -> subprocess.CompletedProcess:
    path.write_text(to_toml(recipe))
    cmd = [sys.executable, "-m", "clipline", "pretrain", "--recipe", str(path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_training_on_reinforced_shards_runs_no_teacher(tmp_path):
    shards = make_shards(tmp_path / "shards", n=48, per_shard=8, image_size=48)
    teacher = _teacher(tmp_path / "teacher")
    out = tmp_path / "reinforced"
    reinforce(
        ReinforceConfig(
            shards=str(shards), output_dir=str(out), teachers=[str(teacher)], augmentations=2
        )
    )
    # The teacher is gone: a run that built it (or read its export) would fail.
    shutil.rmtree(teacher)
    recipe = micro_recipe(out, tmp_path / "run", steps=3)
    recipe["data"]["workers"] = 1  # the replaying decoder runs in a loader worker
    recipe["loss"] = {"distill": {"weight": 0.5}}
    res = _pretrain(recipe, tmp_path / "r.toml")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "online teacher" not in res.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss_distill" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # (1 - w) * contrastive + w * distill, w = 0.5, from stored features
        want = 0.5 * r["train/loss_contrastive"] + 0.5 * r["train/loss_distill"]
        assert r["train/loss"] == pytest.approx(want, rel=1e-5) and r["train/loss_distill"] > 0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["data/skipped/missing_reinforcement"] == 0, sorted(final)

    # Plain shards with a distillation weight and no online teacher: one line at the start.
    recipe = micro_recipe(shards, tmp_path / "plain", steps=3)
    recipe["loss"] = {"distill": {"weight": 0.5}}
    res = _pretrain(recipe, tmp_path / "p.toml", "--dry-run")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{shards}/reinforce.json not found" in res.stderr
    assert "clipline reinforce" in res.stderr and "loss.distill.teacher=" in res.stderr
