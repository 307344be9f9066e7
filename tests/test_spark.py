"""`mnistflow predict --engine spark`: the same answers as the local path on IDX, Parquet and
PNG inputs, bad rows reported per row, the model pinned before the job, and one sentence when
Spark cannot run. One local[2] Spark session serves the whole test session."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import MIRROR, run_cli
from mnistflow.inference import batch as inference
from mnistflow.inference import spark as spark_inference

# One worker holds the Spark session under pytest-xdist (make test): see conftest.py.
pytestmark = pytest.mark.xdist_group("spark")

IDX = MIRROR / "t10k-images-idx3-ubyte.gz"
SPARK = ["--engine", "spark", "--master", "local[2]"]


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One local[2] session for every Spark test (start-up takes seconds); the command reuses
    the active session instead of starting its own."""
    session, _ = spark_inference.session("local[2]")
    yield session
    session.stop()


def local_probabilities(model_uri: str, pixels: np.ndarray) -> np.ndarray:
    """(N, 10) probabilities from the local path's own functions."""
    classifier, _ = inference.load_classifier(model_uri)
    return inference.classify(classifier, pixels.astype(np.float32))[1]


def by_index(frame: pd.DataFrame) -> pd.DataFrame:
    """Output rows of 'file[i]' sources, ordered by i (Spark writes partitions in any order)."""
    index = frame["source"].map(lambda s: int(re.search(r"\[(\d+)\]$", s).group(1)))
    return frame.assign(index=index).sort_values("index").reset_index(drop=True)


def probabilities_of(frame: pd.DataFrame) -> np.ndarray:
    return frame[spark_inference.CLASS_COLUMNS].to_numpy(dtype=np.float64)


def spark_run(*args: str) -> Any:
    result = run_cli("predict", *SPARK, *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize("layout", ["idx", "parquet"])
@pytest.mark.usefixtures("spark")
@pytest.mark.slow
@pytest.mark.spark
def test_spark_matches_local_predict_on_the_test_set(
    champion, test_split, tmp_path: Path, layout: str
):
    pixels = test_split.images[:, 0].numpy()  # (10000, 28, 28) uint8
    labels = test_split.labels.numpy()
    local = run_cli("predict", str(IDX), "--output", str(tmp_path / "local.json"))
    assert local.exit_code == 0, local.stderr
    local_rows = json.loads((tmp_path / "local.json").read_text())
    expected = local_probabilities("models:/mnist@champion", pixels)
    if layout == "idx":
        source = IDX
    else:  # a Parquet dataset of pixel arrays with labels, in two files
        source = tmp_path / "test.parquet"
        source.mkdir()
        for part, rows in enumerate(np.array_split(np.arange(len(pixels)), 2)):
            table = pa.table(
                {
                    "pixels": pa.array(list(pixels[rows].reshape(-1, 784)), pa.list_(pa.uint8())),
                    "label": pa.array(labels[rows], pa.int64()),
                }
            )
            pq.write_table(table, source / f"part-{part}.parquet")
    out = tmp_path / "spark.parquet"
    result = spark_run(str(source), "--output", str(out))
    assert result.exit_code == 0, result.stderr
    assert "10000 digits classified with models:/mnist/1 (version 1)" in result.stderr
    assert "accuracy" in result.stderr
    frame = pd.read_parquet(out)  # a Parquet folder Spark wrote, read by pandas
    assert len(frame) == 10000 and frame["error"].isna().all()
    if layout == "parquet":  # rows are file[i]: put them back in the order written
        frame["part"] = frame["source"].str.contains("part-1")
        frame = pd.concat([by_index(g) for _, g in frame.groupby("part")], ignore_index=True)
    else:
        frame = by_index(frame)
    assert (frame["model_version"] == "1").all()
    assert np.array_equal(frame["label"].to_numpy(), [r["label"] for r in local_rows])
    assert np.array_equal(frame["true_label"].to_numpy(), labels)
    assert np.abs(probabilities_of(frame) - expected).max() < 1e-5
    assert np.allclose(frame["probability"], [r["probability"] for r in local_rows], atol=1e-5)
    # The model's abstain flag, as `mnistflow predict` gives it, for every digit.
    assert frame["abstain"].tolist() == [r["abstain"] for r in local_rows]


@pytest.mark.usefixtures("spark")
@pytest.mark.slow
@pytest.mark.spark
def test_spark_on_a_folder_of_pngs_reports_bad_files_as_local_does(
    champion, test_split, tmp_path: Path
):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, digit in enumerate(test_split.images[:40, 0].numpy()):
        Image.fromarray(255 - digit).resize((84, 84)).save(folder / f"digit-{i:02d}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    Image.new("L", (50, 50), 200).save(folder / "blank.png")
    (folder / "notes.txt").write_text("not an image, and not named like one: not read")
    local = run_cli("predict", str(folder), "--output", str(tmp_path / "local.json"))
    spark = spark_run(str(folder), "--output", str(tmp_path / "spark.json"))
    assert local.exit_code == spark.exit_code == 3, spark.stderr
    assert "2 input(s) could not be read" in spark.stderr
    local_rows = {
        Path(r["source"]).name: r for r in json.loads((tmp_path / "local.json").read_text())
    }
    spark_rows = {
        Path(r["source"]).name: r for r in json.loads((tmp_path / "spark.json").read_text())
    }
    assert set(spark_rows) == {*local_rows, "corrupt.png", "blank.png"}
    for name, row in local_rows.items():
        assert spark_rows[name]["label"] == row["label"] and spark_rows[name]["error"] is None
        assert abs(spark_rows[name]["probability"] - row["probability"]) < 1e-5
    # The same sentence as the local path prints for each.
    for name in ("corrupt.png", "blank.png"):
        assert spark_rows[name]["label"] is None and spark_rows[name]["probability_3"] is None
        assert f"skipped {folder / name}: {spark_rows[name]['error']}" in local.stderr


@pytest.mark.usefixtures("spark")
@pytest.mark.slow
@pytest.mark.spark
def test_spark_scores_good_rows_and_reports_each_bad_one(champion, test_split, tmp_path: Path):
    good = test_split.images[:6, 0].numpy().reshape(-1, 784).astype(np.float64)
    hot, nan, short = good[0].copy(), good[1].copy(), good[2][:783]
    hot[5] = 300.0
    nan[7] = np.nan
    rows = [good[3], hot, good[4], nan, short, None, good[5]]
    names = ["ok-0", "hot", "ok-1", "not-finite", "short", "missing", "ok-2"]
    dataset = tmp_path / "odd.parquet"
    pq.write_table(
        pa.table({"source": names, "digit": pa.array(rows, pa.list_(pa.float64()))}), dataset
    )
    out = tmp_path / "out.csv"
    result = spark_run(str(dataset), "--column", "digit", "--output", str(out))
    assert result.exit_code == 3, result.stderr
    assert (
        "3 digits classified" in result.stderr and "4 input(s) could not be read" in result.stderr
    )
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""]).set_index("source")
    assert frame.loc["hot", "error"] == "pixel values must lie in 0-255; got 0.0 to 300.0."
    assert frame.loc["not-finite", "error"] == (
        "pixel values must be finite numbers (found NaN or infinity)."
    )
    assert "got shape (1, 783)" in frame.loc["short", "error"]
    assert frame.loc["missing", "error"].startswith("pixels must be")
    for name in ("hot", "not-finite", "short", "missing"):
        assert f"skipped {name}: {frame.loc[name, 'error']}" in result.stderr
        assert pd.isna(frame.loc[name, "label"])
    expected = local_probabilities("models:/mnist@champion", good[3:])
    scored = frame.loc[["ok-0", "ok-1", "ok-2"]]
    assert frame.loc[["ok-0", "ok-1", "ok-2"], "error"].isna().all()
    assert np.array_equal(scored["label"].astype(int), expected.argmax(1))
    assert np.abs(probabilities_of(scored) - expected).max() < 1e-5


