"""Offline data sources (emoji, Fashion-MNIST, generated shapes) and the demo data set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from clipline.data import builtin_data, demo_data
from clipline.data.shard_io import list_shards

EMOJI_SNIPPET = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: Component
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: People & Body

# subgroup: person-role
1F469 1F3FD 200D 1F4BB                                 ; fully-qualified     # 👩🏽‍💻 E4.0 woman technologist: medium skin tone
"""


def test_parse_emoji_snippet(tmp_path: Path) -> None:
    path = tmp_path / "emoji-test.txt"
    path.write_text(EMOJI_SNIPPET, encoding="utf-8")
    recs = builtin_data.parse_emoji_test(path)
    assert recs == [
        builtin_data.EmojiRecord("1F600", "grinning face", "Smileys & Emotion", "face-smiling"),
        builtin_data.EmojiRecord("263A FE0F", "smiling face", "Smileys & Emotion", "face-smiling"),
        builtin_data.EmojiRecord(
            "1F469 1F3FD 200D 1F4BB",
            "woman technologist: medium skin tone",
            "People & Body",
            "person-role",
        ),
    ]
    assert recs[2].text == "\U0001f469\U0001f3fd\u200d\U0001f4bb"
    with pytest.raises(ValueError, match="apt-get install"):
        builtin_data.parse_emoji_test(tmp_path / "missing.txt")


def test_installed_emoji_list_and_rendering() -> None:
    assert builtin_data.emoji_available()
    assert not builtin_data.emoji_available(font_path="/nonexistent.ttf")
    recs = builtin_data.parse_emoji_test()
    assert len(recs) == 3655
    groups = Counter(r.group for r in recs)
    assert set(groups) == set(builtin_data.EMOJI_GROUPS)
    assert groups["People & Body"] == 2148
    assert len({(r.group, r.subgroup) for r in recs}) == 99
    by_name = {r.name: r for r in recs}
    picks = ["grinning face", "woman technologist: medium skin tone", "flag: Ghana", "flag: Wales"]
    images = [builtin_data.render_emoji(by_name[n]) for n in picks]
    for name, im in zip(picks, images, strict=True):
        assert im.size == builtin_data.EMOJI_CANVAS and im.mode == "RGB", name
        px = np.asarray(im)
        assert (px[0, 0] == 255).all(), f"{name}: background must be white"
        assert (px < 200).any(axis=-1).mean() > 0.1, f"{name}: glyph missing"
    # Different emoji, different pictures (a missing glyph would render as the same box).
    assert len({im.tobytes() for im in images}) == len(images)


def test_fashion_mnist(tmp_path: Path) -> None:
    assert builtin_data.fashion_mnist_available()
    assert not builtin_data.fashion_mnist_available(tmp_path)
    images, labels = builtin_data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(builtin_data.FASHION_MNIST_CLASSES) == 10
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        builtin_data.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="'val'"):
        builtin_data.load_fashion_mnist("val")


