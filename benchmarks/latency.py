"""Latency of a trained earful listening LM next to its peers, on the same clips, in one run.

For a ~1 s clip (one FSDD recording, padded with silence to 1.0 s) and a ~10 s clip (FSDD
recordings of one speaker end to end), each system is timed from the waveform in memory:

- earful: the trained model (--model, default runs/digits/model from scripts/quickstart.sh), features
  without 30 s padding, greedy decoding;
- whisper_tiny_zero_shot: the same bundled Whisper tiny.en as plain ASR through transformers
  (`WhisperForConditionalGeneration.generate`, features padded to 30 s as transformers does);
- pocketsphinx: 5.1.1's default US English model and language model (no token stream: it gives
  a result at the end, so its time to first token is its time to the whole result).

Quantisation (--quantize int8): the same TTFT and decode speed with the LLM's linear layers in
int8 (earful.models.quantize), and both models' accuracy on --accuracy-clips clips of
--accuracy-speaker (a speaker the model never trained on).

Realtime (/v1/realtime on a real server in this process): a 3 s utterance streamed by a
WebSocket client in 100 ms chunks of 24 kHz pcm16; the time from the last chunk (then commit and
response.create) to response.done, beside POST /v1/chat/completions of the same audio whole.
The audio is encoded at commit, not as it arrives.

Spoken answers (--voice, default piper:joe@noise0,w0): time from the waveform to the first audio
chunk of the answer read out by the voice, earful's streamed path (`SpeechLM.stream_chat`, cut into
sentences, each spoken as soon as it is complete: what `earful serve --voice` streams) against the
cascade peer Whisper tiny.en -> the same voice (transcribe, then speak the transcript), on the 1 s clip.

Time to first token (TTFT) is measured with a `generate()` streamer: the time from the waveform to
the first generated token (features + encoder + prefill + one decoding step). Decoding speed is
tokens/s after the first token, with exactly --new-tokens generated (end-of-text suppressed) so
that both LMs decode the same number of tokens. Figures are medians over --repeats runs after one
warm-up; ratios are earful's against each peer.

    .venv/bin/python benchmarks/latency.py [--model runs/digits/model] [--voice piper:joe@noise0,w0] [--out benchmarks/results/latency.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from reporting import footer, write_report

ROOT = Path(__file__).resolve().parents[1]
SR = 16000


class Clock(BaseStreamer):
    """Records when generate() hands over each piece: first the prompt, then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def clips() -> dict[str, np.ndarray]:
    from earful.audio import load_audio
    from earful.data.fsdd import default_fsdd_dir

    rec = default_fsdd_dir() / "recordings"
    if not rec.is_dir():
        raise SystemExit(f"FSDD not found at {rec} (set EARFUL_FSDD)")
    one = load_audio(rec / "7_george_3.wav", SR)
    one = np.pad(one, (0, max(0, SR - len(one))))[:SR]
    parts, total = [], 0
    for i in range(50):
        w = load_audio(rec / f"{i % 10}_george_{i // 10}.wav", SR)
        parts.append(w)
        total += len(w)
        if total >= 10 * SR:
            break
    joined = np.concatenate(parts)
    return {"1s": one, "10s": joined[: 10 * SR], "3s": joined[: 3 * SR]}


def timed_generate(run, repeats: int) -> dict:
    """`run(clock)` generates once; returns median TTFT, tokens/s and total seconds."""
    run(Clock())  # warm-up
    ttft, tps, total = [], [], []
    for _ in range(repeats):
        clock = Clock()
        start = time.perf_counter()
        run(clock)
        end = time.perf_counter()
        tokens = clock.times[1:]  # [0] is the prompt
        ttft.append(tokens[0] - start)
        tps.append((len(tokens) - 1) / (tokens[-1] - tokens[0]))
        total.append(end - start)
    return {"ttft_s": round(statistics.median(ttft), 4), "tokens_per_s": round(statistics.median(tps), 1),
            "total_s": round(statistics.median(total), 4), "new_tokens": len(tokens)}


def earful_system(model_dir: str, new_tokens: int, quantize: str | None = None):
    from earful.models.build import load_speech_lm

    lm, processor = load_speech_lm(model_dir, quantize=quantize)

    @torch.no_grad()
    def run(wave, clock):
        batch = processor([wave], processor.prompt_format.default_prompt)
        lm.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)

    return run


def whisper_system(new_tokens: int):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from earful.pretrained import resolve

    folder = resolve("bundled:whisper-tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)

    @torch.no_grad()
    def run(wave, clock):
        features = processor(wave, sampling_rate=SR, return_tensors="pt").input_features
        model.generate(features, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)

    return run


def pocketsphinx_time(wave: np.ndarray, repeats: int) -> dict:
    import pocketsphinx

    decoder = pocketsphinx.Decoder(samprate=SR, loglevel="FATAL")
    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes()

    def run():
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    run()
    times, text = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        text = run()
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"ttft_s": round(t, 4), "total_s": round(t, 4), "tokens_per_s": None, "words": len(text.split()),
            "note": "no token stream: the whole result arrives at once"}


