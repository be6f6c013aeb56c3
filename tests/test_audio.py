"""earful.audio: real speech in every container we accept, and one clear error per kind of bad file."""

import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from earful.data.fsdd import default_fsdd_dir
from earful.audio import (
    DEFAULT_MAX_SECONDS,
    AudioCorrupt,
    AudioEmpty,
    AudioError,
    AudioNeedsFfmpeg,
    AudioNonFinite,
    AudioNotAudio,
    AudioNotFound,
    AudioTooLong,
    AudioTooShort,
    audio_duration,
    decode_audio_bytes,
    find_ffmpeg,
    load_audio,
    resample,
)

FSDD = default_fsdd_dir()
FSDD_CLIP = FSDD / "recordings" / "0_george_0.wav"  # "zero", 8 kHz mono 16-bit


@pytest.fixture
def fsdd_wav() -> Path:
    if not FSDD_CLIP.is_file():
        pytest.skip(f"FSDD recording not found at {FSDD_CLIP} (set EARFUL_FSDD to the fsdd folder)")
    return FSDD_CLIP


@pytest.fixture
def fsdd_8k(fsdd_wav) -> np.ndarray:
    """The clip's samples at its native 8 kHz, as soundfile reads them."""
    samples, rate = sf.read(fsdd_wav, dtype="float32")
    assert rate == 8000
    return samples


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def assert_error(excinfo, cls, path, word):
    """The error has the right kind, and its message names the file and says what went wrong."""
    assert type(excinfo.value) is cls, f"expected {cls.__name__}, got {excinfo.value!r}"
    message = str(excinfo.value)
    assert Path(path).name in message
    assert word.lower() in message.lower(), message
    assert "\n" not in message


def ffmpeg(*args) -> None:
    """Run the ffmpeg binary imageio-ffmpeg ships (the one earful decodes with)."""
    subprocess.run([find_ffmpeg(), "-nostdin", "-v", "error", "-y", *map(str, args)], check=True)


def wav_header(n_frames: int, rate: int = 8000) -> bytes:
    """A canonical 44-byte 16-bit mono PCM WAV header for `n_frames` samples."""
    data_bytes = 2 * n_frames
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16,
                       1, 1, rate, 2 * rate, 2, 16, b"data", data_bytes)


# --- good audio ---------------------------------------------------------------------------------

def test_fsdd_loads_at_16k_as_float32_mono(fsdd_wav, fsdd_8k):
    audio = load_audio(fsdd_wav)  # default 16 kHz
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert abs(len(audio) - 2 * len(fsdd_8k)) <= 2
    assert np.abs(audio).max() <= 1.0
    assert np.abs(audio).max() > 0.05  # speech, not silence
    assert load_audio(str(fsdd_wav)).shape == audio.shape  # str paths too
    assert audio_duration(fsdd_wav) == pytest.approx(len(fsdd_8k) / 8000)


@pytest.mark.parametrize("fmt, subtype", [("FLAC", None), ("OGG", "VORBIS"),
                                          ("MP3", "MPEG_LAYER_III")])
def test_same_speech_in_other_containers(tmp_path, fsdd_wav, fsdd_8k, fmt, subtype):
    path = tmp_path / f"zero.{fmt.lower()}"
    sf.write(path, fsdd_8k, 8000, format=fmt, subtype=subtype)
    reference = load_audio(fsdd_wav)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(reference)) <= 0.01 * len(reference)
    assert correlation(audio, reference) > 0.9


@pytest.mark.parametrize("suffix, codec", [(".m4a", "aac"), (".webm", "libopus")], ids=["m4a", "webm"])
def test_containers_only_ffmpeg_reads_decode_like_the_wav(tmp_path, fsdd_wav, suffix, codec):
    """A phone's M4A or a browser's WebM is read by every verb (load_audio: transcribe, eval,
    training; decode_audio_bytes: server uploads), through ffmpeg, as the WAV it was made from."""
    path = tmp_path / f"zero{suffix}"
    ffmpeg("-i", fsdd_wav, "-c:a", codec, path)
    reference = load_audio(fsdd_wav)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(reference)) <= 0.005 * 16000  # within 5 ms
    assert correlation(audio, reference) > 0.95
    np.testing.assert_array_equal(decode_audio_bytes(path.read_bytes(), name=f"upload{suffix}"), audio)
    assert audio_duration(path) == pytest.approx(audio_duration(fsdd_wav), abs=0.02)


