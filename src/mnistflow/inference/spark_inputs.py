"""What a Spark job reads (image files, Parquet datasets, .npy arrays, MNIST IDX files) and
how its rows become model input on the executors: preprocess.image_to_digit for images,
pixels.as_pixels for pixel rows, the same checks as `mnistflow predict` on one machine. A row
that fails gets the sentence they give instead of pixels, and the job goes on (spark.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd  # at run time: pandas_udf reads the functions' type hints

from mnistflow.config import MnistflowError
from mnistflow.inference import batch
from mnistflow.inference.preprocess import ImageError, image_to_digit
from mnistflow.lifecycle.pixels import PixelError, as_pixels

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

PARQUET_SUFFIX = ".parquet"
PIXELS = 784
# What the prepare step hands the model: pixels for every row (zeros where refused, so the
# model's batch stays whole) and the refusal, null where the row is fine.
PREPARED = "pixels array<float>, error string"


# -- on the executors: the one preprocessing and the one pixel check, row by row -----------


def check_rows(rows: Sequence[Any]) -> tuple[np.ndarray, list[str | None]]:
    """Pixel rows (784 values each) -> (n, 784) float32 pixels and each row's refusal.

    Every row goes through as_pixels, the check the local path and the model use; a refused
    row gets zeros and the sentence as_pixels gave for it (None for accepted rows).
    """
    n = len(rows)
    pixels = np.zeros((n, PIXELS), np.float32)
    errors: list[str | None] = [None] * n
    try:  # the common case: the whole batch is fine, one vectorised check
        pixels[:] = as_pixels(np.stack(rows)).reshape(n, PIXELS)
        return pixels, errors
    except (PixelError, ValueError, TypeError):
        pass  # find which rows, and why
    for i, row in enumerate(rows):
        try:
            pixels[i] = as_pixels(np.asarray(row)[None]).reshape(PIXELS)  # (1, 784) one digit
        except PixelError as e:
            errors[i] = str(e)
    return pixels, errors


def decode_images(contents: Sequence[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
    """Image bytes -> (n, 784) float32 MNIST-style pixels and each image's refusal."""
    n = len(contents)
    pixels = np.zeros((n, PIXELS), np.float32)
    errors: list[str | None] = [None] * n
    for i, content in enumerate(contents):
        try:
            if content is None:
                raise ImageError("no image bytes (the value is missing).")
            pixels[i] = image_to_digit(bytes(content)).reshape(PIXELS)
        except ImageError as e:
            errors[i] = str(e)
    return pixels, errors


