"""HTTP serving benchmark: `mnistflow serve` side by side with `mlflow models serve`.

Both serve the same registered model (models:/mnist@champion, a fast-preset CNN trained here
in seconds), one after the other, each in its own process group on a free loopback port.
wrk loads each from a separate process with single-digit /invocations requests for a fixed
time at concurrency 1, 16 and 64 (after a warm-up); mnistflow's /predict with a PNG upload is
measured too, and mnistflow serve with micro-batching off (--max-batch 1) runs beside the
default one, interleaved with it, to show what batching adds. Each figure is the median of
several repetitions; the raw numbers go to
benchmarks/results/serving-<preset>-workers<N>.json. --workers N gives both servers N
processes.

Usage: python benchmarks/bench_serving.py [--duration 10] [--repeats 3] [--preset quality]
                                          [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw
from urllib3 import encode_multipart_formdata

from common import BIN, RESULTS, background, free_port, table
from mnistflow.config import DataConfig, TrackingConfig, preset_config
from mnistflow.inference.preprocess import image_to_digit
from mnistflow.lifecycle import registry
from mnistflow.runs.plain import train_run

CONCURRENCY = (1, 16, 64)
# wrk reports what it measured from a Lua hook: one JSON line, latencies in microseconds.
WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, e.connect + e.read + e.write + e.timeout + e.status))
end
"""


@dataclass(frozen=True)
class Load:
    """What one wrk run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx answers

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


@dataclass(frozen=True)
class Case:
    server: str
    request: str
    url: str
    body: Path
    content_type: str


def ensure_wrk() -> str:
    """wrk's path; installed from Debian's packages when missing and we are root."""
    if not shutil.which("wrk") and os.geteuid() == 0:
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        install = ["apt-get", "install", "-y", "-qq", "wrk"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            subprocess.run(install, capture_output=True)
    path = shutil.which("wrk")
    if path is None:
        sys.exit("This benchmark loads the servers with wrk: install it (apt-get install wrk).")
    return path


def registered_champion(folder: Path, preset: str) -> str:
    """A model of the preset's shape (its network, its members), trained on a short slice:
    accuracy does not matter for speed."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    here = Path.cwd()
    os.chdir(folder)  # its artifacts (./mlruns) go to the temporary folder
    try:
        summary = train_run(
            DataConfig(limit_train=5000),
            preset_config(preset, epochs=1, device="cpu"),
            TrackingConfig(tracking_uri=uri, system_metrics=False),
            register_as="mnist",
        )
    finally:
        os.chdir(here)
    assert summary.registered_version
    registry.make_champion(MlflowClient(uri), "mnist", summary.registered_version, "benchmark")
    return uri


def request_bodies(folder: Path) -> dict[str, tuple[Path, str]]:
    """A digit drawn as on the page (a 280x280 PNG), as JSON pixels and as an upload."""
    image = Image.new("L", (280, 280), 0)
    ImageDraw.Draw(image).line([(70, 60), (210, 60), (130, 230)], fill=255, width=22)
    png = io.BytesIO()
    image.save(png, "PNG")
    pixels = image_to_digit(png.getvalue()).round().astype(int).tolist()  # (28, 28)
    json_body = folder / "invocations.json"
    json_body.write_text(json.dumps({"inputs": [pixels]}))
    form, form_type = encode_multipart_formdata(
        {"file": ("digit.png", png.getvalue(), "image/png")}
    )
    upload = folder / "upload.multipart"
    upload.write_bytes(form)
    return {"json": (json_body, "application/json"), "png": (upload, form_type)}