def test_ffmpeg_containers_without_ffmpeg_say_which_extra_to_install(tmp_path, fsdd_wav, monkeypatch):
    path = tmp_path / "zero.m4a"
    ffmpeg("-i", fsdd_wav, "-c:a", "aac", path)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if the optional package were not installed
    with pytest.raises(AudioNeedsFfmpeg) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioNeedsFfmpeg, path, "earful[ingest]")
    assert isinstance(excinfo.value, AudioError)  # a reject like any other unusable clip
    assert len(load_audio(fsdd_wav)) > 0  # what soundfile reads needs no ffmpeg


def test_an_mp4_with_no_audio_stream(tmp_path):
    path = tmp_path / "video_only.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=black:s=16x16:d=0.2", "-c:v", "mpeg4", path)
    with pytest.raises(AudioNotAudio) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioNotAudio, path, "no audio stream")


def test_stereo_is_mixed_to_the_mean_of_its_channels(tmp_path, fsdd_8k):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([fsdd_8k, np.zeros_like(fsdd_8k)], axis=1), 8000)
    audio = load_audio(path, sampling_rate=8000)  # native rate: no resampling in the way
    assert audio.shape == fsdd_8k.shape
    np.testing.assert_allclose(audio, fsdd_8k / 2, atol=1e-4)


def test_44k1_recording_is_resampled(tmp_path, fsdd_wav, fsdd_8k):
    path = tmp_path / "cd_rate.wav"
    sf.write(path, resample(fsdd_8k, 8000, 44100), 44100, subtype="FLOAT")
    audio = load_audio(path)
    reference = load_audio(fsdd_wav)
    assert abs(len(audio) - len(reference)) <= 2
    assert correlation(audio, reference) > 0.99


def test_resample_keeps_pitch_and_scales_length():
    rate, seconds, tone_hz = 44100, 0.5, 440.0
    tone = np.sin(2 * np.pi * tone_hz * np.arange(int(rate * seconds)) / rate)
    out = resample(tone, rate, 16000)
    assert out.dtype == np.float32
    assert len(out) == 8000
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) * 16000 / len(out) == pytest.approx(tone_hz, abs=2)
    np.testing.assert_array_equal(resample(out, 16000, 16000), out)
    with pytest.raises(ValueError, match="positive"):
        resample(out, 0, 16000)


def test_decode_audio_bytes_round_trip(fsdd_wav):
    from_bytes = decode_audio_bytes(fsdd_wav.read_bytes(), name="upload.wav")
    np.testing.assert_array_equal(from_bytes, load_audio(fsdd_wav))


def test_decode_audio_bytes_names_the_upload_in_errors():
    with pytest.raises(AudioNotAudio) as excinfo:
        decode_audio_bytes(b"<html><body>404 Not Found</body></html>", name="upload-7.wav")
    assert_error(excinfo, AudioNotAudio, "upload-7.wav", "not an audio file")
    assert "HTML" in str(excinfo.value)


# --- bad audio: one kind each --------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioNotFound) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioNotFound, path, "no such file")


def test_directory(tmp_path):
    path = tmp_path / "folder.wav"
    path.mkdir()
    with pytest.raises(AudioNotFound) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioNotFound, path, "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(AudioEmpty) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioEmpty, path, "0 bytes")


def test_header_only_wav_has_no_samples(tmp_path):
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, dtype=np.int16), 8000)
    with pytest.raises(AudioEmpty) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioEmpty, path, "no samples")
    with pytest.raises(AudioEmpty):
        audio_duration(path)


def _cut_wav_header(fsdd_wav, tmp_path):
    return fsdd_wav.read_bytes()[:20]  # in the middle of the 'fmt ' chunk


