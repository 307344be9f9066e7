"""The other-writers set (data/writers.py): built from Debian's handwriting fonts and
page-style strokes, the same every time, prepared as MNIST prepared its digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mnistflow import data
from mnistflow.config import DataConfig, MnistflowError
from mnistflow.data import writers


def test_the_set_is_built_once_then_read_and_the_same_every_time(tmp_path: Path):
    fonts = writers.font_paths()
    assert len(fonts) == 12  # `make test` installs the four font packages
    # A small build, twice from scratch: the same pixels (a fixed seed, nothing else random).
    images, labels = writers.build(fonts[:2], per_font_digit=2, per_stroke_digit=2)
    again, _ = writers.build(fonts[:2], per_font_digit=2, per_stroke_digit=2)
    assert np.array_equal(images, again)
    assert images.shape == (60, 1, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6] * 10

    # Prepared as MNIST: ink inside a 20x20 box, centred by mass near pixel (14, 14).
    for image in images[:, 0].astype(np.float64):
        rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 21
        ys, xs = np.indices(image.shape)
        centre = (ys * image).sum() / image.sum(), (xs * image).sum() / image.sum()
        assert np.allclose(centre, 14, atol=1.5)


def test_load_caches_the_whole_set_and_names_it(tmp_path: Path, monkeypatch):
    splits = data.load(DataConfig(limit_train=10))
    assert splits.writers is not None and len(splits.writers) == 4000
    assert torch.bincount(splits.writers.labels).tolist() == [400] * 10
    cached = list(DataConfig().data_dir.glob("writers-*.npz"))
    assert [p.name for p in cached] == [f"writers-{splits.writers.digest}.npz"]
    # Read back from the cache: the same digits, and nothing is rendered again.
    monkeypatch.setattr(writers, "build", lambda *a, **k: pytest.fail("built again"))
    images, labels, digest = writers.load(DataConfig())
    assert np.array_equal(labels, splits.writers.labels.numpy())
    assert np.array_equal(images, splits.writers.images.numpy()) and digest == splits.writers.digest

    # Without the fonts there is no set (and no writers_accuracy), not an error.
    monkeypatch.setattr(writers, "FONTS", {"fonts-none": ("/nonexistent.ttf",)})
    assert writers.load(DataConfig(data_dir=tmp_path)) is None


def test_an_unwritable_cache_gives_one_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(writers, "RECIPE", "writers-test")  # not the real set's cache name
    # Refused before anything is rendered.
    monkeypatch.setattr(writers, "build", lambda *a, **k: pytest.fail("rendered in vain"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MnistflowError, match="Cannot cache the other-writers set"):
        writers.load(DataConfig(data_dir=blocker / "cache"))
