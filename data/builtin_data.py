"""Real image-text data that works offline, plus a generated fallback.

* **Emoji** with their Unicode CLDR names (3,655 pairs, 9 groups, 99 subgroups), rendered
  from Noto Color Emoji (Debian: ``apt-get install fonts-noto-color-emoji unicode-data``).
* **Fashion-MNIST** (70,000 28x28 grey images, 10 named classes), from the Debian package
  ``dataset-fashion-mnist``.
* **Shapes**: generated compositional scenes ("a small red circle above a blue square")
  for machines without the emoji font. Every word of a caption is true of its image, and
  the shape of the first-named object is a categorical label usable as zero-shot classes.

Each source has an ``*_available()`` check so callers can degrade instead of crash.
"""

from __future__ import annotations

import gzip
import logging
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- emoji

EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_INSTALL_HINT = "apt-get install fonts-noto-color-emoji unicode-data"
# Noto Color Emoji is a CBDT bitmap font with one strike: any other size raises
# "invalid pixel size".
EMOJI_FONT_SIZE = 109
# The strike's glyphs are 136x128, so a canvas of that size holds one glyph exactly.
EMOJI_CANVAS = (136, 128)
EMOJI_GROUPS = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)


@dataclass(frozen=True)
class EmojiRecord:
    """One fully-qualified emoji from ``emoji-test.txt``.

    Attributes:
        codepoints: Space-separated hex code points, e.g. ``"1F469 1F3FD 200D 1F4BB"``.
        name: CLDR short name, e.g. ``"woman technologist: medium skin tone"``.
        group: One of :data:`EMOJI_GROUPS`.
        subgroup: E.g. ``"person-role"``.
    """

    codepoints: str
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(chr(int(cp, 16)) for cp in self.codepoints.split())


def emoji_available(
    font_path: str | Path = EMOJI_FONT_PATH, test_path: str | Path = EMOJI_TEST_PATH
) -> bool:
    """Whether the emoji names and font are installed and Pillow can draw with FreeType.

    Args:
        font_path: Noto Color Emoji font file.
        test_path: Unicode's ``emoji-test.txt``.

    Returns:
        True when :func:`parse_emoji_test` and :func:`render_emoji` will work.
    """
    return Path(font_path).is_file() and Path(test_path).is_file() and features.check("freetype2")


