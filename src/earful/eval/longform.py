"""Long-form transcription: recordings of any length, cut into segments the encoder takes, with timestamps.

A recording is decoded block by block (`stream_audio`: soundfile's blocks for WAV, FLAC, OGG and
MP3, an ffmpeg pipe for the containers only ffmpeg reads, the same split `earful.audio` makes),
mixed to mono and resampled as a stream (soxr), and cut as it arrives:

- `vad` (default): speech regions found by Silero VAD (the model `earful data segment` uses), a
  region ending where at least `VAD_MIN_SILENCE_S` of silence follows, padded by `VAD_PAD_S`, and
  split by the VAD at its quietest point when longer than `segment_seconds`. Silence between
  regions is never transcribed.
- `fixed`: windows of `segment_seconds` that share `overlap` seconds with the next, so a word cut
  at one window's edge is whole in the other; the words the two transcripts share at the seam are
  kept once, and each segment's shown times end half-way through the overlap, so segments tile
  the recording.

Segments go to the model `batch_size` at a time. At most one block, plus the one segment that
runs on past it, is held as float32 (a block is `BLOCK_SECONDS`), so an hour costs the memory of
a few minutes; only the segments' text and times grow with the length.

    transcript = transcribe_long("meeting.flac", texts_of(model, processor), sampling_rate=16000, segment_seconds=30)
    print(to_srt(transcript))
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import jiwer
import numpy as np
import soundfile as sf

# earful.audio is the one decoder: these are its own checks and its ffmpeg plumbing, reused so a
# block-by-block decode refuses exactly what a whole-file decode refuses, in the same words.
from ..audio import AudioCorrupt, AudioEmpty, AudioError, AudioNonFinite, AudioTooLong, resample
from ..audio import _ffmpeg, _ffmpeg_container, _ffmpeg_probe, _ffmpeg_reason, _libsndfile_reason, _on_disk, _open_file
from ..audio import _open_header, _read_head
from ..data.dataset import length_grouped_batches
from ..data.segment import VAD_RATE
from ..errors import EarfulError
from ..models.processing import max_audio_seconds, min_audio_samples
from .asr import NORMALIZERS, NothingToScore, generate_text, load_clip, word_errors

logger = logging.getLogger(__name__)

BLOCK_SECONDS = 120.0  # audio decoded (and VAD-scanned) at a time: 7.7 MB as 16 kHz float32
DEFAULT_MAX_HOURS = 4.0  # the hard limit: longer files are refused from their header, before any decode
DEFAULT_OVERLAP_S = 2.0  # fixed windows: longer than a spoken word, so each word is whole in one window
VAD_MIN_SILENCE_S = 0.3  # a pause this long ends a segment: between sentences (or digit strings), not within words
VAD_PAD_S = 0.2  # speech kept either side of a region, so onsets and word endings are not clipped
VAD_THRESHOLD = 0.5  # Silero's default speech probability
VAD_CONTEXT_S = 1.0  # audio before a region left open at a block's end that the next scan hears again
VAD_WINDOW = 512  # the samples Silero scores at a time, at 16 kHz
TOKENS_PER_SECOND = 8  # new-token budget per second of segment: fast speech is ~3 words (~5 tokens) a second
MIN_NEW_TOKENS = 64
SPLITS = ("vad", "fixed")
FORMATS = ("text", "json", "srt", "vtt")


class LongFormError(EarfulError, ValueError):
    """Long-form settings that cannot work (a window longer than the encoder takes, an overlap as long as the window)."""


@dataclass
class Segment:
    id: int
    start: float  # seconds from the start of the recording
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)  # the token ids generated, where the generator reports them


@dataclass
class Transcript:
    duration: float  # seconds of audio decoded
    segments: list[Segment]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)

    def to_dict(self) -> dict:
        return {"duration": round(self.duration, 3), "text": self.text,
                "segments": [{k: (round(v, 3) if k in ("start", "end") else v) for k, v in asdict(s).items() if k != "tokens"}
                             for s in self.segments]}


def check_settings(split: str, segment_seconds: float, overlap: float = DEFAULT_OVERLAP_S, encoder_limit: float | None = None,
                   max_hours: float = DEFAULT_MAX_HOURS) -> None:
    """Every problem with the long-form settings at once, as one `LongFormError`."""
    problems = []
    if split not in SPLITS:
        problems.append(f"split must be one of {', '.join(SPLITS)}, found {split!r}")
    if not segment_seconds > 0:
        problems.append(f"segment seconds must be above 0, found {segment_seconds:g}")
    elif encoder_limit is not None and segment_seconds > encoder_limit:
        problems.append(f"segment seconds {segment_seconds:g} is longer than this model's encoder takes ({encoder_limit:g} s)")
    if split == "fixed" and not 0 <= overlap < segment_seconds:
        problems.append(f"overlap must be at least 0 and shorter than a window ({segment_seconds:g} s), found {overlap:g}")
    if not max_hours > 0:
        problems.append(f"max hours must be above 0, found {max_hours:g}")
    if problems:
        raise LongFormError("; ".join(problems))


# -- decoding, a block at a time ----------------------------------------------------------------
def stated_seconds(source: str | Path | bytes, name: str | None = None) -> float | None:
    """A recording's length from its header, nothing decoded; None where the header states none
    (a streamed WebM). Raises the `AudioError` a decode would (missing, empty, not audio, ...)."""
    name = _label(source, name)
    with _opened(source) as (f, file):
        head = _read_head(f, name)
        container = _ffmpeg_container(head)
        if container is None:
            with _open_header(f, name, head) as sfile:
                return sfile.frames / sfile.samplerate
        with _on_disk(f, file) as path:
            return _ffmpeg_probe(_ffmpeg(name, container), path, name, container)


@contextmanager
def _opened(source: str | Path | bytes) -> Iterator[tuple[BinaryIO, Path | None]]:
    """(open binary file, its path or None) for a path, or for bytes already in memory."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        f, file = io.BytesIO(bytes(source)), None
    else:
        file = Path(source)
        f = _open_file(file)
    with f:
        yield f, file