def spoken_answer_times(model_dir: str, voice: str, wave: np.ndarray, repeats: int) -> dict:
    """Median seconds from the waveform to the first audio chunk (and to the whole answer spoken), earful vs the cascade."""
    import earful
    from earful.serve.speech_out import sentences_as_decoded
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from earful.pretrained import resolve

    lm = earful.load(model_dir, voice=voice)
    folder = resolve("bundled:whisper-tiny.en")
    whisper = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    whisper_processor = WhisperProcessor.from_pretrained(folder)

    def earful_run() -> tuple[float, float, str]:
        start, first, said = time.perf_counter(), None, []
        for span in sentences_as_decoded(lm.stream_chat(audio=wave)):
            lm.voice.speak(span)
            first = first or time.perf_counter() - start
            said.append(span)
        return first, time.perf_counter() - start, " ".join(said)

    @torch.no_grad()
    def cascade_run() -> tuple[float, float, str]:
        start = time.perf_counter()
        features = whisper_processor(wave, sampling_rate=SR, return_tensors="pt").input_features
        text = whisper_processor.batch_decode(whisper.generate(features, max_new_tokens=64), skip_special_tokens=True)[0].strip()
        lm.voice.speak(text)  # the same voice; one span, as Whisper gives its text at the end
        t = time.perf_counter() - start
        return t, t, text

    out = {}
    for name, run in (("earful", earful_run), ("cascade_whisper_tiny_then_voice", cascade_run)):
        run()  # warm-up
        runs = [run() for _ in range(repeats)]
        out[name] = {"first_audio_s": round(statistics.median(r[0] for r in runs), 4),
                     "whole_answer_spoken_s": round(statistics.median(r[1] for r in runs), 4), "answer": runs[-1][2]}
    lm.close()
    out["voice"] = voice
    out["first_audio_speedup_vs_cascade"] = round(out["cascade_whisper_tiny_then_voice"]["first_audio_s"] / out["earful"]["first_audio_s"], 2)
    return out


def accuracy(model_dir: str, speaker: str, n: int, quantize: str | None) -> float:
    """Share of `speaker`'s first n FSDD clips (by digit, round robin) whose transcript is the digit word."""
    from earful.audio import load_audio
    from earful.data.fsdd import default_fsdd_dir, fsdd_utterances
    from earful.eval.asr import generate_text, normalize_digit_words
    from earful.models.build import load_speech_lm

    lm, processor = load_speech_lm(model_dir, quantize=quantize)
    rows = sorted(fsdd_utterances(default_fsdd_dir(), [speaker]), key=lambda u: (int(u.id.rsplit("_", 1)[1]), u.id))[:n]
    right = 0
    for i in range(0, len(rows), 16):
        batch = rows[i : i + 16]
        said = generate_text(lm, processor, [load_audio(u.audio, SR) for u in batch], processor.prompt_format.default_prompt, max_new_tokens=8)
        right += sum(normalize_digit_words(h) == normalize_digit_words(u.text) for h, u in zip(said, batch))
    return round(right / len(rows), 4)


