"""Digits by other writers: a test set of handwriting MNIST never saw, built offline.

MNIST's digits come from a few hundred American writers of 1990s census forms and school
tests; a model can score 99% there and still stumble on how other people write. This set
measures that, from two sources no training run sees:

- handwriting fonts packaged by Debian (fonts-bwht, fonts-dkg-handwriting, fonts-breip,
  fonts-rufscript: each one person's hand), each glyph rendered with its own stroke width,
  slant, rotation, scale and an elastic distortion (Simard et al. 2003), as a pen wobbles;
- strokes drawn as the draw page draws them (a round pen 22 px wide on a 280 px pad), along
  skeletons of each digit jittered point by point.

Every digit then goes through the same MNIST-style preparation as an uploaded image
(style.py): fitted into 20x20, centred by mass in 28x28. The set is drawn from
a fixed seed and cached by a digest of the fonts and of this recipe, so every run measures
on the same digits.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mnistflow.config import DataConfig, MnistflowError
from mnistflow.data.style import mnist_style

# The fonts, by Debian package; a missing one is skipped, none at all skips the measure.
FONTS: dict[str, tuple[str, ...]] = {
    "fonts-bwht": (
        "/usr/share/fonts/opentype/bwht/BecauseWeBuild-Regular.otf",
        "/usr/share/fonts/opentype/bwht/BecauseWeConnect-Regular.otf",
        "/usr/share/fonts/opentype/bwht/BecauseWeCreate-Regular.otf",
        "/usr/share/fonts/opentype/bwht/BecauseWeLearn-Regular.otf",
        "/usr/share/fonts/opentype/bwht/BecauseWeMentor-Regular.otf",
        "/usr/share/fonts/opentype/bwht/BecauseWeOrganize-Regular.otf",
    ),
    "fonts-dkg-handwriting": (
        "/usr/share/fonts/truetype/fifthhorseman/dkg.ttf",
        "/usr/share/fonts/truetype/fifthhorseman/dkgBd.ttf",
        "/usr/share/fonts/truetype/fifthhorseman/dkgIt.ttf",
        "/usr/share/fonts/truetype/fifthhorseman/dkgBI.ttf",
    ),
    # breipfont.ttf draws the same glyphs as Breip.ttf; femkeklaver's are outlines, not ink.
    "fonts-breip": ("/usr/share/fonts/truetype/breip/Breip.ttf",),
    "fonts-rufscript": ("/usr/share/fonts/truetype/rufscript/Rufscript010.ttf",),
}
PER_FONT_DIGIT = 25  # distorted renderings of each digit in each font
PER_STROKE_DIGIT = 100  # page-style drawings of each digit
SEED = 20261206
# Bump when the recipe changes, so cached sets of the old recipe are not reused.
RECIPE = "writers-1"

PAD = 280  # the draw page's canvas, and its pen
PEN = 22


def font_paths() -> list[Path]:
    return [Path(p) for paths in FONTS.values() for p in paths if Path(p).is_file()]


def load(config: DataConfig) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The set as (N, 1, 28, 28) uint8 images, (N,) int64 labels and a digest naming it
    (fonts and recipe), built on first use and cached in config.data_dir; None when no
    handwriting font is installed."""
    fonts = font_paths()
    if not fonts:
        return None
    digest = hashlib.sha256(RECIPE.encode())
    for font in fonts:
        digest.update(font.name.encode() + font.read_bytes())
    name = digest.hexdigest()[:16]
    cached = config.data_dir / f"writers-{name}.npz"
    if cached.is_file():
        with np.load(cached) as saved:
            return saved["images"], saved["labels"], name
    # The folder is made before the set is rendered: one that cannot be made fails at once,
    # not after 12 s of rendering.
    with _caching_in(config.data_dir):
        config.data_dir.mkdir(parents=True, exist_ok=True)
    images, labels = build(fonts)
    with _caching_in(config.data_dir):
        # Written under another name, then renamed: a reader never sees half a file.
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        with partial.open("wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
        partial.replace(cached)
    return images, labels, name


@contextlib.contextmanager
def _caching_in(folder: Path) -> Iterator[None]:
    """An OSError in the block, said as the one sentence of a cache folder we cannot write."""
    try:
        yield
    except OSError as e:
        raise MnistflowError(
            f"Cannot cache the other-writers set in {folder} ({e.strerror}); "
            "set MNISTFLOW_DATA_DIR to a writable folder."
        ) from e


def build(
    fonts: list[Path],
    per_font_digit: int = PER_FONT_DIGIT,
    per_stroke_digit: int = PER_STROKE_DIGIT,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the set (about 12 s of CPU whole); same fonts, same digits."""
    rng = np.random.default_rng(SEED)
    digits, labels = [], []
    for font in fonts:
        for digit in range(10):
            for _ in range(per_font_digit):
                digits.append(font_digit(font, digit, rng))
                labels.append(digit)
    for digit in range(10):
        for _ in range(per_stroke_digit):
            digits.append(page_digit(digit, rng))
            labels.append(digit)
    images = np.rint(np.stack(digits)).clip(0, 255).astype(np.uint8)[:, None]
    return images, np.asarray(labels, dtype=np.int64)


def font_digit(font: Path, digit: int, rng: np.random.Generator) -> np.ndarray:
    """One glyph in its font, inked with a random stroke width, slanted, turned and
    wobbled, then prepared as an upload is: (28, 28) float32 0-255."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("L", (96, 96), 0)
    face = ImageFont.truetype(str(font), int(rng.integers(48, 60)))
    ImageDraw.Draw(canvas).text(
        (48, 48), str(digit), font=face, fill=255, anchor="mm", stroke_width=int(rng.integers(0, 3))
    )
    grey = np.asarray(canvas, dtype=np.float32)
    grey = affine(grey, rng, degrees=12, shear=0.25, scale=0.1)
    return mnist_style(elastic(grey, rng, alpha=3.0, sigma=8.0))


def page_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One digit drawn as on the page: jittered skeleton strokes with a round pen."""
    from PIL import Image, ImageDraw

    pad = Image.new("L", (PAD, PAD), 0)
    draw = ImageDraw.Draw(pad)
    pen = int(PEN * rng.uniform(0.7, 1.3))
    turn = math.radians(rng.uniform(-12, 12))
    slant, scale = rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.1)
    for stroke in SKELETONS[digit]:
        points = []
        for x, y in stroke:
            # Each point moved a little, then the whole digit turned, slanted and scaled
            # about the pad's centre.
            x, y = x + rng.normal(0, 0.02) - 0.5, y + rng.normal(0, 0.02) - 0.5
            x += slant * y
            x, y = x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)
            points.append(((0.5 + scale * x) * PAD, (0.5 + scale * y) * PAD))
        draw.line(points, fill=255, width=pen, joint="curve")
        for px, py in (points[0], points[-1]):  # the canvas's round caps
            draw.ellipse((px - pen / 2, py - pen / 2, px + pen / 2, py + pen / 2), fill=255)
    return mnist_style(np.asarray(pad, dtype=np.float32))


def affine(
    grey: np.ndarray, rng: np.random.Generator, degrees: float, shear: float, scale: float
) -> np.ndarray:
    """A random rotation, horizontal shear and scaling about the image's centre."""
    from scipy.ndimage import affine_transform

    turn = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    k = rng.uniform(-shear, shear)
    # affine_transform maps output coordinates (row, col) to input ones: the inverse map.
    forward = (
        s
        * np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
        @ np.array([[1.0, 0.0], [k, 1.0]])
    )
    inverse = np.linalg.inv(forward)
    centre = (np.array(grey.shape) - 1) / 2
    return np.asarray(
        affine_transform(grey, inverse, offset=centre - inverse @ centre, order=1), np.float32
    )


def elastic(grey: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Simard's elastic distortion: each pixel displaced along a smoothed random field;
    alpha is the largest displacement in pixels, sigma the field's smoothness."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    fields = []
    for _ in range(2):
        field = gaussian_filter(rng.uniform(-1, 1, grey.shape), sigma)
        fields.append(field * alpha / max(float(np.abs(field).max()), 1e-6))
    rows, cols = np.indices(grey.shape)
    moved = map_coordinates(grey, [rows + fields[0], cols + fields[1]], order=1)
    return np.asarray(moved, np.float32)


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, start: float = 0.0
) -> list[tuple[float, float]]:
    steps = 24
    return [
        (cx + rx * math.cos(start + 2 * math.pi * i / steps),
         cy + ry * math.sin(start + 2 * math.pi * i / steps))
        for i in range(steps + 1)
    ]  # fmt: skip


def _skeletons() -> Iterator[tuple[int, list[list[tuple[float, float]]]]]:
    """Each digit as pen strokes in the unit square (x right, y down), as people draw them."""
    yield 0, [_ellipse(0.5, 0.5, 0.24, 0.34, -math.pi / 2)]
    yield 1, [[(0.42, 0.25), (0.55, 0.15), (0.55, 0.85)]]
    yield 2, [[(0.28, 0.3), (0.38, 0.18), (0.58, 0.16), (0.7, 0.3), (0.62, 0.47),
               (0.3, 0.82), (0.76, 0.82)]]  # fmt: skip
    yield 3, [[(0.3, 0.22), (0.5, 0.15), (0.68, 0.26), (0.62, 0.42), (0.46, 0.48),
               (0.66, 0.58), (0.7, 0.74), (0.52, 0.85), (0.3, 0.8)]]  # fmt: skip
    yield 4, [[(0.58, 0.15), (0.26, 0.6), (0.78, 0.6)], [(0.6, 0.3), (0.6, 0.86)]]
    yield 5, [[(0.7, 0.17), (0.36, 0.17), (0.32, 0.46), (0.56, 0.42), (0.71, 0.55),
               (0.69, 0.75), (0.5, 0.85), (0.3, 0.8)]]  # fmt: skip
    yield 6, [[(0.64, 0.15), (0.44, 0.3), (0.32, 0.55), (0.36, 0.78), (0.52, 0.86),
               (0.68, 0.75), (0.66, 0.58), (0.5, 0.52), (0.34, 0.6)]]  # fmt: skip
    yield 7, [[(0.25, 0.18), (0.76, 0.18), (0.46, 0.86)]]
    yield 8, [_ellipse(0.5, 0.31, 0.15, 0.15, math.pi / 2), _ellipse(0.5, 0.66, 0.19, 0.19)]
    yield 9, [_ellipse(0.48, 0.33, 0.17, 0.16, 0.0), [(0.65, 0.33), (0.62, 0.86)]]


SKELETONS = dict(_skeletons())
