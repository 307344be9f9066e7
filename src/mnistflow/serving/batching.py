"""Micro-batching: the digits of requests that arrive together go through the model in one call.

A model call has a fixed cost (ONNX Runtime's dispatch, and for an ensemble every member's)
that one batched call pays once for all the requests in it, so throughput grows with
concurrency instead of with cores.

Everything happens on the event loop, without threads or locks. A request's pixels join the
pending batch and the request awaits its own answer. The batch goes to the model:
  - as soon as it holds ``max_batch`` digits (a request that would overflow it sends the
    pending batch first, and one larger than ``max_batch`` goes alone);
  - otherwise after ``max_wait`` seconds from its first request; with a wait of 0 (the
    default), at the end of the event loop's current pass: the requests whose bytes came
    in together share a call, and a lone request waits for nothing.
The model runs inline, as it did before batching: a hop to a worker thread costs more than a
batch of digits takes in ONNX Runtime. Each request gets exactly its own rows back; a batch
the model fails on is run again request by request, so that only the faulty one gets the
error. Requests keep the model they started with: a batch spanning an alias switch makes one
call per model.

Written here because no library we use batches across ASGI requests: MLflow's scoring server
runs one request per call, and the serving frameworks that do (Ray Serve, BentoML, Triton)
would replace this server rather than fit in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mnistflow.serving.model import ServedModel

Answer = tuple[np.ndarray, np.ndarray]  # labels (N,), probabilities (N, 10)
Classify = Callable[[ServedModel, np.ndarray], Answer]


@dataclass
class _Waiting:
    served: ServedModel
    pixels: np.ndarray
    answer: asyncio.Future[Answer]


class MicroBatcher:
    """Gathers concurrent requests' digits into one call of classify(served, pixels).

    classify is the per-request call (routes/predict.py's, which turns the model's failures
    into API errors); batches call the model directly and fall back to classify on failure.
    on_call, when given, is told the number of digits of each model call (for /metrics).
    """

    def __init__(
        self,
        classify: Classify,
        max_batch: int = 64,
        max_wait: float = 0.0,
        on_call: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait >= 0, not {max_batch}, {max_wait}")
        self.classify_one = classify
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_call = on_call or (lambda digits: None)
        self.waiting: list[_Waiting] = []
        self.rows = 0
        self.timer: asyncio.Handle | None = None

    async def classify(self, served: ServedModel, pixels: np.ndarray) -> Answer:
        """This request's labels and probabilities, computed in a batch with its neighbours."""
        rows = len(pixels)
        if rows >= self.max_batch:  # a full batch by itself (always, for --max-batch 1)
            self.on_call(rows)
            return self.classify_one(served, pixels)
        if self.rows + rows > self.max_batch:
            self.flush()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        self.waiting.append(_Waiting(served, pixels, answer))
        self.rows += rows
        if self.rows >= self.max_batch:
            self.flush()
        elif self.timer is None:
            self.timer = (
                loop.call_later(self.max_wait, self.flush)
                if self.max_wait > 0
                else loop.call_soon(self.flush)
            )
        return await answer

    def flush(self) -> None:
        """Send what is waiting to the model now: one call per model served."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.waiting, self.rows = self.waiting, [], 0
        while batch:
            served = batch[0].served
            same = [w for w in batch if w.served is served]
            batch = [w for w in batch if w.served is not served]
            self._run(served, same)

    def _run(self, served: ServedModel, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            self._answer_alone(batch[0])
            return
        try:
            # Fails on digits of different shapes (the routes send (n, 1, 28, 28) float32).
            pixels = np.concatenate([w.pixels for w in batch])
            self.on_call(len(pixels))
            labels, probabilities = served.classifier.classify(pixels)
        except Exception:
            for waiting in batch:  # only the request at fault gets the error
                self._answer_alone(waiting)
            return
        start = 0
        for waiting in batch:
            stop = start + len(waiting.pixels)
            if not waiting.answer.done():  # done: the client went away meanwhile
                waiting.answer.set_result((labels[start:stop], probabilities[start:stop]))
            start = stop

    def _answer_alone(self, waiting: _Waiting) -> None:
        if waiting.answer.done():
            return
        self.on_call(len(waiting.pixels))
        try:
            waiting.answer.set_result(self.classify_one(waiting.served, waiting.pixels))
        except Exception as e:
            waiting.answer.set_exception(e)
