"""``clipline embed`` / ``clipline search``: what is indexed is what the export computes.

Scores must equal the dot products of clipline's own ``encode_text``/``encode_image`` on
the export's preprocessing, an exact query must come back first, and an unreadable image is
skipped and reported rather than failing the run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import PIL.Image
import pytest
import torch

from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main
from clipline.launch.run import load_encoders
from clipline.pretrain.export_clipline import export_model
from tests.helpers import micro_model


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    export_model(micro_model(seed=0), root / "export", run_config={})
    export_model(micro_model(seed=1), root / "other", run_config={})
    scenes = generate_shapes(6, seed=5, image_size=40)
    (root / "img" / "sub").mkdir(parents=True)
    for i, s in enumerate(scenes):
        s.image.save(root / "img" / ("sub" if i % 3 == 0 else "") / f"{i}.png")
    (root / "img" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "img" / "notes.txt").write_text("not an image, not counted")
    captions = [s.caption for s in scenes]
    assert len(set(captions)) == len(captions)
    (root / "texts.txt").write_text("\n".join([*captions[:3], "", *captions[3:]]) + "\n")
    return root


def _image_embeddings(model, paths: list[Path]) -> torch.Tensor:
    preprocess = model.image_transform(is_train=False)
    images = torch.stack([preprocess(PIL.Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.encode_image(images)


def test_embed_images_then_search_by_text_and_image(ws, tmp_path, capsys):
    out = tmp_path / "index"
    args = ["embed", str(ws / "export"), "--images", str(ws / "img"), "-o", str(out)]
    assert main([*args, "--batch-size", "4", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 6 images" in printed and "skipped bad.jpg" in printed

    meta = json.loads((out / "meta.json").read_text())
    assert (meta["kind"], meta["count"], meta["dim"]) == ("image", 6, 32)
    assert [s["id"] for s in meta["skipped"]] == ["bad.jpg"]
    assert len(meta["model"]["sha256"]) == 64
    ids = json.loads((out / "ids.json").read_text())
    assert ids == ["1.png", "2.png", "4.png", "5.png", "sub/0.png", "sub/3.png"]
    emb_ND = np.load(out / "embeddings.npy")
    assert emb_ND.dtype == np.float32 and emb_ND.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(emb_ND, axis=1), 1, rtol=1e-5)
    index = faiss.read_index(str(out / "index.faiss"))
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == 6

    model = load_encoders(ws / "export")
    img_ND = _image_embeddings(model, [ws / "img" / i for i in ids])
    np.testing.assert_allclose(emb_ND, img_ND.numpy(), atol=1e-6)

    # Text -> image: scores are encode_text . encode_image, best first.
    query = "a large red circle on a white background"
    assert main(["search", str(ws / "export"), str(out), query, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected_N = (img_ND @ model.encode_text(model.tokenize([query]))[0]).numpy()
    order = np.argsort(-expected_N)[:3]
    assert [h["id"] for h in hits] == [ids[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in hits], expected_N[order], atol=1e-5)
    assert hits[0]["path"] == str((ws / "img" / ids[order[0]]).resolve())

    # Image -> image: the image itself comes first, with cosine 1; the table form.
    assert main(["search", str(ws / "export"), str(out), "--image", str(ws / "img/sub/3.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id"] and len(table) == 1 + 5
    rank, score, first = table[1].split()
    assert (rank, first) == ("1", "sub/3.png") and float(score) == pytest.approx(1, abs=1e-4)


def test_embed_texts_and_search_by_image(ws, tmp_path, capsys):
    out = tmp_path / "texts"
    assert (
        main(["embed", str(ws / "export"), "--texts", str(ws / "texts.txt"), "-o", str(out)]) == 0
    )
    assert "embedded 6 texts" in capsys.readouterr().out
    lines = [x for x in (ws / "texts.txt").read_text().splitlines() if x]
    assert json.loads((out / "ids.json").read_text()) == lines
    assert json.loads((out / "meta.json").read_text())["skipped"][0]["error"] == "blank line"

    # The exact text comes back first, with cosine 1.
    assert main(["search", str(ws / "export"), str(out), lines[4], "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"] == lines[4] and hits[0]["score"] == pytest.approx(1, abs=1e-5)

    # Image -> text: the score of each caption is encode_image . encode_text.
    image = ws / "img" / "2.png"
    assert main(["search", str(ws / "export"), str(out), "--image", str(image), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    model = load_encoders(ws / "export")
    with torch.no_grad():
        txt_TD = model.encode_text(model.tokenize(lines))
    expected_T = (txt_TD @ _image_embeddings(model, [image])[0]).numpy()
    for h in hits:
        assert h["score"] == pytest.approx(expected_T[lines.index(h["id"])], abs=1e-5)


def test_workers_and_mismatched_model(ws, tmp_path, capsys):
    out = tmp_path / "index"
    args = ["embed", str(ws / "export"), "--images", str(ws / "img"), "-o", str(out)]
    assert main([*args, "--workers", "2", "--batch-size", "2"]) == 0
    assert np.load(out / "embeddings.npy").shape == (6, 32)
    capsys.readouterr()
    # An index only makes sense with the weights that built it.
    assert main(["search", str(ws / "other"), str(out), "a red circle"]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert main(["search", str(ws / "export"), str(out)]) == 2  # no query
    assert main(["search", str(ws / "export"), str(tmp_path), "x"]) == 2  # not an index
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    bad_out = str(tmp_path / "bad-index")
    rc = main(["embed", str(ws / "export"), "--images", str(tmp_path / "bad"), "-o", bad_out])
    assert rc == 2 and "nothing to embed" in capsys.readouterr().err


def test_embed_refuses_to_replace_an_index_without_overwrite(ws, tmp_path, capsys):
    """`embed -o DIR` onto an existing index used to replace its 6 entries silently."""
    out = tmp_path / "index"
    args = ["embed", str(ws / "export"), "--workers", "0", "-o", str(out)]
    assert main([*args, "--images", str(ws / "img")]) == 0
    capsys.readouterr()
    assert main([*args, "--texts", str(ws / "texts.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds an index of 6 items" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert json.loads((out / "meta.json").read_text())["kind"] == "image"
    (out / "meta.json").unlink()  # a half-written index is protected too
    assert main([*args, "--texts", str(ws / "texts.txt")]) == 2
    assert "part of an index" in capsys.readouterr().err
    assert main([*args, "--texts", str(ws / "texts.txt"), "--overwrite"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["kind"], meta["count"]) == ("text", 6)


def test_search_answers_several_queries_in_one_process(ws, tmp_path, capsys):
    """Several text arguments, a --queries-file and images: one model load, one process."""
    out = tmp_path / "texts"
    assert (
        main(["embed", str(ws / "export"), "--texts", str(ws / "texts.txt"), "-o", str(out)]) == 0
    )
    capsys.readouterr()
    lines = [x for x in (ws / "texts.txt").read_text().splitlines() if x]
    (tmp_path / "queries.txt").write_text(f"{lines[2]}\n\n{lines[5]}\n")
    image = os.path.relpath(ws / "img" / "2.png", tmp_path)
    cmd = [sys.executable, "-m", "clipline", "search", str(ws / "export"), "texts"]
    cmd += [lines[0], lines[1], "--queries-file", "queries.txt", "--image", image, "--json"]
    cmd += ["-k", "3", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout)
    assert [(a["kind"], a["query"]) for a in answers] == [
        ("text", lines[0]), ("text", lines[1]), ("text", lines[2]), ("text", lines[5]),
        ("image", image),
    ]  # fmt: skip
    for a in answers[:4]:
        assert a["hits"][0]["id"] == a["query"] and len(a["hits"]) == 3
    # Each answer is what a search for that query alone gives.
    for a in answers:
        alone = ["--image", str(tmp_path / a["query"])] if a["kind"] == "image" else [a["query"]]
        assert main(["search", str(ws / "export"), str(out), *alone, "-k", "3", "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert [h["id"] for h in hits] == [h["id"] for h in a["hits"]]
        for got, want in zip(a["hits"], hits, strict=True):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    # The plain-text output names each query above its table.
    assert main(["search", str(ws / "export"), str(out), lines[0], lines[1]]) == 0
    printed = capsys.readouterr().out
    assert f"text: {lines[0]}" in printed and f"text: {lines[1]}" in printed