def test_shapes_deterministic_and_honest() -> None:
    a = builtin_data.generate_shapes(40, seed=3)
    b = builtin_data.generate_shapes(40, seed=3)
    c = builtin_data.generate_shapes(40, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [s.caption for s in a] != [s.caption for s in c]
    assert {len(s.attributes["objects"]) for s in a} == {1, 2}
    for s in a:
        first = s.attributes["objects"][0]
        assert s.shape == first["shape"] and s.caption.startswith(
            f"a {first['size']} {first['color']} {first['shape']}"
        )
        # Every object is drawn in its named colour at its centre.
        for obj in s.attributes["objects"]:
            x, y = (round(obj[k] * (s.image.width - 1)) for k in ("x", "y"))
            got = np.asarray(s.image.getpixel((x, y)), dtype=int)
            assert np.abs(got - builtin_data.COLORS[obj["color"]]).max() < 40, s.caption


def test_split_is_family_level_and_balanced() -> None:
    recs = builtin_data.parse_emoji_test()
    train, held = demo_data.split_emoji(recs, seed=0, heldout_fraction=0.1)
    assert sorted(train + held) == list(range(len(recs)))
    fam = demo_data._family
    assert not {fam(recs[i]) for i in train} & {fam(recs[i]) for i in held}
    assert {(recs[i].group, recs[i].subgroup) for i in train} == {
        (r.group, r.subgroup) for r in recs
    }
    held_groups = Counter(recs[i].group for i in held)
    assert min(held_groups.values()) >= demo_data.MIN_HELDOUT_PER_GROUP
    zs = demo_data._zeroshot_subset(recs, held, seed=0)
    zs_groups = Counter(recs[i].group for i in zs)
    assert len(zs_groups) == 9 and max(zs_groups.values()) <= demo_data.ZEROSHOT_MAX_PER_CLASS
    assert max(zs_groups.values()) / len(zs) < 0.2  # majority-class rate, vs 59% uncapped
    assert demo_data.split_emoji(recs, seed=0, heldout_fraction=0.1)[1] == held
    assert demo_data.split_emoji(recs, seed=1, heldout_fraction=0.1)[1] != held


def _train_keys(d: demo_data.DemoData) -> list[dict]:
    ds = wds.WebDataset(list_shards(str(d.train_shards)), shardshuffle=False)
    return [json.loads(s["json"]) for s in ds]


def test_prepare_demo_data_emoji(tmp_path: Path) -> None:
    from clipline.data import benchmark_sets

    d = demo_data.prepare_demo_data(
        tmp_path / "demo", limit=300, samples_per_shard=32, fashion_mnist_per_class=3
    )
    assert d.source == "emoji" and d.notes == []
    meta = _train_keys(d)
    assert len(meta) == d.stats["train"] and d.stats["train"] + d.stats["heldout"] == 300
    assert len(list_shards(str(d.train_shards))) >= 8
    held = set(d.stats["heldout_keys"])
    assert held and not held & {m["key"].replace("_", " ") for m in meta}
    assert {m["group"] for m in meta} == set(builtin_data.EMOJI_GROUPS)

    zs = benchmark_sets.read_classification_set(d.zeroshot_roots["emoji_groups"])
    assert zs.classnames == list(builtin_data.EMOJI_GROUPS)
    labels = [y for _, y in zs.samples()]
    assert len(labels) == d.stats["zeroshot"]["emoji_groups"]["n"]
    assert len(set(labels)) == 9
    retrieval = list(benchmark_sets.read_retrieval_set(d.retrieval_root).samples())
    assert len(retrieval) == d.stats["heldout"]
    fm = benchmark_sets.read_classification_set(d.zeroshot_roots["fashion_mnist"])
    fm_samples = list(fm.samples())
    assert len(fm_samples) == 30 and fm_samples[0][0].mode == "RGB"

    # Re-running replaces the earlier output; a foreign folder is refused.
    again = demo_data.prepare_demo_data(
        tmp_path / "demo", limit=300, samples_per_shard=32, fashion_mnist_per_class=0
    )
    assert again.stats["heldout_keys"] == d.stats["heldout_keys"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        demo_data.prepare_demo_data(tmp_path / "other")


def test_prepare_demo_data_falls_back_without_font(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtin_data, "emoji_available", lambda *a, **k: False)
    monkeypatch.setattr(builtin_data, "fashion_mnist_available", lambda *a, **k: False)
    d = demo_data.prepare_demo_data(tmp_path / "demo", limit=200, samples_per_shard=32)
    assert d.source == "synthetic"
    assert any("fonts-noto-color-emoji" in n for n in d.notes)
    assert any("dataset-fashion-mnist" in n for n in d.notes)
    assert set(d.zeroshot_roots) == {"shapes", "colors"}
    assert d.stats["train"] + d.stats["heldout"] == 200
    assert len(_train_keys(d)) == d.stats["train"]