def _prepared(pixels: np.ndarray, errors: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame({"pixels": list(pixels), "error": errors})


def _prepare_pixels(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
    for rows in batches:
        yield _prepared(*check_rows(rows.to_numpy()))


def _prepare_images(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
    for contents in batches:
        yield _prepared(*decode_images(contents.to_numpy()))


# -- reading the inputs -----------------------------------------------------------------------


def has_scheme(path: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[{")


def _kind(path: str) -> str:
    """'arrays' (read on the driver, as the local path reads them), 'parquet' or 'images'."""
    local = Path(path)
    if not has_scheme(path):
        if local.suffix == ".npy" or batch.is_idx(local):
            return "arrays"
        if local.is_dir():
            files = [p for p in local.rglob("*") if p.is_file()]
            if any(p.suffix == PARQUET_SUFFIX for p in files) and not any(
                p.suffix.lower() in batch.IMAGE_SUFFIXES for p in files
            ):
                return "parquet"
        elif not local.exists() and not _is_glob(path):
            raise MnistflowError(f"{path} does not exist.")
    elif path.endswith(".npy") or batch.is_idx(Path(path)):
        raise MnistflowError(
            f"{path}: .npy and IDX inputs are read by the driver, from a local path; "
            "put large inputs in Parquet for Spark to read."
        )
    return "parquet" if path.rstrip("/").endswith(PARQUET_SUFFIX) else "images"


def _selected(
    df: DataFrame, source: Column, prepare: Any, value: Column, labels: Column
) -> DataFrame:
    prepared = prepare(value)
    return df.select(
        source.cast("string").alias("source"),
        prepared["pixels"].alias("pixels"),
        prepared["error"].alias("error"),
        labels.cast("long").alias("true_label"),
    )


def _udfs() -> tuple[Any, Any]:
    from pyspark.sql.pandas.functions import pandas_udf

    return (
        pandas_udf(_prepare_pixels, PREPARED),  # type: ignore[call-overload]
        pandas_udf(_prepare_images, PREPARED),  # type: ignore[call-overload]
    )


def _read_images(spark: SparkSession, path: str) -> DataFrame:
    from pyspark.sql import functions as F

    reader = spark.read.format("binaryFile")
    folder = not has_scheme(path) and Path(path).is_dir()
    if folder:
        images = [p for p in Path(path).rglob("*") if p.suffix.lower() in batch.IMAGE_SUFFIXES]
        if not images:
            raise MnistflowError(
                f"Folder {path} holds no images ({', '.join(sorted(batch.IMAGE_SUFFIXES))})."
            )
    # A folder holds other files too; a file or glob named by the user is read as given.
    whole_folder = folder or (has_scheme(path) and not _is_glob(path))
    if whole_folder:
        reader = reader.option("recursiveFileLookup", "true")
    df = reader.load(path)
    if whole_folder:
        suffixes = "|".join(s.lstrip(".") for s in sorted(batch.IMAGE_SUFFIXES))
        df = df.filter(F.lower(F.col("path")).rlike(rf"\.({suffixes})$"))
    _, prepare_images = _udfs()
    return _selected(df, F.col("path"), prepare_images, F.col("content"), F.lit(None))


def _pixel_columns(df: DataFrame) -> list[str]:
    from pyspark.sql.types import NumericType

    numeric = [f.name for f in df.schema.fields if isinstance(f.dataType, NumericType)]
    return [c for c in numeric if c.lower() not in ("label", "true_label")]


def _read_parquet(spark: SparkSession, path: str, column: str | None) -> DataFrame:
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, BinaryType, IntegralType, StringType

    df = spark.read.parquet(path)
    fields = {f.name: f.dataType for f in df.schema.fields}
    prepare_pixels, prepare_images = _udfs()
    if column is not None and column not in fields:
        raise MnistflowError(f"{path} has no column {column!r}; it has: {', '.join(fields)}.")
    if column is None:
        binary = [n for n, t in fields.items() if isinstance(t, BinaryType)]
        arrays = [n for n, t in fields.items() if isinstance(t, ArrayType)]
        column = [*binary, *arrays][0] if len(binary) + len(arrays) == 1 else None
    if column is None and len(_pixel_columns(df)) != PIXELS:
        raise MnistflowError(
            f"{path} needs one binary column of image bytes, one array column of 784 pixels "
            f"or 784 pixel columns (name it with --column); it has: {', '.join(fields)}."
        )
    source = (
        F.col("source")
        if isinstance(fields.get("source"), StringType)
        else F.format_string("%s[%d]", F.col("_metadata.file_path"), F.col("_metadata.row_index"))
    )
    label = F.col("label") if isinstance(fields.get("label"), IntegralType) else F.lit(None)
    if column is None:
        value = F.array(*[F.col(c).cast("double") for c in _pixel_columns(df)])
        return _selected(df, source, prepare_pixels, value, label)
    kind = fields[column]
    if isinstance(kind, BinaryType):
        return _selected(df, source, prepare_images, F.col(column), label)
    if isinstance(kind, ArrayType):
        value = F.col(column)
        if isinstance(kind.elementType, ArrayType):  # (28, 28) nested
            value = F.flatten(value)
        return _selected(df, source, prepare_pixels, value.cast("array<double>"), label)
    raise MnistflowError(
        f"Column {column!r} of {path} holds {kind.simpleString()}; it must hold image bytes "
        "(binary) or pixels (an array of numbers)."
    )


def _read_arrays(spark: SparkSession, paths: list[str]) -> DataFrame:
    """.npy and IDX files, read and checked on the driver exactly as the local path does."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    digits = batch.collect(Path(p) for p in paths)
    pixels = digits.all_pixels().reshape(-1, PIXELS)
    offsets = pa.array(np.arange(0, pixels.size + 1, PIXELS, dtype=np.int32))
    known = digits.all_labels()
    table = pa.table(
        {
            "source": pa.array(digits.sources, pa.string()),
            "pixels": pa.ListArray.from_arrays(offsets, pa.array(pixels.ravel())),
            "true_label": pa.array([None] * len(digits) if known is None else known, pa.int64()),
        }
    )
    df = spark.createDataFrame(table)  # Arrow straight in: no row-by-row conversion
    return df.select("source", "pixels", F.lit(None).cast("string").alias("error"), "true_label")


def read_inputs(spark: SparkSession, paths: Sequence[str], column: str | None) -> DataFrame:
    """Every input as rows of (source, pixels, error, true_label), ready for the model."""
    kinds = {path: _kind(path) for path in paths}
    frames = []
    if arrays := [p for p in paths if kinds[p] == "arrays"]:
        frames.append(_read_arrays(spark, arrays))
    for path in paths:
        kind = kinds[path]
        if kind == "parquet":
            frames.append(_read_parquet(spark, path, column))
        elif kind == "images":
            frames.append(_read_images(spark, path))
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame)
    return result
