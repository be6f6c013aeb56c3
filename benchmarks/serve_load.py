"""A bounded load test of `earful serve` on loopback: 8 concurrent clients × 25 requests.

The same load runs twice in one go, against a server that batches waiting requests
(--max-batch-size 8, the default) and against one that answers them one at a time
(--max-batch-size 1), so the report gives the batching's effect as a ratio. Requests alternate
between a chat completion with input_audio and a transcription upload of FSDD recordings
(earful.serve.loadtest). Writes failures, p50/p95 latency and throughput to
benchmarks/serve_load.json.

    .venv/bin/python benchmarks/serve_load.py [--model runs/digits/model]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from earful.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batch: int, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "earful", "serve", "--model", model, "--name", "bench", "--port", str(port),
                             "--max-batch-size", str(batch), "--no-ui"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 180 s")


def main(argv: list[str] | None = None) -> int:
    from earful.data.fsdd import default_fsdd_dir
    from earful.serve.loadtest import run_load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "digits" / "model"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "serve_load.json"))
    a = p.parse_args(argv)
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"{a.model}: no trained model there; run `bash scripts/quickstart.sh` first or pass --model DIR")
    rec = default_fsdd_dir() / "recordings"
    clips = sorted(rec.glob("*_george_1.wav"))  # ten digits, one speaker
    if not clips:
        raise SystemExit(f"FSDD not found at {rec}")
    started = time.perf_counter()
    runs = {}
    with tempfile.TemporaryFile() as log:
        for label, batch in (("batched", 8), ("one_at_a_time", 1)):
            proc, url = start_server(a.model, batch, log)
            try:
                runs[label] = {"max_batch_size": batch, **run_load(url, "bench", clips, clients=a.clients, requests_per_client=a.requests)}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"{label}: {runs[label]['failures']} failures of {runs[label]['requests']}, p50 {runs[label]['p50_s']:.3f} s, "
                  f"p95 {runs[label]['p95_s']:.3f} s, {runs[label]['requests_per_second']:.1f} req/s")
    b, s = runs["batched"], runs["one_at_a_time"]
    report = {
        "failures": b["failures"] + s["failures"],
        "p50_s": b["p50_s"],
        "p95_s": b["p95_s"],
        "requests_per_second": b["requests_per_second"],
        "throughput_ratio_batched_vs_one_at_a_time": round(b["requests_per_second"] / s["requests_per_second"], 2),
        "p95_ratio_one_at_a_time_vs_batched": round(s["p95_s"] / b["p95_s"], 2),
        "runs": runs,
        "model": a.model,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(a.out)
    write_json(out, report)
    print(f"wrote {out}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
