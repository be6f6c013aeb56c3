"""`earful data segment`: long recordings -> clips a speech LM can take, as a new manifest.

Two ways:
- `fixed`: equal slices cut by ffmpeg's segment muxer with stream copy (`-c copy`): no decoding,
  no re-encoding, thousands of times faster than real time (`--reencode` decodes and encodes
  again instead, for formats whose packets cannot be cut cleanly, and for comparison);
- `vad`: speech regions found by Silero VAD (the `silero-vad` package ships its model), neighbours
  merged up to --max-seconds, regions shorter than --min-seconds dropped; written as 16 kHz WAV.

The ffmpeg binary is the one `imageio-ffmpeg` ships (nothing to install by hand). Segments are
written under temporary names and renamed, a recording at a time; a recording that cannot be read
is a reject, and the job goes on.

A recording's id is its manifest id, or its path relative to the folder all the inputs share (so
`a/x.wav` and `b/x.wav` are `a/x` and `b/x`, made unique as `earful data ingest` does); segment
ids are ID-00000, ...; segment files SEGMENTS/NAME-TAG-00000.EXT, where TAG is a hash of the
recording's path, so two recordings of one name never write the same file.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from .. import atomic
from ..audio import AudioError, audio_duration, load_audio
from .ingest import ffmpeg_exe, path_tag, relative_ids, safe_name, unique_ids
from .manifest import Utterance, read_manifest, write_manifest

VAD_RATE = 16000


def split_fixed(path: str | Path, out_dir: str | Path, seconds: float, *, reencode: bool = False,
                name: str | None = None) -> list[Path]:
    """Cut `path` into `seconds`-long pieces OUT_DIR/NAME-00000.EXT ... (stream copy unless reencode);
    NAME defaults to the file's stem."""
    path, out_dir = Path(path), Path(out_dir)
    name = name or path.stem
    if not path.is_file():
        raise AudioError(path, "file not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower() or ".wav"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".segment-") as tmp:
        codec = ["-c", "copy"] if not reencode else ["-c:a", {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".ogg": "libvorbis"}.get(ext, "flac")]
        if reencode and ext not in (".wav", ".flac", ".mp3", ".ogg"):
            ext = ".flac"
        cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(path), "-vn", "-map", "0:a", *codec,
               "-f", "segment", "-segment_time", f"{seconds}", "-reset_timestamps", "1", str(Path(tmp) / f"{name}-%05d{ext}")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AudioError(path, f"ffmpeg could not segment it: {(r.stderr.strip().splitlines() or ['unknown error'])[-1]}")
        pieces = sorted(Path(tmp).iterdir())
        if not pieces:
            raise AudioError(path, "ffmpeg found no audio stream to segment")
        out = []
        for piece in pieces:
            target = out_dir / piece.name
            os.replace(piece, target)
            out.append(target)
    return out


def speech_regions(wave: np.ndarray, *, min_seconds: float = 1.0, max_seconds: float = 30.0, threshold: float = 0.5) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in a 16 kHz clip, merged up to max_seconds, none under min_seconds."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = _vad_model(load_silero_vad)
    stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), model, sampling_rate=VAD_RATE,
                                   threshold=threshold, max_speech_duration_s=max_seconds, return_seconds=False)
    merged: list[list[int]] = []
    for s in stamps:
        if merged and s["end"] - merged[-1][0] <= max_seconds * VAD_RATE:
            merged[-1][1] = s["end"]  # the gap between them travels with the segment
        else:
            merged.append([s["start"], s["end"]])
    return [(a / VAD_RATE, b / VAD_RATE) for a, b in merged if (b - a) / VAD_RATE >= min_seconds]


_VAD = None


def _vad_model(loader):
    global _VAD
    if _VAD is None:
        _VAD = loader()
    return _VAD


def split_vad(path: str | Path, out_dir: str | Path, *, min_seconds: float = 1.0, max_seconds: float = 30.0,
              name: str | None = None) -> list[tuple[Path, float, float]]:
    """Speech regions of `path` as 16 kHz WAVs OUT_DIR/NAME-00000.wav ... (NAME: the file's stem by
    default); returns (file, start, end)."""
    path, out_dir = Path(path), Path(out_dir)
    name = name or path.stem
    wave = load_audio(path, VAD_RATE, max_seconds=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (a, b) in enumerate(speech_regions(wave, min_seconds=min_seconds, max_seconds=max_seconds)):
        target = out_dir / f"{name}-{i:05d}.wav"
        tmp = target.with_name(f".{target.stem}.tmp.{os.getpid()}.wav")
        sf.write(tmp, wave[int(a * VAD_RATE) : int(b * VAD_RATE)], VAD_RATE, subtype="PCM_16")
        os.replace(tmp, target)
        out.append((target, a, b))
    return out


def segment(inputs: list[str], out_dir: str | Path, *, by: str = "fixed", seconds: float = 30.0, min_seconds: float = 1.0,
            max_seconds: float = 30.0, reencode: bool = False, progress: bool = True) -> dict:
    """Segment recordings (audio files, or the clips of manifests) into OUT/manifest.jsonl."""
    if by not in ("fixed", "vad"):
        raise ValueError(f"--by must be fixed or vad, not {by!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources: list[Utterance] = []
    for item in inputs:
        sources += read_manifest(item) if item.endswith(".jsonl") else [Utterance(audio=os.path.abspath(item))]
    unnamed = [u for u in sources if not u.id]
    for u, i in zip(unnamed, relative_ids([u.audio for u in unnamed], [str(Path(u.audio).parent) for u in unnamed])):
        u.id = i
    ids = unique_ids([u.id for u in sources], [u.audio for u in sources])
    rows, rejects, audio_in, start = [], [], 0.0, time.perf_counter()
    for u, uid in tqdm(list(zip(sources, ids)), desc=f"segmenting ({by})", unit="file", disable=not progress):
        name = f"{safe_name(uid)}-{path_tag(u.audio)}"
        try:
            audio_in += audio_duration(u.audio)
            if by == "fixed":
                pieces = split_fixed(u.audio, out_dir / "segments", seconds, reencode=reencode, name=name)
                for i, piece in enumerate(pieces):
                    rows.append(Utterance(audio=str(piece), id=f"{uid}-{i:05d}", speaker=u.speaker, duration=round(audio_duration(piece), 4)))
            else:
                regions = split_vad(u.audio, out_dir / "segments", min_seconds=min_seconds, max_seconds=max_seconds, name=name)
                for i, (piece, a, b) in enumerate(regions):
                    rows.append(Utterance(audio=str(piece), id=f"{uid}-{i:05d}", speaker=u.speaker, duration=round(b - a, 4)))
        except AudioError as e:
            rejects.append({"audio": u.audio, "error": type(e).__name__, "reason": e.reason})
    write_manifest(rows, out_dir / "manifest.jsonl")
    atomic.write_jsonl(out_dir / "rejects.jsonl", rejects)
    seconds_taken = time.perf_counter() - start
    return {"in": len(sources), "segments": len(rows), "rejected": len(rejects), "audio_seconds_in": round(audio_in, 2),
            "audio_seconds_out": round(sum(r.duration for r in rows), 2), "seconds": round(seconds_taken, 3),
            "real_time_factor": round(audio_in / seconds_taken, 1) if seconds_taken > 0 else None}
