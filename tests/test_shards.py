"""Shard writer: every input kind round-trips through webdataset, bad rows are counted."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipline.data.ingest import Sample
from clipline.data.shard_io import list_shards, read_manifest
from clipline.data.shards import ShardsConfig, write_samples, write_shards
from clipline.launch.cli import main


def _jpeg_bytes(color=(200, 30, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    """A folder of good and bad image files, by role."""
    d = tmp_path / "imgs"
    d.mkdir()
    files = {}
    files["jpg"] = d / "red.jpg"
    files["jpg"].write_bytes(_jpeg_bytes())
    # Half transparent: the transparent half must come out white.
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (8, 0, 16, 16))
    files["png"] = d / "blue.png"
    rgba.save(files["png"])
    files["webp"] = d / "green.webp"
    Image.new("RGB", (16, 16), (0, 200, 0)).save(files["webp"])
    files["random"] = d / "noise.jpg"
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    files["truncated"] = d / "truncated.jpg"
    files["truncated"].write_bytes(_jpeg_bytes(size=(64, 64))[:300])
    return files


def _rows(images: dict[str, Path], base: Path) -> list[tuple[str, str]]:
    rel = {k: str(p.relative_to(base)) for k, p in images.items()}
    return [
        (rel["jpg"], "a red rectangle"),
        (str(images["png"]), "a blue square, half transparent"),  # absolute path
        (rel["webp"], "a green square ünïcödé"),
        (rel["random"], "random bytes"),
        (rel["truncated"], "a truncated jpeg"),
        ("imgs/does_not_exist.jpg", "a missing file"),
        (rel["jpg"], "   "),  # blank caption
    ]


EXPECTED_SKIPS = {"corrupt_image": 2, "missing_image": 1, "empty_caption": 1}


def _read(out: Path) -> list[dict]:
    ds = wds.WebDataset(list_shards(str(out)), shardshuffle=False, empty_check=False)
    return list(ds)


def _check_output(out: Path, images: dict[str, Path], report, skips=EXPECTED_SKIPS) -> None:
    assert report.written == 3
    assert report.skipped == skips
    assert report.shards == ["000000.tar", "000001.tar"]  # samples_per_shard=2
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"000000.tar": 2, "000001.tar": 1}  # open_clip's sizes.json format
    assert json.loads((out / "report.json").read_text())["skipped"] == skips
    samples = _read(out)
    assert [s["txt"].decode() for s in samples] == [
        "a red rectangle",
        "a blue square, half transparent",
        "a green square ünïcödé",
    ]
    assert len({s["__key__"] for s in samples}) == 3
    meta = [json.loads(s["json"]) for s in samples]
    assert meta[0]["key"] == "imgs/red.jpg"
    # JPEG sources are copied byte for byte; others are converted to RGB JPEG.
    assert samples[0]["jpg"] == images["jpg"].read_bytes()
    png = Image.open(io.BytesIO(samples[1]["jpg"]))
    assert png.format == "JPEG" and png.mode == "RGB"
    r, g, b = png.getpixel((14, 8))
    assert min(r, g, b) > 240, "transparent pixels must be flattened onto white"
    assert png.getpixel((2, 8))[2] > 200
    assert Image.open(io.BytesIO(samples[2]["jpg"])).format == "JPEG"


def test_csv(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = tmp_path / "pairs.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "extra"])
        w.writerows((p, c, "x") for p, c in _rows(images, tmp_path))
    out = tmp_path / "shards"
    report = write_shards(
        ShardsConfig(input=str(manifest), output_dir=str(out), samples_per_shard=2)
    )
    _check_output(out, images, report)


def test_tsv_and_open_clip_style_tab_separated_csv(tmp_path: Path, images: dict[str, Path]) -> None:
    # open_clip's own CSVs are tab-separated with filepath/title columns, even when named .csv.
    for name in ("pairs.tsv", "openclip.csv"):
        manifest = tmp_path / name
        lines = ["filepath\ttitle"] + [f"{p}\t{c}" for p, c in _rows(images, tmp_path)]
        manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = tmp_path / f"shards_{name}"
        cfg = ShardsConfig(
            input=str(manifest), output_dir=str(out), caption_column="title", samples_per_shard=2
        )
        _check_output(out, images, write_shards(cfg))


def test_jsonl(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"image": p, "text": c}) for p, c in _rows(images, tmp_path)]
    lines.insert(3, "{not json")
    lines.insert(4, json.dumps({"image": "imgs/red.jpg"}))  # no caption key
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "shards"
    cfg = ShardsConfig(
        input=str(manifest),
        output_dir=str(out),
        image_column="image",
        caption_column="text",
        samples_per_shard=2,
    )
    skips = {**EXPECTED_SKIPS, "malformed_row": 1, "missing_caption": 1}
    _check_output(out, images, write_shards(cfg), skips)


def test_folder(tmp_path: Path, images: dict[str, Path]) -> None:
    root = tmp_path / "imgs"
    (root / "sub").mkdir()
    (root / "sub" / "a.jpg").write_bytes(_jpeg_bytes((10, 10, 10)))
    (root / "sub" / "a.txt").write_text("a black rectangle\n", encoding="utf-8")
    (root / "blue.txt").write_text("a blue square", encoding="utf-8")
    (root / "noise.txt").write_text("random bytes", encoding="utf-8")
    (root / "truncated.txt").write_text("a truncated jpeg", encoding="utf-8")
    (root / "green.txt").write_text("", encoding="utf-8")  # empty caption
    # red.jpg has no .txt: skipped as missing_caption
    out = tmp_path / "shards"
    report = write_shards(ShardsConfig(input=str(root), output_dir=str(out)))
    assert report.written == 2
    assert report.skipped == {
        "corrupt_image": 2,
        "empty_caption": 1,
        "missing_caption": 1,
    }
    samples = _read(out)
    got = {json.loads(s["json"])["key"]: s["txt"].decode() for s in samples}
    assert got == {"blue.png": "a blue square", "sub/a.jpg": "a black rectangle"}
    assert read_manifest(out) == {str(out / "000000.tar"): 2}


def test_wrong_column_names_the_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("path,title\na.jpg,hello\n")
    with pytest.raises(ValueError, match="filepath") as e:
        write_shards(ShardsConfig(input=str(manifest), output_dir=str(tmp_path / "o")))
    msg = str(e.value)
    assert "'path'" in msg and "'title'" in msg and "image_column=" in msg
    assert not (tmp_path / "o").exists(), "nothing is written on a config error"


def test_missing_input_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.csv"):
        write_shards(ShardsConfig(input=str(tmp_path / "nope.csv"), output_dir=str(tmp_path)))
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        write_shards(ShardsConfig(input=str(tmp_path / "x.xlsx"), output_dir=str(tmp_path)))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        write_shards(ShardsConfig(input=str(tmp_path / "x.parquet"), output_dir=str(tmp_path)))


def _pil_samples(n: int) -> list[Sample]:
    return [
        Sample(key=f"k.{i}/x", image=Image.new("RGB", (8, 8), (i, 0, 0)), caption=f"c{i}")
        for i in range(n)
    ]


def test_write_samples_deterministic_and_refuses_stale_shards(tmp_path: Path) -> None:
    a = write_samples(_pil_samples(5), tmp_path / "a", samples_per_shard=2)
    write_samples(_pil_samples(5), tmp_path / "b", samples_per_shard=2)
    assert a.shards == ["000000.tar", "000001.tar", "000002.tar"]
    for name in a.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # keys with dots/slashes survive in json and do not break webdataset's grouping
    assert [json.loads(s["json"])["key"] for s in _read(tmp_path / "a")] == [
        f"k.{i}/x" for i in range(5)
    ]
    with pytest.raises(ValueError, match="already holds 3 shard"):
        write_samples(_pil_samples(1), tmp_path / "a", samples_per_shard=2)


def test_list_shards_and_manifest(tmp_path: Path) -> None:
    write_samples(_pil_samples(7), tmp_path / "s", samples_per_shard=2)
    d = tmp_path / "s"
    all4 = [str(d / f"{i:06d}.tar") for i in range(4)]
    assert list_shards(d) == all4
    assert list_shards(f"{d}/{{000000..000003}}.tar") == all4
    assert list_shards(f"{d}/*.tar") == all4
    assert list_shards(f"{d}/000000.tar,{d}/{{000002,000003}}.tar") == [
        all4[0],
        all4[2],
        all4[3],
    ]
    assert list_shards(f"{d}/000001.tar::{d}/000000.tar") == [all4[1], all4[0]]
    assert list_shards("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]
    assert read_manifest(f"{d}/{{000000..000003}}.tar") == dict(
        zip(all4, [2, 2, 2, 1], strict=True)
    )
    with pytest.raises(ValueError, match="000004.tar"):
        list_shards(f"{d}/{{000000..000004}}.tar")
    with pytest.raises(ValueError, match="no \\*.tar shards"):
        list_shards(tmp_path)
    (d / "sizes.json").unlink()
    with pytest.raises(ValueError, match="sizes.json"):
        read_manifest(d)


def _pairs_folder(root: Path, n: int = 3, captions: bool = True) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        stem = root / ("sub" if i % 2 else "") / f"p{i}"
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(stem.with_suffix(".png"))
        if captions:
            stem.with_suffix(".txt").write_text(f"pair {i}")
    return root


def _clipline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_folder_input_relative_and_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    # The field report: `clipline shards pairs out` from the folder above wrote 0 samples
    # (every row missing_image: the relative folder was joined to itself) and exited 0.
    _pairs_folder(tmp_path / "pairs")
    proc = _clipline("shards", "pairs", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 3
    assert read_manifest(tmp_path / "out") == {str(tmp_path / "out" / "000000.tar"): 3}
    # Every mix of relative and absolute input and output, from another working directory.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for i, (src, out) in enumerate(
        [("../pairs", str(tmp_path / "o0")), (str(tmp_path / "pairs"), "o1"), ("../pairs", "o2")]
    ):
        assert main(["shards", src, out]) == 0
        written = read_manifest(out if i else str(tmp_path / "o0"))
        assert list(written.values()) == [3]


def test_a_run_that_writes_nothing_fails_naming_input_and_reasons(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    _pairs_folder(tmp_path / "nocaps", captions=False)
    monkeypatch.chdir(tmp_path)
    rc = main(["shards", "nocaps", "out"])
    # stderr also carries the progress bar's lines ("shards: ..."); the error is one line.
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith("shards:")]
    assert rc == 2 and len(err) == 1, lines
    assert "no samples written from 'nocaps'" in err[0] and "missing_caption: 3" in err[0]
    assert "name.txt" in err[0]  # the fix
    assert json.loads((tmp_path / "out" / "report.json").read_text())["written"] == 0
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("filepath,caption\nnot_there.jpg,a caption\n")
    with pytest.raises(ValueError, match=r"missing_image: 1 \(e.g. 'not_there.jpg'\)"):
        write_shards(ShardsConfig(input=str(csv_path), output_dir=str(tmp_path / "o")))
