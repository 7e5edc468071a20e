"""Per-sample decoding: every bad sample skipped and counted, every odd image converted and
counted, open_clip's augmentation reproduced exactly, truncated shards survived."""

import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageFile, JpegImagePlugin

from clipline.data.decode import (
    CONVERSIONS,
    SKIP_REASONS,
    DecodeConfig,
    Decoder,
    to_rgb,
)
from clipline.data.shard_io import shard_samples
from clipline.data.stream import StreamConfig
from clipline.pretrain.model import open_clip_preprocess_config
from tests.helpers import micro_loader, micro_model

# open_clip's training transforms, to compare with; the decoder gets only their numbers.
TRAIN_224 = image_transform_v2(PreprocessCfg(size=224), is_train=True)
TRAIN_32 = image_transform_v2(PreprocessCfg(size=32), is_train=True)
NUMBERS_224 = open_clip_preprocess_config({"size": 224})
NUMBERS_32 = open_clip_preprocess_config({"size": 32})


# --------------------------------------------------------------------------- real files


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise: JPEG-like content, any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], -1)
    arr = arr + rng.normal(0, 12, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def half_transparent(mode: str) -> Image.Image:
    """Left half opaque red (or grey 200), right half fully transparent with black stored."""
    if mode == "LA":
        la = np.zeros((32, 32, 2), np.uint8)
        la[:, :16] = (200, 255)
        return Image.fromarray(la, "LA")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)
    return Image.fromarray(rgba, "RGBA")


def palette_with_transparency() -> Image.Image:
    idx = np.zeros((32, 32), np.uint8)
    idx[:, :16] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return img


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w x h`` RGB but whose pixel data are garbage: any
    attempt to decode it fails, so a size verdict proves the header was read first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")
    )


GOOD_JPEG = _encode(photo(), "JPEG", quality=90)

