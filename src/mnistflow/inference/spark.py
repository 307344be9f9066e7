"""Batch inference on Apache Spark: the registered model applied with `mlflow.pyfunc.spark_udf`
to image files, Parquet datasets, .npy arrays and MNIST IDX files, on `local[*]` or a cluster.

The same model, checks and preprocessing as `mnistflow predict` on one machine: images go
through preprocess.image_to_digit, pixel rows through pixels.as_pixels, on the executors. A
row that fails either gets a null prediction and the sentence they give, and the job goes on.

The model URI is resolved to one registry version before the job starts (an alias that moves
meanwhile changes nothing), and that version is written in every output row.

Needs pyspark (the `spark` extra) and a Java runtime; both are imported or looked for only when
a Spark job is asked for.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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

DEFAULT_MASTER = "local[*]"
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
PARQUET_SUFFIX = ".parquet"
PIXELS = 784
# Named in the output for each class: probability_0 ... probability_9.
CLASS_COLUMNS = [f"probability_{digit}" for digit in range(10)]
# What the prepare step hands the model: pixels for every row (zeros where refused, so the
# model's batch stays whole) and the refusal, null where the row is fine.
PREPARED = "pixels array<float>, error string"
SHOWN_FAILURES = 20  # bad rows listed on stderr; the output has all of them


def missing_requirements() -> str | None:
    """One sentence saying what to install for --engine spark, or None when it can run."""
    missing = []
    try:
        import pyspark  # noqa: F401
    except ImportError:
        missing.append("pyspark (pip install 'mnistflow[spark]')")
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (
        java_home and Path(java_home, "bin", "java").is_file()
    ):
        missing.append("a Java 17+ runtime (apt-get install openjdk-17-jre-headless)")
    if not missing:
        return None
    return f"--engine spark needs {' and '.join(missing)}."


# -- the model, pinned before the job -------------------------------------------------------


@dataclass(frozen=True)
class PinnedModel:
    """What every executor loads: one registry version (or the URI as given when it is not a
    registry reference, e.g. runs:/ or a path)."""

    asked: str  # as the user gave it, e.g. models:/mnist@champion
    uri: str  # models:/mnist/3
    version: str | None


def pin_model(model_uri: str) -> PinnedModel:
    """Resolve an alias to the version it names now; a version or any other URI stays."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # Here, not at the top: it imports mlflow, which Spark's workers never need (__init__).
    from mnistflow.lifecycle import registry

    ref = registry.parse_registry_uri(model_uri)
    if ref is None:
        return PinnedModel(model_uri, model_uri, None)
    name, version, alias = ref
    client = MlflowClient()
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, str(version))
        )
    except MlflowException as e:
        raise MnistflowError(
            f"Cannot load model {model_uri} ({e.message.splitlines()[0].rstrip('.')}); "
            f"there is: {registry.describe_models(client)}."
        ) from None
    return PinnedModel(model_uri, f"models:/{name}/{found.version}", str(found.version))


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


