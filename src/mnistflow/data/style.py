"""How MNIST made a digit: fitted into a 20x20 box (keeping its aspect ratio) and centred by
its centre of mass in a 28x28 field, white ink on black.

Uploaded pictures (inference/preprocess.py) and the other-writers set (writers.py) go through
these same steps, so the model sees digits prepared as it was trained on them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class ImageError(ValueError):
    """The bytes are not a usable image of a digit; the message says why in one sentence."""


def mnist_style(grey: np.ndarray) -> np.ndarray:
    """A grey picture of one digit (H, W) -> (28, 28) float32, white digit on black, 0-255."""
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise ImageError(f"expected a 2-D grey image, got shape {grey.shape}.")
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    # The border is background: a light border means dark ink on light paper, so invert.
    if np.median(border) > 127:
        grey = 255 - grey
        border = 255 - border
    background = float(np.median(border))
    ink = float(np.percentile(grey, 99.9))
    if ink - background < 32:
        raise ImageError("the image is blank: no digit stands out from the background.")
    # Stretch background..ink to 0..255 and drop the background's noise and texture.
    levels = np.clip((grey - background) / (ink - background), 0, 1) * 255
    levels[levels < 0.15 * 255] = 0

    rows, cols = np.flatnonzero(levels.any(1)), np.flatnonzero(levels.any(0))
    digit = levels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = digit.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    boxed = np.asarray(
        Image.fromarray(digit.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS),
        dtype=np.float32,
    ).clip(0, 255)

    # Place the digit so its centre of mass lands on pixel (14, 14), where MNIST put it.
    total = boxed.sum()
    ys, xs = np.indices(boxed.shape)
    cy, cx = (ys * boxed).sum() / total, (xs * boxed).sum() / total
    top = int(np.clip(round(14 - cy), 0, 28 - boxed.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - boxed.shape[1]))
    field = np.zeros((28, 28), dtype=np.float32)
    field[top : top + boxed.shape[0], left : left + boxed.shape[1]] = boxed
    return field