def _label(source: str | Path | bytes, name: str | None) -> str:
    return name or ("<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source))


def stream_audio(source: str | Path | bytes, sampling_rate: int = VAD_RATE, *, max_seconds: float | None = None,
                 block_seconds: float = BLOCK_SECONDS, name: str | None = None, limit_hint: str = "") -> Iterator[np.ndarray]:
    """A recording as float32 mono blocks at `sampling_rate`, each (T,), about `block_seconds` long.

    Checks what `earful.audio.load_audio` checks (raising the same `AudioError`s), the length
    against `max_seconds` from the header before any decode (`limit_hint` ends that message: how
    to raise the limit); a length the header does not state is checked as the blocks arrive.
    """
    name = _label(source, name)
    with _opened(source) as (f, file):
        head = _read_head(f, name)
        container = _ffmpeg_container(head)
        if container is None:
            yield from _soundfile_blocks(f, head, name, sampling_rate, max_seconds, block_seconds, limit_hint)
        else:
            with _on_disk(f, file) as path:
                yield from _ffmpeg_blocks(path, name, container, sampling_rate, max_seconds, block_seconds, limit_hint)


def too_long(name: str, seconds: float, max_seconds: float, hint: str = "") -> AudioTooLong:
    length = f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"
    return AudioTooLong(name, f"{length} long, more than the limit of {_hours(max_seconds)}{hint}")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


class _Mono:
    """Interleaved (T, C) float32 blocks -> mono at the target rate, resampled as one stream."""

    def __init__(self, name: str, rate: int, target: int):
        import soxr

        self.name, self.rate, self.in_samples = name, rate, 0
        self.stream = None if rate == target else soxr.ResampleStream(rate, target, 1, dtype="float32", quality="HQ")

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        bad = ~np.isfinite(block)
        if bad.any():
            first = (self.in_samples + np.argwhere(bad)[0, 0]) / self.rate
            raise AudioNonFinite(self.name, f"{int(bad.sum())} NaN/inf samples in a block, the first at {first:.3f} s; "
                                            "the file was written from broken float data, regenerate it")
        self.in_samples += len(block)
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1)  # (T, C) -> (T,)
        if self.stream is None:
            return mono.astype(np.float32, copy=True)  # never a view of the reader's buffer
        return self.stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32), last=last)