def _cut_wav_data(fsdd_wav, tmp_path):
    data = fsdd_wav.read_bytes()  # libsndfile alone would load this as a shorter clip
    return data[: len(data) // 2]


def _cut_encoded(fmt, subtype=None, keep=None):
    def cut(fsdd_wav, tmp_path):
        path = tmp_path / f"full.{fmt.lower()}"
        sf.write(path, sf.read(fsdd_wav)[0], 8000, format=fmt, subtype=subtype)
        data = path.read_bytes()
        return data[: keep or len(data) // 2]
    return cut


def _cut_m4a(*flags):
    def cut(fsdd_wav, tmp_path):
        path = tmp_path / "full.m4a"
        ffmpeg("-i", fsdd_wav, "-c:a", "aac", *flags, path)
        data = path.read_bytes()
        return data[: len(data) * 2 // 3]
    return cut


@pytest.mark.parametrize("suffix, cut", [
    (".wav", _cut_wav_header),
    (".wav", _cut_wav_data),
    (".flac", _cut_encoded("FLAC")),
    (".ogg", _cut_encoded("OGG", "VORBIS")),
    (".mp3", _cut_encoded("MP3", "MPEG_LAYER_III")),
    (".mp3", _cut_encoded("MP3", "MPEG_LAYER_III", keep=10)),  # inside the first frame
    (".m4a", _cut_m4a()),  # its index (moov) at the end: cut off
    (".m4a", _cut_m4a("-movflags", "+faststart")),  # index first: the samples it lists are cut off
], ids=["wav-header", "wav-data", "flac", "ogg", "mp3", "mp3-header", "m4a", "m4a-faststart"])
def test_truncated_file(tmp_path, fsdd_wav, suffix, cut):
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(cut(fsdd_wav, tmp_path))
    with pytest.raises(AudioCorrupt) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioCorrupt, path, "truncated")


@pytest.mark.parametrize("suffix, content, looks_like", [
    (".wav", b"hello, this is a transcript and not a recording\n", "text"),
    (".wav", b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG"),
    (".m4a", b"hello, this is a transcript and not a recording\n", "text"),
], ids=["text", "png", "text-m4a"])
def test_not_audio(tmp_path, suffix, content, looks_like):
    path = tmp_path / f"renamed{suffix}"
    path.write_bytes(content)
    with pytest.raises(AudioNotAudio) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioNotAudio, path, "not an audio file")
    assert looks_like in str(excinfo.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_float_wav(tmp_path, bad):
    samples = np.zeros(8000, dtype=np.float32)
    samples[4000] = bad
    path = tmp_path / "diverged.wav"
    sf.write(path, samples, 8000, subtype="FLOAT")
    with pytest.raises(AudioNonFinite) as excinfo:
        load_audio(path)
    assert_error(excinfo, AudioNonFinite, path, "NaN/inf")
    assert "0.500 s" in str(excinfo.value)


def test_too_long(tmp_path):
    path = tmp_path / "twenty_seconds.wav"
    sf.write(path, np.zeros(20 * 8000, dtype=np.float32), 8000)
    with pytest.raises(AudioTooLong) as excinfo:
        load_audio(path, max_seconds=10)
    assert_error(excinfo, AudioTooLong, path, "max_seconds")
    assert len(load_audio(path, max_seconds=None)) == 20 * 16000


def test_too_long_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    # Two hours of 8 kHz silence: a 115 MB file, written sparse so the test costs nothing.
    n_frames = 2 * 3600 * 8000
    path = tmp_path / "two_hours.wav"
    with open(path, "wb") as f:
        f.write(wav_header(n_frames))
        f.truncate(44 + 2 * n_frames)
    assert audio_duration(path) == 7200.0

    def no_decoding(*args, **kwargs):
        raise AssertionError("load_audio decoded samples of a file it should have refused")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.raises(AudioTooLong) as excinfo:
        load_audio(path)  # the default limit
    assert_error(excinfo, AudioTooLong, path, f"max_seconds={DEFAULT_MAX_SECONDS}")


def test_too_long_m4a_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    wav, path = tmp_path / "long.wav", tmp_path / "twenty_seconds.m4a"
    sf.write(wav, np.zeros(20 * 8000, dtype=np.float32), 8000)
    ffmpeg("-i", wav, "-c:a", "aac", path)
    assert audio_duration(path) == pytest.approx(20.0, abs=0.05)
    import earful.audio

    def no_decoding(*args, **kwargs):
        raise AssertionError("load_audio decoded samples of a file it should have refused")

    monkeypatch.setattr(earful.audio, "_ffmpeg_wav", no_decoding)
    with pytest.raises(AudioTooLong) as excinfo:
        load_audio(path, max_seconds=10)
    assert_error(excinfo, AudioTooLong, path, "20.0 s long")


def test_too_short(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, np.zeros(800, dtype=np.float32), 8000)  # 0.1 s
    with pytest.raises(AudioTooShort) as excinfo:
        load_audio(path, min_seconds=0.5)
    assert_error(excinfo, AudioTooShort, path, "min_seconds")
    assert len(load_audio(path)) == 1600  # no minimum by default


def test_errors_are_one_catchable_picklable_family(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError) as excinfo:
        load_audio(path)
    error = excinfo.value
    assert error.path == str(path)
    assert "no such file" in error.reason
    assert str(error) == f"{path}: {error.reason}"
    # DataLoader workers and process pools send exceptions back pickled.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is AudioNotFound and str(copy) == str(error)
