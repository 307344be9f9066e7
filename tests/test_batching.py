"""Micro-batching (mnistflow.serving.batching): concurrent requests share model calls, each
gets exactly its own rows back, batches respect their size and wait limits, and a failure
reaches only the request at fault. The real model behind the HTTP routes: test_serving.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from mnistflow.serving.batching import MicroBatcher
from mnistflow.serving.model import ServedModel


class Recorder:
    """A model whose answer for a row depends on that row only, and that records each call.

    Its "probabilities" are the row's first ten pixels, so a row given to the wrong request
    shows; a digit whose first pixel is 255 makes it fail, as a model refusing input would.
    """

    def __init__(self) -> None:
        self.calls: list[int] = []

    def classify(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.asarray(data, dtype=np.float32).reshape(len(data), -1)
        self.calls.append(len(pixels))
        if (pixels[:, 0] == 255).any():
            raise ValueError("a pixel of 255 in the corner")
        return pixels[:, :10].argmax(axis=1), pixels[:, :10].copy()


def served(model: Recorder, version: str = "1") -> ServedModel:
    return ServedModel("digits", version, None, "memory", model)


def digits(request: int, rows: int) -> np.ndarray:
    """rows digits that say which request and row they belong to."""
    pixels = np.zeros((rows, 28, 28), dtype=np.float32)
    pixels[:, 0, 1] = request
    pixels[:, 0, 2] = np.arange(rows)
    return pixels


def one_by_one(served: ServedModel, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return served.classifier.classify(pixels)


MODE = {"model_thread": True}


@pytest.fixture(autouse=True, params=[True, False], ids=["model-thread", "inline"])
def model_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs twice: with the model in its own thread (a server of one process),
    and inline on the event loop (each of several workers)."""
    monkeypatch.setitem(MODE, "model_thread", request.param)


def make(classify: Any, **settings: Any) -> MicroBatcher:
    return MicroBatcher(classify, model_thread=MODE["model_thread"], **settings)


def gather(batcher: MicroBatcher, requests: list[tuple[ServedModel, np.ndarray]]) -> list[Any]:
    async def all_at_once() -> list[Any]:
        calls = [batcher.classify(model, pixels) for model, pixels in requests]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(all_at_once())


def assert_own_rows(answer: tuple[np.ndarray, np.ndarray], pixels: np.ndarray) -> None:
    labels, probabilities = answer
    expected = pixels.reshape(len(pixels), -1)[:, :10]
    np.testing.assert_array_equal(probabilities, expected)
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))


def test_requests_that_arrive_together_share_one_call_and_get_their_own_rows():
    model = Recorder()
    calls: list[int] = []
    batcher = make(one_by_one, max_batch=64, on_call=calls.append)
    model_served = served(model)
    requests = [(model_served, digits(i, rows)) for i, rows in enumerate([1, 3, 1, 2, 5, 1])]
    answers = gather(batcher, requests)
    for (_, pixels), answer in zip(requests, answers, strict=True):
        assert_own_rows(answer, pixels)
    assert model.calls == [13] and calls == [13]


def test_a_batch_never_exceeds_max_batch_unless_one_request_does():
    model = Recorder()
    batcher = make(one_by_one, max_batch=8)
    sizes = [3, 3, 3, 3, 9, 2, 1, 8]
    model_served = served(model)
    requests = [(model_served, digits(i, rows)) for i, rows in enumerate(sizes)]
    answers = gather(batcher, requests)
    for (_, pixels), answer in zip(requests, answers, strict=True):
        assert_own_rows(answer, pixels)
    # 3+3 (the next 3 would overflow), the 9 alone, 3+3+2 (full), the 8 alone (a full
    # batch by itself), then the 1 left waiting, at the end of the loop's pass.
    assert model.calls == [6, 9, 8, 8, 1]


def test_max_batch_one_calls_the_model_per_request():
    model = Recorder()
    model_served = served(model)
    requests = [(model_served, digits(i, 2)) for i in range(5)]
    answers = gather(make(one_by_one, max_batch=1), requests)
    for (_, pixels), answer in zip(requests, answers, strict=True):
        assert_own_rows(answer, pixels)
    assert model.calls == [2] * 5


def test_only_the_request_at_fault_gets_the_error():
    model = Recorder()
    bad = digits(2, 3)
    bad[1, 0, 0] = 255
    model_served = served(model)
    requests = [(model_served, digits(i, 2)) for i in range(5)]
    requests[2] = (model_served, bad)
    answers = gather(make(one_by_one), requests)
    assert isinstance(answers[2], ValueError)
    for i in (0, 1, 3, 4):
        assert_own_rows(answers[i], requests[i][1])
    assert model.calls == [11, 2, 2, 3, 2, 2]  # the batch, then each request alone


def test_digits_of_different_shapes_are_answered_each_alone():
    model = Recorder()
    model_served = served(model)
    flat = digits(1, 2).reshape(2, 1, 28, 28)
    requests = [(model_served, digits(0, 1)), (model_served, flat)]
    answers = gather(make(one_by_one), requests)
    for (_, pixels), answer in zip(requests, answers, strict=True):
        assert_own_rows(answer, pixels)
    assert model.calls == [1, 2]


def test_requests_keep_the_model_they_started_with():
    old, new = Recorder(), Recorder()
    models = [served(new, "2"), served(old, "1")]
    requests = [(models[i % 2], digits(i, 1)) for i in range(6)]
    answers = gather(make(one_by_one), requests)
    for (_, pixels), answer in zip(requests, answers, strict=True):
        assert_own_rows(answer, pixels)
    assert old.calls == [3] and new.calls == [3]


def test_a_request_waits_at_most_max_wait_for_company():
    model = Recorder()
    wait = 0.3
    batcher = make(one_by_one, max_batch=64, max_wait=wait)
    model_served = served(model)

    async def first_then_second() -> list[float]:
        started = time.monotonic()

        async def request(i: int, delay: float) -> float:
            await asyncio.sleep(delay)
            assert_own_rows(await batcher.classify(model_served, digits(i, 1)), digits(i, 1))
            return time.monotonic() - started

        return await asyncio.gather(request(0, 0.0), request(1, 0.05))

    first, second = asyncio.run(first_then_second())
    # The first waited for the second, which joined its call: both answered together, no
    # sooner than the wait and no later than the wait plus a busy machine's slack.
    assert model.calls == [2]
    assert wait <= first < wait + 2.0 and abs(second - first) < 0.05

    # With no wait, a lone request is answered on the loop's next pass, not after a timer.
    async def alone() -> float:
        started = time.monotonic()
        await make(one_by_one, max_wait=0.0).classify(served(model), digits(9, 1))
        return time.monotonic() - started

    assert asyncio.run(alone()) < wait


def test_a_full_batch_goes_before_its_wait_is_over():
    model = Recorder()
    batcher = make(one_by_one, max_batch=4, max_wait=30.0)
    started = time.monotonic()
    model_served = served(model)
    answers = gather(batcher, [(model_served, digits(i, 2)) for i in range(2)])
    assert time.monotonic() - started < 10 and model.calls == [4] and len(answers) == 2


@pytest.mark.parametrize("max_batch, max_wait", [(0, 0.0), (8, -1.0)])
def test_impossible_settings_are_refused(max_batch: int, max_wait: float):
    with pytest.raises(ValueError, match="max_batch"):
        make(one_by_one, max_batch=max_batch, max_wait=max_wait)