def _soundfile_blocks(f, head: bytes, name: str, sampling_rate: int, max_seconds: float | None, block_seconds: float,
                      hint: str) -> Iterator[np.ndarray]:
    with _open_header(f, name, head) as sfile:
        rate, frames = sfile.samplerate, sfile.frames
        if max_seconds is not None and frames / rate > max_seconds:
            raise too_long(name, frames / rate, max_seconds, hint)
        mono = _Mono(name, rate, sampling_rate)
        buf = np.empty((max(1, round(block_seconds * rate)), sfile.channels), np.float32)  # (T, C), read into again and again
        try:
            while len(block := sfile.read(out=buf)):
                if len(out := mono(block)):
                    yield out
        except (sf.SoundFileError, RuntimeError) as err:
            raise AudioCorrupt(name, f"truncated or corrupt {sfile.format} file: decoding failed at "
                                     f"{mono.in_samples / rate:.1f} s ({_libsndfile_reason(err)}); re-export or re-download it") from err
        tail = mono(np.zeros((0, sfile.channels), np.float32), last=True)
        if len(tail):
            yield tail
    if mono.in_samples < 0.9 * frames:  # earful.audio's tolerance: MP3 frame counts are estimates
        raise AudioCorrupt(name, f"truncated {sfile.format} file: header says {frames / rate:.2f} s but only "
                                 f"{mono.in_samples / rate:.2f} s could be decoded; re-export or re-download it")


