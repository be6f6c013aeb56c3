"""Clips that hold no speech, for teaching a listening LM to say so instead of guessing a word.

A model trained only on speech answers every input with a transcript: silence becomes "seven".
Ichigo v0.3 and Ultravox train on noise with one fixed answer for this. `make_nonspeech` writes
such clips, drawn evenly over `KINDS`:

- `silence`: digital zero, or room tone (pink/brown noise, maybe a trace of hum) at -65..-45 dBFS;
- `noise`: white, pink or brown noise;
- `hum`: mains hum at 50 or 60 Hz with harmonics, some with a buzz or a noise floor;
- `clicks`: isolated clicks, regular click trains (a clock, a ratchet), keyboard-like typing;
- `tones`: a pure tone, a sweep, beeps, DTMF key tones;
- `music`: chords and short melodies of harmonic notes with envelopes, some with vibrato;
- `mixture`: two of the above at a drawn ratio (hum + noise, tone + noise, music + noise, ...).

Everything is synthesised from numbers (no speech clip goes into any of them, so no babble), at a
peak drawn from -50 to -3 dBFS (silence: quieter, or zero), lasting `min_seconds`..`max_seconds`.
Clip i draws from its own generator, seeded by (seed, i): the same seed writes byte-identical
files, and a smaller `count` writes the first clips of a larger one. Ids are
`nonspeech_{kind}_{i:05d}`, so a report can tell refusals apart by kind (`nonspeech_kind_of`).

Each clip's transcript is "" (no word was said); with `answer` it also carries that as its
`response`, the target training reads before the transcript (`dataset.response_of`).
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from .. import atomic
from .manifest import Utterance

logger = logging.getLogger(__name__)

KINDS = ("silence", "noise", "hum", "clicks", "tones", "music", "mixture")

# Peaks of every audible kind, in dBFS: from barely above a quiet room to loud, never clipped.
PEAK_DBFS = (-50.0, -3.0)
ROOM_TONE_DBFS = (-65.0, -45.0)  # silence that is not digital zero
# The fewest samples a clip may have: wav2vec2 / HuBERT's front end reads 400 (Whisper 201).
MIN_SAMPLES = 400
_ID = re.compile(r"^nonspeech_([a-z]+)_\d+$")
_FADE_SECONDS = 0.005  # a clip may not start or end on a step: that is a click, which only `clicks` may have


def nonspeech_kind_of(utterance_id: str | None) -> str | None:
    """The kind of a clip made here, from its id (`nonspeech_hum_00002` -> "hum"); None for any other id."""
    m = _ID.match(utterance_id or "")
    return m.group(1) if m and m.group(1) in KINDS else None


def make_nonspeech(out_dir: str | Path, count: int, seed: int = 0, sampling_rate: int = 16000, answer: str | None = None,
                   min_seconds: float = 0.3, max_seconds: float = 2.5) -> list[Utterance]:
    """Write `count` non-speech clips OUT_DIR/audio/nonspeech_{kind}_{i}.wav (16-bit PCM) and OUT_DIR/manifest.jsonl.

    Kinds go round `KINDS` in turn (clip i is `KINDS[i % 7]`), so every kind has count/7 clips, give or
    take one. Returns the utterances (absolute audio paths), as the manifest lists them; its rows
    also name each clip's `kind` and `variant` (fields `read_manifest` passes over).
    """
    problems = []
    if count < 1:
        problems.append(f"count must be >= 1, found {count}")
    if sampling_rate < 8000:
        problems.append(f"sampling_rate must be >= 8000 Hz (mains hum harmonics and DTMF need it), found {sampling_rate}")
    if not 0 < min_seconds <= max_seconds:
        problems.append(f"need 0 < min_seconds <= max_seconds, found {min_seconds:g} and {max_seconds:g}")
    elif min_seconds * sampling_rate < MIN_SAMPLES:
        problems.append(f"min_seconds={min_seconds:g} gives fewer than {MIN_SAMPLES} samples at {sampling_rate} Hz, "
                        "too few for an encoder; raise it")
    if problems:
        raise ValueError("make_nonspeech: " + "; ".join(problems))

    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    utterances, rows = [], []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        rng = np.random.default_rng([seed, i])  # each clip its own stream: clip i does not depend on count
        n = round(rng.uniform(min_seconds, max_seconds) * sampling_rate)
        wave, variant = _GENERATORS[kind](rng, n, sampling_rate)
        assert wave.shape == (n,) and np.isfinite(wave).all() and np.abs(wave).max() < 1.0, (kind, variant)
        uid = f"nonspeech_{kind}_{i:05d}"
        path = audio_dir / f"{uid}.wav"
        buffer = io.BytesIO()
        sf.write(buffer, wave, sampling_rate, format="WAV", subtype="PCM_16")
        atomic.write_bytes(path, buffer.getvalue())
        u = Utterance(audio=str(path.resolve()), text="", id=uid, speaker="nonspeech", duration=round(n / sampling_rate, 4),
                      response=answer)
        utterances.append(u)
        rows.append({**u.to_json(out_dir.resolve()), "kind": kind, "variant": variant})
    atomic.write_jsonl(out_dir / "manifest.jsonl", rows)
    logger.info("wrote %d non-speech clips into %s (%s)", count, audio_dir, summary(utterances)["clips"])
    return utterances


def summary(utterances: list[Utterance]) -> dict:
    """Clips per kind and minutes of audio, for a report or a log line."""
    kinds = Counter(nonspeech_kind_of(u.id) for u in utterances)
    return {"clips": {k: kinds[k] for k in KINDS if kinds[k]}, "minutes": round(sum(u.duration or 0 for u in utterances) / 60, 2)}


# -- building blocks ------------------------------------------------------------------------------
def _db(rng: np.random.Generator, span: tuple[float, float] = PEAK_DBFS) -> float:
    return float(rng.uniform(*span))


def _at_peak(x: np.ndarray, dbfs: float, rate: int) -> np.ndarray:
    """`x` scaled so that its peak is `dbfs`, with short fades at both ends."""
    x = x * _fades(len(x), int(_FADE_SECONDS * rate))
    peak = np.abs(x).max()
    return (x / peak * 10 ** (dbfs / 20)).astype(np.float32) if peak > 0 else x.astype(np.float32)


def _fades(n: int, ramp: int) -> np.ndarray:
    env = np.ones(n)
    ramp = min(ramp, n // 4)
    if ramp:
        r = np.linspace(0, 1, ramp, endpoint=False)
        env[:ramp], env[n - ramp:] = r, r[::-1]
    return env


def _coloured_noise(rng: np.random.Generator, n: int, rate: int, exponent: float, low_hz: float = 20.0) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), nothing below `low_hz`; unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate)
    gain = np.zeros_like(f)
    audible = f >= low_hz
    gain[audible] = f[audible] ** (-exponent / 2)
    x = np.fft.irfft(spectrum * gain, n)
    return x / _rms(x)


def _band(x: np.ndarray, rate: int, low_hz: float, high_hz: float) -> np.ndarray:
    """`x` keeping only low_hz..high_hz (an FFT mask: the clips are short)."""
    f = np.fft.rfftfreq(len(x), 1 / rate)
    return np.fft.irfft(np.fft.rfft(x) * ((f >= low_hz) & (f <= high_hz)), len(x))


def _partials(f0: np.ndarray | float, t: np.ndarray, rate: int, n_partials: int, rolloff: float,
              rng: np.random.Generator) -> np.ndarray:
    """A harmonic tone: partials k*f0 (those under 0.45*rate) at amplitude 1/k**rolloff, random phases.

    `f0` may vary over time (vibrato, a sweep): the phase is its running sum.
    """
    f0 = np.broadcast_to(np.asarray(f0, dtype=np.float64), t.shape)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros_like(t)
    for k in range(1, n_partials + 1):
        if k * f0.max() >= 0.45 * rate:
            break
        out += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**rolloff
    return out


def _hum(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    mains = float(rng.choice([50.0, 60.0]))
    t = np.arange(n) / rate
    x = np.zeros(n)
    for k in range(1, int(rng.integers(3, 12)) + 1):  # transformer hum: odd harmonics strongest
        if k * mains >= 0.45 * rate:
            break
        level = rng.uniform(0.3, 1.0) / k ** rng.uniform(0.5, 1.5) * (1.0 if k % 2 else rng.uniform(0.1, 0.6))
        x += level * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 2 * np.pi))
    return x, f"hum{int(mains)}"


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))) or 1.0


def _tone_burst(rng: np.random.Generator, t: np.ndarray, rate: int, freqs: list[float]) -> np.ndarray:
    return sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs)


# -- the kinds ------------------------------------------------------------------------------------
def _silence(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    if rng.random() < 0.4:
        return np.zeros(n, dtype=np.float32), "digital-zero"
    x = _coloured_noise(rng, n, rate, exponent=float(rng.uniform(0.8, 2.0)))
    if rng.random() < 0.3:  # a trace of the building's mains
        x += rng.uniform(0.05, 0.3) * _hum(rng, n, rate)[0]
    return _at_peak(x, _db(rng, ROOM_TONE_DBFS), rate), "room-tone"


_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}


def _noise(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    colour = str(rng.choice(list(_COLOURS)))
    return _at_peak(_coloured_noise(rng, n, rate, _COLOURS[colour]), _db(rng), rate), f"{colour}-noise"


def _mains(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    x, variant = _hum(rng, n, rate)
    if rng.random() < 0.3:  # a buzz: the hum swells and fades a little, slowly (not at a syllable rate)
        x *= 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * np.arange(n) / rate)
        variant += "-buzz"
    if rng.random() < 0.4:
        x += 10 ** (-rng.uniform(10, 30) / 20) * np.sqrt(np.mean(x**2)) * _coloured_noise(rng, n, rate, 0.0)
        variant += "-noisy"
    return _at_peak(x, _db(rng), rate), variant


def _click(rng: np.random.Generator, rate: int, soft: bool = False) -> np.ndarray:
    """One click: a few ms of band-passed noise or a damped ring, decaying fast."""
    m = int(rate * rng.uniform(0.002, 0.012 if soft else 0.006))
    decay = np.exp(-np.arange(m) / (m * rng.uniform(0.1, 0.3)))
    if rng.random() < 0.5:
        burst = _band(rng.standard_normal(m), rate, rng.uniform(500, 2000), min(rng.uniform(3000, 7000), 0.45 * rate))
    else:
        burst = np.sin(2 * np.pi * rng.uniform(1000, min(6000, 0.4 * rate)) * np.arange(m) / rate)
    return burst * decay


def _clicks(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    x = np.zeros(n)
    variant = str(rng.choice(["isolated", "train", "keyboard"]))
    if variant == "isolated":
        times = rng.uniform(0, n / rate, int(rng.integers(1, 7)))
    elif variant == "train":  # a clock's tick, a ratchet, a dripping tap: near-regular
        period = 1 / rng.uniform(2, 30)
        times = np.arange(rng.uniform(0, period), n / rate, period) + rng.normal(0, period * 0.02, 1)
    else:  # typing: irregular keystrokes, each a press and, a little later, a softer release
        gaps = rng.uniform(0.06, 0.35, int(n / rate / 0.06) + 1)
        presses = np.cumsum(gaps) - gaps[0] + rng.uniform(0, 0.1)
        times = np.concatenate([presses, presses + rng.uniform(0.03, 0.09, len(presses))])
    for k, at in enumerate(times):
        c = _click(rng, rate, soft=variant == "keyboard") * rng.uniform(0.3, 1.0)
        if variant == "keyboard" and k >= len(times) // 2:
            c *= 0.5  # the release
        start = int(at * rate)
        if 0 <= start < n:
            x[start : start + len(c)] += c[: n - start]
    if not np.any(x):  # every draw fell past the end: one click, somewhere
        c = _click(rng, rate)
        start = int(rng.integers(0, max(1, n - len(c))))
        x[start : start + len(c)] += c[: n - start]
    if rng.random() < 0.5:  # the room behind them
        x += 10 ** (-rng.uniform(30, 50) / 20) * np.abs(x).max() * _coloured_noise(rng, n, rate, 1.0)
    return _at_peak(x, _db(rng), rate), f"{variant}-clicks"


_DTMF_ROWS, _DTMF_COLS = (697.0, 770.0, 852.0, 941.0), (1209.0, 1336.0, 1477.0, 1633.0)


def _tones(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    t = np.arange(n) / rate
    variant = str(rng.choice(["pure", "sweep", "beeps", "dtmf"]))
    if variant == "pure":
        x = np.sin(2 * np.pi * np.exp(rng.uniform(np.log(60), np.log(min(6000, 0.4 * rate)))) * t)
    elif variant == "sweep":
        lo, hi = np.sort(np.exp(rng.uniform(np.log(100), np.log(min(6000, 0.4 * rate)), 2)))
        f = lo * (hi / lo) ** (t / t[-1]) if rng.random() < 0.5 else hi * (lo / hi) ** (t / t[-1])
        x = np.sin(2 * np.pi * np.cumsum(f) / rate)
    else:  # beeps or DTMF keys: bursts with gaps
        on, off = (rng.uniform(0.08, 0.4), rng.uniform(0.05, 0.5)) if variant == "beeps" else (rng.uniform(0.06, 0.15), rng.uniform(0.05, 0.12))
        beep = float(np.exp(rng.uniform(np.log(400), np.log(3000))))
        x, start = np.zeros(n), int(rng.uniform(0, off) * rate)
        while start < n:
            m = min(int(on * rate), n - start)
            freqs = [beep] if variant == "beeps" else [float(rng.choice(_DTMF_ROWS)), float(rng.choice(_DTMF_COLS))]
            x[start : start + m] = _tone_burst(rng, t[:m], rate, freqs) * _fades(m, int(0.004 * rate))
            start += m + int(off * rate)
    return _at_peak(x, _db(rng), rate), variant


# Scales as semitones over the root: what short tunes are made of.
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10), "pentatonic": (0, 2, 4, 7, 9)}
_CHORDS = ((0, 4, 7), (0, 3, 7), (0, 4, 7, 11), (0, 3, 7, 10), (0, 5, 7), (0, 4, 7, 12))


def _note(rng: np.random.Generator, midi: float, m: int, rate: int, vibrato: bool, pluck: bool,
          n_partials: int, rolloff: float) -> np.ndarray:
    t = np.arange(m) / rate
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    if vibrato:
        f0 = f0 * (1 + rng.uniform(0.002, 0.008) * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t))
    tone = _partials(f0, t, rate, n_partials, rolloff, rng)
    attack = int(rate * rng.uniform(0.003, 0.03))
    if pluck:  # a struck or plucked string: it dies away
        env = np.exp(-t / rng.uniform(0.1, 0.6))
    else:  # an organ or a bowed note: attack, sustain, release
        env = np.ones(m)
        release = min(int(rate * rng.uniform(0.02, 0.1)), m // 3)
        if release:
            env[m - release:] = np.linspace(1, 0, release)
    env[:attack] *= np.linspace(0, 1, min(attack, m))[: len(env[:attack])]
    return tone * env


def _music(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    variant = str(rng.choice(["chord", "arpeggio", "melody"]))
    vibrato, pluck = bool(rng.random() < 0.4), bool(rng.random() < 0.5)
    timbre = {"n_partials": int(rng.integers(1, 9)), "rolloff": float(rng.uniform(0.7, 2.0))}
    root = float(rng.integers(48, 76))  # C3..D#5
    x = np.zeros(n)
    if variant == "chord":
        for step in _CHORDS[rng.integers(len(_CHORDS))]:
            x += _note(rng, root + step, n, rate, vibrato, pluck, **timbre)
    else:
        scale = _SCALES[str(rng.choice(list(_SCALES)))]
        chord = _CHORDS[rng.integers(len(_CHORDS))]
        start, k = 0, 0
        while start < n:
            m = min(int(rate * rng.uniform(0.12, 0.5)), n - start)
            if variant == "arpeggio":
                midi = root + chord[k % len(chord)] + 12 * (k // len(chord) % 2)
            else:
                midi = root + scale[int(rng.integers(len(scale)))] + 12 * int(rng.integers(0, 2))
            # a note rings on under the next one, as on a piano with the pedal down
            ring = min(n - start, m + int(rate * rng.uniform(0, 0.2)))
            x[start : start + ring] += _note(rng, midi, ring, rate, vibrato, pluck, **timbre)
            start, k = start + m, k + 1
    return _at_peak(x, _db(rng), rate), f"{variant}{'-vibrato' if vibrato else ''}"


def _mixture(rng: np.random.Generator, n: int, rate: int) -> tuple[np.ndarray, str]:
    """Two audible kinds at a drawn ratio: the louder first, the other 0..20 dB under it."""
    pairs = (("hum", "noise"), ("tones", "noise"), ("music", "noise"), ("clicks", "hum"), ("music", "hum"), ("tones", "hum"))
    first, second = pairs[rng.integers(len(pairs))]
    a, va = _GENERATORS[first](rng, n, rate)
    b, vb = _GENERATORS[second](rng, n, rate)
    x = a / _rms(a) + 10 ** (-rng.uniform(0, 20) / 20) * b / _rms(b)
    return _at_peak(x, _db(rng), rate), f"{va}+{vb}"


_GENERATORS = {"silence": _silence, "noise": _noise, "hum": _mains, "clicks": _clicks, "tones": _tones,
               "music": _music, "mixture": _mixture}
assert tuple(_GENERATORS) == KINDS