def _has_scheme(path: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[{")


def _kind(path: str) -> str:
    """'arrays' (read on the driver, as the local path reads them), 'parquet' or 'images'."""
    local = Path(path)
    if not _has_scheme(path):
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
    folder = not _has_scheme(path) and Path(path).is_dir()
    if folder:
        images = [p for p in Path(path).rglob("*") if p.suffix.lower() in batch.IMAGE_SUFFIXES]
        if not images:
            raise MnistflowError(
                f"Folder {path} holds no images ({', '.join(sorted(batch.IMAGE_SUFFIXES))})."
            )
    # A folder holds other files too; a file or glob named by the user is read as given.
    whole_folder = folder or (_has_scheme(path) and not _is_glob(path))
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


# -- the job ---------------------------------------------------------------------------------


@dataclass
class SparkResult:
    model: PinnedModel
    master: str
    total: int
    failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first SHOWN_FAILURES
    accuracy: float | None = None  # against known labels, when every classified row has one


def scored(
    spark: SparkSession, inputs: DataFrame, model: PinnedModel, env_manager: str
) -> DataFrame:
    """One output row per input row: source, label, probability, probability_0..9,
    model_version, model_uri, error, true_label; refused rows keep a null prediction."""
    import mlflow
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(
        spark,
        model.uri,
        env_manager=env_manager,
        # Spark runs one task per core: one ONNX Runtime thread each.
        model_config={"intra_op_threads": 1},
    )
    fine = F.col("error").isNull()
    out = inputs.withColumn("out", udf(F.col("pixels")))
    label = F.col("out.label")
    probabilities = F.col("out.probabilities")
    return out.select(
        "source",
        F.when(fine, label).alias("label"),
        F.when(fine, probabilities[label.cast("int")]).alias("probability"),
        *[F.when(fine, probabilities[d]).alias(c) for d, c in enumerate(CLASS_COLUMNS)],
        F.lit(model.version).alias("model_version"),
        F.lit(model.uri).alias("model_uri"),
        "error",
        "true_label",
    )


def check_output(output: str | None) -> None:
    """Refuse an output that cannot be written, before any work (see batch.check_output);
    a Parquet folder must not exist yet: Spark would refuse it after the model is loaded."""
    if output is None or not output.rstrip("/").endswith(PARQUET_SUFFIX):
        if output is not None and _has_scheme(output):
            raise MnistflowError(
                f"Cannot write results to {output}: a remote output must be Parquet "
                "(a name ending in .parquet)."
            )
        try:
            batch.check_output(None if output is None else Path(output))
        except MnistflowError as e:
            raise MnistflowError(
                str(e).replace("in .csv or .json", "in .parquet, .csv or .json")
            ) from None
        return
    if _has_scheme(output):
        return  # Spark checks it on its file system
    target = Path(output)
    if target.exists():
        raise MnistflowError(
            f"Cannot write results to {output}: it exists already; remove it or name another."
        )
    if not target.parent.is_dir():
        raise MnistflowError(f"Cannot write results to {output}: {target.parent} is not a folder.")


def session(master: str | None) -> tuple[SparkSession, bool]:
    """The active Spark session, or a new one on master (default: what spark-submit set, else
    local[*]); the flag says whether this call created it (and so should stop it)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName("mnistflow predict")
    # Under spark-submit the JVM is already running with the master it was given.
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(master or DEFAULT_MASTER)
    if (master or DEFAULT_MASTER).startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local workers run this interpreter (this venv), not whatever python3 is on PATH;
        # pyspark reads it from the environment when the session starts.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    if (master or DEFAULT_MASTER).startswith("local"):
        # Everything runs on this machine: listen on loopback only (and skip Spark's warning
        # about a host name that resolves to it).
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = builder.config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


def predict(
    inputs: Sequence[str],
    model_uri: str,
    output: str | None,
    master: str | None = None,
    column: str | None = None,
    env_manager: str = "local",
    batch_size: int = 1024,
) -> SparkResult:
    """Score inputs on Spark and write the rows (Parquet by Spark; CSV/JSON or stdout by
    collecting them, for small jobs). The tracking store must already be chosen."""
    if (missing := missing_requirements()) is not None:
        raise MnistflowError(missing)
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    model = pin_model(model_uri)  # before any job: every executor loads this version
    spark, created = session(master)
    used = str(spark.sparkContext.master)
    try:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
        rows = scored(spark, read_inputs(spark, inputs, column), model, env_manager)
        if output is not None and output.rstrip("/").endswith(PARQUET_SUFFIX):
            rows.write.parquet(output)
            written = spark.read.parquet(output)
        else:
            collected = [r.asDict() for r in rows.collect()]
            if not any(r["true_label"] is not None for r in collected):
                collected = [{k: v for k, v in r.items() if k != "true_label"} for r in collected]
            batch.write(collected, None if output is None else Path(output))
            return _summary_of_rows(collected, model, used)
        return _summary(written, model, used)
    except (PySparkException, Py4JJavaError) as e:
        raise MnistflowError(f"The Spark job failed: {_first_line(e)}") from None
    finally:
        if created:
            spark.stop()


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "java_exception", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _summary(written: DataFrame, model: PinnedModel, master: str) -> SparkResult:
    from pyspark.sql import functions as F

    counts = written.agg(
        F.count(F.lit(1)).alias("total"),
        F.count("error").alias("failed"),
        F.count("true_label").alias("known"),
        F.sum((F.col("label") == F.col("true_label")).cast("long")).alias("right"),
    ).first()
    assert counts is not None
    failures = [
        (r["source"], r["error"])
        for r in written.where(F.col("error").isNotNull())
        .select("source", "error")
        .head(SHOWN_FAILURES)
    ]
    classified = counts["total"] - counts["failed"]
    accuracy = (
        counts["right"] / classified if classified and counts["known"] == counts["total"] else None
    )
    return SparkResult(model, master, counts["total"], counts["failed"], failures, accuracy)


def _summary_of_rows(rows: list[dict[str, Any]], model: PinnedModel, master: str) -> SparkResult:
    bad = [(r["source"], r["error"]) for r in rows if r["error"] is not None]
    labelled = [r for r in rows if r.get("true_label") is not None and r["error"] is None]
    known = all(r.get("true_label") is not None for r in rows)
    classified = len(rows) - len(bad)
    accuracy = (
        sum(r["label"] == r["true_label"] for r in labelled) / classified
        if known and classified
        else None
    )
    return SparkResult(model, master, len(rows), len(bad), bad[:SHOWN_FAILURES], accuracy)
