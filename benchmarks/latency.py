"""Latency of a trained earful listening LM next to its peers, on the same clips, in one run.

For a ~1 s clip (one FSDD recording, padded with silence to 1.0 s) and a ~10 s clip (FSDD
recordings of one speaker end to end), each system is timed from the waveform in memory:

- earful: the trained model (--model, default runs/digits/model from scripts/quickstart.sh), features
  without 30 s padding, greedy decoding;
- whisper_tiny_zero_shot: the same bundled Whisper tiny.en as plain ASR through transformers
  (`WhisperForConditionalGeneration.generate`, features padded to 30 s as transformers does);
- pocketsphinx: 5.1.1's default US English model and language model (no token stream: it gives
  a result at the end, so its time to first token is its time to the whole result).

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
    return {"1s": one, "10s": np.concatenate(parts)[: 10 * SR]}


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


def earful_system(model_dir: str, new_tokens: int):
    from earful.models.build import load_speech_lm

    lm, processor = load_speech_lm(model_dir)

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "digits" / "model"), help="trained earful model folder (default runs/digits/model)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each LM generates (default 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--voice", default="piper:joe@noise0,w0", help="offline voice that reads the answers out (default piper:joe@noise0,w0)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    a = p.parse_args(argv)
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"{a.model}: no trained model there; run `bash scripts/quickstart.sh` first or pass --model DIR")
    started = time.perf_counter()
    waves = clips()
    earful_run, whisper_run = earful_system(a.model, a.new_tokens), whisper_system(a.new_tokens)
    results = {}
    for name, wave in waves.items():
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
    spoken = spoken_answer_times(a.model, a.voice, waves["1s"], a.repeats)
    print(f"spoken answer, 1s clip: earful first audio {spoken['earful']['first_audio_s'] * 1000:.0f} ms | cascade (Whisper tiny.en -> "
          f"{a.voice}) {spoken['cascade_whisper_tiny_then_voice']['first_audio_s'] * 1000:.0f} ms")
    report = {"clips": results, "spoken_answer_1s": spoken, "model": a.model, "new_tokens": a.new_tokens, "repeats": a.repeats, **footer(started)}
    out = write_report(a.out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
