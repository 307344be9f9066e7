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
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistflow.config import MnistflowError
from mnistflow.inference import batch
from mnistflow.inference.spark_inputs import PARQUET_SUFFIX, has_scheme, read_inputs

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DEFAULT_MASTER = "local[*]"
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
# Named in the output for each class: probability_0 ... probability_9.
CLASS_COLUMNS = [f"probability_{digit}" for digit in range(10)]
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
    """One output row per input row: source, label, probability, abstain (for a model with
    an abstain threshold), probability_0..9, model_version, model_uri, error, true_label;
    refused rows keep a null prediction."""
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
    # A model logged with an abstain threshold also says whether it is sure (its signature's
    # outputs, which the UDF's result type follows); an older one does not.
    judged = "abstain" in out.schema["out"].dataType.fieldNames()  # type: ignore[attr-defined]
    return out.select(
        "source",
        F.when(fine, label).alias("label"),
        F.when(fine, probabilities[label.cast("int")]).alias("probability"),
        *([F.when(fine, F.col("out.abstain")).alias("abstain")] if judged else []),
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
        if output is not None and has_scheme(output):
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
    if has_scheme(output):
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
