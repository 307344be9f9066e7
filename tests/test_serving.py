"""The HTTP service in-process: every endpoint and error, MLflow parity of /invocations, the
API key, the size limits, following @champion while requests run, and a fuzzed schema."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import orjson
import psutil
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import MIRROR, MNISTFLOW, free_port, wait_until_up
from mnistflow import data
from mnistflow import serving as serving_package
from mnistflow.config import DataConfig
from mnistflow.inference.preprocess import image_to_digit
from mnistflow.lifecycle import pixels, registry
from mnistflow.serving import ServeConfig, create_app
from mnistflow.serving.model import ModelFollower, ServedModel

# -- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    uri: str
    client: MlflowClient
    run_id: str
    source: str  # where the trained model's files are, to register copies of it


@pytest.fixture(scope="module")
def trained(registered) -> Store:
    """The session's store (conftest): a small trained model as mnist version 1 @champion.

    Tests that move aliases register copies of it under their own names, so mnist@champion
    never moves.
    """
    uri, runs = registered
    client = MlflowClient(uri)
    # The artifacts' folder, not models:/m-...: MLflow resolves that against its global URI.
    source = client.get_model_version_download_uri("mnist", "1")
    return Store(uri, client, runs["good"]["run_id"], source)


@pytest.fixture(scope="module")
def follower(trained: Store) -> ModelFollower:
    """mnist@champion loaded once for the module."""
    follower = ModelFollower("models:/mnist@champion", tracking_uri=trained.uri)
    follower.start()
    return follower


def make_client(trained: Store, follower: ModelFollower, **config: Any) -> TestClient:
    """A client of a new app over the module's loaded model; no lifespan, so no polling."""
    return TestClient(create_app(ServeConfig(tracking_uri=trained.uri, **config), follower))


@pytest.fixture
def client(trained: Store, follower: ModelFollower) -> TestClient:
    return make_client(trained, follower)


def register_copy(trained: Store, name: str, source: str | None = None) -> str:
    """A new version of `name` (created if needed) holding the trained model, or `source`."""
    if not trained.client.search_registered_models(f"name = '{name}'"):
        trained.client.create_registered_model(name)
    mv = trained.client.create_model_version(
        name, source=source or trained.source, run_id=None if source else trained.run_id
    )
    return str(mv.version)


def digit_pixels(seed: int = 0) -> list[list[int]]:
    """A 28x28 'digit' (a thick stroke) as JSON-able grey levels."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((28, 28), dtype=np.int64)
    column = int(rng.integers(10, 18))
    pixels[4:24, column : column + 3] = 255
    return pixels.tolist()


def png(draw: bool = True, size: int = 200) -> bytes:
    """A PNG of a dark stroke on white paper (or a blank page)."""
    image = Image.new("L", (size, size), 255)
    if draw:
        ImageDraw.Draw(image).line([(size // 2, size // 6), (size // 2, size * 5 // 6)], 0, 16)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    """Until the in-process app's /ready says 200 (servers.wait_until_up is for processes)."""
    deadline = time.monotonic() + timeout
    while (status := client.get("/ready").status_code) != 200:
        assert time.monotonic() < deadline, f"/ready still says {status} after {timeout} s"
        time.sleep(0.05)


