"""Shard writer at scale: workers, resizing, several captions, Parquet, dedup, indexing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipline.data.shard_index import index_shards
from clipline.data.shard_io import list_shards, read_manifest
from clipline.data.shards import ShardsConfig, length_stats, sample_captions, write_shards
from clipline.launch.cli import main


def _jpeg(color, size, quality=95) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _members(folder: Path) -> list[tuple[str, str, str]]:
    """(shard, member name, sha256 of its bytes) for every member of every shard."""
    out = []
    for shard in list_shards(folder):
        with tarfile.open(shard) as tf:
            for m in tf:
                digest = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
                out.append((Path(shard).name, m.name, digest))
    return out


def _samples(folder: Path) -> list[dict[str, bytes]]:
    """Samples in shard order, as {ext: bytes} (the txt/json decoded)."""
    samples: list[dict] = []
    for shard in list_shards(folder):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tf.extractfile(m).read()
    for s in samples:
        s["txt"] = s["txt"].decode()
        s["json"] = json.loads(s["json"])
    return samples


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    """A CSV with large and small JPEGs, PNGs, bad rows and repeated images."""
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(24):
        name = f"img/{i:02d}.jpg" if i % 3 else f"img/{i:02d}.png"
        size = (300, 120) if i % 2 else (40, 30)
        data = _jpeg((i * 10, 50, 90), size) if i % 3 else _png((i * 10, 0, 0, 128), size)
        (tmp_path / name).write_bytes(data)
        rows.append((name, f"picture number {i}"))
        if i % 5 == 0:
            rows.append((name, f"another caption of picture {i}"))  # adjacent repeat
    (img / "bad.jpg").write_bytes(b"not an image")
    rows += [("img/bad.jpg", "broken"), ("img/missing.jpg", "gone"), ("img/01.jpg", "")]
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows(rows)
    return path


def _write(manifest: Path, out: Path, **kw):
    cfg = ShardsConfig(input=str(manifest), output_dir=str(out), samples_per_shard=5, **kw)
    return write_shards(cfg)


def test_workers_give_identical_shards(manifest: Path, tmp_path: Path) -> None:
    one = _write(manifest, tmp_path / "w1", max_side=64)
    two = _write(manifest, tmp_path / "w2", max_side=64, workers=2)
    again = _write(manifest, tmp_path / "w1b", max_side=64, workers=2)
    assert one.written == 24 and one.shards == [f"{i:06d}.tar" for i in range(5)]
    assert one.skipped == {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1}
    assert _members(tmp_path / "w1") == _members(tmp_path / "w2") == _members(tmp_path / "w1b")
    for name in one.shards:  # tar headers included: byte-identical files
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert one == two == again
    for f in ("sizes.json", "report.json"):
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


def test_originals_copied_by_default_resize_and_quality_on_request(
    manifest: Path, tmp_path: Path
) -> None:
    base = manifest.parent
    plain = _write(manifest, tmp_path / "plain")
    samples = _samples(tmp_path / "plain")
    for s in samples:
        src = (base / s["json"]["key"]).read_bytes()
        if s["json"]["key"].endswith(".jpg"):
            assert s["jpg"] == src, "JPEGs are stored byte for byte when no option is set"
        else:
            assert Image.open(io.BytesIO(s["jpg"])).size == Image.open(io.BytesIO(src)).size
    assert plain.images == {
        "copied": 16,
        "reencoded": 8,
        "resized": 0,
        "bytes": plain.images["bytes"],
    }

    resized = _write(manifest, tmp_path / "resized", max_side=100)
    for s in _samples(tmp_path / "resized"):
        src = (base / s["json"]["key"]).read_bytes()
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        if Image.open(io.BytesIO(src)).size == (300, 120):
            assert (w, h) == (100, 40), "longer side shrunk to max_side, aspect kept"
        else:
            assert (w, h) == (40, 30), "small images are never enlarged"
            if s["json"]["key"].endswith(".jpg"):
                assert s["jpg"] == src, "an image within max_side is copied unchanged"
    assert resized.images["resized"] == 12 and resized.images["copied"] == 8

    low = _write(manifest, tmp_path / "low", jpeg_quality=20)
    assert low.images["copied"] == 0 and low.images["reencoded"] == 24
    assert low.images["bytes"] < plain.images["bytes"]
    for s in _samples(tmp_path / "low"):
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"

    for bad in ({"max_side": 0}, {"jpeg_quality": 101}, {"workers": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _write(manifest, tmp_path / "bad", **bad)


def test_several_captions_and_caption_stats(manifest: Path, tmp_path: Path) -> None:
    report = _write(manifest, tmp_path / "out")
    samples = _samples(tmp_path / "out")
    by_key = {s["json"]["key"]: s for s in samples}
    s0 = by_key["img/00.png"]
    assert s0["txt"] == "picture number 0"  # open_clip/img2dataset readers take txt
    assert s0["json"]["captions"] == ["picture number 0", "another caption of picture 0"]
    assert sample_captions(s0) == s0["json"]["captions"]
    assert "captions" not in by_key["img/02.jpg"]["json"]
    assert sample_captions(by_key["img/02.jpg"]) == ["picture number 2"]
    # img/01.jpg appears again later with an empty caption: not adjacent, so not merged.
    assert report.skipped_examples["empty_caption"] == ["img/01.jpg"]
    caps = report.captions
    assert caps["count"] == 24 + 5
    assert caps["per_sample"] == {"min": 1, "mean": 1.21, "median": 1, "p95": 2, "max": 2}
    assert caps["words"]["min"] == 3 and caps["words"]["max"] == 5
    assert caps["chars"]["min"] == len("picture number 0")
    assert caps["chars"]["max"] == len("another caption of picture 20")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["captions"] == caps
    # Indexing our own shards in place does not overwrite the writer's report.
    before = (tmp_path / "out" / "report.json").read_bytes()
    assert index_shards(tmp_path / "out").sizes == report.sizes
    assert (tmp_path / "out" / "report.json").read_bytes() == before


def test_token_stats_count_clip_bpe_tokens(tmp_path: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    from clipline.pretrain.model import count_clip_tokens

    (tmp_path / "a.jpg").write_bytes(_jpeg((1, 2, 3), (8, 8)))
    long = " ".join(["word"] * 80)
    lines = [{"filepath": "a.jpg", "caption": ["a dog", long]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    plain = write_shards(ShardsConfig(input=str(jsonl), output_dir=str(tmp_path / "a")))
    assert "tokens" not in plain.captions, "off by default"
    cfg = ShardsConfig(input=str(jsonl), output_dir=str(tmp_path / "b"))
    caps = write_shards(cfg, count_tokens=count_clip_tokens).captions
    n_long = len(SimpleTokenizer().encode(long))
    assert caps["tokens"]["min"] == 2 and caps["tokens"]["max"] == n_long
    assert caps["over_77_tokens"] == 1
    assert (
        index_shards(tmp_path / "a", tmp_path / "idx", count_tokens=count_clip_tokens).captions[
            "over_77_tokens"
        ]
        == 0
    )  # an index sees txt: the first caption only
    # The CLI passes open_clip's tokenizer by name into spawned writer processes.
    assert main(["shards", str(jsonl), str(tmp_path / "c"), "--token-stats", "--workers", "2"]) == 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["captions"] == caps


def test_length_stats_nearest_rank() -> None:
    from collections import Counter

    hist = Counter({1: 10, 2: 5, 10: 5})  # 20 values
    assert length_stats(hist) == {"min": 1, "mean": 3.5, "median": 1, "p95": 10, "max": 10}
    assert length_stats(Counter())["max"] == 0


def test_jsonl_and_csv_caption_lists(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg((1, 2, 3), (8, 8)))
    (tmp_path / "b.jpg").write_bytes(_jpeg((9, 2, 3), (8, 8)))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"filepath": "a.jpg", "caption": ["first", " ", "second"]})
        + "\n"
        + json.dumps({"filepath": "b.jpg", "caption": []})
        + "\n"
    )
    report = write_shards(ShardsConfig(input=str(jsonl), output_dir=str(tmp_path / "j")))
    assert report.written == 1 and report.skipped == {"missing_caption": 1}
    (s,) = _samples(tmp_path / "j")
    assert s["txt"] == "first" and s["json"]["captions"] == ["first", "second"]

    table = tmp_path / "p.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["filepath", "caption"], ["a.jpg", '["x y", "z"]'], ["b.jpg", "[not json"]]
        )
    write_shards(ShardsConfig(input=str(table), output_dir=str(tmp_path / "c")))
    a, b = _samples(tmp_path / "c")
    assert a["json"]["captions"] == ["x y", "z"]
    assert b["txt"] == "[not json" and "captions" not in b["json"]


def test_parquet_paths_bytes_and_hf_struct(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg((1, 2, 3), (8, 8)))
    jpg_b, png_b = _jpeg((200, 0, 0), (8, 6)), _png((0, 0, 255, 255), (6, 6))
    pq.write_table(
        pa.table({"path": ["a.jpg", "missing.jpg", None], "text": ["one", "two", "three"]}),
        tmp_path / "paths.parquet",
    )
    r = write_shards(
        ShardsConfig(
            input=str(tmp_path / "paths.parquet"),
            output_dir=str(tmp_path / "p"),
            image_column="path",
            caption_column="text",
        )
    )
    assert r.written == 1 and r.skipped == {"missing_image": 2}

    # img2dataset-style raw bytes, with a list<string> caption column and a bad row.
    pq.write_table(
        pa.table(
            {
                "jpg": pa.array([jpg_b, png_b, b"garbage"], pa.binary()),
                "caps": [["red", "a red box"], ["blue"], ["x"]],
            }
        ),
        tmp_path / "bytes.parquet",
    )
    cfg = ShardsConfig(
        input=str(tmp_path / "bytes.parquet"),
        output_dir=str(tmp_path / "b"),
        image_column="jpg",
        caption_column="caps",
    )
    r = write_shards(cfg)
    assert r.written == 2 and r.skipped == {"corrupt_image": 1}
    assert r.skipped_examples == {"corrupt_image": ["row2"]}
    red, blue = _samples(tmp_path / "b")
    assert red["jpg"] == jpg_b and red["json"]["captions"] == ["red", "a red box"]
    assert blue["txt"] == "blue" and Image.open(io.BytesIO(blue["jpg"])).format == "JPEG"

    # Hugging Face datasets' Image feature: a {"bytes", "path"} struct.
    pq.write_table(
        pa.table({"image": [{"bytes": jpg_b, "path": "x.jpg"}], "caption": ["hf"]}),
        tmp_path / "hf.parquet",
    )
    r = write_shards(
        ShardsConfig(
            input=str(tmp_path / "hf.parquet"), output_dir=str(tmp_path / "h"), image_column="image"
        )
    )
    assert r.written == 1 and _samples(tmp_path / "h")[0]["jpg"] == jpg_b

    with pytest.raises(ValueError, match=r"columns found: \['jpg', 'caps'\]"):
        write_shards(ShardsConfig(input=str(tmp_path / "bytes.parquet"), output_dir=str(tmp_path)))


def test_dedup_by_image_bytes(tmp_path: Path) -> None:
    same = _jpeg((5, 5, 5), (8, 8))
    for name in ("a.jpg", "b.jpg", "d.jpg"):
        (tmp_path / name).write_bytes(same)
    (tmp_path / "c.jpg").write_bytes(_jpeg((250, 5, 5), (8, 8)))
    lines = [{"filepath": n, "caption": n} for n in ("a.jpg", "c.jpg", "b.jpg", "d.jpg")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    kept = write_shards(ShardsConfig(input=str(jsonl), output_dir=str(tmp_path / "all")))
    assert kept.written == 4 and kept.skipped == {}
    for workers in (1, 2):
        out = tmp_path / f"dedup{workers}"
        cfg = ShardsConfig(input=str(jsonl), output_dir=str(out), dedup=True, workers=workers)
        r = write_shards(cfg)
        assert r.written == 2
        assert r.skipped == {"duplicate": 2}
        assert r.skipped_examples == {"duplicate": ["b.jpg", "d.jpg"]}
        assert [s["txt"] for s in _samples(out)] == ["a.jpg", "c.jpg"]


def _img2dataset_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A tar as img2dataset writes it, using plain tarfile (not our writer)."""
    with tarfile.open(path, "w") as tf:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def img2dataset_dir(tmp_path: Path) -> Path:
    d = tmp_path / "laion"
    d.mkdir()
    for shard in range(2):
        samples = []
        for i in range(3):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"http://x/{key}", "caption": "c", "width": 32, "status": "success"}
            image = {f"{key}.png": _png((0, 9, 0, 255), (32, 32))} if i == 1 else {}
            samples.append(
                {
                    **(image or {f"{key}.jpg": _jpeg((shard * 100, i * 50, 0), (32, 32))}),
                    **({f"{key}.txt": f"photo {key}".encode()} if (shard, i) != (1, 2) else {}),
                    f"{key}.json": json.dumps(meta).encode(),
                }
            )
        _img2dataset_shard(d / f"{shard:05d}.tar", samples)
        (d / f"{shard:05d}_stats.json").write_text("{}")  # img2dataset's side files
    return d


