"""Data: verified fetch from a mirror (folder or URL), IDX parsing, fixed splits."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import MIRROR, free_port
from mnistflow import config, data
from mnistflow.config import DataConfig, MnistflowError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def splits() -> data.MnistSplits:
    return data.load(DataConfig(mirror=str(MIRROR)))


def test_splits_hold_all_of_mnist_with_the_published_label_counts(splits: data.MnistSplits):
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    train_and_val = torch.cat([splits.train.labels, splits.val.labels])
    assert torch.bincount(train_and_val).tolist() == TRAIN_COUNTS
    assert torch.bincount(splits.test.labels).tolist() == TEST_COUNTS
    assert splits.train.images.shape == (55000, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert splits.source == str(MIRROR.resolve())


def test_validation_split_is_fixed_and_disjoint_whatever_the_limit(splits: data.MnistSplits):
    limited = data.load(DataConfig(mirror=str(MIRROR), limit_train=1000))
    assert torch.equal(limited.val.images, splits.val.images)
    assert torch.equal(limited.train.images, splits.train.images[:1000])
    assert limited.train.digest != splits.train.digest
    assert limited.val.digest == splits.val.digest
    # No validation image is also a training image (compare raw bytes of every image).
    val = {bytes(x) for x in splits.val.images.numpy().reshape(5000, -1)}
    train = {bytes(x) for x in splits.train.images[:5000].numpy().reshape(5000, -1)}
    assert len(val & train) < 5  # MNIST has a handful of exact duplicates, no more


def _mirror_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "mirror"
    shutil.copytree(MIRROR, folder, ignore=shutil.ignore_patterns("*.md", "SHA256SUMS"))
    return folder


def test_truncated_file_in_mirror_is_refused_by_name(tmp_path: Path):
    folder = _mirror_copy(tmp_path)
    victim = folder / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(MnistflowError, match=r"t10k-labels-idx1-ubyte\.gz is corrupt"):
        data.load(DataConfig(mirror=str(folder)))


def test_missing_file_or_folder_gives_one_clear_error(tmp_path: Path):
    folder = _mirror_copy(tmp_path)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MnistflowError, match=r"train-labels-idx1-ubyte\.gz is missing"):
        data.load(DataConfig(mirror=str(folder)))
    with pytest.raises(MnistflowError, match="does not exist"):
        data.load(DataConfig(mirror=str(tmp_path / "nowhere")))


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The four files served over HTTP on a loopback port, from a folder the test can spoil."""
    folder = _mirror_copy(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()
    server.server_close()


def test_download_verifies_and_caches(http_mirror: tuple[str, Path], tmp_path: Path):
    url, _ = http_mirror
    cache = tmp_path / "cache"
    cache.mkdir()
    # The other-writers set is no download: copied in from the session's cache, not rendered
    # again (12 s of CPU).
    for rendered in DataConfig().data_dir.glob("writers-*.npz"):
        shutil.copy(rendered, cache)
    splits = data.load(DataConfig(mirror=url, data_dir=cache))
    assert len(splits.test) == 10000 and splits.source == url
    assert sorted(p.name for p in cache.glob("*.gz")) == sorted(data.FILES)


def test_download_of_a_wrong_file_never_lands_in_the_cache(
    http_mirror: tuple[str, Path], tmp_path: Path
):
    url, folder = http_mirror
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    cache = tmp_path / "cache"
    with pytest.raises(MnistflowError, match=r"Could not download train-images-idx3-ubyte\.gz"):
        data.load(DataConfig(mirror=url, data_dir=cache))
    assert not (cache / "train-images-idx3-ubyte.gz").exists()


def test_no_network_and_no_cache_tells_what_to_do(tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(MnistflowError, match="MNISTFLOW_MNIST_MIRROR"):
        data.load(DataConfig(mirror=dead, data_dir=tmp_path / "cache"))


def test_read_idx_rejects_other_files(tmp_path: Path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(4)))  # float IDX, not bytes
    with pytest.raises(MnistflowError, match="not an IDX file of unsigned bytes"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(3)))
    with pytest.raises(MnistflowError, match="holds 3 bytes"):
        data.read_idx(path)
    raw = tmp_path / "ok-idx1-ubyte"
    raw.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    assert data.read_idx(raw).tolist() == [7, 8, 9]


# -- the non-digits (Fashion-MNIST, Debian's dataset-fashion-mnist; `make test` installs it) --


def test_the_non_digits_are_fashion_mnist_test_images_verified(splits, tmp_path, monkeypatch):
    assert splits.nondigits is not None and splits.nondigits.shape == (10000, 1, 28, 28)
    assert splits.nondigits.dtype == torch.uint8
    # Clothes, not digits: no image equals an MNIST test digit.
    digits = {bytes(x) for x in splits.test.images.numpy().reshape(10000, -1)}
    assert not digits & {bytes(x) for x in splits.nondigits[:1000].numpy().reshape(1000, -1)}

    # Another folder: used when it holds the right file, one clear error when it does not.
    folder = tmp_path / "fashion"
    folder.mkdir()
    original = Path(config.NONDIGITS_FOLDER) / data.NONDIGITS_FILE
    monkeypatch.setenv("MNISTFLOW_NONDIGITS", str(folder))
    with pytest.raises(MnistflowError, match=r"t10k-images-idx3-ubyte\.gz is missing"):
        data.read_nondigits(DataConfig(mirror=str(MIRROR)))
    raw = bytearray(gzip.decompress(original.read_bytes()))
    raw[-1] ^= 0xFF  # one pixel changed
    (folder / data.NONDIGITS_FILE).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(MnistflowError, match="not Fashion-MNIST's test set"):
        data.read_nondigits(DataConfig(mirror=str(MIRROR)))
    raw[-1] ^= 0xFF  # recompressed, as Debian does: the pixels are what is checked
    (folder / data.NONDIGITS_FILE).write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    assert data.read_nondigits(DataConfig(mirror=str(MIRROR))) is not None

    # Empty turns the measure off; the default folder, absent, is skipped quietly.
    monkeypatch.setenv("MNISTFLOW_NONDIGITS", "")
    assert data.load(DataConfig(mirror=str(MIRROR), limit_train=10)).nondigits is None
    monkeypatch.setattr(data, "NONDIGITS_FOLDER", str(tmp_path / "not-installed"))
    assert data.read_nondigits(DataConfig(nondigits=str(tmp_path / "not-installed"))) is None
