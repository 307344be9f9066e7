"""Turn any picture of one digit into an MNIST-style 28x28 image.

Photos and drawings of any size, colour or polarity are decoded here and go through MNIST's
own preparation (data/style.py), so the model sees what it was trained on.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# ImageError is raised here too, and caught by the callers under this module's name.
from mnistflow.data.style import ImageError as ImageError
from mnistflow.data.style import mnist_style

MAX_PIXELS = 40_000_000  # refuse decompression bombs long before they exhaust memory


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes (PNG, JPEG, ...), honouring the camera's orientation tag."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"image is too large ({image.width}x{image.height} pixels).")
            image.load()
            return ImageOps.exif_transpose(image) or image
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"not a readable image ({type(e).__name__}).") from None
    except Image.DecompressionBombError:
        raise ImageError("image is too large to decode safely.") from None


def to_grey(image: Image.Image) -> np.ndarray:
    """Grey levels 0-255 as float32; transparency is flattened onto white, like paper."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def image_to_digit(data: bytes | Image.Image | Any) -> np.ndarray:
    """Image bytes or a PIL image -> (28, 28) float32 MNIST-style pixels."""
    image = data if isinstance(data, Image.Image) else open_image(data)
    return mnist_style(to_grey(image))
