"""`earful serve` on loopback under load and abuse: batching's effect, a burst, a long sequential run, dropped streams.

Two parts, each against a real `earful serve --no-ui` process on FSDD recordings:

1. Batching: 8 concurrent clients x 25 requests (chat with input_audio and transcription uploads,
   alternating; earful.serve.loadtest), against a server that batches (--max-batch-size 8) and one
   that answers one at a time (--max-batch-size 1); the report gives the ratio.
2. Abuse, on one batching server with its default limits: the server's RSS after a warm-up; a burst
   of 64 requests sent at once, 8 of them streams that hang up after their first piece; 1,000
   requests one after another, every 25th a dropped stream; the RSS again. Dropped streams ask for a
   long answer (200 tokens) to a text prompt, so a generation left running would show in the next
   requests' latency. Counted: every status code (no 500 may appear), 429s, transport errors, and
   the server's own count of cancelled generations (GET /health).

Writes benchmarks/results/serve_load.json.

    .venv/bin/python benchmarks/serve_load.py [--model runs/digits/model] [--sequential 1000] [--burst 64]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from earful.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
DROP_EVERY = 25  # in the sequential run, every 25th request is a stream dropped after its first piece
BURST_DROPS = 8


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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


class Tally:
    """Status codes, latencies of answered requests, and transport errors, from many threads."""

    def __init__(self):
        self.statuses: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def one(self, url: str, model: str, kind: str, wav: bytes) -> None:
        from earful.serve.loadtest import answered, chat_request, dropped_stream, transcription_request

        start = time.perf_counter()
        try:
            if kind == "dropped_stream":
                status = dropped_stream(url, model)
            else:
                with httpx.Client(base_url=url, timeout=300) as http:
                    r = chat_request(http, model, wav) if kind == "chat" else transcription_request(http, model, wav)
                status = r.status_code
                if status == 200 and not answered(r, kind):
                    status = "200-malformed"
        except httpx.HTTPError as e:
            status = type(e).__name__
        elapsed = time.perf_counter() - start
        with self.lock:
            self.statuses[str(status)] += 1
            if status == 200 and kind != "dropped_stream":
                self.latencies.append(elapsed)
            if not isinstance(status, int):
                self.errors.append(f"{kind}: {status}")

    def report(self, wall_s: float, **extra) -> dict:
        from earful.serve.loadtest import percentile

        return {**extra, "statuses": dict(sorted(self.statuses.items())),
                "server_errors_5xx": sum(n for s, n in self.statuses.items() if s.startswith("5")),
                "rejected_429": self.statuses.get("429", 0), "transport_errors": len(self.errors), "error_examples": self.errors[:5],
                "answered": len(self.latencies), "p50_s": round(percentile(self.latencies, 50), 4),
                "p95_s": round(percentile(self.latencies, 95), 4), "max_s": round(max(self.latencies, default=float("nan")), 4),
                "wall_s": round(wall_s, 1)}


def abuse(model: str, clips: list[bytes], burst: int, sequential: int, log) -> dict:
    proc, url = start_server(model, 8, log)
    try:
        warm = Tally()
        for i in range(8):
            warm.one(url, "bench", ("chat", "transcription")[i % 2], clips[i % len(clips)])
        rss_before = rss_mb(proc.pid)

        kinds = ["dropped_stream" if i % (burst // BURST_DROPS) == 0 else ("chat", "transcription")[i % 2] for i in range(burst)]
        tally, gate = Tally(), threading.Barrier(burst)

        def at_once(i: int) -> None:
            gate.wait()
            tally.one(url, "bench", kinds[i], clips[i % len(clips)])

        started = time.perf_counter()
        with ThreadPoolExecutor(burst) as pool:
            list(pool.map(at_once, range(burst)))
        burst_report = tally.report(time.perf_counter() - started, requests=burst, dropped_streams=kinds.count("dropped_stream"))
        print(f"burst: {burst_report['statuses']}, p50 {burst_report['p50_s']} s, p95 {burst_report['p95_s']} s", flush=True)

        tally, drops = Tally(), 0
        started = time.perf_counter()
        for i in range(sequential):
            kind = "dropped_stream" if i % DROP_EVERY == DROP_EVERY - 1 else ("chat", "transcription")[i % 2]
            drops += kind == "dropped_stream"
            tally.one(url, "bench", kind, clips[i % len(clips)])
        seq_report = tally.report(time.perf_counter() - started, requests=sequential, dropped_streams=drops)
        print(f"sequential: {seq_report['statuses']}, p50 {seq_report['p50_s']} s, p95 {seq_report['p95_s']} s, "
              f"max {seq_report['max_s']} s", flush=True)
        time.sleep(2)  # the last cancellations land
        health = httpx.get(f"{url}/health", timeout=10).json()
        return {"burst": burst_report, "sequential": seq_report,
                "server_rss_mb": {"after_warmup": rss_before, "after_burst_and_sequential": rss_mb(proc.pid)},
                "server_counts": {k: health[k] for k in ("cancelled", "busy", "queued")},
                "server_limits": "defaults: --max-batch-size 8, --max-queue 64, --max-request-audio-seconds 120, --max-clips 8"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    from earful.data.fsdd import default_fsdd_dir
    from earful.serve.loadtest import run_load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "digits" / "model"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per client in the batching comparison")
    p.add_argument("--burst", type=int, default=64)
    p.add_argument("--sequential", type=int, default=1000)
    p.add_argument("--note", default="", help="what else the machine was doing, for the report")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    a = p.parse_args(argv)
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"{a.model}: no trained model there; run `bash scripts/quickstart.sh` first or pass --model DIR")
    rec = default_fsdd_dir() / "recordings"
    clips = sorted(rec.glob("*_george_1.wav"))  # ten digits, one speaker
    if not clips:
        raise SystemExit(f"FSDD not found at {rec}")
    started, load_at_start = time.perf_counter(), os.getloadavg()
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
                  f"p95 {runs[label]['p95_s']:.3f} s, {runs[label]['requests_per_second']:.1f} req/s", flush=True)
        abused = abuse(a.model, [c.read_bytes() for c in clips], a.burst, a.sequential, log)
    b, s = runs["batched"], runs["one_at_a_time"]
    five_hundreds = abused["burst"]["server_errors_5xx"] + abused["sequential"]["server_errors_5xx"] + sum(
        n for r in runs.values() for st, n in r["statuses"].items() if st.startswith("5"))
    report = {
        "server_errors_5xx": five_hundreds,
        "failures": b["failures"] + s["failures"],
        "p50_s": b["p50_s"],
        "p95_s": b["p95_s"],
        "requests_per_second": b["requests_per_second"],
        "throughput_ratio_batched_vs_one_at_a_time": round(b["requests_per_second"] / s["requests_per_second"], 2),
        "p95_ratio_one_at_a_time_vs_batched": round(s["p95_s"] / b["p95_s"], 2),
        "runs": runs,
        "abuse": abused,
        "model": a.model,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                    "note": a.note},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(a.out)
    write_json(out, report)
    print(f"wrote {out}: {five_hundreds} 5xx, {abused['burst']['rejected_429'] + abused['sequential']['rejected_429']} 429s")
    return 1 if report["failures"] or five_hundreds else 0


if __name__ == "__main__":
    raise SystemExit(main())