def parse_emoji_test(path: str | Path = EMOJI_TEST_PATH) -> list[EmojiRecord]:
    """Parse the fully-qualified emoji of Unicode's ``emoji-test.txt``, in CLDR order.

    Args:
        path: The file (``/usr/share/unicode/emoji/emoji-test.txt`` on Debian).

    Returns:
        One record per ``; fully-qualified`` line (3,655 in Emoji 15.0).

    Raises:
        ValueError: If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"emoji list {str(path)!r} not found; install it: {EMOJI_INSTALL_HINT}")
    records, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and not line.startswith("#"):
            # "1F600  ; fully-qualified  # 😀 E1.0 grinning face": the name follows the
            # emoji itself and its version tag.
            codepoints, rest = line.split(";", 1)
            comment = rest.split("#", 1)[1].strip()
            name = comment.split(" ", 2)[2].strip()
            records.append(EmojiRecord(" ".join(codepoints.split()), name, group, subgroup))
    return records


@cache
def _emoji_font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, EMOJI_FONT_SIZE)


@cache
def _warn_no_raqm() -> None:
    logger.warning(
        "Pillow has no raqm layout: emoji sequences (skin tones, ZWJ, flags) render as "
        "several glyphs squeezed into one image; install libraqm for single glyphs."
    )


def render_emoji(
    emoji: EmojiRecord | str, *, font_path: str | Path = EMOJI_FONT_PATH
) -> Image.Image:
    """Render one emoji as an RGB image (136x128) on white.

    Args:
        emoji: A record or the emoji string itself.
        font_path: Noto Color Emoji font file.

    Returns:
        A 136x128 RGB image.
    """
    text = emoji.text if isinstance(emoji, EmojiRecord) else emoji
    font = _emoji_font(str(font_path))
    left, top, right, bottom = font.getbbox(text)
    w, h = max(right - left, 1), max(bottom - top, 1)
    # Without raqm a sequence is not shaped into one ligature glyph and comes out wider
    # than one strike; draw it at full size and shrink it to the canvas instead of clipping.
    canvas_size = (max(w, EMOJI_CANVAS[0]), max(h, EMOJI_CANVAS[1]))
    if canvas_size != EMOJI_CANVAS:
        _warn_no_raqm()
    rgba = Image.new("RGBA", canvas_size, (255, 255, 255, 0))
    xy = ((canvas_size[0] - w) // 2 - left, (canvas_size[1] - h) // 2 - top)
    ImageDraw.Draw(rgba).text(xy, text, font=font, embedded_color=True)
    if canvas_size != EMOJI_CANVAS:
        rgba.thumbnail(EMOJI_CANVAS, Image.Resampling.LANCZOS)
        padded = Image.new("RGBA", EMOJI_CANVAS, (255, 255, 255, 0))
        padded.paste(
            rgba, ((EMOJI_CANVAS[0] - rgba.width) // 2, (EMOJI_CANVAS[1] - rgba.height) // 2)
        )
        rgba = padded
    rgb = Image.new("RGB", EMOJI_CANVAS, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    return rgb


# ----------------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL_HINT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FASHION_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DIR) -> bool:
    """Whether the four Fashion-MNIST files are installed.

    Args:
        root: Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
        True when :func:`load_fashion_mnist` will work for both splits.
    """
    root = Path(root)
    return all(
        (root / f"{p}-{kind}-ubyte.gz").is_file()
        for p in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )


def load_fashion_mnist(
    split: str = "test", root: str | Path = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Read one Fashion-MNIST split from the IDX files.

    Args:
        split: ``"train"`` (60,000) or ``"test"``/``"t10k"`` (10,000).
        root: Folder holding the ``*-ubyte.gz`` files.

    Returns:
        ``(images_N28x28 uint8, labels_N uint8)``; label ``i`` is
        ``FASHION_MNIST_CLASSES[i]``.

    Raises:
        ValueError: For an unknown split or missing files.
    """
    return load_idx_split(split, root, what="Fashion-MNIST", hint=FASHION_MNIST_INSTALL_HINT)


# ----------------------------------------------------------------------------- mnist

# No Debian package ships the full MNIST; users point ``root`` at their own copy of the four
# IDX files (torchvision's ``MNIST/raw`` folder has them, gzipped or not).
MNIST_INSTALL_HINT = (
    "point root at a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
    "(e.g. torchvision's MNIST/raw)"
)
MNIST_CLASSES = tuple(str(d) for d in range(10))  # clip_benchmark's mnist class names


def load_mnist(split: str = "test", root: str | Path = ".") -> tuple[np.ndarray, np.ndarray]:
    """Read one MNIST split from the standard IDX files.

    Args:
        split: ``"train"`` (60,000) or ``"test"``/``"t10k"`` (10,000).
        root: Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` or not).

    Returns:
        ``(images_NHxW uint8, labels_N uint8)``; label ``i`` is the digit ``i``.

    Raises:
        ValueError: For an unknown split, missing files or a malformed file.
    """
    return load_idx_split(split, root, what="MNIST", hint=MNIST_INSTALL_HINT)


