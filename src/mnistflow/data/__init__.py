"""The data: MNIST's four original IDX files fetched (verified), parsed into tensors and
split; beside them, the images every trained model is also measured on.

The images stay uint8 in memory, shaped (N, 1, 28, 28); the network scales them itself,
so the trainer, the logged model and the server all take the same raw 0-255 pixels.

- style.py: how MNIST prepared a digit (20x20 box, centred by mass in 28x28), for uploads too
- writers.py: digits by writers outside MNIST (handwriting fonts, page-style strokes), built
  offline and cached: the robustness measure
- here: MNIST itself, and Fashion-MNIST's test images as the non-digits (read_nondigits)

Imports config and store only.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mnistflow.config import NONDIGITS_FOLDER, DataConfig, MnistflowError
from mnistflow.data import writers
from mnistflow.store.uris import redact

if TYPE_CHECKING:
    import torch

# SHA-256 of the original files, as published with the dataset's well-known mirrors.
FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
PUBLIC_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# Fashion-MNIST's test images, the non-digits: the SHA-256 of the 10,000 images' pixels, as
# Debian recompresses the original .gz (so the file's hash differs from upstream's).
NONDIGITS_FILE = "t10k-images-idx3-ubyte.gz"
NONDIGITS_SHA256 = "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a"
# One name for the whole dataset's content: the four files' hashes, hashed.
DATASET_DIGEST = hashlib.sha256("".join(sorted(FILES.values())).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    """One split in memory: images (N, 1, 28, 28) uint8 and labels (N,) int64."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    # Identifies exactly which images are in the split (dataset content + indices).
    digest: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class MnistSplits:
    train: Split
    val: Split
    test: Split
    source: str  # where the files came from: a URL or a local folder
    # Images that are not digits (N, 1, 28, 28) uint8, to measure abstention; None when
    # DataConfig.nondigits names no folder, or the default one is not installed.
    nondigits: torch.Tensor | None = None
    # Digits by writers outside MNIST (writers.py); None when no handwriting font is installed.
    writers: Split | None = None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(config: DataConfig) -> tuple[dict[str, Path], str]:
    """Return verified local paths of the four files, and the source they came from."""
    mirror = config.mirror
    if mirror and not mirror.startswith(("http://", "https://")):
        return _from_folder(Path(mirror).expanduser()), str(Path(mirror).expanduser().resolve())
    return _download(config.data_dir, [mirror] if mirror else list(PUBLIC_MIRRORS))


