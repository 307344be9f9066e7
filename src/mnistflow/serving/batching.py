"""Micro-batching: the digits of requests that arrive together go through the model in one call.

A model call has a fixed cost (ONNX Runtime's dispatch, and for an ensemble every member's)
that one batched call pays once for all the requests in it, so throughput grows with
concurrency instead of with cores.

In a server of one process the model runs in one thread of its own; the event loop only reads
requests, forms batches and answers. A request's pixels join the pending batch and the request
awaits its own answer. The batch goes to the model:
  - as soon as it holds ``max_batch`` digits (a request that would overflow it sends the
    pending batch first, and one larger than ``max_batch`` goes alone);
  - otherwise after ``max_wait`` seconds from its first request; with a wait of 0 (the
    default), at the end of the event loop's current pass: the requests whose bytes came
    in together share a call, and a lone request waits for nothing;
  - but while the model thread is busy, a batch that is not full waits for it, and the
    requests that arrive meanwhile join it: the busier the server, the larger the batches.
Why a thread: ONNX Runtime releases the GIL while it computes, so the loop reads, parses and
answers requests on one core while the model computes on the other. A digit of the fast
network costs about 80 µs on this project's 2-core test host (an ensemble several times
that), as much as a request's HTTP and JSON; run inline, each batch stopped the loop for as
long as it took. With several worker processes (`serve --workers`), which already share the
cores, each runs its model inline (model_thread=False): two threads per process then only
contend for the cores and the GIL. Measured by hand with wrk on the 2-core host, alternating
5 s rounds: one process, at concurrency 64, 3,960-3,980 requests/s with the thread against
3,690-3,750 inline (at 16 inline was ahead, 3,480-3,610 against 3,060-3,380); two workers, at
64, 5,650-6,220 inline against 5,340-5,720, p99 16-19 against 20-22 ms.

Each request gets exactly its own rows back; a batch the model fails on is run again request
by request, so that only the faulty one gets the error. Requests keep the model they started
with: a batch spanning an alias switch makes one call per model.

Written here because no library we use batches across ASGI requests: MLflow's scoring server
runs one request per call, and the serving frameworks that do (Ray Serve, BentoML, Triton)
would replace this server rather than fit in it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


@dataclass
class _Outcome:
    """What the model thread did with one batch, for the loop to hand out."""

    answers: list[Answer | Exception]  # one per request, in order
    calls: list[int]  # the digits of each model call made


class MicroBatcher:
    """Gathers concurrent requests' digits into one call of classify(served, pixels), made in
    the batcher's model thread.

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
        model_thread: bool = True,
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
        self.in_model = 0  # batches sent to the model thread and not yet answered
        # One thread: the model's calls run one after the other, in the order sent.
        self.model_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="mnistflow-model") if model_thread else None
        )

    async def classify(self, served: ServedModel, pixels: np.ndarray) -> Answer:
        """This request's labels and probabilities, computed in a batch with its neighbours."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(served, pixels, loop.create_future())
        rows = len(pixels)
        if rows >= self.max_batch:  # a full batch by itself (always, for --max-batch 1)
            self._send(served, [waiting])
            return await waiting.answer
        if self.rows + rows > self.max_batch:
            self._send_waiting()
        self.waiting.append(waiting)
        self.rows += rows
        if self.rows >= self.max_batch:
            self._send_waiting()
        elif self.timer is None:
            self.timer = (
                loop.call_later(self.max_wait, self.flush)
                if self.max_wait > 0
                else loop.call_soon(self.flush)
            )
        return await waiting.answer

    def flush(self) -> None:
        """The wait is over: send what is waiting, unless the model thread is busy (then it
        goes when the thread is done, with whatever joined it meanwhile)."""
        self.timer = None
        if not self.in_model:
            self._send_waiting()

    def close(self) -> None:
        """Let the model thread end once the batches sent to it are done."""
        if self.model_thread is not None:
            self.model_thread.shutdown(wait=False)

    def _send_waiting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.waiting, self.rows = self.waiting, [], 0
        while batch:  # one call per model served
            served = batch[0].served
            self._send(served, [w for w in batch if w.served is served])
            batch = [w for w in batch if w.served is not served]

    def _send(self, served: ServedModel, batch: list[_Waiting]) -> None:
        self.in_model += 1
        pixels = [w.pixels for w in batch]
        if self.model_thread is None:  # inline: the loop waits for the model
            self._answer(batch, self._run(served, pixels))
            return
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self.model_thread, self._run, served, pixels)
        done.add_done_callback(lambda outcome: self._answer(batch, outcome.result()))

    def _run(self, served: ServedModel, pixels: list[np.ndarray]) -> _Outcome:
        """In the model thread (or inline): the batch in one call, or each request alone if
        that fails."""
        if len(pixels) > 1:
            try:
                # Fails on digits of different shapes (the routes send (n, 1, 28, 28) float32).
                together = np.concatenate(pixels)
                labels, probabilities = served.classifier.classify(together)
            except Exception:
                pass  # only the request at fault gets the error: see below
            else:
                bounds = np.cumsum([0] + [len(p) for p in pixels])
                answers: list[Answer | Exception] = [
                    (labels[start:stop], probabilities[start:stop])
                    for start, stop in itertools.pairwise(bounds)
                ]
                return _Outcome(answers, [len(together)])
        alone: list[Answer | Exception] = []
        for one in pixels:
            try:
                alone.append(self.classify_one(served, one))
            except Exception as e:
                alone.append(e)
        return _Outcome(alone, [len(one) for one in pixels])

    def _answer(self, batch: list[_Waiting], outcome: _Outcome) -> None:
        """On the loop: hand each request its answer, then send what waited meanwhile."""
        self.in_model -= 1
        for digits in outcome.calls:
            self.on_call(digits)
        for waiting, answer in zip(batch, outcome.answers, strict=True):
            if waiting.answer.done():  # the client went away meanwhile
                continue
            if isinstance(answer, Exception):
                waiting.answer.set_exception(answer)
            else:
                waiting.answer.set_result(answer)
        # Requests whose wait ended while the thread was busy go now; a timer still running
        # sends its own batch when it fires.
        if not self.in_model and self.waiting and self.timer is None:
            self._send_waiting()
