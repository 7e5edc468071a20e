"""``clipline data doctor``: healthy shards pass; each thing that would break a run is named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import open_clip
import pytest
from PIL import Image

from clipline.data.doctor import DoctorConfig, diagnose
from clipline.launch.cli import main
from tests.helpers import make_shards


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("doctor") / "shards", n=48, per_shard=12)


@pytest.fixture()
def shards(healthy: Path, tmp_path: Path) -> Path:
    """A private copy of the healthy shards, to break."""
    return Path(shutil.copytree(healthy, tmp_path / "shards"))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _doctor(shards: Path, capsys, *flags: str) -> tuple[int, str]:
    rc = main(["data", "doctor", str(shards), "--seconds", "0", "--batch-size", "4", *flags])
    return rc, capsys.readouterr().out


def test_healthy_shards_pass_and_loader_is_measured(healthy: Path, capsys) -> None:
    rc = main(
        ["data", "doctor", str(healthy), "--workers", "1", "--batch-size", "4", "--seconds", "0.5"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "OK, these shards will train" in out and "samples/s per rank" in out
    rc, out = _doctor(healthy, capsys, "--json", "--full", "--workers", "2", "--world-size", "2")
    report = json.loads(out)
    assert rc == 0 and report["ok"] and report["problems"] == []
    assert report["decoded"] == 48 and report["samples"] == report["manifest_samples"] == 48
    assert report["run_shape"]["readers_per_rank"] == 2
    assert report["run_shape"]["batches_per_epoch"] == 6  # 48 // (2 ranks x 2 workers x 4) x 2
    assert "loader" not in report["checks"]  # --seconds 0


def test_missing_caption_orphans_and_duplicate_keys(shards: Path, capsys) -> None:
    jpg = _jpeg()
    _tar(
        shards / "000000.tar",
        [("a.jpg", jpg), ("a.txt", b"ok")]
        + [(f"k{i}.jpg", jpg) for i in range(4)]  # no captions
        + [("orphan.txt", b"caption without image"), ("a.jpg", jpg), ("a.txt", b"again")],
    )
    rc, out = _doctor(shards, capsys)
    assert rc == 1
    assert (
        "000000.tar: 4 sample(s) without a caption (no or empty .txt): k0, k1, k2, ... 1 more"
        in out
    )
    assert "000000.tar: 1 sample(s) without an image" in out and "orphan" in out
    assert "duplicate sample key(s) a" in out
    # sizes.json still says 12 for the rewritten shard
    assert "sizes.json says 12 samples but the shard holds 2 usable ones" in out
    assert "--index-only" in out


def test_truncated_and_corrupt_tar(shards: Path, capsys) -> None:
    data = (shards / "000001.tar").read_bytes()
    (shards / "000001.tar").write_bytes(data[: len(data) // 2])
    rc, out = _doctor(shards, capsys)
    assert rc == 1
    assert "[tar] 000001.tar: unreadable: truncated" in out
    # Garbage where a header should be: tarfile would just stop; the doctor does not.
    with tarfile.open(shards / "000002.tar") as tf:
        third_header = tf.getmembers()[2].offset
    data = bytearray((shards / "000002.tar").read_bytes())
    data[third_header : third_header + 512] = b"x" * 512
    (shards / "000002.tar").write_bytes(bytes(data))
    rc, out = _doctor(shards, capsys, "--json")
    problems = json.loads(out)["problems"]
    assert rc == 1
    assert {Path(p["shard"]).name for p in problems if p["check"] == "tar"} == {
        "000001.tar",
        "000002.tar",
    }


def test_undecodable_image(shards: Path, capsys) -> None:
    _tar(shards / "000003.tar", [("x.jpg", b"\xff\xd8 not really"), ("x.txt", b"hi")])
    sizes = json.loads((shards / "sizes.json").read_text())
    sizes["000003.tar"] = 1
    (shards / "sizes.json").write_text(json.dumps(sizes))
    rc, out = _doctor(shards, capsys)
    assert rc == 1
    assert "[decode] 000003.tar: 1 sample(s) the stream would drop" in out
    assert "x.jpg does not decode" in out


def test_count_mismatch_and_missing_manifest(shards: Path, capsys) -> None:
    sizes = json.loads((shards / "sizes.json").read_text())
    sizes["000002.tar"] = 20
    (shards / "sizes.json").write_text(json.dumps(sizes))
    rc, out = _doctor(shards, capsys)
    assert rc == 1
    assert "[manifest] 000002.tar: sizes.json says 20 samples but the shard holds 12" in out
    assert f"clipline shards --index-only {shards}" in out
    (shards / "sizes.json").unlink()
    rc, out = _doctor(shards, capsys)
    assert rc == 1 and "no sizes.json" in out and "--index-only" in out


def test_too_few_shards_for_workers_and_ranks(healthy: Path, capsys) -> None:
    rc, out = _doctor(healthy, capsys, "--workers", "2", "--world-size", "3")
    assert rc == 1
    assert "4 shards" in out and "3 ranks x 2 workers = 6 readers" in out
    assert "Lower data.workers" in out
    # The same rule as the stream: 4 readers fit 4 shards.
    assert _doctor(healthy, capsys, "--workers", "2", "--world-size", "2")[0] == 0


def test_diagnose_api_and_missing_folder(tmp_path: Path) -> None:
    report = diagnose(
        DoctorConfig(shards=str(tmp_path / "nope"), seconds=0),
        tokenize=open_clip.get_tokenizer("ViT-B-32"),
    )
    assert not report.ok and report.problems[0].check == "shards"
    assert "nope" in report.to_text()


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_applies_the_streams_rules(shards: Path, capsys) -> None:
    # A 10000 x 10000 PNG (1-bit: small to write) that training skips as image_too_large:
    # the doctor used to decode it in full (300 MB of RGB) and call it usable. And an 8 x 8
    # JPEG below min_image_size.
    _tar(
        shards / "000003.tar",
        [("big.png", _png((10_000, 10_000), "1")), ("big.txt", b"a huge image")]
        + [("small.jpg", _jpeg()), ("small.txt", b"an icon")]
        + [("ok.png", _png((32, 32))), ("ok.txt", b"fine")],
    )
    sizes = json.loads((shards / "sizes.json").read_text())
    sizes["000003.tar"] = 3
    (shards / "sizes.json").write_text(json.dumps(sizes))
    rc, out = _doctor(shards, capsys)  # first sample per shard: the big one
    assert rc == 1
    assert "big.png has more pixels than max_pixels=89478485 (image_too_large)" in out
    rc, out = _doctor(shards, capsys, "--full", "--json")
    report = json.loads(out)
    assert rc == 1 and report["skipped"] == {"image_too_large": 1, "image_too_small": 1}
    (problem,) = [p for p in report["problems"] if p["check"] == "decode"]
    assert "image_too_small: 1" in problem["message"] and "small.jpg" in problem["message"]

    # Training counts the same samples under the same reasons.
    from clipline.data.stream import StreamConfig
    from tests.helpers import micro_loader

    # Batch 1: an exact epoch then reads every sample (none waits for a later epoch).
    loader = micro_loader(StreamConfig(shards=str(shards), batch_size=1, workers=0))
    counted: Counter = Counter()
    for batch in loader.epoch(0):
        counted.update(batch["skipped"])
    assert dict(counted) == report["skipped"]

    # The same settings as data.decode: relaxed, the icon is usable; tightened, all skip.
    rc, out = _doctor(shards, capsys, "--full", "--json", "--min-image-size", "4")
    assert json.loads(out)["skipped"] == {"image_too_large": 1}
    rc, out = _doctor(shards, capsys, "--full", "--json", "--max-pixels", "1000")
    # Every 32 x 32 image (1024 pixels), 36 + 1 in the rewritten shard, and the big one.
    assert json.loads(out)["skipped"] == {"image_too_large": 38, "image_too_small": 1}
    assert main(["data", "doctor", str(shards), "--max-pixels", "10", "--seconds", "0"]) == 2
    assert "data.decode.max_pixels=10" in capsys.readouterr().err