def assert_prediction(prediction: dict[str, Any]) -> None:
    assert set(prediction) == {"label", "probabilities", "confidence", "abstain"}
    assert len(prediction["probabilities"]) == 10
    assert sum(prediction["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert prediction["label"] == int(np.argmax(prediction["probabilities"]))
    assert prediction["confidence"] == prediction["probabilities"][prediction["label"]]


# -- health, version, metrics, docs, page --------------------------------------------------


def test_health_ready_version(client: TestClient, trained: Store):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "model": {"name": "mnist", "version": "1", "run_id": trained.run_id},
        "model_uri": "models:/mnist@champion",
        "last_error": None,
    }
    assert client.get("/version").json() == {
        "name": "mnist",
        "version": "1",
        "run_id": trained.run_id,
        "model_uri": "models:/mnist@champion",
    }


def test_metrics_count_requests_latencies_batches_and_model(client: TestClient):
    client.post("/invocations", json={"inputs": [digit_pixels(), digit_pixels(1)]})
    client.post("/predict", json={"pixels": digit_pixels()})
    client.post("/predict", content=b"{", headers={"content-type": "application/json"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    for expected in [
        'mnistflow_http_requests_total{handler="/invocations",status="200"} 1.0',
        'mnistflow_http_requests_total{handler="/predict",status="200"} 1.0',
        'mnistflow_http_requests_total{handler="/predict",status="400"} 1.0',
        'mnistflow_http_request_duration_seconds_count{handler="/invocations"} 1.0',
        'mnistflow_batch_size_sum{handler="/invocations"} 2.0',
        'mnistflow_batch_size_bucket{handler="/predict",le="1.0"} 1.0',
        "mnistflow_model_ready 1.0",
        'mnistflow_model_loads_total{outcome="loaded"} 1.0',
        # One request at a time: each is a model call of its own (micro-batching has no one
        # to gather; see the concurrent test below).
        "mnistflow_model_batch_size_count 2.0",
        "mnistflow_model_batch_size_sum 3.0",
    ]:
        assert expected in lines, expected
    (info,) = [line for line in lines if line.startswith("mnistflow_model_info")]
    assert 'name="mnist"' in info and 'version="1"' in info


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_answer(
    trained: Store, follower: ModelFollower
):
    """Micro-batching with the real model: 48 requests at once, on both routes, with one to
    three different digits each; every answer is what the model says for that request's
    digits alone (no row of another request), and the model was called fewer times."""
    app = create_app(ServeConfig(tracking_uri=trained.uri, max_batch=32), follower)
    model = follower.current
    assert model is not None
    # Random grey levels: every row gets probabilities of its own, so a row answered to the
    # wrong request shows.
    bodies = [np.random.default_rng(i).integers(0, 256, (1 + i % 3, 28, 28)) for i in range(48)]

    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(
                    http.post("/invocations", json={"inputs": body.tolist()})
                    if i % 2
                    else http.post("/predict", json={"pixels": body.tolist()})
                    for i, body in enumerate(bodies)
                )
            )

    responses = asyncio.run(send_all())
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        labels, probabilities = model.classifier.classify(body.astype(np.float32))
        assert [p["label"] for p in got] == labels.tolist()
        np.testing.assert_allclose([p["probabilities"] for p in got], probabilities, atol=1e-5)
    metrics = TestClient(app).get("/metrics").text.splitlines()
    (calls,) = [m for m in metrics if m.startswith("mnistflow_model_batch_size_count")]
    (digits,) = [m for m in metrics if m.startswith("mnistflow_model_batch_size_sum")]
    assert float(digits.split()[-1]) == sum(len(body) for body in bodies)
    assert 1 <= float(calls.split()[-1]) < len(bodies) / 2


def test_docs_work_offline_and_the_schema_documents_the_bodies(client: TestClient):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower()  # nothing outside can be reached
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    predict_body = paths["/predict"]["post"]["requestBody"]["content"]
    assert set(predict_body) == {"application/json", "multipart/form-data"}
    formats = paths["/invocations"]["post"]["requestBody"]["content"]["application/json"]
    assert [next(iter(s["required"])) for s in formats["schema"]["oneOf"]] == [
        "inputs",
        "instances",
        "dataframe_split",
    ]
    assert {"/health", "/ready", "/version", "/metrics"} <= set(paths)


def test_the_schema_carries_the_configured_limits_and_the_key(
    trained: Store, follower: ModelFollower
):
    client = make_client(trained, follower, max_images=7, api_key="k")
    schema = client.get("/openapi.json").json()
    invocations = schema["paths"]["/invocations"]["post"]
    body = invocations["requestBody"]["content"]["application/json"]["schema"]
    assert [f["properties"][f["required"][0]]["maxItems"] for f in body["oneOf"][:2]] == [7, 7]
    assert set(invocations["responses"]) >= {"200", "400", "401", "413", "415", "500", "503"}
    assert {next(iter(s)) for s in invocations["security"]} == {"APIKeyHeader", "HTTPBearer"}
    assert "security" not in schema["paths"]["/ready"]["get"]


def test_the_prediction_routes_are_tried_first(client: TestClient):
    """Starlette tries routes in order: the hot ones must not wait behind the docs routes."""
    paths = [getattr(route, "path", None) for route in client.app.router.routes]
    assert paths[:2] == ["/predict", "/invocations"]


def test_page_and_its_assets_are_served(client: TestClient):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    static = Path(serving_package.__file__).parent / "static"
    assert page.text == (static / "index.html").read_text()
    for asset in ("app.js", "style.css"):
        assert f"static/{asset}" in page.text
        served = client.get(f"/static/{asset}")
        assert (served.status_code, served.text) == (200, (static / asset).read_text())


# -- predictions ---------------------------------------------------------------------------


def test_invocations_answer_exactly_as_mlflow_models_serve(client: TestClient, trained: Store):
    """Same request formats, same response, same error shape as MLflow's scoring server
    (run in-process here on the same model: `mlflow models serve` is that code)."""
    model = mlflow.pyfunc.load_model(trained.client.get_model_version_download_uri("mnist", "1"))
    schema = model.metadata.get_input_schema()

    def mlflow_answer(body: dict[str, Any]) -> tuple[int, Any]:
        try:
            answer = scoring_server.invocations(
                orjson.dumps(body), "application/json", model, schema
            )
        except MlflowException as e:  # what its FastAPI wrapper turns into the response
            return e.get_http_status_code(), orjson.loads(e.serialize_as_json())
        return answer.status, orjson.loads(answer.response)

    digits = [digit_pixels(0), digit_pixels(1)]
    for body in ({"inputs": digits}, {"instances": digits}, {"inputs": digits, "params": {}}):
        status, expected = mlflow_answer(body)
        response = client.post("/invocations", json=body)
        assert (response.status_code, response.json()) == (status, expected) == (200, expected)
        assert response.headers["x-model-version"] == "1"

    # MLflow refuses dataframe_split for a tensor signature; here it takes rows of 784.
    rows = {"dataframe_split": {"columns": [f"px{i}" for i in range(784)], "data": []}}
    rows["dataframe_split"]["data"] = [np.ravel(d).tolist() for d in digits]
    assert client.post("/invocations", json=rows).json() == expected

    for bad in (
        {"inputs": digits, "instances": digits},  # two formats: BAD_REQUEST
        {"inputs": [[[0] * 28] * 27]},  # a wrong shape: INVALID_PARAMETER_VALUE
    ):
        status, mlflow_error = mlflow_answer(bad)
        response = client.post("/invocations", json=bad)
        assert response.status_code == status == 400
        assert set(response.json()) == {"error_code", "message"}
        assert response.json()["error_code"] == mlflow_error["error_code"]


def test_predict_json_one_digit_or_many(client: TestClient):
    one = client.post("/predict", json={"pixels": digit_pixels()})
    assert one.status_code == 200
    assert one.json()["model"] == {"name": "mnist", "version": "1"}
    (prediction,) = one.json()["predictions"]
    assert_prediction(prediction)

    many = client.post("/predict", json={"pixels": [digit_pixels(i) for i in range(3)]})
    assert len(many.json()["predictions"]) == 3
    assert many.json()["predictions"][0] == prediction


def test_predict_uploads_are_preprocessed_as_in_batch_inference(client: TestClient):
    image = png()
    upload = client.post("/predict", files=[("file", ("one.png", image, "image/png"))])
    assert upload.status_code == 200, upload.text
    expected = client.post("/predict", json={"pixels": image_to_digit(image).tolist()})
    assert upload.json() == expected.json()

    jpeg = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(jpeg, "JPEG")
    files = [("file", ("a.png", image, "image/png")), ("file", ("b.jpg", jpeg.getvalue(), ""))]
    both = client.post("/predict", files=files)
    assert both.status_code == 200
    assert [p["label"] for p in both.json()["predictions"]] == [
        upload.json()["predictions"][0]["label"]
    ] * 2


def test_each_prediction_says_how_sure_and_abstains_on_non_digits(
    client: TestClient, trained: Store
):
    """Digits and Fashion-MNIST images in one request: each row carries the label's
    probability and the abstain flag of the threshold logged with the model."""
    splits = data.load(DataConfig(mirror=str(MIRROR), limit_train=1))
    assert splits.nondigits is not None
    digits, clothes = splits.test.images[:60, 0], splits.nondigits[:60, 0]
    mixed = np.concatenate([digits.numpy(), clothes.numpy()]).tolist()
    answer = client.post("/predict", json={"pixels": mixed})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]

    source = trained.client.get_model_version_download_uri("mnist", "1")
    below = mlflow.pyfunc.load_model(source).model_config["abstain_below"]
    assert 0 < below < 1
    for row in rows:
        assert row["confidence"] == max(row["probabilities"]) == row["probabilities"][row["label"]]
        assert row["abstain"] == (row["confidence"] < below)
    digit_abstains = sum(row["abstain"] for row in rows[:60])
    clothes_abstains = sum(row["abstain"] for row in rows[60:])
    # Chosen to turn away 2% of validation digits: most clothes are refused, few digits.
    assert digit_abstains <= 6 and clothes_abstains >= 30, (digit_abstains, clothes_abstains)


# -- bad input: one 4xx JSON sentence, never a 5xx, and the service keeps serving -----------

TOO_BIG = 1_000_001
BAD_INPUTS = [
    # (id, path, request kwargs, status, phrase in the message). The pixels themselves are
    # checked by mnistflow.pixels: test_pixels.py runs one table through every entry point.
    ("not-an-image", "/predict", {"files": {"file": ("x.png", b"\x89PNG junk", "image/png")}},
     400, "image 1 (x.png): not a readable image"),
    ("blank-image", "/predict", {"files": {"file": ("blank.png", png(draw=False), "")}},
     400, "blank"),
    ("no-file-field", "/predict", {"files": {"other": ("x.png", png(), "image/png")}},
     400, "no image"),
    ("text-in-file-field", "/predict", {"data": {"file": "hello"},
                                        "files": {"x": ("x", b"", "")}}, 400, "files, not text"),
    ("no-pixels", "/predict", {"json": {"image": []}}, 400, '{"pixels"'),
    ("nan-is-not-json", "/invocations",
     {"content": b'{"inputs": [NaN]}', "headers": {"content-type": "application/json"}},
     400, "not valid JSON"),
    ("not-utf8", "/invocations",
     {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("pixels-in-split-rows", "/invocations",
     {"json": {"dataframe_split": {"data": [[255.00000000000003] * 784]}}}, 400,
     "pixel values must lie in 0-255; got 255.00000000000003"),
    ("no-format-key", "/invocations", {"json": {"data": []}}, 400, "exactly one of"),
    ("json-list", "/invocations", {"json": [1, 2]}, 400, "exactly one of"),
    ("split-without-data", "/invocations", {"json": {"dataframe_split": {"rows": []}}},
     400, "data field"),
    ("too-many-digits", "/invocations", {"json": {"inputs": [[[0] * 28] * 28] * 129}},
     400, "at most 128"),
    ("text-plain", "/predict", {"content": b"7", "headers": {"content-type": "text/plain"}},
     415, "application/json"),
    ("no-content-type", "/invocations", {"content": b"{}"}, 415, "application/json"),
    ("declared-too-large", "/predict",
     {"content": b"0" * TOO_BIG, "headers": {"content-type": "application/json"}},
     413, "over the limit of 1,000,000 bytes"),
    ("streamed-too-large", "/invocations",
     {"content": iter([b"0" * 600_000, b"0" * 600_000]),
      "headers": {"content-type": "application/json"}}, 413, "over the limit"),
    ("unknown-path", "/predicts", {"json": {}}, 404, "/docs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "request_kwargs", "status", "phrase"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_one_clear_4xx(
    client: TestClient, path: str, request_kwargs: dict[str, Any], status: int, phrase: str
):
    response = client.post(path, **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    if path == "/invocations":  # the shape of MLflow's errors
        assert set(body) == {"error_code", "message"}
        message = body["message"]
    else:
        assert set(body) == {"error"}
        message = body["error"]
    assert phrase.lower() in message.lower()
    assert message[0].isupper() and message.endswith(".") and "\n" not in message
    # ...and the service goes on serving.
    assert client.post("/predict", json={"pixels": digit_pixels()}).status_code == 200


def test_a_streamed_body_is_refused_before_it_is_all_read(trained: Store, follower: ModelFollower):
    """Driven through ASGI directly: TestClient would read the whole body before sending."""
    app = create_app(ServeConfig(tracking_uri=trained.uri), follower)
    chunks_read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:  # 100 MB, if it were all read
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"0" * 100_000, "more_body": chunks_read < 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],  # no content-length
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert chunks_read == 11  # refused at the chunk that passed 1,000,000 bytes


def test_wrong_method_is_a_json_405(client: TestClient):
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.json() == {"error": "Method Not Allowed"}


# JSON bodies to both prediction routes, good and bad: (path, body bytes).
JSON_REQUESTS = [
    ("/predict", orjson.dumps({"pixels": digit_pixels()})),
    ("/predict", orjson.dumps({"pixels": [digit_pixels(1), digit_pixels(2)]})),
    ("/invocations", orjson.dumps({"inputs": [digit_pixels(3)]})),
    ("/invocations", orjson.dumps({"dataframe_split": {"data": [[0] * 784]}})),
    ("/predict", orjson.dumps({"image": []})),
    ("/invocations", b'{"inputs": [NaN]}'),
    ("/invocations", orjson.dumps({"inputs": [[[0] * 28] * 28] * 129})),
    ("/invocations", orjson.dumps({"inputs": [[[300] * 28] * 28]})),
    ("/predict", b"0" * TOO_BIG),
    ("/invocations", b"0" * TOO_BIG),
]


def asgi_post(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
    """POST body to app through ASGI: the status, the headers, the body, and the scope as
    the app left it (the router adds the endpoint it chose)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    asyncio.run(app(scope, receive, send))
    start, *chunks = sent
    reply_headers = dict(start["headers"])
    return start["status"], reply_headers, b"".join(c.get("body", b"") for c in chunks), scope


@pytest.mark.parametrize("loaded", [True, False], ids=["model-loaded", "no-model-yet"])
def test_json_predictions_skip_the_apps_layers_and_answer_as_its_routes_do(
    trained: Store, follower: ModelFollower, loaded: bool
):
    """serving/fast_path.py answers unguarded JSON predictions before FastAPI routes them; a
    server with an API key sends them through the routes. Both answer alike, byte for byte."""
    if not loaded:
        follower = ModelFollower("runs:/nothing/model", tracking_uri=trained.uri)
    fast = create_app(ServeConfig(tracking_uri=trained.uri), follower)
    routed = create_app(ServeConfig(tracking_uri=trained.uri, api_key="k"), follower)
    statuses = set()
    for path, body in JSON_REQUESTS:
        status, headers, answer, scope = asgi_post(fast, path, body, [])
        routed_status, routed_headers, routed_answer, routed_scope = asgi_post(
            routed, path, body, [(b"x-api-key", b"k")]
        )
        assert "endpoint" not in scope and routed_scope["endpoint"].__name__ in path
        assert (status, answer) == (routed_status, routed_answer), (path, body[:60])
        for header in (b"content-type", b"content-length", b"x-model-version"):
            assert headers.get(header) == routed_headers.get(header), header
        statuses.add(status)
    assert statuses == ({200, 400, 413} if loaded else {503, 413})
    # Both counted in /metrics under the route, as the app's middleware counts them.
    metrics = TestClient(fast).get("/metrics").text
    assert 'mnistflow_http_requests_total{handler="/invocations",status="' in metrics


def serving(trained: Store, classifier: Any) -> TestClient:
    """A client of an app serving classifier as mnist version 7."""
    follower = ModelFollower("runs:/nothing/model", tracking_uri=trained.uri)
    follower.current = ServedModel("mnist", "7", None, "nowhere", classifier)
    app = create_app(ServeConfig(tracking_uri=trained.uri), follower)
    return TestClient(app, raise_server_exceptions=False)


class Failing:
    """A model whose runtime fails: not the client's fault, whatever the exception type."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def classify(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        raise self.error


@pytest.mark.parametrize("error", [ValueError("weights are corrupt"), RuntimeError("OOM")])
def test_a_model_that_fails_is_a_500_with_the_detail_in_the_log(
    trained: Store, error: Exception, caplog: pytest.LogCaptureFixture
):
    client = serving(trained, Failing(error))
    with caplog.at_level(logging.ERROR, logger="mnistflow.serving"):
        invocation = client.post("/invocations", json={"inputs": [digit_pixels()]})
        predict = client.post("/predict", json={"pixels": digit_pixels()})
    message = "The model failed on this input; the server log has the details."
    assert (invocation.status_code, invocation.json()) == (
        500,
        {"error_code": "INTERNAL_ERROR", "message": message},
    )
    assert (predict.status_code, predict.json()) == (500, {"error": message})
    assert str(error) not in invocation.text + predict.text  # details stay in the log
    records = [r for r in caplog.records if r.name == "mnistflow.serving.routes.predict"]
    assert len(records) == 2
    for record in records:
        assert record.getMessage() == "model mnist version 7 failed on 1 digit(s)"
        assert record.exc_info is not None and record.exc_info[1] is error


def test_pixels_the_model_refuses_are_still_the_clients_fault(trained: Store):
    """The logged model checks pixels with its own copy of pixels.py (a class of its own):
    if it is stricter than the server's, its refusal is a 400 with its sentence."""
    spec = importlib.util.spec_from_file_location("pixels", Path(pixels.__file__))
    assert spec is not None and spec.loader is not None
    logged_copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(logged_copy)
    assert logged_copy.PixelError is not pixels.PixelError
    client = serving(trained, Failing(logged_copy.PixelError("pixels must be sharper.")))
    response = client.post("/invocations", json={"inputs": [digit_pixels()]})
    assert (response.status_code, response.json()) == (
        400,
        {"error_code": "INVALID_PARAMETER_VALUE", "message": "Pixels must be sharper."},
    )


def test_a_fault_of_our_own_is_a_generic_500(trained: Store):
    class Garbled:  # answers, but not with labels and probabilities
        def classify(self, data: Any) -> tuple[Any, Any]:
            return None, None

    response = serving(trained, Garbled()).post("/invocations", json={"inputs": [digit_pixels()]})
    assert (response.status_code, response.json()) == (
        500,
        {
            "error_code": "INTERNAL_ERROR",
            "message": "Internal server error; the server log has the details.",
        },
    )


# -- API key -------------------------------------------------------------------------------


def test_api_key_guards_only_the_predict_endpoints(trained: Store, follower: ModelFollower):
    client = make_client(trained, follower, api_key="s3cret")
    body = {"pixels": digit_pixels()}
    assert client.post("/predict", json=body).status_code == 401
    wrong = client.post("/predict", json=body, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401
    assert "API key" in wrong.json()["error"]
    invocations = client.post("/invocations", json={"inputs": [digit_pixels()]})
    assert invocations.status_code == 401
    assert invocations.json()["error_code"] == "UNAUTHENTICATED"

    assert client.post("/predict", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    bearer = {"Authorization": "Bearer s3cret"}
    assert client.post("/predict", json=body, headers=bearer).status_code == 200
    for path in ("/health", "/ready", "/version", "/metrics", "/", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path


# -- following @champion -------------------------------------------------------------------


def test_not_ready_until_the_model_is_loaded_then_loads_in_the_background(trained: Store):
    app = create_app(ServeConfig(tracking_uri=trained.uri, poll_seconds=0.1))
    client = TestClient(app)  # no lifespan yet: nothing loads
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert client.post("/predict", json={"pixels": digit_pixels()}).status_code == 503
    assert client.get("/version").status_code == 503

    with TestClient(app) as running:  # the lifespan loads it in a worker thread
        wait_ready(running)
        assert running.get("/version").json()["version"] == "1"


def test_follows_champion_during_a_stream_of_requests(trained: Store):
    v1, v2 = register_copy(trained, "follow"), register_copy(trained, "follow")
    registry.make_champion(trained.client, "follow", v1, "first")
    config = ServeConfig(
        model_uri="models:/follow@champion", tracking_uri=trained.uri, poll_seconds=0.1
    )
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def stream(client: TestClient) -> None:
        while not stop.is_set() and len(answers) < 20_000:
            response = client.post("/invocations", json={"inputs": [digit_pixels()]})
            answers.append((response.status_code, response.headers.get("x-model-version", "")))

    def served_versions_after(move: Any, version: str) -> None:
        start = len(answers)
        move()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            answer == (200, version) for answer in answers[start:]
        ):
            time.sleep(0.05)

    with TestClient(create_app(config)) as client:
        wait_ready(client)
        worker = threading.Thread(target=stream, args=(client,))
        worker.start()
        try:
            served_versions_after(
                lambda: registry.make_champion(trained.client, "follow", v2, "better"), v2
            )
            served_versions_after(lambda: registry.rollback(trained.client, "follow"), v1)
            time.sleep(0.3)  # a few more answers from the rolled-back version
        finally:
            stop.set()
            worker.join(timeout=30)
        assert client.get("/version").json()["version"] == v1

    assert answers and all(status == 200 for status, _ in answers)
    versions = [version for _, version in answers]
    # One switch each way, no flapping: 1...1 2...2 1...1
    switches = [b for a, b in itertools.pairwise(versions) if a != b]
    assert switches == [v2, v1]


def test_a_broken_version_leaves_the_old_one_serving(
    trained: Store, caplog: pytest.LogCaptureFixture
):
    good = register_copy(trained, "fragile")
    registry.make_champion(trained.client, "fragile", good, "works")
    follower = ModelFollower("models:/fragile@champion", tracking_uri=trained.uri)
    follower.start()
    client = make_client(trained, follower)

    broken = register_copy(trained, "fragile", source="/nonexistent/path")
    registry.make_champion(trained.client, "fragile", broken, "will not load")
    with caplog.at_level(logging.WARNING, logger="mnistflow.serving"):
        assert follower.refresh() is None
        assert follower.refresh() is None  # not retried (nor logged) again at once
    (warning,) = [r for r in caplog.records if r.name == "mnistflow.serving.model"]
    assert f"version {broken} failed to load" in warning.getMessage()
    assert f"still serving version {good}" in warning.getMessage()

    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["model"]["version"] == good
    assert ready["last_error"]["version"] == broken
    assert "/nonexistent/path" in ready["last_error"]["message"]
    answer = client.post("/predict", json={"pixels": digit_pixels()})
    assert answer.status_code == 200 and answer.json()["model"]["version"] == good

    fixed = register_copy(trained, "fragile")
    registry.make_champion(trained.client, "fragile", fixed, "fixed")
    assert follower.refresh() is not None
    ready = client.get("/ready").json()
    assert ready["model"]["version"] == fixed and ready["last_error"] is None


def test_serve_refuses_to_start_without_its_model(trained: Store, cli):
    result = cli("serve", "--model-uri", "models:/nope@champion", "--tracking-uri", trained.uri)
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert "Cannot load the model models:/nope@champion" in message
    assert "the registry has:" in message and "@champion=1" in message  # names what exists
    assert "Traceback" not in result.stderr


def test_one_process_runs_its_model_in_a_thread_and_each_of_several_inline(
    trained: Store, follower: ModelFollower
):
    """Measured choices (serving/batching.py): the thread helps one process use a second
    core; workers that already share the cores are faster without it."""
    for workers, threaded in ((1, True), (2, False)):
        app = create_app(ServeConfig(tracking_uri=trained.uri, workers=workers), follower)
        assert (app.state.service.batcher.model_thread is not None) is threaded


def worker_processes(proc: Any) -> list[psutil.Process]:
    """The `serve --workers` process's workers (spawned interpreters), alive."""
    children = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in children if "spawn_main" in " ".join(p.cmdline()) and p.is_running()]


@pytest.mark.server
@pytest.mark.slow
def test_workers_share_the_port_the_key_and_one_count_and_are_replaced(trained: Store, spawn):
    """`serve --workers 2`: two processes answer on one port, each with the model and the
    API key; /metrics, whichever worker answers it, counts the requests of both; a worker
    killed is replaced and the port goes on answering."""
    port = free_port()
    key = "key-7f3a9c"
    args = ["serve", "--port", str(port), "--tracking-uri", trained.uri, "--workers", "2"]
    proc = spawn([*MNISTFLOW, *args, "--api-key", key])
    base = f"http://127.0.0.1:{port}"
    wait_until_up(f"{base}/ready", proc, timeout=120)
    deadline = time.monotonic() + 120
    while len(worker_processes(proc)) < 2:  # the second may still be loading its model
        assert time.monotonic() < deadline, "the second worker did not start"
        time.sleep(0.2)
    # The key reached the workers, but not through their command line or environment.
    for worker in worker_processes(proc):
        assert key not in " ".join(worker.cmdline()) + " ".join(worker.environ().values())

    bodies = [np.random.default_rng(i).integers(0, 256, (1, 28, 28)) for i in range(24)]
    model = ModelFollower("models:/mnist@champion", tracking_uri=trained.uri)
    model.start()
    assert model.current is not None

    def ask(body: np.ndarray) -> list[int]:
        with httpx.Client(base_url=base, headers={"X-API-Key": key}) as http:  # own connection
            response = http.post("/invocations", json={"inputs": body.tolist()})
            assert response.status_code == 200, response.text
            return [row["label"] for row in response.json()["predictions"]]

    def ask_all() -> None:
        with ThreadPoolExecutor(8) as pool:
            labels = list(pool.map(ask, bodies))
        for body, got in zip(bodies, labels, strict=True):
            assert got == model.current.classifier.classify(body.astype(np.float32))[0].tolist()

    ask_all()
    assert httpx.post(f"{base}/invocations", json={"inputs": bodies[0].tolist()}).status_code == 401
    counted = 'mnistflow_http_requests_total{handler="/invocations",status="200"} 24.0'
    for _ in range(6):  # on new connections: either worker may answer
        assert counted in httpx.get(f"{base}/metrics").text.splitlines()

    killed = worker_processes(proc)[0]
    killed.kill()
    killed.wait(10)
    deadline = time.monotonic() + 120
    while len(worker_processes(proc)) < 2 or killed in worker_processes(proc):
        assert proc.poll() is None and time.monotonic() < deadline, "no worker replaced it"
        time.sleep(0.2)
    wait_until_up(f"{base}/ready", proc, timeout=60)
    ask_all()


# -- the schema, fuzzed: whatever is sent, never a 5xx -------------------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(
    trained: Store, follower: ModelFollower, mode: GenerationMode
):
    """Requests made from the OpenAPI schema, valid ones and deliberately invalid ones: the
    responses must match the schema and none may be a 5xx."""
    app = create_app(ServeConfig(tracking_uri=trained.uri), follower)
    # 413 (too many digits make a body over the size limit) is a refusal too.
    refusals = ["400", "401", "404", "405", "406", "413", "415", "422"]
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": refusals}}}
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        # A schema cannot say "a picture of a digit" (a blank PNG is schema-valid), so a
        # valid-looking request may still be refused, with a 4xx and a reason.
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    fuzz()