def _from_folder(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise MnistflowError(
            f"MNIST mirror folder {folder} does not exist; point MNISTFLOW_MNIST_MIRROR at the "
            "folder holding the four .gz files, or unset it to download."
        )
    paths = {}
    for name, expected in FILES.items():
        path = folder / name
        if not path.is_file():
            raise MnistflowError(
                f"{path} is missing; put the original {name} in {folder} "
                "or unset MNISTFLOW_MNIST_MIRROR to download it."
            )
        if sha256(path) != expected:
            raise MnistflowError(
                f"{path} is corrupt or truncated (SHA-256 mismatch); replace it with the original "
                "MNIST file."
            )
        paths[name] = path
    return paths


def _download(data_dir: Path, mirrors: list[str]) -> tuple[dict[str, Path], str]:
    import pooch  # only needed when files are downloaded

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MnistflowError(
            f"Cannot create the MNIST cache folder {data_dir} ({e.strerror}); "
            "set MNISTFLOW_DATA_DIR to a writable folder."
        ) from e
    paths: dict[str, Path] = {}
    used = mirrors[0]
    for name, expected in FILES.items():
        cached = data_dir / name
        if cached.is_file() and sha256(cached) == expected:
            paths[name] = cached
            continue
        errors = []
        for base in mirrors:
            try:
                # pooch downloads to a temporary name and checks the hash before moving the file
                # into place, so a partial or wrong download never lands in the cache.
                pooch.retrieve(
                    base.rstrip("/") + "/" + name,
                    known_hash=f"sha256:{expected}",
                    fname=name,
                    path=data_dir,
                    progressbar=False,
                )
                paths[name], used = cached, base
                break
            except Exception as e:  # network errors come in many types; report them all
                errors.append(f"{base}: {type(e).__name__}")
        else:
            raise MnistflowError(
                f"Could not download {name} ({'; '.join(errors)}); check the network, or set "
                "MNISTFLOW_MNIST_MIRROR to a folder holding the four MNIST .gz files."
            )
    return paths, used


def read_idx(path: Path) -> np.ndarray:
    """Parse one (optionally gzipped) IDX file into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise MnistflowError(f"{path} is not a readable IDX file ({e}).") from e
    # Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then
    # one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MnistflowError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise MnistflowError(f"{path} holds {len(raw) - offset} bytes of data, not {dims}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def read_nondigits(config: DataConfig) -> np.ndarray | None:
    """Fashion-MNIST's 10,000 test images (N, 28, 28) uint8, verified; None when the
    measure is off or the default folder is not there (the package is not installed)."""
    if not config.nondigits:
        return None
    path = Path(config.nondigits).expanduser() / NONDIGITS_FILE
    if not path.is_file():
        if config.nondigits == NONDIGITS_FOLDER:
            return None
        raise MnistflowError(
            f"{path} is missing; point MNISTFLOW_NONDIGITS at the folder holding Fashion-MNIST's "
            f"{NONDIGITS_FILE}, or set it empty to skip the non-digit measure."
        )
    images = read_idx(path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise MnistflowError(f"{path} holds images shaped {images.shape[1:]}, not 28 x 28.")
    if hashlib.sha256(images.tobytes()).hexdigest() != NONDIGITS_SHA256:
        raise MnistflowError(
            f"{path} is not Fashion-MNIST's test set (SHA-256 mismatch); replace it with the "
            "original file."
        )
    return images


def load(config: DataConfig) -> MnistSplits:
    """Fetch, verify, parse and split MNIST into train / validation / test tensors."""
    # Imported here, where tensors are made: commands that only read IDX files (predict)
    # then start without loading torch.
    import torch

    paths, source = fetch(config)
    train_x = torch.from_numpy(read_idx(paths["train-images-idx3-ubyte.gz"]).copy())
    train_y = torch.from_numpy(read_idx(paths["train-labels-idx1-ubyte.gz"]).astype(np.int64))
    test_x = torch.from_numpy(read_idx(paths["t10k-images-idx3-ubyte.gz"]).copy())
    test_y = torch.from_numpy(read_idx(paths["t10k-labels-idx1-ubyte.gz"]).astype(np.int64))
    if not 0 < config.val_size < len(train_y):
        raise MnistflowError(
            f"validation size must be between 1 and {len(train_y) - 1}, got {config.val_size}."
        )
    if config.limit_train is not None and config.limit_train < 1:
        raise MnistflowError(f"--limit-train must be at least 1, got {config.limit_train}.")

    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = order[: config.val_size], order[config.val_size :]
    if config.limit_train is not None:
        train_idx = train_idx[: config.limit_train]
    test_idx = torch.arange(len(test_y))
    nondigits = read_nondigits(config)
    others = writers.load(config)

    def split(name: str, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Split:
        digest = hashlib.sha256(DATASET_DIGEST.encode() + idx.numpy().tobytes()).hexdigest()[:16]
        # (N, 28, 28) -> (N, 1, 28, 28): one grey channel
        return Split(name, x[idx].unsqueeze(1).contiguous(), y[idx].contiguous(), digest)

    return MnistSplits(
        train=split("train", train_x, train_y, train_idx),
        val=split("validation", train_x, train_y, val_idx),
        test=split("test", test_x, test_y, test_idx),
        # Recorded with every run (params, dataset inputs): a mirror's login stays out.
        source=redact(source),
        nondigits=None if nondigits is None else torch.from_numpy(nondigits.copy()).unsqueeze(1),
        writers=None
        if others is None
        else Split("writers", torch.from_numpy(others[0]), torch.from_numpy(others[1]), others[2]),
    )
