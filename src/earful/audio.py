"""Audio input for every earful entry point: load, validate, mix to mono, resample.

`load_audio` (a file) and `decode_audio_bytes` (an upload, a shard member) decode WAV, FLAC,
OGG (Vorbis, Opus) and MP3 with soundfile, mix channels to mono by their mean, resample with soxr
and return a float32 1-D array. Containers libsndfile cannot read (MP4/M4A, WebM/Matroska, ADTS
AAC, WMA, AMR), recognised by their first bytes, are decoded by ffmpeg (the binary of the optional
`imageio-ffmpeg` package) to 32-bit float WAV at their own rate and channels, then take the same
path, so every verb reads every format the same way. Bad input raises a subclass of `AudioError`
whose message names the file, the problem and the fix, so a data run or a server request fails
with a line a person can act on.

Length limits are checked from the header before any sample is decoded: an hours-long file
costs a header read, not its size in memory (for ffmpeg's containers, a probe of the header;
where it states no duration, decoding stops just past the limit).
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf
import soxr

from .errors import EarfulError

logger = logging.getLogger(__name__)

# A speech LM prompt is seconds to minutes long; longer recordings belong to segmentation.
DEFAULT_MAX_SECONDS = 600.0

# A decoded file may fall short of its header's frame count by this fraction before we call it
# truncated: MP3 frame counts are estimates when the file has no Xing/LAME header.
_SHORTFALL_TOLERANCE = 0.10


# ... and ffmpeg's containers by a codec frame more: a stated length may count the encoder's last
# frame (WMA's is 2,048 samples, 0.26 s at 8 kHz), which the decoder does not give back.
_CODEC_FRAME_SECONDS = 0.3


class AudioError(EarfulError):
    """Audio that earful cannot use. `path` names the file (or upload), `reason` says why."""

    def __init__(self, path: str | Path, reason: str):
        # args=(path, reason) keeps the exception picklable across worker processes.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class AudioNotFound(AudioError):
    """The path does not exist or is a directory."""


class AudioEmpty(AudioError):
    """Zero bytes, or a valid header with zero samples."""


class AudioCorrupt(AudioError):
    """A known audio container (WAV, FLAC, OGG, MP3, M4A, ...) that is truncated or damaged."""


class AudioNotAudio(AudioError):
    """Bytes that are no audio format at all (text, an image, ... named .wav)."""


class AudioNonFinite(AudioError):
    """NaN or infinite samples (possible in float WAV/FLAC files)."""


class AudioTooLong(AudioError):
    """Longer than `max_seconds`."""


class AudioTooShort(AudioError):
    """Shorter than `min_seconds`."""


class AudioNeedsFfmpeg(AudioError):
    """A container only ffmpeg decodes (M4A, WebM, ...), and ffmpeg is not installed."""


def load_audio(
    path: str | Path,
    sampling_rate: int = 16000,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """Read an audio file as float32 mono at `sampling_rate`, shape (T,).

    `max_seconds=None` lifts the length limit; `min_seconds=0` (default) accepts any length.
    Raises a subclass of `AudioError` for any file that cannot be used.
    """
    path = Path(path)
    with _open_file(path) as f:
        return _decode(f, str(path), sampling_rate, max_seconds, min_seconds, file=path)


def decode_audio_bytes(
    data: bytes,
    sampling_rate: int = 16000,
    *,
    name: str = "<bytes>",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """`load_audio` for audio already in memory; `name` stands for the file in error messages."""
    return _decode(io.BytesIO(bytes(data)), name, sampling_rate, max_seconds, min_seconds)


def audio_duration(path: str | Path) -> float:
    """Length in seconds, read from the header without decoding (raises like `load_audio`).

    An ffmpeg container whose header states no length (a streamed WebM) is decoded to measure it.
    """
    path = Path(path)
    with _open_file(path) as f:
        head = _read_head(f, str(path))
        container = _ffmpeg_container(head)
        if container is not None:
            return _ffmpeg_seconds(path, str(path), container)
        with _open_header(f, str(path), head) as sfile:
            return sfile.frames / sfile.samplerate


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample (T,) or (T, C) audio from `orig_sr` to `target_sr` Hz with soxr "HQ"; float32."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def _open_file(path: Path) -> BinaryIO:
    if path.is_dir():
        raise AudioNotFound(path, "is a directory, not an audio file")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise AudioNotFound(path, "no such file; check the path (manifest paths are relative "
                                  "to the manifest's folder)") from None
    except OSError as err:
        raise AudioError(path, f"cannot be read: {err.strerror}") from err


def _read_head(f: BinaryIO, name: str) -> bytes:
    """The first 16 bytes (enough to tell every container apart); `f` is left at its start."""
    head = f.read(16)
    if not head:
        raise AudioEmpty(name, "file is empty (0 bytes); re-export or re-download it")
    f.seek(0)
    return head


def _open_header(f: BinaryIO, name: str, head: bytes) -> sf.SoundFile:
    """Open `f` with soundfile after checks that soundfile does not make itself."""
    _check_wav_data_complete(f, name)
    f.seek(0)
    try:
        sfile = sf.SoundFile(f)
    except (sf.SoundFileError, RuntimeError) as err:
        raise _open_error(name, head, err) from err
    if sfile.frames == 0:
        sfile.close()
        raise AudioEmpty(name, f"valid {sfile.format} header but no samples (empty recording)")
    return sfile


def _decode(f: BinaryIO, name: str, sampling_rate: int, max_seconds: float | None, min_seconds: float,
            file: Path | None = None) -> np.ndarray:
    """Decode `f` (the file at `file`, when there is one) after every check that can come first."""
    head = _read_head(f, name)
    container = _ffmpeg_container(head)
    if container is not None:  # ffmpeg turns it into a float WAV; the checks below then apply
        f = _ffmpeg_to_wav(f, file, name, container, max_seconds, min_seconds)
        head = _read_head(f, name)
    with _open_header(f, name, head) as sfile:
        rate, frames = sfile.samplerate, sfile.frames
        fmt = container or sfile.format
        seconds = frames / rate
        if max_seconds is not None and seconds > max_seconds:
            raise _too_long(name, f"{seconds:.1f} s", max_seconds)
        if seconds < min_seconds:
            raise _too_short(name, seconds, min_seconds)
        try:
            audio = sfile.read(dtype="float32", always_2d=True)  # (T, C)
        except (sf.SoundFileError, RuntimeError) as err:
            raise AudioCorrupt(name, f"truncated or corrupt {fmt} file: decoding failed "
                                     f"({_libsndfile_reason(err)}); re-export or re-download it"
                               ) from err

    if len(audio) < (1 - _SHORTFALL_TOLERANCE) * frames:
        raise AudioCorrupt(name, f"truncated {fmt} file: header says {seconds:.2f} s but only "
                                 f"{len(audio) / rate:.2f} s could be decoded; "
                                 "re-export or re-download it")
    bad = ~np.isfinite(audio)
    if bad.any():
        first = np.argwhere(bad)[0, 0] / rate
        raise AudioNonFinite(name, f"{int(bad.sum())} NaN/inf samples, the first at {first:.3f} s; "
                                   "the file was written from broken float data, regenerate it")
    logger.debug("%s: %s, %d Hz, %d channel(s), %.2f s", name, fmt, rate, audio.shape[1], seconds)
    return resample(audio.mean(axis=1), rate, sampling_rate)  # (T, C) -> (T,)


def _too_long(name: str, length: str, max_seconds: float) -> AudioTooLong:
    return AudioTooLong(name, f"{length} long, more than the limit (max_seconds={max_seconds}); "
                              "split it into shorter segments with `earful data segment`")


def _too_short(name: str, seconds: float, min_seconds: float) -> AudioTooShort:
    return AudioTooShort(name, f"{seconds:.3f} s long, less than min_seconds={min_seconds}; "
                               "drop it or lower min_seconds")


# -- containers only ffmpeg reads -----------------------------------------------------------------
def _ffmpeg_container(head: bytes) -> str | None:
    """Name a container libsndfile cannot read but ffmpeg can, from its first bytes."""
    if head[4:8] == b"ftyp":
        return "MP4/M4A"  # also 3GP and QuickTime: ISO base media files
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM/Matroska"  # the EBML magic
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":
        return "WMA/ASF"
    if head[:5] == b"#!AMR":
        return "AMR"
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "AAC (ADTS)"  # MPEG frame sync with layer bits 00, which MP3 never has
    return None


def find_ffmpeg() -> str | None:
    """The ffmpeg binary the optional `imageio-ffmpeg` package ships (or points at), or None."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package is there but its binary is not (an unsupported platform)
        return None