def test_index_existing_shards_in_place(img2dataset_dir: Path) -> None:
    d = img2dataset_dir
    before = {p.name: p.read_bytes() for p in d.glob("*.tar")}
    report = index_shards(str(d))
    assert {p.name: p.read_bytes() for p in d.glob("*.tar")} == before, "tars are not rewritten"
    assert report.sizes == {"00000.tar": 3, "00001.tar": 2}
    assert report.skipped == {"missing_caption": 1}
    assert report.skipped_examples == {"missing_caption": ["00001.tar:000010002"]}
    assert report.captions["count"] == 5
    assert read_manifest(d) == {str(d / "00000.tar"): 3, str(d / "00001.tar"): 2}
    # Re-indexing part of the folder keeps the other shards' entries.
    index_shards(d / "00001.tar")
    assert json.loads((d / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 2}

    # The stream reads them as they are: png samples included, the caption-less one dropped.
    from clipline.data.loader import build_train_loader
    from clipline.data.preprocess import PreprocessConfig
    from clipline.data.stream import StreamConfig

    cfg = StreamConfig(shards=str(d), batch_size=2, workers=0, shuffle_buffer=1)
    loader = build_train_loader(
        cfg,
        preprocess=PreprocessConfig(size=(4, 4)),
        tokenize=lambda caps: torch.zeros(len(caps), 4, dtype=torch.long),
        rank=0,
        world_size=1,
    )
    batches = list(loader.epoch(0))
    assert len(batches) == loader.batches_per_epoch == 2


def test_index_into_own_folder_and_reject_broken(img2dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    report = index_shards(f"{img2dataset_dir}/*.tar", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.tar",
        "00001.tar",
        "index_report.json",
        "sizes.json",
    ]
    assert (out / "00000.tar").is_symlink()
    assert report.sources["00001.tar"] == str((img2dataset_dir / "00001.tar").resolve())
    assert sum(read_manifest(out).values()) == 5
    assert not (img2dataset_dir / "sizes.json").exists()

    # A cut-off tar is caught (tarfile alone would silently stop early) and named.
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (img2dataset_dir / "00000.tar").read_bytes()
    (broken / "00000.tar").write_bytes(data[:1500])
    with pytest.raises(ValueError, match=r"00000\.tar.*truncated"):
        index_shards(broken)
    assert not (broken / "sizes.json").exists()


def test_cli_shards_flags_and_index_only(
    manifest: Path, img2dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cli"
    rc = main(
        [
            "shards",
            str(manifest),
            str(out),
            "--samples-per-shard",
            "10",
            "--workers",
            "2",
            "--max-side",
            "64",
            "--jpeg-quality",
            "80",
            "--dedup",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == 24 and printed["images"]["copied"] == 0
    assert main(["shards", "--index-only", str(img2dataset_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["sizes"] == {"00000.tar": 3, "00001.tar": 2}
    assert main(["shards", str(manifest)]) == 2  # no output folder: a clear error, exit 2
    assert "output_dir" in capsys.readouterr().err
