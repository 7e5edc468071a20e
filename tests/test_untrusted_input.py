"""Names and files from the user never run code (issue 11, item 7).

* A folder literally named ``pipe:<command>`` is a folder at every entry point that opens
  shards or eval sets: ``clipline eval``, ``data doctor``, ``shards --index-only``, ``embed``
  and the training stream. Before the fix, ``Path`` dropped the ``./`` of
  ``./pipe:touch PWNED; true x`` and webdataset ran ``touch PWNED; true x/test/0.tar``.
* A real ``pipe:`` URL runs only in training with ``data.allow_pipe = true``.
* A pickle where clipline expects safetensors or a weights-only torch file is refused with
  one line naming the file (exit 2); its ``__reduce__`` never runs.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipline.data import benchmark_sets
from clipline.data.builtin_data import generate_shapes
from clipline.data.shard_io import shard_samples
from clipline.data.stream import StreamConfig, epoch_shape
from clipline.launch.cli import main
from clipline.pretrain.export_clipline import IMAGE_FILE, export_model
from tests.helpers import make_shards, micro_loader, micro_model, micro_recipe, to_toml

SENTINEL = "PWNED"
# As a folder name: "<folder>/<file>" read as a pipe: URL runs `touch PWNED; true x/<file>`.
PIPE_DIR = f"pipe:touch {SENTINEL}; true x"
PIPE_DIR_2 = f"pipe:touch {SENTINEL}; echo x"
SHAPES = ["circle", "square", "triangle"]


class Evil:
    """Unpickling this creates ``path``: the sentinel of code run from a weights file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Shards, eval sets and an image folder under pipe:-named folders, and an export."""
    root = tmp_path_factory.mktemp("untrusted")
    make_shards(root / PIPE_DIR, n=16, per_shard=8)
    scenes = generate_shapes(12, seed=4, image_size=32)
    labelled = [(s.image, SHAPES.index(s.shape)) for s in scenes if s.shape in SHAPES]
    benchmark_sets.write_classification_set(root / "sets" / PIPE_DIR, labelled, SHAPES, ["a {c}."])
    benchmark_sets.write_retrieval_set(
        root / "sets" / PIPE_DIR_2, ((s.image, [s.caption]) for s in scenes)
    )
    (root / "img" / PIPE_DIR).mkdir(parents=True)
    for i, s in enumerate(scenes[:3]):
        s.image.save(root / "img" / PIPE_DIR / f"{i}.png")
    export_model(micro_model(), root / "export", run_config={})
    return root


def _no_sentinel(*folders: Path) -> None:
    for folder in folders:
        assert not list(folder.rglob(SENTINEL)), f"a command ran: {SENTINEL} in {folder}"


def test_clipline_eval_reads_a_pipe_named_root_as_a_folder(ws: Path) -> None:
    # The report, as a user types it: a relative root, in a fresh process.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipline",
            "eval",
            "../export",
            "--zeroshot",
            f"shapes=./{PIPE_DIR}",
            "--retrieval",
            f"caps=./{PIPE_DIR_2}",
            "--device",
            "cpu",
        ],
        cwd=ws / "sets",
        capture_output=True,
        text=True,
        timeout=600,
    )
    _no_sentinel(ws)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert "shapes/acc1" in results and any(k.startswith("caps/") for k in results)


def test_eval_absolute_root_and_a_real_pipe_url(ws: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ws / "sets")
    root = ws / "sets" / PIPE_DIR
    assert main(["eval", str(ws / "export"), "--zeroshot", f"a={root}", "--device", "cpu"]) == 0
    assert "a/acc1" in json.loads(capsys.readouterr().out)
    # Not a folder: refused, nothing runs.
    rc = main(["eval", str(ws / "export"), "--zeroshot", f"b=pipe:touch {SENTINEL}"])
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    _no_sentinel(ws)


@pytest.mark.parametrize("form", ["relative", "glob", "brace", "absolute"])
def test_doctor_and_index_only_read_a_pipe_named_folder(ws, tmp_path, monkeypatch, capsys, form):
    monkeypatch.chdir(ws)
    spec = {
        "relative": f"./{PIPE_DIR}",
        "glob": f"./{PIPE_DIR}/*.tar",
        "brace": f"./{PIPE_DIR}/{{000000..000001}}.tar",
        "absolute": str(ws / PIPE_DIR),
    }[form]
    # --seconds: the doctor also runs the real stream over these shards.
    args = [spec, "--workers", "0", "--batch-size", "4", "--seconds", "0.2", "--json"]
    rc = main(["data", "doctor", *args])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] and report["samples"] == 16, report["problems"]
    assert report["loader"]["samples"] > 0
    rc = main(["shards", spec, str(tmp_path / "index"), "--index-only"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["written"] == 16
    _no_sentinel(ws, tmp_path)


def test_doctor_and_index_only_refuse_pipe_urls(ws, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ws)
    cmd = f"pipe:touch {SENTINEL}; cat {PIPE_DIR}/000000.tar"
    assert main(["data", "doctor", cmd, "--seconds", "0"]) == 2
    assert "local shards" in capsys.readouterr().err
    assert main(["shards", cmd, "--index-only"]) == 2
    assert "remote shards" in capsys.readouterr().err
    _no_sentinel(ws)


def test_embed_reads_a_pipe_named_image_folder(ws, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ws / "img")
    rc = main(["embed", str(ws / "export"), "--images", f"./{PIPE_DIR}", "-o", str(tmp_path)])
    assert rc == 0 and "embedded 3 images" in capsys.readouterr().out
    _no_sentinel(ws, tmp_path)


@pytest.mark.parametrize("allow_pipe", [False, True])
def test_training_stream_reads_a_pipe_named_folder_as_a_folder(ws, monkeypatch, allow_pipe):
    monkeypatch.chdir(ws)
    for spec in (f"./{PIPE_DIR}", str(ws / PIPE_DIR)):
        cfg = StreamConfig(shards=spec, batch_size=4, workers=1, allow_pipe=allow_pipe)
        keys = [k for b in micro_loader(cfg).epoch(0) for k in b["key"]]
        assert sorted(keys) == [f"{i:09d}" for i in range(16)]
    _no_sentinel(ws)


def test_pipe_urls_run_only_with_allow_pipe(ws, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ws)
    cmd = f"pipe:touch {SENTINEL}; cat './{PIPE_DIR}/000000.tar'"
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        epoch_shape(StreamConfig(shards=cmd, workers=0), 1)
    with pytest.raises(ValueError, match="pipe: URL"):
        list(shard_samples([cmd], counts=Counter()))
    recipe = micro_recipe(cmd, tmp_path / "run")
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    assert main(["pretrain", "--recipe", str(tmp_path / "r.toml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.allow_pipe=true" in err
    _no_sentinel(ws, tmp_path)
    # Allowed, such a command runs (what data.allow_pipe is for); here in its own folder.
    (tmp_path / "allowed").mkdir()
    monkeypatch.chdir(tmp_path / "allowed")
    cmd = f"pipe:touch {SENTINEL}; cat '{ws / PIPE_DIR}/000000.tar'"
    manifest = str(ws / PIPE_DIR / "sizes.json")
    cfg = StreamConfig(shards=cmd, manifest=manifest, batch_size=4, workers=0, allow_pipe=True)
    assert len([k for b in micro_loader(cfg).epoch(0) for k in b["key"]]) == 8
    assert (tmp_path / "allowed" / SENTINEL).exists()
    _no_sentinel(ws)


# ------------------------------------------------------------------------------- pickles


def _one_line_refusal(capsys, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "Traceback" not in err
    return err


def test_a_pickled_checkpoint_metadata_is_refused_on_resume(tmp_path, monkeypatch, capsys) -> None:
    shards = make_shards(tmp_path / "shards", n=32, per_shard=8)
    recipe = tmp_path / "r.toml"
    recipe.write_text(to_toml(micro_recipe(shards, tmp_path / "run", steps=2, checkpoint_every=2)))
    assert main(["pretrain", "--recipe", str(recipe)]) == 0
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    sentinel = tmp_path / SENTINEL
    # DCP's metadata is a pickle: one that builds anything but DCP's metadata is refused.
    metadata = ckpt / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(Evil(sentinel)))
    capsys.readouterr()
    assert main(["pretrain", "--recipe", str(recipe), "loop.steps=4", "--resume", "latest"]) == 2
    assert "was refused" in _one_line_refusal(capsys, metadata)
    assert not sentinel.exists()
    # The eval and export commands, which read the checkpoint in one process, say so too.
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "was refused" in _one_line_refusal(capsys, metadata)
    assert not sentinel.exists()


def test_a_pickled_export_or_tower_weights_file_is_refused(ws, tmp_path, capsys) -> None:
    export = tmp_path / "export"
    export_model(micro_model(), export, run_config={})
    sentinel = tmp_path / SENTINEL
    import pickle

    (export / IMAGE_FILE).write_bytes(pickle.dumps(Evil(sentinel)))
    rc = main(["eval", str(export), "--zeroshot", f"a={ws / 'sets' / PIPE_DIR}"])
    assert rc == 2 and "a Python pickle" in _one_line_refusal(capsys, export / IMAGE_FILE)
    weights = tmp_path / "resnet18.bin"
    torch.save({"conv1.weight": Evil(sentinel)}, weights)
    recipe = micro_recipe(ws / PIPE_DIR, tmp_path / "run")
    recipe["model"] |= {"image_tower": "timm:resnet18", "image_tower_weights": str(weights)}
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    assert main(["pretrain", "--recipe", str(tmp_path / "r.toml"), "--dry-run"]) == 2
    assert "model.image_tower_weights" in _one_line_refusal(capsys, weights)
    assert not sentinel.exists()