def _ffmpeg(name: str, container: str) -> str:
    exe = find_ffmpeg()
    if exe is None:
        raise AudioNeedsFfmpeg(name, f"{container} audio, which only ffmpeg decodes, and ffmpeg is not installed; "
                                     "pip install 'earful[ingest]' (imageio-ffmpeg ships the binary) "
                                     "or convert the file to WAV or FLAC")
    return exe


def _ffmpeg_reason(stderr: str, file: Path, name: str) -> str:
    """ffmpeg's first real complaint, without its "[in#0 @ 0x...]" prefixes or our temp file's name."""
    for line in stderr.replace(str(file), name).splitlines():
        line = re.sub(r"^(\[[^\]]*\] )+", "", line.strip())
        if line and not line.startswith(("Error opening input file", "At least one output file")):
            return line.rstrip(".")
    return "unknown error"


def _ffmpeg_probe(exe: str, file: Path, name: str, container: str) -> float | None:
    """The length the header states (None: it states none, or only ffmpeg's bitrate estimate)."""
    err = subprocess.run([exe, "-hide_banner", "-nostdin", "-i", str(file)],
                         capture_output=True, text=True, errors="replace").stderr
    if "Input #0" not in err:
        raise AudioCorrupt(name, f"truncated or corrupt {container} file (ffmpeg: {_ffmpeg_reason(err, file, name)}); "
                                 "re-export or re-download it")
    if not re.search(r"Stream #\S+.*: Audio:", err):
        raise AudioNotAudio(name, f"a {container} file with no audio stream; check that the file is a recording")
    m = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", err)
    if m is None or "Estimating duration from bitrate" in err:
        return None
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