def run_wrk(wrk: str, script: Path, case: Case, connections: int, seconds: int) -> Load:
    env = {
        **os.environ,
        "BENCH_BODY": str(case.body),
        "BENCH_CONTENT_TYPE": case.content_type,
    }
    # One wrk thread: it keeps 16 connections busy and leaves the other core to the server.
    args = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script)]
    out = subprocess.run(
        [*args, case.url], env=env, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    return Load(**json.loads(line.removeprefix("BENCH ")))


def check_answer(case: Case) -> dict[str, Any]:
    response = requests.post(
        case.url,
        data=case.body.read_bytes(),
        headers={"Content-Type": case.content_type},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def measure(
    wrk: str, script: Path, cases: Sequence[Case], duration: int, repeats: int
) -> dict[tuple[str, str, int], list[Load]]:
    runs: dict[tuple[str, str, int], list[Load]] = {}
    run_wrk(wrk, script, cases[0], 16, min(3, duration))  # warm-up, not counted
    for _ in range(repeats):
        for case in cases:
            for connections in CONCURRENCY:
                load = run_wrk(wrk, script, case, connections, duration)
                runs.setdefault((case.server, case.request, connections), []).append(load)
                print(
                    f"  {case.server} {case.request} c={connections}: "
                    f"{load.per_second:,.0f} req/s, p50 {load.p50_ms:.2f} ms, "
                    f"p99 {load.p99_ms:.2f} ms, {load.errors} errors",
                    file=sys.stderr,
                )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--repeats", type=int, default=3, help="load runs per figure")
    parser.add_argument(
        "--preset", default="fast", help="the champion's shape: fast (one network) or quality "
        "(an ensemble); the targets are the fast champion's",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes, for both servers alike"
    )
    args = parser.parse_args()
    workers = ["--workers", str(args.workers)]
    wrk = ensure_wrk()
    runs: dict[tuple[str, str, int], list[Load]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        folder = Path(tmp)
        uri = registered_champion(folder, args.preset)
        mlflow.set_tracking_uri(uri)
        bodies = request_bodies(folder)
        script = folder / "post.lua"
        script.write_text(WRK_SCRIPT)
        answers = {}

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        baseline = [
            str(BIN / "mlflow"), "models", "serve", "-m", "models:/mnist@champion",
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), *workers,
        ]  # fmt: skip
        with background(baseline, f"{base}/ping", MLFLOW_TRACKING_URI=uri):
            case = Case("mlflow models serve", "/invocations, 1 digit", f"{base}/invocations",
                        *bodies["json"])  # fmt: skip
            answers[case.server] = check_answer(case)
            print(f"measuring {case.server} ...", file=sys.stderr)
            runs |= measure(wrk, script, [case], args.duration, args.repeats)

        port, unbatched_port = free_port(), free_port()
        base, unbatched = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{unbatched_port}"
        command = [str(BIN / "mnistflow"), "serve", *workers, "--tracking-uri", uri, "--port"]
        with (
            background([*command, str(port)], f"{base}/ready"),
            background([*command, str(unbatched_port), "--max-batch", "1"], f"{unbatched}/ready"),
        ):
            cases = [
                Case("mnistflow serve", "/invocations, 1 digit", f"{base}/invocations",
                     *bodies["json"]),
                Case("mnistflow serve --max-batch 1", "/invocations, 1 digit",
                     f"{unbatched}/invocations", *bodies["json"]),
                Case("mnistflow serve", "/predict, 1 PNG upload", f"{base}/predict",
                     *bodies["png"]),
            ]  # fmt: skip
            answers[cases[0].server] = check_answer(cases[0])
            answers[cases[1].server] = check_answer(cases[1])
            print("measuring mnistflow serve ...", file=sys.stderr)
            runs |= measure(wrk, script, cases, args.duration, args.repeats)

    if len({json.dumps(a, sort_keys=True) for a in answers.values()}) != 1:
        sys.exit(f"the two servers answered differently: {answers}")
    median = {key: _median(loads) for key, loads in runs.items()}
    rows = [
        [
            server,
            request,
            str(c),
            f"{m['per_second']:,.0f}",
            f"{m['p50_ms']:.2f}",
            f"{m['p99_ms']:.2f}",
            str(m["errors"]),
        ]
        for (server, request, c), m in median.items()
    ]
    print(f"\nOne digit per request, {args.duration:g} s per run, median of {args.repeats} runs")
    print(f"({os.cpu_count()} CPU cores shared by server and wrk; loopback)")
    print(f"{args.workers} worker process(es) per server\n")
    header = ["server", "request", "concurrency", "requests/s", "p50 ms", "p99 ms", "errors"]
    print(table(header, rows))

    theirs = {c: median["mlflow models serve", "/invocations, 1 digit", c] for c in CONCURRENCY}
    ours = {c: median["mnistflow serve", "/invocations, 1 digit", c] for c in CONCURRENCY}
    ratio = ours[16]["per_second"] / theirs[16]["per_second"]
    p99 = max(ours[16]["p99_ms"], ours[64]["p99_ms"])
    at_64 = ours[64]["per_second"]
    p50, base_p50 = ours[1]["p50_ms"], theirs[1]["p50_ms"]
    targets = [
        ["throughput at concurrency 16 vs baseline", ">= 10x", f"{ratio:.1f}x", _ok(ratio >= 10)],
        ["throughput at concurrency 64", ">= 5,000/s", f"{at_64:,.0f}/s", _ok(at_64 >= 5000)],
        ["p99 latency at concurrency 16 and 64", "<= 20 ms", f"{p99:.2f} ms", _ok(p99 <= 20)],
        ["p50 latency at concurrency 1", f"< {base_p50:.2f} ms", f"{p50:.2f} ms",
         _ok(p50 < base_p50)],
    ]  # fmt: skip
    print("\n" + table(["target (/invocations)", "wanted", "measured", "met"], targets))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serving-{args.preset}-workers{args.workers}.json").write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "settings": {
                    "duration_s": args.duration,
                    "repeats": args.repeats,
                    "preset": args.preset,
                    "workers": args.workers,
                },
                "runs": [
                    {"server": s, "request": r, "concurrency": c, "loads": [asdict(x) for x in v]}
                    for (s, r, c), v in runs.items()
                ],
                "median": [
                    {"server": s, "request": r, "concurrency": c, **m}
                    for (s, r, c), m in median.items()
                ],
            },
            indent=1,
        )
    )


def _median(loads: list[Load]) -> dict[str, Any]:
    return {
        "per_second": statistics.median(x.per_second for x in loads),
        "p50_ms": statistics.median(x.p50_ms for x in loads),
        "p99_ms": statistics.median(x.p99_ms for x in loads),
        "errors": sum(x.errors for x in loads),
    }


def _ok(met: bool) -> str:
    return "yes" if met else "NO"


if __name__ == "__main__":
    main()
