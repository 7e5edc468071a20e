"""The model's preprocessing as plain numbers: data/ builds open_clip's eval transform from
them bit for bit, and rejects numbers that cannot be right."""

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from clipline.data.decode import ImageNormalizer
from clipline.data.preprocess import PreprocessConfig, eval_pixels
from clipline.pretrain.model import open_clip_preprocess_config


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb.convert(mode)


OPEN_CLIP_CFGS = [
    {"size": 32},
    {"size": 32, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    {"size": (24, 40)},  # non-square "shortest": open_clip's ResizeKeepRatio, always bicubic
    {"size": (24, 40), "interpolation": "bilinear"},
    {"size": 32, "resize_mode": "longest", "fill_color": 128},
    {"size": (40, 24), "resize_mode": "longest"},
    {"size": (24, 40), "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": 32, "interpolation": "random"},
]


@pytest.mark.parametrize("oc_cfg", OPEN_CLIP_CFGS, ids=str)
def test_eval_pixels_equal_open_clips_eval_transform(oc_cfg):
    transform = image_transform_v2(PreprocessCfg(**oc_cfg), is_train=False)
    numbers = open_clip_preprocess_config(oc_cfg)
    normalize = ImageNormalizer(numbers.mean, numbers.std)
    for i, (w, h, mode) in enumerate(
        [(57, 33, "RGB"), (32, 90, "RGB"), (64, 48, "L"), (33, 33, "RGBA"), (20, 12, "P")]
    ):
        image = _image(w, h, mode, seed=i)
        pixels = eval_pixels(numbers, image)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, *numbers.size)
        assert torch.equal(normalize(pixels[None])[0], transform(image)), (w, h, mode)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": (0, 32)}, r"preprocess.size must be \(height, width\).*\(0, 32\)"),
        ({"mean": (0.5, 0.5)}, r"preprocess.mean must be 3 finite numbers.*\(0.5, 0.5\)"),
        ({"std": (0.5, 0.0, 0.5)}, r"preprocess.std must be > 0.*0.0"),
        ({"interpolation": "nearest"}, r"preprocess.interpolation must be one of.*'nearest'"),
        ({"resize_mode": "crop"}, r"preprocess.resize_mode must be one of.*'crop'"),
        ({"fill_color": 300}, r"preprocess.fill_color must be in 0..255, got 300"),
        ({"train_scale": (1.0, 0.5)}, r"preprocess.train_scale must be a range.*\(1.0, 0.5\)"),
        ({"train_ratio": (0, 1)}, r"preprocess.train_ratio must be a range.*\(0, 1\)"),
    ],
)
def test_bad_numbers_are_refused_with_the_value(change, message):
    PreprocessConfig()
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**change)


def test_lists_from_json_compare_equal_to_tuples():
    a = PreprocessConfig(size=[24, 40], mean=[0.5, 0.5, 0.5], train_scale=[0.5, 1.0])
    b = PreprocessConfig(size=(24, 40), mean=(0.5, 0.5, 0.5), train_scale=(0.5, 1.0))
    assert a == b and repr(a) == repr(b)


def test_bad_model_preprocess_overrides_are_refused_when_the_numbers_are_built():
    with pytest.raises(ValueError, match=r"model.preprocess.interpolation .* got 'nearest'"):
        open_clip_preprocess_config({"size": 32, "interpolation": "nearest"})
    with pytest.raises(ValueError, match=r"^model.preprocess.resize_mode must be one of.*'crop'"):
        open_clip_preprocess_config({"size": 32, "resize_mode": "crop"})


def test_pretrain_with_a_preprocess_open_clip_cannot_run_stops_with_one_line(
    tmp_path, monkeypatch, capsys
):
    from clipline.launch.cli import main
    from tests.helpers import make_shards

    shards = make_shards(tmp_path / "shards", n=8, per_shard=8)
    monkeypatch.chdir(tmp_path)  # relative paths, as typed
    rc = main(
        [
            "pretrain", "--recipe", "cpu-debug", f"data.shards={shards.name}", "run_dir=run",
            "data.batch_size=4", "data.workers=0", 'model.preprocess={resize_mode="crop"}',
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "model.preprocess.resize_mode must be one of" in err and "'crop'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