def load_idx_split(
    split: str, root: str | Path, *, what: str = "IDX", hint: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(images, labels)`` of one split in MNIST's file naming (``.gz`` or raw).

    Args:
        split: ``"train"`` or ``"test"``/``"t10k"``.
        root: The folder of the IDX files.
        what: Data set name for error messages.
        hint: How to install or find the files, for error messages.

    Returns:
        ``(images_NHxW uint8, labels_N uint8)``.

    Raises:
        ValueError: For an unknown split, missing files, malformed files or a count mismatch.
    """
    if split not in _FASHION_PREFIX:
        raise ValueError(f"unknown {what} split {split!r}; use 'train' or 'test'.")
    prefix = f"{_FASHION_PREFIX[split]}-"
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [Path(root) / f"{prefix}{kind}-ubyte{ext}" for ext in (".gz", "")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(f"{what} file {str(candidates[0])!r} not found; {hint}")
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} holds {images.shape} and {paths[1]} holds {labels.shape}; expected "
            "[N, H, W] images and [N] labels"
        )
    return images, labels


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX array (MNIST's format), gzipped or not.

    Args:
        path: The file.

    Returns:
        A uint8 array of the shape the header declares.

    Raises:
        ValueError: If the header is not an unsigned-byte IDX header or the size is wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    # Header: two zero bytes, a type code (0x08: unsigned byte), the number of dimensions,
    # then one big-endian int32 per dimension.
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header declares shape {shape} but {len(raw) - offset} bytes follow it"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


# ----------------------------------------------------------------------------- shapes

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Few colours and backgrounds on purpose: with many, a tiny CLIP tells scenes apart by
# colour alone and learns shape last (measured: 7 colours x 3 backgrounds gave shape
# zero-shot ~22% after 300 steps, 4 x 2 gave ~30%, chance 17%).
COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "gray": (150, 150, 150),
}
SIZES = {"small": 0.2, "large": 0.36}  # half-extent as a fraction of the canvas side


@dataclass
class ShapeScene:
    """A generated image and its caption.

    Attributes:
        image: RGB image.
        caption: Full description; every attribute in it is true of the image.
        shape: Shape of the first-named object (the zero-shot label).
        attributes: Per-object attributes (shape, color, size, x, y) and the background.
    """

    image: Image.Image
    caption: str
    shape: str
    attributes: dict = field(default_factory=dict)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise AssertionError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, color, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=color)


def _relation(a: dict, b: dict) -> str:
    """Spatial relation of a to b along the axis where they are further apart."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _phrase(obj: dict) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def generate_shapes(
    n: int, *, seed: int = 0, image_size: int = 64, pair_fraction: float = 0.4
) -> list[ShapeScene]:
    """Generate ``n`` compositional scenes of coloured shapes with honest captions.

    One-object scenes read "a large red circle on a gray background"; two-object scenes
    "a small red circle above a large blue square" (the two objects never overlap and the
    relation is taken along the axis where they are further apart, so it is unambiguous).
    Shapes are big relative to the canvas so that a tiny ViT at 64 px can learn them in a
    few CPU minutes. Drawn at 4x and downsampled for anti-aliased edges.

    Args:
        n: Number of scenes.
        seed: Same seed, same scenes (pixels and captions).
        image_size: Output side in pixels.
        pair_fraction: Share of two-object scenes.

    Returns:
        The scenes.
    """
    rng = random.Random(seed)
    big = image_size * 4
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    scenes = []
    for _ in range(n):
        bg = rng.choice(backgrounds)
        n_obj = 2 if rng.random() < pair_fraction else 1
        objs: list[dict] = []
        while len(objs) < n_obj:
            size = rng.choice(list(SIZES))
            r = SIZES[size] * big if n_obj == 1 else SIZES[size] * big * 0.7
            obj = {
                "shape": rng.choice(SHAPES),
                "color": rng.choice(colors),
                "size": size,
                "x": rng.uniform(r, big - r),
                "y": rng.uniform(r, big - r),
                "r": r,
            }
            # Overlapping objects would hide each other's shape, and two identical objects
            # would make "a red circle above a red circle" ambiguous about which is which.
            if objs:
                o = objs[0]
                if np.hypot(obj["x"] - o["x"], obj["y"] - o["y"]) < (obj["r"] + o["r"]) * 1.05:
                    continue
                if (obj["shape"], obj["color"]) == (o["shape"], o["color"]):
                    continue
            objs.append(obj)
        im = Image.new("RGB", (big, big), BACKGROUNDS[bg])
        draw = ImageDraw.Draw(im)
        for o in objs:
            _draw(draw, o["shape"], COLORS[o["color"]], o["x"], o["y"], o["r"])
        im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        if n_obj == 1:
            caption = f"a {_phrase(objs[0])} on a {bg} background"
        else:
            caption = f"a {_phrase(objs[0])} {_relation(objs[0], objs[1])} a {_phrase(objs[1])}"
        attributes = {
            "background": bg,
            "objects": [
                {k: (round(v / big, 3) if k in ("x", "y", "r") else v) for k, v in o.items()}
                for o in objs
            ],
        }
        scenes.append(
            ShapeScene(image=im, caption=caption, shape=objs[0]["shape"], attributes=attributes)
        )
    return scenes
