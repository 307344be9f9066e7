"""Batch inference and preprocessing: users' own images, arrays and IDX files; train/serve
parity between the trained module, the logged pyfunc and the ONNX export."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MIRROR, run_cli
from mnistflow import data
from mnistflow.config import DataConfig, preset_config
from mnistflow.engines.plain import evaluate, fit
from mnistflow.inference import batch as inference
from mnistflow.inference import preprocess
from mnistflow.lifecycle import logged_models
from mnistflow.lifecycle.export import onnx_probabilities


def as_user_photo(digit: np.ndarray, size: int = 200, colour: bool = True) -> bytes:
    """An MNIST digit as a user might send it: large, dark ink on a light tinted page."""
    ink = Image.fromarray(255 - digit.astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    if colour:
        ink = Image.merge("RGB", [ink.point(lambda v, f=f: int(v * f)) for f in (0.95, 0.9, 0.8)])
    buffer = io.BytesIO()
    ink.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_preprocessing_recovers_mnist_from_large_inverted_colour_photos(test_split):
    digits = test_split.images[:50, 0].numpy().astype(np.float32)
    recovered = np.stack([preprocess.image_to_digit(as_user_photo(d)) for d in digits])
    assert recovered.shape == (50, 28, 28) and recovered.dtype == np.float32
    assert recovered.min() >= 0 and recovered.max() <= 255
    correlation = [
        np.corrcoef(r.ravel(), d.ravel())[0, 1] for r, d in zip(recovered, digits, strict=True)
    ]
    assert np.median(correlation) > 0.9
    # Centre of mass lands where MNIST puts it.
    ys, xs = np.indices((28, 28))
    weights = recovered.sum(axis=(1, 2))
    assert np.allclose((recovered * ys).sum(axis=(1, 2)) / weights, 14, atol=1)
    assert np.allclose((recovered * xs).sum(axis=(1, 2)) / weights, 14, atol=1)


def test_preprocessing_handles_transparency_and_refuses_blank_or_garbage():
    canvas = Image.new("RGBA", (300, 300), (0, 0, 0, 0))  # a transparent drawing surface
    for y in range(60, 240):
        for x in range(140, 160):
            canvas.putpixel((x, y), (0, 0, 0, 255))  # a black "1"
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    one = preprocess.image_to_digit(buffer.getvalue())
    assert one[:, 14].sum() > one[:, 5].sum()  # the stroke sits in the middle column
    blank = io.BytesIO()
    Image.new("L", (50, 50), 200).save(blank, "PNG")
    with pytest.raises(preprocess.ImageError, match="blank"):
        preprocess.image_to_digit(blank.getvalue())
    with pytest.raises(preprocess.ImageError, match="not a readable image"):
        preprocess.image_to_digit(b"GIF89a but not really")


def test_predict_a_folder_of_user_images_with_one_bad_file(champion, test_split, tmp_path: Path):
    folder = tmp_path / "mine"
    folder.mkdir()
    digits = test_split.images[:12, 0].numpy()
    for i, d in enumerate(digits):
        (folder / f"digit-{i:02d}.jpg").write_bytes(as_user_photo(d))
    (folder / "notes.png").write_text("this is not an image")
    output = tmp_path / "out.json"
    result = run_cli("predict", str(folder), "--output", str(output))
    assert result.exit_code == 3, result.stderr  # some inputs failed, the rest were classified
    assert "skipped" in result.stderr and "notes.png" in result.stderr
    rows = json.loads(output.read_text())
    assert [Path(r["source"]).name for r in rows] == [f"digit-{i:02d}.jpg" for i in range(12)]
    assert all(0 <= r["label"] <= 9 and 0 < r["probability"] <= 1 for r in rows)
    labels = test_split.labels[:12].numpy()
    assert np.mean([r["label"] for r in rows] == labels) >= 0.75


def test_predict_idx_reports_accuracy_and_writes_csv(champion, tmp_path: Path):
    output = tmp_path / "test.csv"
    images = MIRROR / "t10k-images-idx3-ubyte.gz"
    result = run_cli("predict", str(images), "--output", str(output))
    assert result.exit_code == 0, result.stderr
    assert "10000 digits classified" in result.stderr and "accuracy" in result.stderr
    lines = output.read_text().splitlines()
    assert lines[0] == "source,label,probability,abstain,true_label" and len(lines) == 10001
    # The rows flagged are those under the model's threshold, and the summary counts them.
    below = inference.load_classifier("models:/mnist@champion")[0].abstain_below
    rows = list(csv.DictReader(lines))
    assert all((row["abstain"] == "True") == (float(row["probability"]) < below) for row in rows)
    unsure = sum(row["abstain"] == "True" for row in rows)
    assert 0 < unsure < 1000 and f"not sure of {unsure}" in result.stderr


def test_predict_npy_to_stdout_and_bad_arrays(champion, test_split, tmp_path: Path):
    good = tmp_path / "digits.npy"
    np.save(good, test_split.images[:5, 0].numpy())
    result = run_cli("predict", str(good))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "source,label,probability,abstain"
    assert len(result.stdout.splitlines()) == 6
    # Every way an array can be wrong is in test_pixels.py; here, that it ends as one line.
    hot = tmp_path / "hot.npy"
    np.save(hot, np.full((2, 28, 28), 300.0))
    bad = run_cli("predict", str(hot))
    assert bad.exit_code == 1 and bad.stdout == ""
    refusal = "pixel values must lie in 0-255; got 300.0 to 300.0."
    assert bad.stderr.strip() == f"Error: {hot}: {refusal}"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing/out.csv", "the folder {tmp}/missing does not exist"),
        ("file.txt/out.csv", "{tmp}/file.txt is a file"),
        ("out.txt", "the name must end in .csv or .json"),
        ("folder.csv", "it is a folder"),
        ("/proc/out.csv", "no file can be created in /proc (No such file or directory)"),
        ("/sys/out.json", "no file can be created in /sys (Permission denied)"),
    ],
)
def test_predict_refuses_an_unwritable_output_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, reason: str
):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "folder.csv").mkdir()
    output = tmp_path / name
    # Neither the inputs nor the model exist: the output is checked before either is read.
    monkeypatch.setattr(
        inference, "collect", lambda paths: pytest.fail("read the inputs before the check")
    )
    result = run_cli(
        "predict", str(tmp_path / "nothing.npy"), "--output", str(output),
        "--model-uri", "models:/nothing@here", "--tracking-uri", f"sqlite:///{tmp_path}/no.db",
    )  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    expected = f"Error: Cannot write results to {output}: {reason.format(tmp=tmp_path)}."
    assert result.stderr.strip() == expected
    assert not (tmp_path / "no.db").exists()  # no store was created either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder.csv"]


def test_predict_output_check_leaves_an_existing_file_as_it_is(tmp_path: Path):
    existing = tmp_path / "old.csv"
    existing.write_text("kept\n")
    inference.check_output(existing)  # writable: no error, and nothing written yet
    assert existing.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]  # the probe is gone


def test_predict_refuses_empty_folders_and_unknown_models(champion, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("predict", str(empty))
    assert result.exit_code == 1 and "holds no images" in result.stderr
    digits = tmp_path / "d.npy"
    np.save(digits, np.zeros((1, 28, 28)))
    unknown = run_cli("predict", str(digits), "--model-uri", "models:/mnist@nosuchalias")
    assert (
        unknown.exit_code == 1 and "Cannot load model models:/mnist@nosuchalias" in unknown.stderr
    )
    assert "@champion=1" in unknown.stderr  # it names what does exist
    assert "Traceback" not in unknown.stderr


@pytest.mark.slow
def test_trained_module_pyfunc_and_onnx_agree_on_the_whole_test_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = data.load(DataConfig(mirror=str(MIRROR), limit_train=2000))
    result = fit(preset_config("fast", epochs=1, device="cpu"), splits.train, splits.val)
    in_training = evaluate(result.model, splits.test).predictions.numpy()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("parity")
    with mlflow.start_run():
        logged = logged_models.log_torch_models(
            result.model, splits.test.images[:64], tmp_path, abstain_below=0.5
        )
    pixels = splits.test.images[:, 0].numpy().astype(np.float32)  # (10000, 28, 28)
    pyfunc = mlflow.pyfunc.load_model(logged.model_uri)
    through_mlflow = np.asarray(pyfunc.predict(pixels)["label"])
    local = Path(
        mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "m"))
    )
    onnx_path = next(local.rglob("model.onnx"))
    through_onnx = onnx_probabilities(onnx_path, pixels[:, None]).argmax(1)
    assert np.array_equal(in_training, through_mlflow)
    assert np.array_equal(in_training, through_onnx)
    assert logged.onnx_max_abs_diff < 1e-4
    # The torch model logged beside it gives the same answers too.
    torch_model = mlflow.pytorch.load_model(logged.pytorch_uri)
    with torch.inference_mode():
        via_torch = torch_model(torch.from_numpy(pixels[:500, None])).argmax(1).numpy()
    assert np.array_equal(in_training[:500], via_torch)
