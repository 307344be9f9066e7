"""The one check of MNIST-style pixel arrays, shared by the logged model, the server and
`mnistflow predict`, so that what each of them accepts cannot drift apart.

Needs numpy alone: it is logged beside the model (``code_paths``), so a model loaded where
mnistflow is not installed runs the same check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHAPES = "(N, 28, 28), (N, 1, 28, 28), (N, 784) or one (28, 28)"
# What a refused dtype is called in the message; others by their numpy name.
KIND_NAMES = {"b": "true/false", "U": "text", "S": "bytes", "O": "mixed or missing values"}


class PixelError(ValueError):
    """The pixels cannot be classified; the message says why in one sentence."""


def as_pixels(data: Any) -> np.ndarray:
    """Any accepted input as a float32 batch (N, 1, 28, 28) of finite values in 0-255.

    Accepted: real numbers (ints, unsigned ints, floats) shaped (N, 28, 28),
    (N, 1, 28, 28), (N, 784) or one (28, 28) digit, N >= 1. Refused, each with one
    sentence: bools (true/false is no grey level, and a mask passed by mistake would
    classify as a black image), text, missing values, ragged lists, other shapes, no digits,
    NaN, infinity and values outside 0-255. The range is checked in the precision given,
    before the cast to float32, which would round e.g. 255.00000000000003 to 255.0.
    """
    if hasattr(data, "to_numpy"):  # a pandas DataFrame, e.g. from MLflow's scoring server
        data = data.to_numpy()
    try:
        array = np.asarray(data)
    except (TypeError, ValueError, RecursionError):  # ragged lists, or nested too deep
        raise PixelError(
            "pixels must be numbers in nested lists of equal lengths (28x28 per digit)."
        ) from None
    if array.size == 0:
        raise PixelError("no digits given.")
    if array.dtype.kind not in "iuf":
        kind = KIND_NAMES.get(array.dtype.kind, str(array.dtype))
        raise PixelError(f"pixels must be real numbers, not {kind}.")
    given = array.shape
    if given == (28, 28):
        array = array[None]
    elif array.ndim == 2 and given[1] == 784:
        array = array.reshape(-1, 28, 28)
    if array.ndim == 3 and array.shape[1:] == (28, 28):
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (1, 28, 28):
        raise PixelError(f"expected digits shaped {SHAPES}; got shape {given}.")
    low, high = array.min(), array.max()
    # NaN propagates through min and max and fails every comparison, so this one test
    # catches NaN, infinity and out-of-range values; the messages tell them apart.
    if not (low >= 0 and high <= 255):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise PixelError("pixel values must be finite numbers (found NaN or infinity).")
        raise PixelError(f"pixel values must lie in 0-255; got {float(low)} to {float(high)}.")
    return np.ascontiguousarray(array, dtype=np.float32)
