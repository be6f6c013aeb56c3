"""A bounded load test of a running `earful serve`: N concurrent clients, each sending M requests.

Requests alternate between a chat completion with `input_audio` and a transcription upload, over
real clips. Reports failures, the status codes seen and latency percentiles; nothing is retried,
so a failure is a failure. `dropped_stream` is a client that asks for a long streamed answer and
leaves after its first piece (the server should cancel its generation at once).

    python -m earful.serve.loadtest http://127.0.0.1:8000 --model digits --clips a.wav b.wav
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

LONG_PROMPT = "Tell me a long story about a cat."  # a text prompt a chat model answers at length


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def chat_request(http: httpx.Client, model: str, wav: bytes, max_tokens: int = 16) -> httpx.Response:
    content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]
    return http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})


def transcription_request(http: httpx.Client, model: str, wav: bytes) -> httpx.Response:
    return http.post("/v1/audio/transcriptions", data={"model": model}, files={"file": ("clip.wav", wav, "audio/wav")})


def dropped_stream(url: str, model: str, *, headers: dict | None = None, max_tokens: int = 200, timeout_s: float = 120.0) -> int:
    """Ask for a long streamed answer, read its first piece of text, and hang up; returns the status code."""
    body = {"model": model, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": max_tokens, "stream": True}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers or {}, timeout=timeout_s) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 200:
                for line in r.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break  # the first piece of the answer: leave
            return r.status_code


def answered(r: httpx.Response, kind: str) -> bool:
    if r.status_code != 200:
        return False
    body = r.json()
    return body["choices"][0]["message"]["content"] is not None if kind == "chat" else "text" in body


def run_load(url: str, model: str, clips: list[str | Path], *, clients: int = 8, requests_per_client: int = 25,
             api_key: str | None = None, timeout_s: float = 120.0) -> dict:
    """Drive the server at `url` and return counts, status codes, failures and latency figures (seconds)."""
    payloads = [Path(c).read_bytes() for c in clips]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    failures: list[str] = []
    statuses: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as http:
            for i in range(requests_per_client):
                n = k * requests_per_client + i
                wav, kind = payloads[n % len(payloads)], ("chat", "transcription")[n % 2]
                start = time.perf_counter()
                try:
                    r = chat_request(http, model, wav) if kind == "chat" else transcription_request(http, model, wav)
                    status, problem = r.status_code, None if answered(r, kind) else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    status, problem = type(e).__name__, f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses[str(status)] += 1
                    if problem:
                        failures.append(problem)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = clients * requests_per_client
    return {
        "clients": clients,
        "requests_per_client": requests_per_client,
        "requests": total,
        "failures": len(failures),
        "failure_examples": failures[:5],
        "statuses": dict(sorted(statuses.items())),
        "p50_s": round(percentile(latencies, 50), 4),
        "p95_s": round(percentile(latencies, 95), 4),
        "max_s": round(max(latencies), 4),
        "mean_s": round(statistics.fmean(latencies), 4),
        "wall_s": round(wall, 2),
        "requests_per_second": round(total / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--model", required=True, help="model id the server answers to (GET /v1/models)")
    p.add_argument("--clips", nargs="+", required=True, help="WAV files to send")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--api-key")
    a = p.parse_args(argv)
    report = run_load(a.url, a.model, a.clips, clients=a.clients, requests_per_client=a.requests, api_key=a.api_key)
    print(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
