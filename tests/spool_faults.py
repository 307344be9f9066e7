"""Tools for breaking the spool's copy where it hurts, and for telling whether a store holds
exactly what it should: a client that fails at its k-th call (before or after the call took
effect), and a snapshot of everything a run left in a store, ids aside.

Used by the fault-injection tests (test_spool_faults.py, test_spool.py) and by
benchmarks/soak_spool.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

# The faults a target's client may meet: no answer in time, a connection reset, a server
# that is down (5xx), a request refused as bad (400: not an outage), a full embedded store.
KINDS = ("timeout", "reset", "unavailable", "bad_request", "disk_full")


def fault(kind: str, call: str) -> Exception:
    """The exception MLflow's client raises for kind, on a call named call."""
    url = f"http://127.0.0.1:9/api/2.0/mlflow/{call}"
    if kind == "timeout":
        error = MlflowException(f"API request to {url} failed with timeout exception ReadTimeout")
        error.__cause__ = requests.ReadTimeout("read timed out")
        return error
    if kind == "reset":
        error = MlflowException(f"API request to {url} failed with exception ConnectionError")
        error.__cause__ = requests.ConnectionError("Connection reset by peer")
        return error
    if kind == "unavailable":
        return RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"})
    if kind == "bad_request":
        return RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "refused"})
    if kind == "disk_full":
        error = MlflowException("(sqlite3.OperationalError) database or disk is full")
        error.__cause__ = sqlite3.OperationalError("database or disk is full")
        return error
    raise ValueError(kind)


class FaultyClient:
    """An MlflowClient whose call number `at` (counting every method call) fails with kind:
    before the call (the request never arrived) or after it (it took effect, the answer was
    lost). Every other call goes through; `calls` names them in order."""

    def __init__(
        self, client: MlflowClient, at: int = 0, after: bool = False, kind: str = "timeout"
    ) -> None:
        self._client = client
        self.at, self.after, self.kind = at, after, kind
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            hit = len(self.calls) == self.at
            if hit and not self.after:
                raise fault(self.kind, name)
            result = attr(*args, **kwargs)
            if hit:
                raise fault(self.kind, name)
            return result

        return call


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(uri: str, run_id: str) -> dict[str, Any]:
    """Everything run_id left in the store at uri, with the store's own ids (of the run, its
    models) replaced by names, so two stores holding the same run compare equal."""
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    names = {run_id: "<run>", **{m.model_id: f"<model {m.name}>" for m in models}}

    def plain(text: str) -> str:
        for key, name in names.items():
            text = text.replace(key, name)
        return text

    def files(download: Callable[[str], str]) -> dict[str, str]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(download(tmp))
            return {
                str(p.relative_to(root)): plain(p.read_text()) if p.name == "MLmodel" else _sha(p)
                for p in sorted(root.rglob("*"))
                if p.is_file()
            }

    def metric_rows(metrics: Any) -> list[tuple[Any, ...]]:
        return sorted((m.key, m.step, m.timestamp, repr(m.value)) for m in metrics)

    import mlflow

    shot: dict[str, Any] = {
        "status": run.info.status,
        "times": (run.info.start_time, run.info.end_time),
        "name": run.info.run_name,
        "params": run.data.params,
        "tags": {k: plain(v) for k, v in run.data.tags.items()},
        "metrics": {
            key: metric_rows(client.get_metric_history(run_id, key)) for key in run.data.metrics
        },
        "inputs": sorted(
            (i.dataset.name, i.dataset.digest, tuple(sorted((t.key, t.value) for t in i.tags)))
            for i in (run.inputs.dataset_inputs if run.inputs else [])
        ),
        "outputs": sorted(
            (names[o.model_id], o.step) for o in (run.outputs.model_outputs if run.outputs else [])
        ),
        "artifacts": files(
            lambda tmp: mlflow.artifacts.download_artifacts(
                run_id=run_id, tracking_uri=uri, dst_path=tmp
            )
        ),
        "models": {
            m.name: {
                "status": str(m.status),
                "params": m.params,
                "tags": {k: plain(v) for k, v in m.tags.items()},
                "metrics": metric_rows(m.metrics or []),
                "files": files(
                    lambda tmp, m=m: mlflow.artifacts.download_artifacts(
                        artifact_uri=m.artifact_location, tracking_uri=uri, dst_path=tmp
                    )
                ),
            }
            for m in models
        },
    }
    versions = []
    for model in client.search_registered_models():
        for v in client.search_model_versions(f"name='{model.name}'"):
            versions.append(
                (
                    model.name,
                    v.version,
                    plain(v.run_id or ""),
                    plain(v.model_id or ""),
                    {k: plain(t) for k, t in v.tags.items()},
                    plain(v.description or ""),
                )
            )
        versions.append((model.name, "aliases", dict(model.aliases)))
    shot["registry"] = sorted(versions, key=repr)
    return shot


def differences(got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The parts of two snapshots that differ, named (an empty list: the same)."""
    out = []
    for part in sorted(set(got) | set(expected)):
        a, b = got.get(part), expected.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(part)
    return out


class StallingProxy(threading.Thread):
    """A TCP proxy on a free loopback port in front of a server, whose mode can change at any
    moment: "pass" forwards, "stall" accepts and holds every byte (no answer; what it held
    goes through once the mode changes, as a request a hung server takes late), "slow"
    forwards each chunk after a delay.

    Written here, not taken from a library: toxiproxy, the usual tool, is a Go server that is
    not packaged for pip or Debian, and this needs a few dozen lines of sockets."""

    def __init__(self, upstream_port: int, delay_s: float = 0.3) -> None:
        super().__init__(name="stalling-proxy", daemon=True)
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.mode = "pass"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                conn.close()  # the server is down: as a refused connection would be
                continue
            self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            source.settimeout(None)
            while chunk := source.recv(65536):
                while self.mode == "stall" and not self.stopping.is_set():
                    time.sleep(0.05)
                if self.mode == "slow":
                    time.sleep(self.delay_s)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for conn in self.sockets:
            conn.close()
        self.join(timeout=5)
