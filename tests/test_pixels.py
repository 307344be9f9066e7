"""One table of good and bad pixel arrays, through all three entry points that take pixels:
the logged model (as loaded from the registry, with its own copy of pixels.py), the server
(/invocations and /predict) and `mnistflow predict` on a .npy file. Each must accept the
same inputs, with the same labels, and refuse the others with the same sentence."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from conftest import run_cli
from mnistflow.lifecycle.pixels import SHAPES, PixelError, as_pixels
from mnistflow.serving import ServeConfig, create_app
from mnistflow.serving.model import ModelFollower


def stroke(dtype: Any = np.uint8, value: float = 255) -> np.ndarray:
    """A (28, 28) 'one': a vertical bar of `value` on black."""
    digit = np.zeros((28, 28), dtype)
    digit[4:24, 13:16] = value
    return digit


def with_pixel(value: float) -> np.ndarray:
    """A float64 (1, 28, 28) stroke with one pixel set to value."""
    digit = stroke(np.float64)
    digit[0, 0] = value
    return digit[None]


# fmt: off
@dataclass(frozen=True)
class Case:
    id: str
    data: Any  # a numpy array, or nested lists where numpy cannot hold the input
    refusal: str | None  # the sentence every entry point says; None: accepted
    json: bool = True  # JSON can carry it (it has no NaN nor infinity)
    npy: bool = True  # a .npy file can hold it (ragged or mixed lists it cannot)


NAN_INF = "pixel values must be finite numbers (found NaN or infinity)."
CASES = [
    # Accepted, in each documented shape and several dtypes.
    Case("one-28x28-uint8", stroke(), None),
    Case("Nx28x28-float64-at-the-edges",
         np.stack([stroke(np.float64, 255.0), stroke(np.float64, np.nextafter(255.0, 0))]),
         None),
    Case("Nx1x28x28-float32", np.stack([stroke(np.float32)[None]] * 3), None),
    Case("Nx784-int64", np.stack([stroke(np.int64).ravel()] * 2), None),
    Case("smallest-positive-float64", with_pixel(5e-324), None),
    # Out of range in the precision given, though float32 would round them into range.
    Case("just-above-255", with_pixel(255.00000000000003),
         "pixel values must lie in 0-255; got 0.0 to 255.00000000000003."),
    Case("just-below-0", with_pixel(-1e-300),
         "pixel values must lie in 0-255; got -1e-300 to 255.0."),
    Case("beyond-float32", with_pixel(1e39), "pixel values must lie in 0-255; got 0.0 to 1e+39."),
    Case("int-256", stroke(np.int64, 256)[None],
         "pixel values must lie in 0-255; got 0.0 to 256.0."),
    Case("nan", with_pixel(np.nan), NAN_INF, json=False),
    Case("inf", with_pixel(np.inf), NAN_INF, json=False),
    Case("minus-inf", with_pixel(-np.inf), NAN_INF, json=False),
    # Not grey levels.
    Case("bools", stroke() > 0, "pixels must be real numbers, not true/false."),
    Case("strings", np.full((28, 28), "7"), "pixels must be real numbers, not text."),
    Case("complex", stroke(np.complex128), "pixels must be real numbers, not complex128.",
         json=False),
    Case("nulls", [[None] * 28] * 28, "pixels must be real numbers, not mixed or missing values.",
         npy=False),
    Case("ragged", [[0] * 28] * 27 + [[0] * 5],
         "pixels must be numbers in nested lists of equal lengths (28x28 per digit).", npy=False),
    # Shapes.
    Case("27x27", np.zeros((3, 27, 27)),
         f"expected digits shaped {SHAPES}; got shape (3, 27, 27)."),
    Case("one-flat-784", np.zeros(784), f"expected digits shaped {SHAPES}; got shape (784,)."),
    Case("two-channels", np.zeros((2, 2, 28, 28)),
         f"expected digits shaped {SHAPES}; got shape (2, 2, 28, 28)."),
    Case("empty", np.zeros((0, 28, 28)), "no digits given."),
]
# fmt: on

Outcome = tuple[str, Any]  # ("accepted", labels) or ("refused", sentence)


@dataclass(frozen=True)
class EntryPoints:
    uri: str
    classifier: Any  # the logged model's MnistClassifier, loaded from the registry
    server: TestClient


@pytest.fixture(scope="module")
def entry_points(registered) -> EntryPoints:
    uri, _ = registered
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("mnist", "champion").version
    model = mlflow.pyfunc.load_model(client.get_model_version_download_uri("mnist", version))
    follower = ModelFollower("models:/mnist@champion", tracking_uri=uri)
    follower.start()
    server = TestClient(create_app(ServeConfig(tracking_uri=uri), follower))
    return EntryPoints(uri, model.unwrap_python_model(), server)


def through_model(entry: EntryPoints, data: Any) -> Outcome:
    try:
        labels, _ = entry.classifier.classify(data)
    except ValueError as e:  # the logged copy's PixelError: another class than ours
        assert type(e).__name__ == "PixelError", repr(e)
        return "refused", str(e)
    return "accepted", labels.tolist()


def through_server(entry: EntryPoints, path: str, data: Any) -> Outcome:
    lists = data.tolist() if isinstance(data, np.ndarray) else data
    body = {"inputs": lists} if path == "/invocations" else {"pixels": lists}
    response = entry.server.post(path, content=json.dumps(body, allow_nan=False),
                                 headers={"content-type": "application/json"})  # fmt: skip
    answer = response.json()
    if response.status_code == 200:
        return "accepted", [p["label"] for p in answer["predictions"]]
    assert response.status_code == 400, response.text
    if path == "/invocations":
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        message = answer["message"]
    else:
        message = answer["error"]
    return "refused", message[0].lower() + message[1:]  # the server capitalises sentences


def through_predict(entry: EntryPoints, data: np.ndarray, folder: Path) -> Outcome:
    path = folder / "digits.npy"
    np.save(path, data, allow_pickle=False)
    result = run_cli("predict", str(path), "--tracking-uri", entry.uri)
    if result.exit_code == 0:
        rows = result.stdout.splitlines()[1:]  # source,label,probability
        return "accepted", [int(row.split(",")[1]) for row in rows]
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    prefix = f"Error: {path}: "
    (line,) = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    return "refused", line.removeprefix(prefix)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_entry_point_accepts_and_refuses_alike(
    entry_points: EntryPoints, case: Case, tmp_path: Path
):
    outcomes = {"logged model": through_model(entry_points, case.data)}
    if case.json:
        for path in ("/invocations", "/predict"):
            outcomes[path] = through_server(entry_points, path, case.data)
    if case.npy:
        outcomes["mnistflow predict"] = through_predict(entry_points, case.data, tmp_path)
    if case.refusal is None:
        digits = len(as_pixels(case.data))
        labels = outcomes["logged model"][1]
        assert len(labels) == digits and all(0 <= label <= 9 for label in labels)
        assert outcomes == dict.fromkeys(outcomes, ("accepted", labels))
    else:
        assert outcomes == dict.fromkeys(outcomes, ("refused", case.refusal))


def test_the_logged_model_runs_its_own_copy_of_the_check(entry_points: EntryPoints):
    """The served model does not import mnistflow: pixels.py was logged beside it."""
    module = inspect.getmodule(type(entry_points.classifier))
    assert module is not None and module.as_pixels.__module__ == "pixels"
    assert module.as_pixels is not as_pixels


def test_the_check_refuses_before_the_cast_and_returns_float32():
    pixels = as_pixels(stroke(np.float64, 255.0))
    assert pixels.shape == (1, 1, 28, 28) and pixels.dtype == np.float32
    assert pixels.flags.c_contiguous and pixels.max() == 255
    # float32 would make this exactly 255.0, which is why the range is checked first.
    assert np.float32(255.00000000000003) == 255
    with pytest.raises(PixelError, match="0-255"):
        as_pixels(with_pixel(255.00000000000003))
