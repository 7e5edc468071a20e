"""The data behind ``clipline demo``: real emoji image-text pairs, split for honest evaluation.

What :func:`prepare_demo_data` writes, and why:

* **Training shards** (``train/``): every emoji not held out, shuffled across shards (few
  shards, so shard-level shuffling alone would otherwise see CLDR order). Each emoji gets
  one caption, drawn per emoji by the seed from three true descriptions
  (:func:`emoji_captions`): the CLDR name, "woman technologist: medium skin tone" (50%);
  the name and its group, "grinning face, an emoji from Smileys & Emotion" (20%); the group
  alone, "an emoji from Smileys & Emotion" (30%). The name is the natural caption and what
  retrieval asks for. The group-only form is there because a group *suffix* next to a
  unique name is redundant for the contrastive loss (the name already tells the pairs in a
  batch apart), so a tiny model learns to ignore it; measured with a 3+3-layer width-128
  ViT-B/8-style model at 64 px, 150 steps of 128: name/name+group captions (50/50) gave
  zero-shot group accuracy 0.23 (majority-class rate 0.18), adding 20-30% group-only
  captions gave 0.35-0.40 at the same retrieval recall; 300 steps gave 0.45 (mean
  per-class recall 0.46) and held-out text->image R@1 0.15. The price is some exact
  duplicate captions in a batch, which InfoNCE tolerates. Every caption form is kept in
  the sample's ``json`` (``captions``) for loaders that sample among them.
* **Held-out split** (never in training), chosen by *family* and stratified by subgroup:
  2,148 of the 3,655 emoji are People & Body, mostly the five skin-tone variants of one
  design. Holding out one variant while its siblings train would turn "held-out" into a
  recolouring of a training image, so all skin-tone variants of a design (the same code
  points once U+1F3FB..U+1F3FF are removed) go to the same side. Per group the target is
  ``heldout_fraction`` of its emoji but at least 20 (so that small groups such as
  Activities, 85 emoji, give a usable number of test images) and at most 30% (so they keep
  most of their training data). Families are taken round-robin over the group's subgroups,
  and one family of every subgroup always stays in training.
* **Retrieval set** (``retrieval/``): all held-out emoji, each with its CLDR name.
* **Zero-shot set "emoji_groups"** (``zeroshot/emoji_groups/``): the held-out emoji with
  their group (9 classes), at most 40 per class (People & Body's held-out emoji are
  subsampled round-robin over their families). Uncapped, People & Body would be ~55% of
  the set and a constant classifier would look good; capped, the majority-class rate is
  under 20%. The evaluator should also report mean per-class recall. Template:
  ``"an emoji from {c}"``, the wording of the training captions (no final period: the
  captions have none, and it measurably helped).
* **Zero-shot set "fashion_mnist"** (when ``dataset-fashion-mnist`` is installed): 200
  test images per class (2,000), 28x28 grey stored as RGB at native size (the model's
  preprocessing resizes; upsampling here would only add bytes). An out-of-domain check:
  emoji include a t-shirt, dress, coat, jeans, shoes and bags, but drawn in colour on
  white, not grey on black; expect chance level (0.10 measured) from the demo's model.

Without the emoji font the demo falls back to generated shape scenes
(:func:`clipline.data.builtin_data.generate_shapes`, 3,600, 10% held out) and says so in
``DemoData.notes``; its zero-shot sets are the shape (6 classes) and the colour (4 classes)
of the held-out one-object scenes (same probe, 300 steps: shape 0.30, chance 0.17; colour
1.00), and its retrieval set the held-out scenes whose caption is unique among them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, features

from clipline.data import benchmark_sets, builtin_data
from clipline.data.ingest import Sample
from clipline.data.shards import write_samples

logger = logging.getLogger(__name__)

MARKER = "demo_data.json"
_OWNED = ("train", "retrieval", "zeroshot")
MIN_HELDOUT_PER_GROUP = 20
MAX_HELDOUT_SHARE = 0.3
ZEROSHOT_MAX_PER_CLASS = 40
# Share of training captions of each form in emoji_captions(): name, name + group, group.
CAPTION_WEIGHTS = (0.5, 0.2, 0.3)
EMOJI_ZEROSHOT_TEMPLATES = ["an emoji from {c}"]
FASHION_PER_CLASS = 200
FASHION_TEMPLATES = ["a {c}.", "a photo of a {c}.", "a black and white photo of a {c}."]
SHAPES_TOTAL = 3600
# Captions always name a colour with a shape, so each attribute's prompts average over the
# other one (CLIP-style template ensembling over a nuisance attribute).
SHAPES_TEMPLATES = [f"a {color} {{c}}" for color in builtin_data.COLORS]
COLORS_TEMPLATES = [f"a {{c}} {shape}" for shape in builtin_data.SHAPES]
_SKIN_TONES = {f"1F3F{c}" for c in "BCDEF"}


@dataclass
class DemoData:
    """Where :func:`prepare_demo_data` put things.

    Attributes:
        source: ``"emoji"`` or ``"synthetic"``.
        train_shards: Folder of training shards (``list_shards`` accepts it).
        retrieval_root: CLIP_benchmark-layout retrieval set (held-out pairs).
        zeroshot_roots: Name -> CLIP_benchmark-layout classification set.
        notes: Human-readable remarks (fallbacks, how to get the real data).
        stats: Counts per split and class balance (also in ``demo_data.json``).
    """

    source: str
    train_shards: Path
    retrieval_root: Path
    zeroshot_roots: dict[str, Path]
    notes: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


def _prepare_out_dir(out: Path) -> None:
    """Clear what a previous demo run wrote; refuse to touch a folder that isn't ours."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(
            f"out_dir {str(out)!r} is not empty and was not written by prepare_demo_data "
            f"(no {MARKER}); pass an empty or new folder."
        )
    for name in _OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _family(rec: builtin_data.EmojiRecord) -> str:
    return " ".join(cp for cp in rec.codepoints.split() if cp not in _SKIN_TONES)