def _ffmpeg_wav(exe: str, file: Path, name: str, container: str, limit: float | None) -> bytes:
    """The first audio stream as a 32-bit float WAV (its own rate and channels), at most `limit` s."""
    cmd = [exe, "-nostdin", "-v", "error", "-i", str(file), "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav"]
    cmd += ["-t", f"{limit:.3f}"] if limit is not None else []
    r = subprocess.run([*cmd, "pipe:1"], capture_output=True)
    if r.returncode != 0 or len(r.stdout) <= 44:
        reason = _ffmpeg_reason(r.stderr.decode("utf-8", "replace"), file, name)
        if r.returncode == 0:
            raise AudioEmpty(name, f"valid {container} header but no samples (empty recording)")
        raise AudioCorrupt(name, f"truncated or corrupt {container} file: decoding failed (ffmpeg: {reason}); "
                                 "re-export or re-download it")
    return r.stdout


@contextmanager
def _on_disk(f: BinaryIO, file: Path | None) -> Iterator[Path]:
    """`file`, or `f`'s bytes in a temporary file: MP4's index may sit at the end, so ffmpeg must seek."""
    if file is not None:
        yield file
        return
    with tempfile.NamedTemporaryFile(prefix="earful-audio-") as tmp:
        f.seek(0)
        shutil.copyfileobj(f, tmp)
        tmp.flush()
        yield Path(tmp.name)


