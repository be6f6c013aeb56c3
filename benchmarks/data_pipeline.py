"""The data pipeline's two costs that matter at thousands of hours, each against its alternative in one run.

1. Segmenting a long recording into 30 s pieces: ffmpeg stream copy (what `earful data segment
   --by fixed` does) vs decoding and encoding again (`--reencode`), on the same file, as WAV and
   as MP3 (a podcast's usual format). Figure: real-time factor (audio seconds per wall second).
   The recording is FSDD clips end to end (--hours long).
2. Pre-encoding with the frozen Whisper tiny.en encoder (what `earful data encode` runs):
   length-sorted batches vs the manifest's own order, same clips, same batch size. Figure: audio
   hours per hour, and the share of encoder frames spent on padding.

    .venv/bin/python benchmarks/data_pipeline.py [--hours 1] [--clips 1000] [--out benchmarks/results/data_pipeline.json]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

from reporting import footer, write_report

ROOT = Path(__file__).resolve().parents[1]


def long_recording(folder: Path, hours: float) -> Path:
    from earful.data.fsdd import default_fsdd_dir

    clips = sorted((default_fsdd_dir() / "recordings").glob("*.wav"))
    if not clips:
        raise SystemExit("FSDD not found (set EARFUL_FSDD)")
    path = folder / "long.wav"
    target = int(hours * 3600 * 8000)
    with sf.SoundFile(path, "w", 8000, 1, subtype="PCM_16") as out:
        written, i = 0, 0
        while written < target:
            w, _ = sf.read(clips[i % len(clips)], dtype="int16")
            out.write(w)
            written += len(w)
            i += 1
    return path


def to_mp3(wav: Path) -> Path:
    import subprocess

    from earful.data.ingest import ffmpeg_exe

    mp3 = wav.with_suffix(".mp3")
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(wav), "-c:a", "libmp3lame", "-b:a", "64k", str(mp3)], check=True)
    return mp3


def time_segmenting(path: Path, work: Path, reencode: bool) -> dict:
    from earful.data.segment import split_fixed

    out = work / f"seg-{path.suffix[1:]}-{'reencode' if reencode else 'copy'}"
    start = time.perf_counter()
    pieces = split_fixed(path, out, 30.0, reencode=reencode)
    seconds = time.perf_counter() - start
    audio = sf.info(path).duration
    return {"pieces": len(pieces), "wall_s": round(seconds, 3), "real_time_factor": round(audio / seconds, 1)}


def time_encoding(clips: list[Path], batch_size: int, sort: bool) -> dict:
    from earful.audio import load_audio
    from earful.data.shards import FrozenEncoder

    encoder = _ENCODER.setdefault("e", FrozenEncoder("bundled:whisper-tiny.en"))
    waves = [load_audio(c, 16000) for c in clips]
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i])) if sort else list(range(len(waves)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    encoder([waves[0]])  # warm-up
    real_frames = padded_frames = 0
    start = time.perf_counter()
    for b in batches:
        out = encoder([waves[i] for i in b])
        longest = max(t.shape[0] for t in out)
        real_frames += sum(t.shape[0] for t in out)
        padded_frames += longest * len(out)
    seconds = time.perf_counter() - start
    audio = sum(len(w) for w in waves) / 16000
    return {"batches": len(batches), "wall_s": round(seconds, 2), "audio_hours_per_hour": round(audio / seconds, 1),
            "padding_share": round(1 - real_frames / padded_frames, 3)}


_ENCODER: dict = {}


def main(argv: list[str] | None = None) -> int:
    from earful.data.fsdd import default_fsdd_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=1.0, help="length of the long recording (default 1)")
    p.add_argument("--clips", type=int, default=1000, help="FSDD clips to pre-encode (default 1000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wav = long_recording(work, a.hours)
        mp3 = to_mp3(wav)
        segmenting = {}
        for path in (wav, mp3):
            copy, again = time_segmenting(path, work, False), time_segmenting(path, work, True)
            segmenting[path.suffix[1:]] = {"stream_copy": copy, "reencode": again,
                                           "copy_speedup": round(again["wall_s"] / copy["wall_s"], 1)}
            print(f"segment {path.suffix[1:]}: copy {copy['real_time_factor']:.0f}x real time, re-encode {again['real_time_factor']:.0f}x "
                  f"({segmenting[path.suffix[1:]]['copy_speedup']}x faster by copy)")
    clips = sorted((default_fsdd_dir() / "recordings").glob("*.wav"))
    random.Random(0).shuffle(clips)
    clips = clips[: a.clips]
    unsorted = time_encoding(clips, a.batch_size, sort=False)
    sorted_ = time_encoding(clips, a.batch_size, sort=True)
    encoding = {"length_sorted": sorted_, "manifest_order": unsorted,
                "sorted_speedup": round(sorted_["audio_hours_per_hour"] / unsorted["audio_hours_per_hour"], 2),
                "clips": len(clips), "batch_size": a.batch_size, "encoder": "bundled:whisper-tiny.en (no 30 s padding)"}
    print(f"encode: sorted {sorted_['audio_hours_per_hour']:.0f} audio-h/h (padding {sorted_['padding_share']:.0%}), "
          f"unsorted {unsorted['audio_hours_per_hour']:.0f} (padding {unsorted['padding_share']:.0%}): {encoding['sorted_speedup']}x")
    report = {"recording_hours": a.hours, "segmenting": segmenting, "encoding": encoding, **footer(started)}
    out = write_report(a.out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