def split_emoji(
    records: list[builtin_data.EmojiRecord], *, seed: int, heldout_fraction: float
) -> tuple[list[int], list[int]]:
    """Family-level, subgroup-stratified held-out split (see the module docstring).

    Args:
        records: Emoji records.
        seed: Split seed.
        heldout_fraction: Target held-out share per group before the 20-minimum/30%-cap.

    Returns:
        ``(train_indices, heldout_indices)`` into ``records``, each sorted.
    """
    rng = random.Random(seed)
    # group -> subgroup -> family -> record indices, in file order (deterministic).
    tree: dict[str, dict[str, dict[str, list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for i, r in enumerate(records):
        tree[r.group][r.subgroup][_family(r)].append(i)
    heldout: list[int] = []
    for group, subgroups in tree.items():
        size = sum(len(m) for fams in subgroups.values() for m in fams.values())
        target = min(
            max(round(heldout_fraction * size), MIN_HELDOUT_PER_GROUP),
            int(MAX_HELDOUT_SHARE * size),
        )
        queues = []
        for sub in sorted(subgroups):
            fams = [subgroups[sub][f] for f in sorted(subgroups[sub])]
            rng.shuffle(fams)
            queues.append(fams[1:])  # fams[0] stays in training: every subgroup is seen
        rng.shuffle(queues)
        taken = 0
        while taken < target and any(queues):
            for q in queues:
                # Skip families that would overshoot (a 26-member couple family, say)
                # rather than stop: a smaller family later in the queue may still fit.
                while q and taken + len(q[0]) > target:
                    q.pop(0)
                if q and taken < target:
                    fam = q.pop(0)
                    heldout.extend(fam)
                    taken += len(fam)
        logger.debug("held out %d of %d %s emoji", taken, size, group)
    held = set(heldout)
    return [i for i in range(len(records)) if i not in held], sorted(held)


def _zeroshot_subset(
    records: list[builtin_data.EmojiRecord], heldout: list[int], *, seed: int
) -> list[int]:
    """At most ZEROSHOT_MAX_PER_CLASS per group, round-robin over families for variety."""
    rng = random.Random(seed + 1)
    by_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i in heldout:
        by_group[records[i].group][_family(records[i])].append(i)
    chosen: list[int] = []
    for fams in by_group.values():
        queues = [fams[f][:] for f in sorted(fams)]
        for q in queues:
            rng.shuffle(q)
        rng.shuffle(queues)
        picked: list[int] = []
        while len(picked) < ZEROSHOT_MAX_PER_CLASS and any(queues):
            for q in queues:
                if q and len(picked) < ZEROSHOT_MAX_PER_CLASS:
                    picked.append(q.pop())
        chosen.extend(picked)
    return sorted(chosen)


def emoji_captions(rec: builtin_data.EmojiRecord) -> list[str]:
    """Caption forms for one emoji: the CLDR name, the name with its group, the group."""
    return [rec.name, f"{rec.name}, an emoji from {rec.group}", f"an emoji from {rec.group}"]


def _class_balance(labels: list[int], classnames: list[str]) -> dict[str, Any]:
    counts = Counter(labels)
    n = len(labels)
    return {
        "n": n,
        "per_class": {c: counts.get(i, 0) for i, c in enumerate(classnames)},
        "majority_rate": round(max(counts.values()) / n, 4) if n else 0.0,
        "chance_rate": round(1 / len(classnames), 4),
    }


def _fashion_zeroshot(root: Path, seed: int, per_class: int) -> dict[str, Any]:
    images_N28x28, labels_N = builtin_data.load_fashion_mnist("test")
    rng = random.Random(seed)
    idx = []
    for c in range(len(builtin_data.FASHION_MNIST_CLASSES)):
        members = [i for i, y in enumerate(labels_N.tolist()) if y == c]
        idx.extend(sorted(rng.sample(members, min(per_class, len(members)))))
    labels = [int(labels_N[i]) for i in idx]
    n = benchmark_sets.write_classification_set(
        root,
        (
            (Image.fromarray(images_N28x28[i]).convert("RGB"), y)
            for i, y in zip(idx, labels, strict=True)
        ),
        list(builtin_data.FASHION_MNIST_CLASSES),
        FASHION_TEMPLATES,
    )
    assert n == len(idx), (n, len(idx))
    return _class_balance(labels, list(builtin_data.FASHION_MNIST_CLASSES))


def _emoji_demo(
    out: Path, *, seed: int, heldout_fraction: float, limit: int | None, samples_per_shard: int
) -> tuple[dict[str, Path], Path, dict[str, Any]]:
    records = builtin_data.parse_emoji_test()
    if limit is not None and limit < len(records):
        # An even stride keeps every group's share (tests use this to stay fast).
        stride = len(records) / limit
        records = [records[int(i * stride)] for i in range(limit)]
    train_idx, heldout_idx = split_emoji(records, seed=seed, heldout_fraction=heldout_fraction)
    zs_idx = _zeroshot_subset(records, heldout_idx, seed=seed)
    rng = random.Random(seed)
    rng.shuffle(train_idx)
    images: dict[int, Image.Image] = {}

    def image(i: int) -> Image.Image:
        if i not in images:
            images[i] = builtin_data.render_emoji(records[i])
        return images[i]

    def train_samples() -> Iterator[Sample]:
        cap_rng = random.Random(seed + 2)
        for i in train_idx:
            r = records[i]
            caps = emoji_captions(r)
            yield Sample(
                key=r.codepoints.replace(" ", "_"),
                image=builtin_data.render_emoji(r),
                caption=cap_rng.choices(caps, weights=CAPTION_WEIGHTS)[0],
                meta={"name": r.name, "group": r.group, "subgroup": r.subgroup, "captions": caps},
            )

    report = write_samples(train_samples(), out / "train", samples_per_shard=samples_per_shard)
    retrieval_n = benchmark_sets.write_retrieval_set(
        out / "retrieval", ((image(i), [records[i].name]) for i in heldout_idx)
    )
    classnames = list(builtin_data.EMOJI_GROUPS)
    zs_labels = [classnames.index(records[i].group) for i in zs_idx]
    benchmark_sets.write_classification_set(
        out / "zeroshot" / "emoji_groups",
        ((image(i), y) for i, y in zip(zs_idx, zs_labels, strict=True)),
        classnames,
        EMOJI_ZEROSHOT_TEMPLATES,
    )
    stats = {
        "train": report.written,
        "train_shards": len(report.shards),
        "heldout": len(heldout_idx),
        "retrieval": retrieval_n,
        "train_per_group": dict(Counter(records[i].group for i in train_idx)),
        "heldout_per_group": dict(Counter(records[i].group for i in heldout_idx)),
        "zeroshot": {"emoji_groups": _class_balance(zs_labels, classnames)},
        "heldout_keys": [records[i].codepoints for i in heldout_idx],
    }
    return {"emoji_groups": out / "zeroshot" / "emoji_groups"}, out / "train", stats


def _shapes_demo(
    out: Path, *, seed: int, heldout_fraction: float, limit: int | None, samples_per_shard: int
) -> tuple[dict[str, Path], Path, dict[str, Any]]:
    n = SHAPES_TOTAL if limit is None else limit
    scenes = builtin_data.generate_shapes(n, seed=seed)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(heldout_fraction * n))
    heldout_idx, train_idx = sorted(order[:n_held]), order[n_held:]
    report = write_samples(
        (
            Sample(
                key=f"shapes_{i:06d}",
                image=scenes[i].image,
                caption=scenes[i].caption,
                meta={"shape": scenes[i].shape, **scenes[i].attributes},
            )
            for i in train_idx
        ),
        out / "train",
        samples_per_shard=samples_per_shard,
    )
    # Attribute combinations repeat ("a small red circle on a white background"); a caption
    # shared by several held-out images has no single right answer, so retrieval keeps
    # only the scenes whose caption is unique among the held-out ones (mostly pairs).
    caption_counts = Counter(scenes[i].caption for i in heldout_idx)
    unique = [i for i in heldout_idx if caption_counts[scenes[i].caption] == 1]
    retrieval_n = benchmark_sets.write_retrieval_set(
        out / "retrieval", ((scenes[i].image, [scenes[i].caption]) for i in unique)
    )
    # One-object scenes only: in a two-object scene "the" shape or colour is ambiguous.
    single = [i for i in heldout_idx if len(scenes[i].attributes["objects"]) == 1]
    roots, balance = {}, {}
    for name, classnames, attr, templates in (
        ("shapes", list(builtin_data.SHAPES), "shape", SHAPES_TEMPLATES),
        ("colors", list(builtin_data.COLORS), "color", COLORS_TEMPLATES),
    ):
        labels = [classnames.index(scenes[i].attributes["objects"][0][attr]) for i in single]
        roots[name] = out / "zeroshot" / name
        benchmark_sets.write_classification_set(
            roots[name],
            ((scenes[i].image, y) for i, y in zip(single, labels, strict=True)),
            classnames,
            templates,
        )
        balance[name] = _class_balance(labels, classnames)
    stats = {
        "train": report.written,
        "train_shards": len(report.shards),
        "heldout": len(heldout_idx),
        "retrieval": retrieval_n,
        "zeroshot": balance,
    }
    return roots, out / "train", stats


def prepare_demo_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    limit: int | None = None,
    samples_per_shard: int = 256,
    fashion_mnist_per_class: int = FASHION_PER_CLASS,
) -> DemoData:
    """Write the demo's training shards and evaluation sets (see the module docstring).

    Uses emoji when the font and names are installed, generated shape scenes otherwise;
    adds a Fashion-MNIST zero-shot set when that package is installed. Re-running on the
    same ``out_dir`` replaces what an earlier run wrote.

    Args:
        out_dir: Output folder (new, empty, or from an earlier ``prepare_demo_data``).
        seed: Seeds the held-out split, caption choice and shuffling.
        heldout_fraction: Target share of each group kept out of training.
        limit: Use only this many source pairs (spread over all groups); for tests.
        samples_per_shard: Training samples per shard (256 gives 13 emoji shards, enough
            to split over a few ranks x workers).
        fashion_mnist_per_class: Fashion-MNIST test images per class (0 to skip).

    Returns:
        Paths of what was written, notes and statistics.

    Raises:
        ValueError: If ``heldout_fraction`` is not in (0, 0.5], or ``out_dir`` holds
            files this function did not write.
    """
    if not 0 < heldout_fraction <= 0.5:
        raise ValueError(
            f"heldout_fraction must be in (0, 0.5], got {heldout_fraction}; 0.1 is typical."
        )
    out = Path(out_dir)
    _prepare_out_dir(out)
    notes: list[str] = []
    kwargs = dict(
        seed=seed,
        heldout_fraction=heldout_fraction,
        limit=limit,
        samples_per_shard=samples_per_shard,
    )
    if builtin_data.emoji_available():
        source = "emoji"
        if not features.check("raqm"):
            notes.append(
                "Pillow lacks raqm text layout: multi-code-point emoji (skin tones, "
                "families, flags) are drawn as several small glyphs; install libraqm "
                "(Debian: libraqm0) for the real single-glyph images."
            )
        zeroshot_roots, train_dir, stats = _emoji_demo(out, **kwargs)
    else:
        source = "synthetic"
        notes.append(
            "Emoji font or names not found ("
            f"{builtin_data.EMOJI_FONT_PATH}, {builtin_data.EMOJI_TEST_PATH}); using generated "
            "shape scenes instead. For the real emoji image-text pairs run: "
            f"{builtin_data.EMOJI_INSTALL_HINT}"
        )
        zeroshot_roots, train_dir, stats = _shapes_demo(out, **kwargs)
    if fashion_mnist_per_class > 0:
        if builtin_data.fashion_mnist_available():
            root = out / "zeroshot" / "fashion_mnist"
            stats["zeroshot"]["fashion_mnist"] = _fashion_zeroshot(
                root, seed, fashion_mnist_per_class
            )
            zeroshot_roots["fashion_mnist"] = root
        else:
            notes.append(
                "Fashion-MNIST not found; skipping its zero-shot set. To add it run: "
                f"{builtin_data.FASHION_MNIST_INSTALL_HINT}"
            )
    data = DemoData(
        source=source,
        train_shards=train_dir,
        retrieval_root=out / "retrieval",
        zeroshot_roots=zeroshot_roots,
        notes=notes,
        stats=stats,
    )
    (out / MARKER).write_text(
        json.dumps(asdict(data), indent=2, default=str, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    for note in notes:  # the caller shows notes to the user; here they go to the log only
        logger.info("%s", note)
    logger.info(
        "demo data (%s) in %s: %d train, %d held out",
        source,
        out,
        stats["train"],
        stats["heldout"],
    )
    return data