def _ffmpeg_to_wav(f: BinaryIO, file: Path | None, name: str, container: str,
                   max_seconds: float | None, min_seconds: float) -> io.BytesIO:
    """Probe (length limits first), decode, and check the decode gave what the header promised."""
    exe = _ffmpeg(name, container)
    with _on_disk(f, file) as path:
        stated = _ffmpeg_probe(exe, path, name, container)
        if stated is not None and max_seconds is not None and stated > max_seconds:
            raise _too_long(name, f"{stated:.1f} s", max_seconds)
        if stated is not None and stated < min_seconds:
            raise _too_short(name, stated, min_seconds)
        # With no stated length, stop a second past the limit: enough to know it is too long.
        wav = _ffmpeg_wav(exe, path, name, container, None if max_seconds is None else max_seconds + 1.0)
    info = sf.info(io.BytesIO(wav))
    decoded = info.frames / info.samplerate
    if info.frames == 0:
        raise AudioEmpty(name, f"valid {container} header but no samples (empty recording)")
    if stated is not None and decoded < (1 - _SHORTFALL_TOLERANCE) * stated - _CODEC_FRAME_SECONDS:
        raise AudioCorrupt(name, f"truncated {container} file: header says {stated:.2f} s but only "
                                 f"{decoded:.2f} s could be decoded; re-export or re-download it")
    if stated is None and max_seconds is not None and decoded > max_seconds:
        raise _too_long(name, f"over {max_seconds:g} s", max_seconds)
    return io.BytesIO(wav)


def _ffmpeg_seconds(path: Path, name: str, container: str) -> float:
    exe = _ffmpeg(name, container)
    stated = _ffmpeg_probe(exe, path, name, container)
    if stated is not None:
        return stated
    info = sf.info(io.BytesIO(_ffmpeg_wav(exe, path, name, container, None)))
    return info.frames / info.samplerate


def _check_wav_data_complete(f: BinaryIO, name: str) -> None:
    """Raise `AudioCorrupt` if a RIFF/WAVE file holds fewer data bytes than its header declares.

    libsndfile shortens such a file's length to the bytes present without a word, so a
    half-downloaded WAV would otherwise load as a silently cut clip.
    """
    f.seek(0)
    riff = f.read(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        return
    while len(chunk := f.read(8)) == 8:
        size = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"data":
            start = f.tell()
            available = f.seek(0, io.SEEK_END) - start
            # Streaming writers leave the size 0 or 0xFFFFFFFF: "unknown", not a truncation.
            if size not in (0, 0xFFFFFFFF) and available < size:
                raise AudioCorrupt(name, f"truncated WAV file: header declares {size} bytes of "
                                         f"samples but only {available} ({available / size:.0%}) "
                                         "are present; re-export or re-download it")
            return
        f.seek(size + size % 2, io.SEEK_CUR)  # chunks are padded to an even size


def _audio_container(head: bytes) -> str | None:
    """Name the container from its first bytes; used only to word an error after soundfile failed."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] in (b"WAVE", b""):
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"  # an ID3 tag or an MPEG frame sync
    return None


_NOT_AUDIO = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"%PDF": "a PDF",
              b"PK\x03\x04": "a ZIP archive", b"<": "HTML or XML (an error page saved as audio?)"}


def _open_error(name: str, head: bytes, err: Exception) -> AudioError:
    container = _audio_container(head)
    if container is not None:
        return AudioCorrupt(name, f"truncated or corrupt {container} file "
                                  f"({_libsndfile_reason(err)}); re-export or re-download it")
    looks_like = next((what for magic, what in _NOT_AUDIO.items() if head.startswith(magic)), None)
    if looks_like is None and all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        looks_like = "text"
    found = looks_like or f"unknown bytes {head[:8]!r}"
    return AudioNotAudio(name, f"not an audio file: expected WAV, FLAC, OGG, MP3, M4A, WebM, AAC, WMA or AMR but found "
                               f"{found}; check that the file is a recording")


def _libsndfile_reason(err: Exception) -> str:
    # LibsndfileError's str() starts with "Error opening <_io.BytesIO object at 0x...>: ".
    return getattr(err, "error_string", str(err)).strip().rstrip(".")