@pytest.mark.usefixtures("spark")
@pytest.mark.slow
@pytest.mark.spark
def test_alias_moved_during_the_job_changes_nothing(
    registered, test_split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _, runs = registered
    # A store of our own (a copy; artifacts stay where they are) with a second version.
    shutil.copyfile(runs["folder"] / "mlflow.db", tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    mlflow.set_tracking_uri(store)
    second = mlflow.register_model(runs["poor"]["model_uri"], "mnist").version
    digits = test_split.images[:300, 0].numpy()
    np.save(tmp_path / "digits.npy", digits)
    v1, v2 = (local_probabilities(f"models:/mnist/{v}", digits) for v in ("1", second))
    assert np.abs(v1 - v2).max() > 1e-2  # the two versions answer differently

    real_spark_udf = mlflow.pyfunc.spark_udf

    def moved_first(spark: Any, model_uri: str, **kwargs: Any) -> Any:
        # After the command resolved @champion, before the job loads the model.
        client.set_registered_model_alias("mnist", "champion", second)
        return real_spark_udf(spark, model_uri, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "spark_udf", moved_first)
    out = tmp_path / "out.json"
    result = spark_run(str(tmp_path / "digits.npy"), "--output", str(out), "--tracking-uri", store)
    assert result.exit_code == 0, result.stderr
    assert client.get_model_version_by_alias("mnist", "champion").version == second
    frame = by_index(pd.DataFrame(json.loads(out.read_text())))
    assert (frame["model_version"] == "1").all() and (frame["model_uri"] == "models:/mnist/1").all()
    assert np.abs(probabilities_of(frame) - v1).max() < 1e-5
    assert "models:/mnist/1 (version 1) from models:/mnist@champion" in result.stderr


def test_spark_engine_without_pyspark_or_java_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    digits = tmp_path / "d.npy"
    np.save(digits, np.zeros((1, 28, 28)))
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark now raises ImportError
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    result = run_cli("predict", str(digits), "--engine", "spark")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: --engine spark needs pyspark (pip install 'mnistflow[spark]') and a Java 17+ "
        "runtime (apt-get install openjdk-17-jre-headless)."
    )
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    java_only = run_cli("predict", str(digits), "--engine", "spark")
    assert java_only.exit_code == 1 and "Traceback" not in java_only.stderr
    assert java_only.stderr.strip() == (
        "Error: --engine spark needs a Java 17+ runtime (apt-get install openjdk-17-jre-headless)."
    )


def test_spark_only_options_are_refused_on_the_local_engine(tmp_path: Path):
    result = run_cli("predict", str(tmp_path / "d.npy"), "--master", "local[2]")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: --master, --column and --env-manager apply to --engine spark only."
    )