def realtime_times(model_dir: str, wave: np.ndarray, repeats: int) -> dict:
    """/v1/realtime on a real uvicorn server in this process: a websockets client streams `wave` as
    24 kHz pcm16 in 100 ms chunks, then commits and asks (turn_detection null); the time from the
    last chunk to response.done, next to the same audio through POST /v1/chat/completions (whole file)."""
    import base64
    import io
    import json
    import socket
    import threading

    import httpx
    import soundfile as sf
    import uvicorn
    from websockets.sync.client import connect

    import earful
    from earful.audio import resample
    from earful.serve.app import create_app

    lm = earful.load(model_dir, name="bench")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(lm, ui=False), log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = sock.getsockname()[1]
    pcm = (np.clip(resample(wave, SR, 24000), -1, 1) * 32767).astype("<i2").tobytes()
    chunks = [base64.b64encode(pcm[i : i + 4800]).decode() for i in range(0, len(pcm), 4800)]  # 100 ms each
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="WAV", subtype="PCM_16")
    body = {"model": "bench", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}]}]}

    def over_websocket() -> tuple[float, str]:
        with connect(f"ws://127.0.0.1:{port}/v1/realtime", max_size=None) as ws:
            ws.recv()  # session.created
            ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
            ws.recv()
            for c in chunks:
                ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": c}))
            start = time.perf_counter()
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            ws.send(json.dumps({"type": "response.create"}))
            while True:
                event = json.loads(ws.recv())
                if event["type"] == "response.done":
                    return time.perf_counter() - start, event["response"]["output"][0]["content"][0]["text"]

    def over_http() -> tuple[float, str]:
        start = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        return time.perf_counter() - start, r.json()["choices"][0]["message"]["content"]

    out = {"audio_seconds": round(len(wave) / SR, 2)}
    for name, run in (("realtime_last_chunk_to_final_text", over_websocket), ("http_chat_completion_whole_file", over_http)):
        run()  # warm-up
        runs = [run() for _ in range(repeats)]
        out[name] = {"seconds": round(statistics.median(r[0] for r in runs), 4), "answer": runs[-1][1]}
    server.should_exit = True
    thread.join(timeout=30)
    lm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "digits" / "model"), help="trained earful model folder (default runs/digits/model)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each LM generates (default 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quantize", default="int8", help="compare fp32 with this quantisation (int8; none: skip)")
    p.add_argument("--accuracy-speaker", default="george", help="FSDD speaker for the fp32-vs-quantised accuracy (one the model never trained on)")
    p.add_argument("--accuracy-clips", type=int, default=200)
    p.add_argument("--voice", default="piper:joe@noise0,w0", help="offline voice that reads the answers out (default piper:joe@noise0,w0)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    a = p.parse_args(argv)
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"{a.model}: no trained model there; run `bash scripts/quickstart.sh` first or pass --model DIR")
    started = time.perf_counter()
    waves = clips()
    earful_run, whisper_run = earful_system(a.model, a.new_tokens), whisper_system(a.new_tokens)
    results = {}
    for name, wave in ((k, waves[k]) for k in ("1s", "10s")):
        e = timed_generate(lambda clock: earful_run(wave, clock), a.repeats)
        w = timed_generate(lambda clock: whisper_run(wave, clock), a.repeats)
        s = pocketsphinx_time(wave, a.repeats)
        results[name] = {
            "audio_seconds": round(len(wave) / SR, 2),
            "earful": e,
            "whisper_tiny_zero_shot": w,
            "pocketsphinx": s,
            "ttft_speedup_vs_whisper": round(w["ttft_s"] / e["ttft_s"], 2),
            "decode_speed_ratio_vs_whisper": round(e["tokens_per_s"] / w["tokens_per_s"], 2),
            "time_to_result_speedup_vs_pocketsphinx": round(s["total_s"] / e["ttft_s"], 2),
        }
        print(f"{name}: earful TTFT {e['ttft_s'] * 1000:.0f} ms, {e['tokens_per_s']:.0f} tok/s | whisper TTFT {w['ttft_s'] * 1000:.0f} ms, "
              f"{w['tokens_per_s']:.0f} tok/s | pocketsphinx result {s['total_s'] * 1000:.0f} ms")
    quantized = {}
    if a.quantize not in ("none", ""):
        q_run = earful_system(a.model, a.new_tokens, a.quantize)
        for name in ("1s", "10s"):
            wave = waves[name]
            q = timed_generate(lambda clock: q_run(wave, clock), a.repeats)
            e = results[name]["earful"]
            quantized[name] = {a.quantize: q, "ttft_speedup_vs_fp32": round(e["ttft_s"] / q["ttft_s"], 2),
                               "decode_speed_ratio_vs_fp32": round(q["tokens_per_s"] / e["tokens_per_s"], 2)}
            print(f"{name} {a.quantize}: TTFT {q['ttft_s'] * 1000:.0f} ms, {q['tokens_per_s']:.0f} tok/s "
                  f"(fp32 {e['ttft_s'] * 1000:.0f} ms, {e['tokens_per_s']:.0f} tok/s)")
        del q_run
        quantized["accuracy"] = {"speaker": a.accuracy_speaker, "clips": a.accuracy_clips,
                                 "fp32": accuracy(a.model, a.accuracy_speaker, a.accuracy_clips, None),
                                 a.quantize: accuracy(a.model, a.accuracy_speaker, a.accuracy_clips, a.quantize)}
        print(f"accuracy on {a.accuracy_clips} {a.accuracy_speaker} clips: fp32 {quantized['accuracy']['fp32']}, "
              f"{a.quantize} {quantized['accuracy'][a.quantize]}")
    realtime = realtime_times(a.model, waves["3s"], a.repeats)
    print(f"realtime, {realtime['audio_seconds']} s utterance: last chunk -> final text "
          f"{realtime['realtime_last_chunk_to_final_text']['seconds'] * 1000:.0f} ms (POST of the whole file "
          f"{realtime['http_chat_completion_whole_file']['seconds'] * 1000:.0f} ms)")
    spoken = spoken_answer_times(a.model, a.voice, waves["1s"], a.repeats)
    print(f"spoken answer, 1s clip: earful first audio {spoken['earful']['first_audio_s'] * 1000:.0f} ms | cascade (Whisper tiny.en -> "
          f"{a.voice}) {spoken['cascade_whisper_tiny_then_voice']['first_audio_s'] * 1000:.0f} ms")
    report = {"clips": results, "quantized": quantized, "realtime_3s": realtime, "spoken_answer_1s": spoken, "model": a.model, "new_tokens": a.new_tokens, "repeats": a.repeats, **footer(started)}
    out = write_report(a.out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
