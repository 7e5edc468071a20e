"""One tar reader for every reader of shards (``shard_io.TarSamples``): the indexer, the
training stream, the doctor and eval sets group a tar's members alike, so they agree on
which samples a shard holds."""

import ast
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from clipline.data.shard_io import list_shards, shard_samples
from clipline.data.stream import StreamConfig
from clipline.launch.cli import main
from tests.helpers import micro_loader

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def _foreign_shard(path: Path, keys: list[str]) -> None:
    """A shard as another tool writes it (plain tarfile), with a metadata folder first:
    webdataset reserves ``__name__`` for what is not a sample."""
    members = [("__meta__/info.json", b'{"tool": "other"}')]
    for i, key in enumerate(keys):
        members += [(f"{key}.jpg", _jpeg(i * 40)), (f"{key}.txt", f"photo {key}".encode())]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_index_stream_doctor_and_eval_reader_agree_on_a_foreign_tar(tmp_path, monkeypatch, capsys):
    # Before, the indexer left the metadata member out while the stream took it for a
    # sample: every epoch read it (counted missing_image) in place of the shard's last one.
    (tmp_path / "shards").mkdir()
    keys = {n: [f"{n}{i:03d}" for i in range(4)] for n in ("a", "b")}
    for n, ks in keys.items():
        _foreign_shard(tmp_path / "shards" / f"{n}.tar", ks)
    monkeypatch.chdir(tmp_path)  # relative paths, as typed at a prompt
    assert main(["shards", "--index-only", "shards"]) == 0
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"a.tar": 4, "b.tar": 4}

    cfg = StreamConfig(shards="shards", batch_size=4, workers=1, shuffle_buffer=1)
    batches = list(micro_loader(cfg).epoch(0))
    assert sorted(k for b in batches for k in b["key"]) == keys["a"] + keys["b"]
    assert [b["skipped"] for b in batches] == [{}, {}]

    capsys.readouterr()
    doctor = ["data", "doctor", "shards", "--json", "--full", "--seconds", "0"]
    rc = main([*doctor, "--workers", "1", "--batch-size", "4"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["problems"] == [], report["problems"]
    assert report["decoded"] == report["samples"] == report["manifest_samples"] == 8

    samples = list(shard_samples(list_shards("shards")))
    assert [s["__key__"] for s in samples] == keys["a"] + keys["b"]


def test_only_shard_io_reads_tars():
    """The one tar reader: no other module under data/, eval/, launch/ or pretrain/ opens a
    tar for reading or groups members itself (writers use webdataset's TarWriter)."""
    readers = []
    for folder in ("data", "eval", "launch", "pretrain"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == "data/shard_io.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == "webdataset.tariterators":
                    readers.append(f"{path.relative_to(ROOT)}:{node.lineno} tariterators")
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "open"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "tarfile"
                ):
                    readers.append(f"{path.relative_to(ROOT)}:{node.lineno} tarfile.open")
    assert readers == []