# key -> (sample members, expected skip reason or conversion kind or None)
BAD = {
    "garbage_jpeg": ({"jpg": b"\xff\xd8 not a jpeg", "txt": b"x"}, "corrupt_image"),
    "cut_jpeg": ({"jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2], "txt": b"x"}, "corrupt_image"),
    "no_image": ({"txt": b"a caption"}, "missing_image"),
    "no_caption": ({"jpg": GOOD_JPEG}, "missing_caption"),
    "blank_caption": ({"jpg": GOOD_JPEG, "txt": b" \n\t"}, "missing_caption"),
    "latin1_caption": ({"jpg": GOOD_JPEG, "txt": "café".encode("latin-1")}, "caption_not_utf8"),
    "tiny": ({"png": _encode(photo(8, 8), "PNG"), "txt": b"x"}, "image_too_small"),
    "banner": ({"png": _encode(photo(400, 10), "PNG"), "txt": b"x"}, "image_too_small"),
    # 144 MP: above DecodeConfig's default (PIL's MAX_IMAGE_PIXELS), below PIL's refusal.
    "big_header": ({"png": png_header_only(12000, 12000), "txt": b"x"}, "image_too_large"),
    # 400 MP: PIL itself refuses to open it (DecompressionBombError).
    "bomb_header": ({"png": png_header_only(20000, 20000), "txt": b"x"}, "image_too_large"),
}
CONVERTED = {
    "cmyk_jpeg": ({"jpg": _encode(photo().convert("CMYK"), "JPEG"), "txt": b"x"}, "cmyk"),
    "grey_jpeg": ({"jpg": _encode(photo().convert("L"), "JPEG"), "txt": b"x"}, "grey"),
    "bilevel_png": ({"png": _encode(photo().convert("1"), "PNG"), "txt": b"x"}, "grey"),
    "palette_png": ({"png": _encode(photo().quantize(16), "PNG"), "txt": b"x"}, "palette"),
    "palette_gif_alpha": (
        {"png": _encode(palette_with_transparency(), "GIF", transparency=0), "txt": b"x"},
        "alpha",
    ),
    "rgba_png": ({"png": _encode(half_transparent("RGBA"), "PNG"), "txt": b"x"}, "alpha"),
    "la_png": ({"png": _encode(half_transparent("LA"), "PNG"), "txt": b"x"}, "alpha"),
    "grey16_png": (
        {
            "png": _encode(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
            "txt": b"x",
        },
        "16bit",
    ),
}


def _decode(members: dict, cfg: DecodeConfig | None = None, preprocess=NUMBERS_32, seed: int = 0):
    decoder = Decoder(cfg or DecodeConfig(), preprocess)
    skipped, converted = Counter(), Counter()
    out = decoder({"__key__": "k", **members}, seed=seed, skipped=skipped, converted=converted)
    return out, skipped, converted, decoder


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_bad_sample_is_skipped_and_counted_by_reason(key):
    members, reason = BAD[key]
    assert reason in SKIP_REASONS
    out, skipped, converted, _ = _decode(members)
    assert out is None
    assert skipped == Counter({reason: 1}) and not converted


@pytest.mark.parametrize("key", sorted(CONVERTED))
def test_each_odd_image_mode_is_converted_to_rgb_and_counted(key):
    members, kind = CONVERTED[key]
    assert kind in CONVERSIONS
    out, skipped, converted, _ = _decode(members)
    assert out is not None and not skipped
    assert converted == Counter({kind: 1})
    _, image, caption = out
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and caption == "x"


def test_a_decompression_bomb_is_never_decoded(monkeypatch):
    # The header verdict comes before any pixel work: decoding the garbage would raise.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    for key in ("big_header", "bomb_header"):
        assert _decode(BAD[key][0])[1] == Counter({"image_too_large": 1})


def test_limits_are_configurable():
    members = {"jpg": GOOD_JPEG, "txt": b"x"}  # 64 x 48
    assert _decode(members, DecodeConfig(min_image_size=49))[1] == {"image_too_small": 1}
    assert _decode(members, DecodeConfig(min_image_size=48))[0] is not None
    assert _decode(members, DecodeConfig(max_pixels=64 * 48 - 1))[1] == {"image_too_large": 1}
    with pytest.raises(ValueError, match="max_pixels"):
        Decoder(DecodeConfig(max_pixels=10**12), NUMBERS_32)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_flattened_on_white_or_dropped_like_open_clip(mode):
    img = palette_with_transparency() if mode == "P" else half_transparent(mode)
    if mode == "P":
        img = Image.open(io.BytesIO(_encode(img, "GIF", transparency=0)))
    rgb, kind = to_rgb(img, alpha="white")
    assert kind == "alpha" and rgb.mode == "RGB"
    # GIF keeps the red opaque half; the transparent half becomes the background.
    opaque = (200, 200, 200) if mode == "LA" else (255, 0, 0)
    assert tuple(_pixels(rgb)[5, 5]) == opaque
    assert tuple(_pixels(rgb)[5, 25]) == (255, 255, 255)
    assert tuple(_pixels(to_rgb(img, alpha="black")[0])[5, 25]) == (0, 0, 0)
    dropped, _ = to_rgb(img, alpha="drop")
    assert np.array_equal(_pixels(dropped), _pixels(img.convert("RGB")))  # open_clip's way


def test_16bit_images_are_scaled_not_clipped():
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    img = Image.open(io.BytesIO(_encode(Image.fromarray(values), "PNG")))
    assert img.mode.startswith("I;16")
    rgb, kind = to_rgb(img)
    assert kind == "16bit"
    expected = np.rint(values / 257.0).astype(np.int16)
    assert np.array_equal(_pixels(rgb)[..., 0], expected)
    assert np.array_equal(_pixels(rgb)[..., 0], _pixels(rgb)[..., 2])
    # What open_clip's convert("RGB") does: everything above 255 becomes white.
    assert (_pixels(img.convert("RGB"))[16:] == 255).all()
    as_int32, kind = to_rgb(img.convert("I"))
    assert kind == "16bit" and np.array_equal(_pixels(as_int32), _pixels(rgb))


@pytest.mark.parametrize("key", ["cmyk_jpeg", "grey_jpeg", "palette_png"])
def test_conversions_without_alpha_match_open_clip(key):
    members, _ = CONVERTED[key]
    ext = next(iter(k for k in members if k != "txt"))
    torch.manual_seed(3)
    expected = TRAIN_32(Image.open(io.BytesIO(members[ext])).convert("RGB"))
    out, _, _, decoder = _decode(members, seed=3)
    assert torch.equal(decoder.model_input(decoder.collate([out[1]])), expected[None])


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("uint8_images", [True, False])
@pytest.mark.parametrize("size", [(300, 260), (256, 256), (260, 400), (400, 100)])
def test_pixels_equal_open_clips_train_transform_given_the_same_seed(size, uint8_images):
    # (400, 100) is too wide for any crop of the allowed aspect ratios: the central-crop
    # fallback. Draft decoding off: this is the exact path.
    jpg = _encode(photo(*size, seed=sum(size)), "JPEG", quality=90)
    cfg = DecodeConfig(draft=False, uint8_images=uint8_images)
    decoder = Decoder(cfg, NUMBERS_224)
    images, expected = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        expected.append(TRAIN_224(Image.open(io.BytesIO(jpg)).convert("RGB")))
        out = decoder(
            {"__key__": "k", "jpg": jpg, "txt": b"x"},
            seed=seed,
            skipped=Counter(),
            converted=Counter(),
        )
        images.append(out[1])
    batch = decoder.collate(images)
    assert batch.dtype == (torch.uint8 if uint8_images else torch.float32)
    assert torch.equal(decoder.model_input(batch), torch.stack(expected))


def test_the_models_numbers_reproduce_its_own_train_transform():
    # launch hands the stream model.preprocess_config(), never the model's transform.
    model = micro_model()
    numbers = model.preprocess_config()
    assert numbers.size == (32, 32) and numbers.train_scale == (0.9, 1.0)
    assert numbers.train_ratio == (3 / 4, 4 / 3) and numbers.train_interpolation == "bicubic"
    transform = model.image_transform(is_train=True)
    jpg = _encode(photo(90, 70, seed=2), "JPEG", quality=90)
    decoder = Decoder(DecodeConfig(draft=False), numbers)
    for seed in range(3):
        out = decoder({"__key__": "k", "jpg": jpg, "txt": b"x"}, seed=seed, **_counters())
        torch.manual_seed(seed)
        expected = transform(Image.open(io.BytesIO(jpg)).convert("RGB"))
        assert torch.equal(decoder.model_input(decoder.collate([out[1]])), expected[None])


def _counters() -> dict[str, Counter]:
    return {"skipped": Counter(), "converted": Counter()}


def test_large_jpegs_are_draft_decoded_with_the_same_crop(monkeypatch):
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    jpg = _encode(photo(1024, 1024, seed=5), "JPEG", quality=90)
    exact = Decoder(DecodeConfig(draft=False), NUMBERS_224)
    drafted = Decoder(DecodeConfig(), NUMBERS_224)
    args = {"skipped": Counter(), "converted": Counter()}
    for seed in range(3):
        a = exact({"__key__": "k", "jpg": jpg, "txt": b"x"}, seed=seed, **args)[1]
        b = drafted({"__key__": "k", "jpg": jpg, "txt": b"x"}, seed=seed, **args)[1]
        # Crops of ~970 px with 2x oversampling: a 1/2-size decode (512 px).
        assert drafts[-1] == (512, 512)
        diff = (a.int() - b.int()).abs().float()
        assert diff.mean() < 1.5, diff.mean()  # pixel levels out of 255
    n = len(drafts)
    exact({"__key__": "k", "jpg": GOOD_JPEG, "txt": b"x"}, seed=0, **args)
    drafted({"__key__": "k", "jpg": GOOD_JPEG, "txt": b"x"}, seed=0, **args)
    assert len(drafts) == n  # a 64-px image is never reduced for a 224-px crop


# --------------------------------------------------------------------------- shards


def write_tar(path: Path, samples: list[tuple[str, dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def cut_tar(path: Path, offset: Callable[[list[tarfile.TarInfo]], int]) -> Path:
    """Truncates the shard at ``offset(members)`` bytes."""
    with tarfile.open(path) as tar:
        end = offset(tar.getmembers())
    path.write_bytes(path.read_bytes()[:end])
    return path


def _good(n: int, prefix: str = "g") -> list[tuple[str, dict]]:
    return [(f"{prefix}{i}", {"jpg": GOOD_JPEG, "txt": f"caption {i}".encode()}) for i in range(n)]


@pytest.mark.parametrize(
    "cut_at",
    [
        "member_data",  # inside the last sample's jpg
        "header",  # inside the last member's 512-byte header
        "boundary",  # after a complete member, before the end-of-archive blocks
    ],
)
def test_a_truncated_shard_is_counted_and_the_next_shard_is_read(tmp_path, cut_at):
    samples = _good(3, "a")  # members a0.jpg a0.txt a1.jpg a1.txt a2.jpg a2.txt
    where = {
        "member_data": lambda m: m[4].offset_data + 100,  # inside a2.jpg
        "header": lambda m: m[5].offset + 100,  # inside a2.txt's header
        "boundary": lambda m: m[5].offset,  # a2.jpg complete, nothing after it
    }
    cut = cut_tar(write_tar(tmp_path / "cut.tar", samples), where[cut_at])
    # The next shard reuses the keys: its samples must not merge into the cut one.
    nxt = write_tar(tmp_path / "next.tar", samples)
    counts = Counter()
    keys = [s["__key__"] for s in shard_samples([str(cut), str(nxt)], counts=counts)]
    assert keys == ["a0", "a1", "a0", "a1", "a2"]  # a2 of the cut shard is dropped
    assert counts == Counter({"truncated_tar": 1})


def test_unreadable_shards_are_counted_and_skipped(tmp_path):
    good = write_tar(tmp_path / "good.tar", _good(2))
    with tarfile.open(good) as tar:
        second_header = tar.getmembers()[1].offset
    garbled = bytearray(good.read_bytes())
    garbled[second_header : second_header + 512] = b"\x07" * 512
    (tmp_path / "garbled.tar").write_bytes(bytes(garbled))
    (tmp_path / "empty.tar").write_bytes(b"")
    urls = [str(tmp_path / n) for n in ("missing.tar", "garbled.tar", "empty.tar", "good.tar")]
    counts = Counter()
    keys = [s["__key__"] for s in shard_samples(urls, counts=counts)]
    assert keys == ["g0", "g1"]
    assert counts == Counter({"shard_read_error": 3})


def test_a_shard_mixing_every_case_yields_exactly_the_usable_samples_with_counts(tmp_path):
    # One shard through the real stream (exact mode, one batch = the whole epoch): plain
    # samples, every bad and every converted case, then a sample cut by truncation. The
    # batch holds every usable sample; the places of the dropped ones are filled with
    # repeats of usable ones, so the batch keeps its size (every rank, same batch count).
    mixed = [*_good(6), *[(k, v[0]) for k, v in (BAD | CONVERTED).items()]]
    shard = write_tar(tmp_path / "s" / "000000.tar", [*mixed, ("cut", mixed[0][1])])
    cut_tar(shard, lambda members: members[-1].offset_data)  # cut.txt's data is gone
    (tmp_path / "s" / "sizes.json").write_text(json.dumps({"000000.tar": len(mixed) + 1}))
    usable = [k for k, _ in _good(6)] + sorted(CONVERTED)
    cfg = StreamConfig(shards=str(shard), batch_size=len(mixed) + 1, workers=0, shuffle_buffer=1)
    loader = micro_loader(cfg)
    keys, skipped, converted = [], Counter(), Counter()
    for batch in loader.epoch(0):
        keys += batch["key"]
        skipped.update(batch["skipped"])
        converted.update(batch["converted"])
        assert batch["image"].dtype == torch.uint8
    assert len(keys) == len(mixed) + 1 and set(keys) == set(usable)
    expected_skips = Counter(reason for _, reason in BAD.values()) + Counter({"truncated_tar": 1})
    assert skipped == expected_skips
    # Each conversion is counted when its sample is decoded (again if it fills a place).
    assert set(converted) == {kind for _, kind in CONVERTED.values()}


def test_training_metrics_report_every_reason_and_kind(tmp_path):
    from clipline.launch.config import load_run_config
    from clipline.launch.run import run_pretrain
    from tests.helpers import micro_recipe

    plain = _good(14)
    bad = ("garbage", BAD["garbage_jpeg"][0])
    grey = ("grey", CONVERTED["grey_jpeg"][0])
    shard = write_tar(tmp_path / "s" / "000000.tar", [*plain[:2], bad, grey, *plain[2:]])
    (tmp_path / "s" / "sizes.json").write_text(json.dumps({"000000.tar": 16}))
    recipe = micro_recipe(shard, tmp_path / "run", steps=2, checkpoint_every=2)
    recipe["data"].update(shuffle_buffer=1, num_samples=16)  # read in order: 16 usable
    metrics = run_pretrain(load_run_config(recipe))
    assert {k: v for k, v in metrics.items() if k.startswith("data/")} == {
        **{f"data/skipped/{r}": int(r == "corrupt_image") for r in SKIP_REASONS},
        **{f"data/converted/{k}": int(k == "grey") for k in CONVERSIONS},
    }


def test_shards_with_nothing_usable_stop_with_the_counts_instead_of_cycling(tmp_path, monkeypatch):
    from clipline.data import decode

    monkeypatch.setattr(decode, "MAX_SKIPPED_IN_A_ROW", 50)
    tiny = {"png": _encode(photo(8, 8), "PNG"), "txt": b"x"}
    shard = write_tar(tmp_path / "s" / "000000.tar", [(f"t{i}", tiny) for i in range(100)])
    (tmp_path / "s" / "sizes.json").write_text(json.dumps({"000000.tar": 100}))
    cfg = StreamConfig(shards=str(shard), batch_size=2, workers=0, num_samples=100)
    loader = micro_loader(cfg)
    with pytest.raises(RuntimeError, match=r"last 50 samples .*'image_too_small': 50"):
        next(loader.epoch(0))


def test_a_sample_with_several_captions_trains_on_one_per_seed():
    from clipline.data.decode import DecodeConfig, Decoder

    model = micro_model()
    decoder = Decoder(DecodeConfig(), model.preprocess_config())
    sample = {
        "__key__": "k",
        "jpg": _encode(photo(64, 48), "JPEG"),
        "txt": b"a red car",
        "json": json.dumps({"captions": ["a red car", "a car parked", "red vehicle"]}).encode(),
    }
    picked = {decoder(sample, seed=s, skipped=Counter(), converted=Counter())[2] for s in range(9)}
    assert picked == {"a red car", "a car parked", "red vehicle"}