def _ffmpeg_blocks(path: Path, name: str, container: str, sampling_rate: int, max_seconds: float | None, block_seconds: float,
                   hint: str) -> Iterator[np.ndarray]:
    """ffmpeg decodes to a 32-bit float WAV on a pipe, at the file's own rate and channels (as earful.audio asks it)."""
    exe = _ffmpeg(name, container)
    stated = _ffmpeg_probe(exe, path, name, container)
    if stated is not None and max_seconds is not None and stated > max_seconds:
        raise too_long(name, stated, max_seconds, hint)
    cmd = [exe, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav"]
    cmd += ["-t", f"{max_seconds + 1.0:.3f}"] if max_seconds is not None else []  # a second past the limit tells it is over
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*cmd, "pipe:1"], stdout=subprocess.PIPE, stderr=err)
        finished = False
        try:
            channels, rate = _wav_stream_header(proc.stdout, name, container)
            mono, frame = _Mono(name, rate, sampling_rate), 4 * channels
            while raw := proc.stdout.read(max(1, round(block_seconds * rate)) * frame):
                block = np.frombuffer(raw[: len(raw) // frame * frame], dtype="<f4").reshape(-1, channels)
                if max_seconds is not None and (mono.in_samples + len(block)) / rate > max_seconds:
                    raise too_long(name, (mono.in_samples + len(block)) / rate, max_seconds, hint)
                if len(out := mono(block)):
                    yield out
            if len(tail := mono(np.zeros((0, channels), np.float32), last=True)):
                yield tail
            finished = True
        finally:
            if not finished:  # an error, or a consumer that stopped early: no ffmpeg left behind
                proc.kill()
            proc.stdout.close()
            proc.wait()
        err.seek(0)
        reason = _ffmpeg_reason(err.read().decode("utf-8", "replace"), path, name)
    if proc.returncode != 0:
        raise AudioCorrupt(name, f"truncated or corrupt {container} file: decoding failed (ffmpeg: {reason}); re-export or re-download it")
    if mono.in_samples == 0:
        raise AudioEmpty(name, f"valid {container} header but no samples (empty recording)")
    decoded = mono.in_samples / rate
    if stated is not None and decoded < 0.9 * stated - 0.3:  # earful.audio's tolerance, a codec frame included
        raise AudioCorrupt(name, f"truncated {container} file: header says {stated:.2f} s but only {decoded:.2f} s could be decoded; "
                                 "re-export or re-download it")


def _wav_stream_header(pipe, name: str, container: str) -> tuple[int, int]:
    """(channels, rate) of the float WAV ffmpeg writes, read up to its data chunk (whose size a pipe leaves unset)."""
    riff = pipe.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF":
        raise AudioCorrupt(name, f"truncated or corrupt {container} file: ffmpeg decoded no audio; re-export or re-download it")
    channels = rate = None
    while len(chunk := pipe.read(8)) == 8:
        kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if kind == b"data":
            if channels is None:
                break
            return channels, rate
        body = pipe.read(size + size % 2)
        if kind == b"fmt ":
            channels, rate = struct.unpack("<HI", body[2:8])
    raise AudioCorrupt(name, f"truncated or corrupt {container} file: ffmpeg's output has no audio data; re-export or re-download it")


# -- cutting into segments ---------------------------------------------------------------------
@dataclass
class Piece:
    start: float  # seconds
    end: float
    wave: np.ndarray  # (T,) float32 at the splitter's rate


_VAD_LOCK = threading.Lock()  # one Silero model, stateful: server threads take turns
_VAD_MODEL = None


def _vad_model():
    global _VAD_MODEL
    if _VAD_MODEL is None:
        from silero_vad import load_silero_vad

        try:
            import onnxruntime  # noqa: F401  the ONNX export runs ~3x faster than the TorchScript one here

            _VAD_MODEL = load_silero_vad(onnx=True)
        except ImportError:
            _VAD_MODEL = load_silero_vad()
    return _VAD_MODEL


def vad_probabilities(wave: np.ndarray) -> tuple[np.ndarray, int]:
    """Silero's speech probability of each `VAD_WINDOW`-sample window of a 16 kHz wave, scanned
    from a fresh state: (probabilities (n,), samples per window). For live audio (`/v1/realtime`)."""
    import torch

    n = len(wave) // VAD_WINDOW
    with _VAD_LOCK:
        model = _vad_model()
        model.reset_states()
        probs = [float(model(torch.from_numpy(np.ascontiguousarray(wave[i * VAD_WINDOW : (i + 1) * VAD_WINDOW], dtype=np.float32)), VAD_RATE))
                 for i in range(n)]
    return np.asarray(probs, dtype=np.float32), VAD_WINDOW


def _speech(wave: np.ndarray, segment_seconds: float) -> list[tuple[int, int]]:
    """(start, end) samples of the speech regions of a 16 kHz buffer, each at most `segment_seconds`."""
    import torch
    from silero_vad import get_speech_timestamps

    with _VAD_LOCK:
        stamps = get_speech_timestamps(torch.from_numpy(wave), _vad_model(), sampling_rate=VAD_RATE, threshold=VAD_THRESHOLD,
                                       min_silence_duration_ms=round(VAD_MIN_SILENCE_S * 1000),
                                       speech_pad_ms=round(VAD_PAD_S * 1000), max_speech_duration_s=segment_seconds)
    longest = int(segment_seconds * VAD_RATE)
    out = []
    for s in stamps:  # the padding may take a region split at the longest just past it: cut it in equal parts
        a, b = s["start"], s["end"]
        n = -(-(b - a) // longest)
        out += [(a + (b - a) * i // n, a + (b - a) * (i + 1) // n) for i in range(n)]
    return out


def vad_pieces(blocks: Iterable[np.ndarray], *, segment_seconds: float) -> Iterator[Piece]:
    """Speech regions of 16 kHz blocks, in order, found a block at a time.

    Each block is scanned after what the last scan left open: a region that may still go on (less
    than a minimum silence and its pad after it when the block ended) is scanned again with the
    next block, from `VAD_CONTEXT_S` before its start (Silero misses a word it hears from the
    middle), but not from before the end of a region already given out, and on the whole-file
    scan's grid of `VAD_WINDOW` samples (Silero's probabilities move with the window's phase).
    So no region is cut at a block's edge or given twice, and the buffer stays at most one block
    plus one segment.
    """
    settle = int((VAD_MIN_SILENCE_S + VAD_PAD_S) * VAD_RATE)  # silence after a region that ends it for sure
    context = int(VAD_CONTEXT_S * VAD_RATE)
    buffer, offset, given = np.zeros(0, np.float32), 0, 0  # offset: samples before buffer[0]; given: end of the last region out
    for block, last in _with_last(blocks):
        buffer = np.concatenate([buffer, block])
        regions = [(max(a, given - offset), b) for a, b in _speech(buffer, segment_seconds) if b > given - offset]
        open_from = len(buffer)  # where a region that may go on starts
        if not last and regions and regions[-1][1] + settle > len(buffer):
            open_from = regions.pop()[0]
        for a, b in regions:
            yield Piece((offset + a) / VAD_RATE, (offset + b) / VAD_RATE, buffer[a:b].copy())
            given = offset + b
        if last:
            return
        keep = min(len(buffer), max(given - offset, open_from - context, 0))
        keep = (offset + keep) // VAD_WINDOW * VAD_WINDOW - offset  # offset stays on the grid
        buffer, offset = buffer[keep:], offset + keep


def fixed_pieces(blocks: Iterable[np.ndarray], rate: int, *, window_seconds: float, overlap_seconds: float) -> Iterator[Piece]:
    """Windows of `window_seconds`, each starting `window - overlap` after the one before; the last one shorter."""
    window, overlap = round(window_seconds * rate), round(overlap_seconds * rate)
    step = window - overlap
    buffer, offset = np.zeros(0, np.float32), 0
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        while len(buffer) >= window:
            yield Piece(offset / rate, (offset + window) / rate, buffer[:window].copy())
            buffer, offset = buffer[step:], offset + step
    if len(buffer) > (overlap if offset else 0):  # the tail holds audio no window has had
        yield Piece(offset / rate, (offset + len(buffer)) / rate, buffer)


def _with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


class _Counted:
    """Blocks passed through, their samples counted: the recording's length once they are all read."""

    def __init__(self, blocks: Iterable[np.ndarray]):
        self.blocks, self.samples = blocks, 0

    def __iter__(self):
        for block in self.blocks:
            self.samples += len(block)
            yield block


# -- transcribing -------------------------------------------------------------------------------
# What a generator gives back for each wave: its text, or an object with `.text` (and `.token_ids`).
Generate = Callable[[list[np.ndarray]], list]


def max_new_tokens_for(seconds: float) -> int:
    """A token budget that a segment's speech cannot outrun, and that a runaway repetition soon spends."""
    return max(MIN_NEW_TOKENS, math.ceil(seconds * TOKENS_PER_SECOND))


def texts_of(model, processor, prompt: str | None = None, max_new_tokens: int | None = None) -> Generate:
    """`generate_text` for a batch of segments, the token budget set by the longest (`max_new_tokens_for`)."""
    prompt = prompt or processor.prompt_format.default_prompt

    def generate(waves: list[np.ndarray]) -> list[str]:
        budget = max_new_tokens or max_new_tokens_for(max(len(w) for w in waves) / processor.sampling_rate)
        return generate_text(model, processor, waves, prompt, max_new_tokens=budget)

    return generate


def transcribe_long(source: str | Path | bytes, generate: Generate, *, sampling_rate: int, split: str = "vad",
                    segment_seconds: float = 30.0, overlap: float = DEFAULT_OVERLAP_S, batch_size: int = 8,
                    max_seconds: float | None = None, block_seconds: float = BLOCK_SECONDS, name: str | None = None,
                    limit_hint: str = "", min_samples: int = 1) -> Transcript:
    """A recording of any length, transcribed `batch_size` segments at a time by `generate`.

    `sampling_rate`: the rate `generate` takes; `min_samples`: segments shorter than this (the
    encoder's fewest) are left out. Raises `AudioError`s as `stream_audio` does.
    """
    check_settings(split, segment_seconds, overlap)
    rate = VAD_RATE if split == "vad" else sampling_rate  # Silero hears 16 kHz
    blocks = _Counted(stream_audio(source, rate, max_seconds=max_seconds, block_seconds=block_seconds, name=name,
                                   limit_hint=limit_hint))
    if split == "vad":
        pieces = vad_pieces(blocks, segment_seconds=segment_seconds)
    else:
        pieces = fixed_pieces(blocks, rate, window_seconds=segment_seconds, overlap_seconds=overlap)
    segments: list[Segment] = []
    batch: list[Piece] = []

    def flush() -> None:
        waves = [resample(p.wave, rate, sampling_rate) for p in batch]
        for p, out in zip(batch, generate(waves)):
            text, tokens = (out, []) if isinstance(out, str) else (out.text, list(getattr(out, "token_ids", [])))
            segments.append(Segment(len(segments), p.start, p.end, text.strip(), tokens))
        batch.clear()
        _trim_heap()

    for piece in pieces:
        if len(piece.wave) * sampling_rate < min_samples * rate:
            continue
        batch.append(piece)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    duration = blocks.samples / rate
    if split == "fixed":
        _seam(segments, overlap)
    logger.debug("%s: %.1f s in %d segments (%s)", name or source, duration, len(segments), split)
    return Transcript(duration, segments)


_LIBC = None


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc's `malloc_trim`; elsewhere nothing).

    Each batch's tensors differ in size from the last's and glibc keeps the holes they leave, so
    without this the resident size creeps up with the length of the recording (measured with a
    digits model: 1,094 -> 1,144 MB over 8 minutes of audio; flat at 1,020 MB with it).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_WORD = re.compile(r"[^\w']+")


def _seam(segments: list[Segment], overlap: float) -> None:
    """Fixed windows overlap: the words a window's transcript starts with that end the one before are
    dropped, and neighbours meet half-way through their shared audio."""
    most = max(1, math.ceil(overlap * 4))  # words that fit in the overlap, at a fast 4 a second
    for prev, seg in pairwise(segments):
        mid = (prev.end + seg.start) / 2 if prev.end > seg.start else seg.start
        prev.end, seg.start = mid, mid
        a, b = prev.text.split(), seg.text.split()
        a_keys, b_keys = [_WORD.sub("", w.lower()) for w in a], [_WORD.sub("", w.lower()) for w in b]
        for k in range(min(most, len(a), len(b)), 0, -1):
            if a_keys[-k:] == b_keys[:k]:
                seg.text = " ".join(b[k:])
                break


# -- formats ------------------------------------------------------------------------------------
def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue(text: str) -> str:
    """A cue's text on one line: a blank line would end the cue early, and "-->" is WebVTT's timing arrow."""
    return " ".join(text.split()).replace("-->", "->")


def to_srt(t: Transcript) -> str:
    """SubRip: numbered cues `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each; silent segments left out."""
    cues = [s for s in t.segments if s.text.strip()]
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_cue(s.text)}\n\n" for i, s in enumerate(cues, 1))


def to_vtt(t: Transcript) -> str:
    """WebVTT: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    cues = [s for s in t.segments if s.text.strip()]
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_cue(s.text)}\n\n" for s in cues)


def to_json(t: Transcript, file: str) -> str:
    """One line of JSON: file, duration, text and segments [{id, start, end, text}]."""
    return json.dumps({"file": file, **t.to_dict()}, ensure_ascii=False)


def compression_ratio(text: str) -> float:
    """Whisper's repetition signal: UTF-8 bytes over their zlib-compressed bytes."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


def short_transcript(text: str, seconds: float) -> Transcript:
    """A clip the encoder takes whole: one segment, the whole clip."""
    return Transcript(seconds, [Segment(0, 0.0, seconds, text.strip())])


def render(t: Transcript, fmt: str, file: str) -> str:
    """The transcript as `earful transcribe --format FMT` prints it (text: FILE<TAB>transcript)."""
    if fmt == "text":
        return f"{file}\t{t.text}\n"
    if fmt == "json":
        return to_json(t, file) + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    raise LongFormError(f"format must be one of {', '.join(FORMATS)}, found {fmt!r}")


def is_long(seconds: float | None, encoder_limit: float | None) -> bool:
    """Whether a recording takes the long-form path: longer than the encoder reads whole (unknown: yes)."""
    return seconds is None or seconds > (encoder_limit or 30.0)



# -- scoring a manifest that holds long recordings ------------------------------------------------
def evaluate_asr_long(model, processor, utterances: list, *, prompt: str, batch_size: int = 16, max_new_tokens: int = 32,
                      normalizer: str = "whisper", split: str = "vad", segment_seconds: float | None = None,
                      overlap: float = DEFAULT_OVERLAP_S, max_hours: float = DEFAULT_MAX_HOURS) -> dict:
    """`evaluate_asr` for manifests whose recordings may be longer than the encoder takes.

    Clips the encoder reads whole are batched as `evaluate_asr` batches them; longer ones are
    transcribed long-form (`transcribe_long`), their row keeping the segments. One corpus score
    over both, in `evaluate_asr`'s report shape. A recording over `max_hours`, or one that cannot
    be read, is a reject with the reason.
    """
    fe, enc = processor.feature_extractor, processor.config.encoder_config
    limit = max_audio_seconds(fe, enc)
    segment_seconds = segment_seconds or limit or 30.0
    check_settings(split, segment_seconds, overlap, limit, max_hours)
    norm, start = NORMALIZERS[normalizer], time.perf_counter()
    waves, short, long, rejects, hyps = [], [], [], [], {}

    def reject(u, e: AudioError) -> None:
        rejects.append({"id": u.id, "audio": u.audio, "error": type(e).__name__, "reason": e.reason})
        logger.warning("skipping %s", e)

    for i, u in enumerate(utterances):
        try:
            seconds = stated_seconds(u.audio)
            if not is_long(seconds, limit):
                waves.append(load_clip(u.audio, fe, enc))
                short.append(i)
            elif seconds is not None and seconds > max_hours * 3600:
                raise too_long(u.audio, seconds, max_hours * 3600, " (eval asr --max-hours)")
            else:
                long.append(i)
        except AudioError as e:
            reject(u, e)
    model.eval()
    for idx in length_grouped_batches([len(w) for w in waves], batch_size, 0, shuffle=False):
        for j, text in zip(idx, generate_text(model, processor, [waves[j] for j in idx], prompt, max_new_tokens=max_new_tokens)):
            hyps[short[j]] = (text, None)
    generate = texts_of(model, processor, prompt)
    for i in long:
        u = utterances[i]
        try:
            t = transcribe_long(u.audio, generate, sampling_rate=processor.sampling_rate, split=split, segment_seconds=segment_seconds,
                                overlap=overlap, batch_size=batch_size, max_seconds=max_hours * 3600, name=u.audio,
                                limit_hint=" (eval asr --max-hours)", min_samples=min_audio_samples(fe, enc))
            hyps[i] = (t.text, t)
        except AudioError as e:
            reject(u, e)
    rows, refs_n, hyps_n = [], [], []
    for i in sorted(hyps):
        u, (h, t) = utterances[i], hyps[i]
        r_n, h_n = norm(u.text), norm(h)
        row = {"id": u.id, "audio": u.audio, "reference": u.text, "hypothesis": h, "correct": r_n == h_n}
        rows.append(row if t is None else {**row, "duration": round(t.duration, 3), "segments": t.to_dict()["segments"]})
        if r_n:
            refs_n.append(r_n)
            hyps_n.append(h_n)
    if not refs_n:
        why = f"; {len(rejects)} rejected, the first: {rejects[0]['audio']}: {rejects[0]['reason']}" if rejects else ""
        raise NothingToScore(f"no utterance with a non-empty transcript could be read: nothing to score{why}")
    return {**word_errors(refs_n, hyps_n), "cer": jiwer.cer(refs_n, hyps_n), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "normalizer": normalizer, "n": len(rows), "rejected": len(rejects), "long_form": {"n": len(long), "split": split,
            "segment_seconds": segment_seconds}, "seconds": round(time.perf_counter() - start, 2), "utterances": rows, "rejects": rejects}
