"""``clipline evalset`` builds CLIP_benchmark-layout sets that ``clipline eval`` and
clip_benchmark's wds loader read; ``--zeroshot NAME=ROOT,format=...`` reads the other formats.

A folder of class folders becomes a zero-shot set that scores exactly as the folder itself
(read with ``format=folder``); a CSV with repeated image rows becomes a retrieval set with
several captions per image.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main
from clipline.pretrain.export_clipline import export_model
from tests.helpers import micro_model

CB_WDS_WARNING = "ignore:WebDataset\\(shardshuffle"  # clip_benchmark's own call, not ours


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalset")
    export_model(micro_model(seed=2), root / "export", run_config={})
    scenes = generate_shapes(18, seed=4, image_size=32)
    with (root / "pairs.csv").open("w", newline="") as f, (root / "labels.csv").open("w") as g:
        writer, labels = csv.writer(f), csv.writer(g)
        writer.writerow(["path", "text"])
        labels.writerow(["path", "label"])
        # Sorted as an image folder is read, so that the CSV lists the same images in order.
        for i, s in sorted(enumerate(scenes), key=lambda x: (x[1].shape, f"{x[0]}.png")):
            (root / "imgs" / s.shape).mkdir(parents=True, exist_ok=True)
            s.image.save(root / "imgs" / s.shape / f"{i}.png")
            writer.writerow([f"imgs/{s.shape}/{i}.png", s.caption])
            labels.writerow([f"imgs/{s.shape}/{i}.png", s.shape])
            if i % 3 == 0:  # a second caption for every third image
                writer.writerow([f"imgs/{s.shape}/{i}.png", f"picture number {i}"])
    return root


def _clipline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clipline", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.filterwarnings(CB_WDS_WARNING)
def test_evalset_builds_sets_that_eval_and_clip_benchmark_read(ws, tmp_path, monkeypatch, capsys):
    from clip_benchmark.datasets.builder import build_dataset

    out = tmp_path / "sets"
    res = _clipline("evalset", "zeroshot", "imgs", str(out / "zs"), "--templates", "simple",
                    cwd=ws)  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    classes = sorted(p.name for p in (ws / "imgs").iterdir())
    assert (summary["samples"], summary["classes"]) == (18, len(classes))
    monkeypatch.chdir(ws)
    argv = ["evalset", "retrieval", "pairs.csv", str(out / "ret"), "--image-column", "path"]
    assert main([*argv, "--caption-column", "text"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["samples"], summary["captions"]) == (18, 24)

    # clip_benchmark's own loader reads both sets.
    zs = build_dataset("wds/zs", root=str(out / "zs"), transform=None, split="test")
    assert zs.classes == classes and zs.templates == ["a photo of a {c}."]
    assert sum(1 for _ in zs) == 18
    ret = build_dataset("wds/ret", root=str(out / "ret"), transform=None, split="test",
                        task="zeroshot_retrieval")  # fmt: skip
    assert sorted(len(texts) for _, texts in ret) == [1] * 12 + [2] * 6

    # The built set scores exactly as its source folder, read with format=folder.
    argv = ["eval", "export", "--device", "cpu", "--zeroshot", f"built={out / 'zs'}"]
    argv += ["--zeroshot", "folder=imgs,format=folder,templates=simple"]
    argv += ["--zeroshot", "csv=labels.csv,format=csv,csv_image_column=path,templates=simple"]
    argv += ["--retrieval", f"ret={out / 'ret'},ks=[1,2]"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert got[f"built/{metric}"] == got[f"folder/{metric}"] == got[f"csv/{metric}"], metric
    assert {"ret/image_retrieval_recall@2", "ret/text_retrieval_recall@1"} <= got.keys()

    # The built split is not replaced without --overwrite.
    argv = ["evalset", "zeroshot", "imgs", str(out / "zs"), "--templates", "simple"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_evalset_and_task_flags_name_what_to_fix(ws, tmp_path, capsys):
    out = str(tmp_path / "x")
    argv = ["evalset", "retrieval", str(ws / "pairs.csv"), out, "--image-column", "path"]
    assert main([*argv, "--caption-column", "txt"]) == 2
    err = capsys.readouterr().err
    assert "pass --caption-column" in err and "Did you mean 'text'" in err
    assert main(["evalset", "zeroshot", str(ws / "imgs"), out]) == 2
    assert "give --templates" in capsys.readouterr().err
    assert main(["eval", str(ws / "export"), "--zeroshot", f"a={ws / 'imgs'},formt=folder"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Did you mean 'format'" in err and len(err.splitlines()) == 1


def test_evalset_reads_csvs_as_clipline_shards_does(ws, tmp_path, capsys):
    # Excel saves a byte-order mark; open_clip writes tab-separated files named *.csv.
    rows = (ws / "pairs.csv").read_text().splitlines()
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text("\n".join(r.replace(",", "\t", 1) for r in rows) + "\n")
    for src in (bom, tabbed):
        for p in (ws / "imgs").iterdir():  # image paths are relative to the CSV
            (tmp_path / "imgs" / p.name).mkdir(parents=True, exist_ok=True)
            for img in p.iterdir():
                target = tmp_path / "imgs" / p.name / img.name
                if not target.exists():
                    target.symlink_to(img)
        argv = ["evalset", "retrieval", str(src), str(tmp_path / src.stem), "--image-column"]
        assert main([*argv, "path", "--caption-column", "text"]) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        # Every image, and every caption (every third image has a second one).
        assert (summary["samples"], summary["captions"]) == (18, 24), summary
