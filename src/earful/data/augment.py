"""Data augmentation as recipe keys (`data.augment`), drawn reproducibly per (seed, epoch, clip).

Ultravox's `data/aug` is the anchor: each augmentation is a small pure function over a waveform,
and an `Augmenter` decides, per clip, which ones run and with what parameters. Wave
augmentations run in this order, as a recording would meet them:

    speed    the talker: tempo and pitch together, by resampling (Kaldi's speed perturbation)
    reverb   the room: convolution with a synthetic impulse response (exponentially decaying noise)
    noise    the room's other sounds: white, pink, brown, babble (other training clips), mains hum,
             added at an SNR drawn from a range (SNR = 10 log10 of clean power / noise power)
    eq       the microphone: a spectral tilt (dB per octave about 1 kHz) with high- and low-pass
             roll-offs at drawn corners, level kept (what set FSDD's speakers' recordings apart)
    band     the channel: telephone band (300-3400 Hz) or 8 kHz and back
    codec    the channel: an MP3 or Opus round trip at a low bitrate (ffmpeg, through pipes)
    gain     the level

SpecAugment (Park et al. 2019) is not a wave augmentation: it masks time and frequency bands of
the encoder's input features (or of a cached frozen encoder's output frames), see `mask_spans`.

Every draw is a function of (seed, draw, clip index) alone (`draw` is the epoch when clips are
augmented on the fly, the copy number when copies are pre-rendered), so a run is reproducible,
`--resume` hears the same audio, and each epoch hears different audio. Each augmentation draws
from its own random stream, so changing one augmentation's settings leaves the others' draws as
they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, get_type_hints

import numpy as np

from ..audio import find_ffmpeg, resample
from ..errors import EarfulError

logger = logging.getLogger(__name__)

NOISE_KINDS = ("white", "pink", "brown", "babble", "hum")
BAND_KINDS = ("telephone", "8k")
CODEC_KINDS = ("mp3", "opus")
TELEPHONE_HZ = (300.0, 3400.0)  # ITU-T G.712's speech band
_CODECS = {"mp3": ("libmp3lame", "mp3"), "opus": ("libopus", "ogg")}  # ffmpeg encoder, container


class AugmentError(EarfulError):
    """An augmentation that cannot run here (e.g. no ffmpeg for a codec round trip)."""


# -- the recipe section: data.augment ------------------------------------------------------------
# Ranges are [low, high], drawn uniformly (a single number means that value every time).

@dataclass
class Noise:
    p: float = 0.5  # share of clips given additive noise
    snr_db: list = field(default_factory=lambda: [5.0, 30.0])  # SNR range (dB) over the whole clip
    kinds: list = field(default_factory=lambda: list(NOISE_KINDS))  # one drawn uniformly per noisy clip


@dataclass
class Gain:
    p: float = 0.5
    db: list = field(default_factory=lambda: [-12.0, 6.0])  # level change (dB)


@dataclass
class Speed:
    p: float = 0.5
    factors: list = field(default_factory=lambda: [0.9, 1.1])  # > 1 is faster (shorter), pitch moves with it


@dataclass
class Eq:
    p: float = 0.5
    tilt_db: list = field(default_factory=lambda: [-6.0, 6.0])  # dB per octave about 1 kHz (> 0 brighter)
    highpass_hz: list = field(default_factory=lambda: [20.0, 300.0])  # low roll-off corner (12 dB per octave)
    lowpass_hz: list = field(default_factory=lambda: [2500.0, 8000.0])  # high roll-off corner (12 dB per octave)


@dataclass
class Band:
    p: float = 0.2
    kinds: list = field(default_factory=lambda: list(BAND_KINDS))  # telephone: 300-3400 Hz; 8k: 8 kHz and back


@dataclass
class Codec:
    p: float = 0.1
    kinds: list = field(default_factory=lambda: list(CODEC_KINDS))
    kbps: list = field(default_factory=lambda: [8, 24])  # bitrate range (whole kbit/s)


@dataclass
class Reverb:
    p: float = 0.2
    rt60: list = field(default_factory=lambda: [0.2, 0.8])  # seconds for the tail to fall 60 dB
    drr_db: list = field(default_factory=lambda: [0.0, 10.0])  # direct-to-reverberant energy ratio (dB)


@dataclass
class SpecAugment:
    p: float = 1.0  # share of clips masked
    time_masks: int = 2  # time bands masked per clip
    time_width: float = 0.05  # widest time band, as a share of the clip's frames
    freq_masks: int = 2  # frequency bands masked per clip
    freq_width: int = 8  # widest frequency band, in mel bins (cached encoder frames: the same share of channels)


# In the order the wave augmentations are applied (see the module docstring).
WAVE_AUGMENTATIONS = {"speed": Speed, "reverb": Reverb, "noise": Noise, "eq": Eq, "band": Band, "codec": Codec, "gain": Gain}
# Each augmentation's random stream; a new one is appended, so the others keep their draws.
_STREAMS = {name: i for i, name in enumerate(["speed", "reverb", "noise", "band", "codec", "gain", "specaugment", "copy", "eq"])}


@dataclass
class AugmentSpec:
    """`data.augment`, typed: each augmentation None when absent (off)."""

    copies: int | None = None  # frozen (cached) encoder: augmented copies per clip, encoded once; each epoch takes one
    speed: Speed | None = None
    reverb: Reverb | None = None
    noise: Noise | None = None
    eq: Eq | None = None
    band: Band | None = None
    codec: Codec | None = None
    gain: Gain | None = None
    specaugment: SpecAugment | None = None

    @property
    def waves(self) -> dict[str, Any]:
        """The wave augmentations that can run (p > 0), in the order they are applied."""
        return {n: a for n in WAVE_AUGMENTATIONS if (a := getattr(self, n)) is not None and a.p > 0}

    @property
    def masks(self) -> SpecAugment | None:
        sa = self.specaugment
        return sa if sa is not None and sa.p > 0 and (sa.time_masks or sa.freq_masks) else None

    @property
    def active(self) -> bool:
        return bool(self.waves) or self.masks is not None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range(lo: float, hi: float, integer: bool = False):
    """A check for a [low, high] range within [lo, hi] (a single number is [v, v])."""
    def check(v):
        pair = [v, v] if _number(v) else v
        ok = (isinstance(pair, list) and len(pair) == 2 and all(_number(x) for x in pair) and lo <= pair[0] <= pair[1] <= hi
              and (not integer or all(float(x).is_integer() for x in pair)))
        return ok, [float(x) for x in pair] if ok else None
    kind = "whole numbers" if integer else "numbers"
    return check, f"[low, high] ({kind}, low <= high, within [{lo:g}, {hi:g}]) or one number"


def _kinds(known: tuple[str, ...]):
    def check(v):
        ok = isinstance(v, list) and v and all(isinstance(k, str) and k in known for k in v)
        return bool(ok), list(dict.fromkeys(v)) if ok else None
    return check, f"a non-empty list of {', '.join(known)}"


def _scalar(test, what: str, integer: bool = False):
    def check(v):
        ok = _number(v) and (not integer or isinstance(v, int)) and test(v)
        return ok, v if ok else None
    return check, what


_CHECKS = {
    "p": _scalar(lambda v: 0 <= v <= 1, "a probability within [0, 1]"),
    "snr_db": _range(-20, 100),
    "db": _range(-60, 40),
    "factors": _range(0.5, 2.0),
    "kbps": _range(6, 320, integer=True),
    "rt60": _range(0.05, 3.0),
    "drr_db": _range(-20, 40),
    "tilt_db": _range(-24, 24),
    "highpass_hz": _range(0, 4000),
    "lowpass_hz": _range(500, 48000),
    "time_masks": _scalar(lambda v: v >= 0, "a whole number >= 0", integer=True),
    "freq_masks": _scalar(lambda v: v >= 0, "a whole number >= 0", integer=True),
    "time_width": _scalar(lambda v: 0 < v < 1, "a share of the clip's frames within (0, 1)"),
    "freq_width": _scalar(lambda v: v >= 1, "a whole number of mel bins >= 1", integer=True),
}
_KIND_CHECKS = {Noise: _kinds(NOISE_KINDS), Band: _kinds(BAND_KINDS), Codec: _kinds(CODEC_KINDS)}


def parse_augment(raw: Any, where: str = "data.augment") -> tuple[AugmentSpec, list[str]]:
    """`data.augment` as an `AugmentSpec`, and every problem found in it (unknown keys, types,
    ranges), each naming its key, what was expected and what was found."""
    problems: list[str] = []
    if raw is None or raw == {}:
        return AugmentSpec(), problems
    if not isinstance(raw, dict):
        return AugmentSpec(), [f"{where}: expected a mapping of augmentations, found {raw!r}"]
    known = [f.name for f in dataclasses.fields(AugmentSpec)]
    spec = AugmentSpec()
    for name, value in raw.items():
        key = f"{where}.{name}"
        if name not in known:
            problems.append(f"{key}: unknown key (known: {', '.join(known)})")
        elif name == "copies":
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
                problems.append(f"{key}: expected a whole number within [1, 64] (or null), found {value!r}")
            else:
                spec.copies = value
        elif value is not None:
            cls = get_type_hints(AugmentSpec)[name].__args__[0]
            aug, found = _parse_one(cls, value, key)
            problems += found
            setattr(spec, name, aug)
    if spec.copies and not spec.waves:
        problems.append(f"{where}.copies: {spec.copies} copies, but no wave augmentation is on "
                        f"({', '.join(WAVE_AUGMENTATIONS)}): every copy would be the clean clip; drop copies or add one")
    return spec, problems


def _parse_one(cls, value: Any, key: str) -> tuple[Any, list[str]]:
    if not isinstance(value, dict):
        return None, [f"{key}: expected a mapping of its settings ({', '.join(f.name for f in dataclasses.fields(cls))}) "
                      f"or null (off), found {value!r}"]
    names = [f.name for f in dataclasses.fields(cls)]
    good, problems = {}, []
    for name, v in value.items():
        if name not in names:
            problems.append(f"{key}.{name}: unknown key (known: {', '.join(names)})")
            continue
        check, what = _KIND_CHECKS[cls] if name == "kinds" else _CHECKS[name]
        ok, parsed = check(v)
        if ok:
            good[name] = parsed
        else:
            problems.append(f"{key}.{name}: expected {what}, found {v!r}")
    return cls(**good), problems


# -- the augmentations: pure functions of a float32 waveform (T,) --------------------------------

def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def snr_db(clean: np.ndarray, noise: np.ndarray) -> float:
    """10 log10(clean power / noise power): what `add_noise` sets."""
    return 10 * math.log10(power(clean) / power(noise))


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """White (flat), pink (power ~ 1/f, -3 dB per octave) or brown (~ 1/f^2, -6 dB per octave) noise."""
    white = rng.standard_normal(n)
    if kind == "white":
        return white.astype(np.float32)
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    spectrum /= f ** {"pink": 0.5, "brown": 1.0}[kind]  # amplitude ~ f^-a: power ~ f^-2a
    spectrum[0] = 0.0  # no DC offset
    return np.fft.irfft(spectrum, n).astype(np.float32)


def hum(n: int, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and its first harmonics, each weaker, at random phases."""
    f0 = float(rng.choice([50.0, 60.0]))
    t = np.arange(n) / sampling_rate
    out = np.zeros(n)
    for k in range(1, int(rng.integers(3, 9)) + 1):
        if k * f0 < sampling_rate / 2:
            out += rng.uniform(0.5, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    return out.astype(np.float32)


def babble(n: int, talkers: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Several other clips at equal level, each looped to `n` samples from a random offset, summed."""
    out = np.zeros(n)
    for clip in talkers:
        p = power(clip)
        if not len(clip) or p == 0:
            continue
        looped = np.resize(clip, n + len(clip))  # repeats the clip end to end
        start = int(rng.integers(len(clip)))
        out += looped[start : start + n] / math.sqrt(p)
    return out.astype(np.float32)


def add_noise(clean: np.ndarray, noise: np.ndarray, snr: float) -> np.ndarray:
    """`clean` plus `noise` scaled so that `snr_db(clean, added noise)` is `snr`.

    A silent clip (or silent noise) has no SNR: it comes back unchanged.
    """
    pc, pn = power(clean), power(noise)
    if pc == 0 or pn == 0:
        return clean
    scale = math.sqrt(pc / (pn * 10 ** (snr / 10)))
    return (clean + scale * noise).astype(np.float32)


def apply_gain(wave: np.ndarray, db: float) -> np.ndarray:
    return (wave * 10 ** (db / 20)).astype(np.float32)


def change_speed(wave: np.ndarray, factor: float, sampling_rate: int) -> np.ndarray:
    """Played `factor` times faster (tempo and pitch together): the samples read as if recorded at
    rate * factor; `factor` > 1 shortens the clip to len / factor."""
    return resample(wave, round(sampling_rate * factor), sampling_rate)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def equalize(wave: np.ndarray, sampling_rate: int, tilt_db: float, highpass_hz: float, lowpass_hz: float) -> np.ndarray:
    """A microphone's colour, zero-phase: gain `tilt_db` x log2(f / 1 kHz) dB, times second-order
    (12 dB per octave) high- and low-pass magnitude roll-offs at `highpass_hz` and `lowpass_hz`;
    the clip's power is kept, so only its spectral shape changes."""
    n = len(wave)
    pad = n + sampling_rate // 10  # room for ringing, so it does not wrap round the clip
    f = np.fft.rfftfreq(pad, 1 / sampling_rate)
    gain = 10 ** (tilt_db * np.log2(np.maximum(f, 20.0) / 1000.0) / 20)
    gain /= np.sqrt(1 + (highpass_hz / np.maximum(f, 1e-3)) ** 4) if highpass_hz > 0 else 1.0
    gain /= np.sqrt(1 + (f / lowpass_hz) ** 4)
    y = np.fft.irfft(np.fft.rfft(wave, pad) * gain, pad)[:n]
    before, after = power(wave), power(y)
    return (y * math.sqrt(before / after) if after > 0 else y).astype(np.float32)


def band_limit(wave: np.ndarray, sampling_rate: int, kind: str) -> np.ndarray:
    """`telephone`: the 300-3400 Hz band (raised-cosine edges 100 Hz wide, -6 dB at the band's
    limits), zero-phase; `8k`: resampled to 8 kHz and back (nothing above 4 kHz survives)."""
    n = len(wave)
    if kind == "8k":
        if sampling_rate <= 8000:
            return wave
        return _fit(resample(resample(wave, sampling_rate, 8000), 8000, sampling_rate), n)
    pad = n + sampling_rate // 10  # room for the filter's ringing, so it does not wrap round the clip
    spectrum = np.fft.rfft(wave, pad)
    f = np.fft.rfftfreq(pad, 1 / sampling_rate)
    lo, hi = TELEPHONE_HZ
    edge = 50.0  # half the transition width
    rise = np.clip((f - (lo - edge)) / (2 * edge), 0, 1)
    fall = np.clip(((hi + edge) - f) / (2 * edge), 0, 1)
    gain = (0.5 - 0.5 * np.cos(np.pi * rise)) * (0.5 - 0.5 * np.cos(np.pi * fall))
    return np.fft.irfft(spectrum * gain, pad)[:n].astype(np.float32)


def _ffmpeg_run(cmd: list[str], data: bytes, what: str) -> bytes:
    r = subprocess.run(cmd, input=data, capture_output=True)
    if r.returncode != 0 or not r.stdout:
        reason = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AugmentError(f"data.augment.codec: ffmpeg could not {what} ({reason[-1] if reason else f'exit {r.returncode}'}); "
                           "drop data.augment.codec or reinstall imageio-ffmpeg")
    return r.stdout


def codec_round_trip(wave: np.ndarray, sampling_rate: int, kind: str, kbps: int, ffmpeg: str) -> np.ndarray:
    """Encode to MP3 or Opus at `kbps` and decode back, through pipes (no file is written).

    The decoded audio is aligned to the input (MP3 adds the encoder's delay and padding, which a
    stream read from a pipe keeps) and cut or padded to the input's length.
    """
    encoder, container = _CODECS[kind]
    rate = ["-ar", "48000"] if kind == "opus" and sampling_rate not in (8000, 12000, 16000, 24000, 48000) else []
    coded = _ffmpeg_run([ffmpeg, "-nostdin", "-v", "error", "-f", "f32le", "-ar", str(sampling_rate), "-ac", "1", "-i", "pipe:0",
                         *rate, "-c:a", encoder, "-b:a", f"{int(kbps)}k", "-f", container, "pipe:1"],
                        np.asarray(wave, "<f4").tobytes(), f"encode {kind} at {kbps} kbit/s")
    pcm = _ffmpeg_run([ffmpeg, "-nostdin", "-v", "error", "-f", container, "-i", "pipe:0", "-f", "f32le", "-ac", "1",
                       "-ar", str(sampling_rate), "pipe:1"], coded, f"decode {kind}")
    decoded = np.frombuffer(pcm, "<f4").astype(np.float32)
    return _fit(decoded[_delay(decoded, wave, sampling_rate // 5):], len(wave))


def _delay(y: np.ndarray, x: np.ndarray, max_lag: int) -> int:
    """The lag in [0, max_lag] at which `y` best matches `x` (cross-correlation by FFT)."""
    if power(x) == 0 or power(y) == 0:
        return 0
    size = 1 << (len(x) + len(y)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(y, size) * np.conj(np.fft.rfft(x, size)), size)
    return int(np.argmax(corr[: min(max_lag, len(y) - 1) + 1]))


def room_impulse_response(sampling_rate: int, rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: the direct sound (1 at t=0), then Gaussian noise under an exponential
    envelope that falls 60 dB in `rt60` seconds, its energy `drr_db` below the direct sound's."""
    n = max(2, round(rt60 * sampling_rate))
    t = np.arange(n) / sampling_rate
    tail = rng.standard_normal(n) * np.exp(-3 * math.log(10) * t / rt60)  # amplitude 10^-3 (-60 dB) at rt60
    tail[0] = 0.0
    tail *= math.sqrt(10 ** (-drr_db / 10) / float(np.sum(tail**2)))
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """`wave` convolved with `rir` (by FFT), cut to its own length, at its own RMS level (level is
    `gain`'s business)."""
    n = len(wave)
    size = 1 << (n + len(rir) - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(wave, size) * np.fft.rfft(rir, size), size)[:n]
    p = power(wet)
    return (wet * math.sqrt(power(wave) / p)).astype(np.float32) if p > 0 else wave


def mask_spans(rng: np.random.Generator, length: int, n_masks: int, max_width: int) -> list[tuple[int, int]]:
    """`n_masks` bands [start, end) of `length`, each 1 to `max_width` wide (capped at `length`), placed uniformly."""
    spans = []
    for _ in range(n_masks):
        width = int(rng.integers(1, max(1, min(max_width, length)) + 1))
        start = int(rng.integers(0, length - width + 1))
        spans.append((start, start + width))
    return spans


# -- the augmenter ------------------------------------------------------------------------------

class Augmenter:
    """Draws and applies `data.augment` for one training set.

    sampling_rate: the waveforms'. seed: the run's (train.seed). clips(j): another training clip's
    audio, j in [0, n_clips), for babble. length_ok(n): whether the encoder takes n samples (a
    speed change that would make a clip too long or short for it is skipped for that clip).
    """

    def __init__(self, spec: AugmentSpec, sampling_rate: int, seed: int, clips: Callable[[int], np.ndarray] | None = None,
                 n_clips: int = 0, length_ok: Callable[[int], bool] | None = None):
        self.spec, self.sampling_rate, self.seed = spec, sampling_rate, seed
        self.clips, self.n_clips, self.length_ok = clips, n_clips, length_ok
        self.ffmpeg = None
        if "codec" in spec.waves:
            self.ffmpeg = check_codecs(spec.codec.kinds)
        if spec.noise is not None and "babble" in spec.noise.kinds and spec.noise.p > 0 and (clips is None or n_clips < 2):
            raise AugmentError("data.augment.noise.kinds: babble mixes other training clips, and this training set has "
                               f"{n_clips}; drop babble from the kinds or train on more clips")

    def _rng(self, stream: str, index: int, draw: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, draw, index, _STREAMS[stream]])

    @property
    def on_waves(self) -> bool:
        return bool(self.spec.waves)

    def plan(self, index: int, draw: int) -> list[tuple[str, dict]]:
        """The wave augmentations clip `index` gets in `draw` (the epoch, or the copy), with their parameters."""
        steps = []
        for name, a in self.spec.waves.items():
            rng = self._rng(name, index, draw)
            if rng.random() >= a.p:
                continue
            if name == "speed":
                params = {"factor": rng.uniform(*a.factors)}
            elif name == "reverb":
                params = {"rt60": rng.uniform(*a.rt60), "drr_db": rng.uniform(*a.drr_db), "seed": int(rng.integers(2**32))}
            elif name == "noise":
                params = {"kind": str(rng.choice(a.kinds)), "snr_db": rng.uniform(*a.snr_db), "seed": int(rng.integers(2**32))}
                if params["kind"] == "babble":
                    others = rng.choice(self.n_clips - 1, size=min(int(rng.integers(3, 6)), self.n_clips - 1), replace=False)
                    params["talkers"] = [int(j) + (j >= index % self.n_clips) for j in others]  # never the clip itself
            elif name == "eq":
                params = {"tilt_db": rng.uniform(*a.tilt_db), "highpass_hz": rng.uniform(*a.highpass_hz),
                          "lowpass_hz": rng.uniform(*a.lowpass_hz)}
            elif name == "band":
                params = {"kind": str(rng.choice(a.kinds))}
            elif name == "codec":
                params = {"kind": str(rng.choice(a.kinds)), "kbps": int(rng.integers(int(a.kbps[0]), int(a.kbps[1]) + 1))}
            else:
                params = {"db": rng.uniform(*a.db)}
            steps.append((name, params))
        return steps

    def apply(self, wave: np.ndarray, plan: list[tuple[str, dict]]) -> np.ndarray:
        """`wave` through the `plan`'s steps, in order."""
        sr = self.sampling_rate
        for name, q in plan:
            if name == "speed":
                faster = change_speed(wave, q["factor"], sr)
                if self.length_ok is None or self.length_ok(len(faster)):
                    wave = faster
                else:
                    logger.debug("data.augment.speed: %.3f skipped for a clip of %d samples (the encoder would not take it)", q["factor"], len(wave))
            elif name == "reverb":
                wave = reverberate(wave, room_impulse_response(sr, q["rt60"], q["drr_db"], np.random.default_rng(q["seed"])))
            elif name == "noise":
                rng = np.random.default_rng(q["seed"])
                if q["kind"] == "hum":
                    noise = hum(len(wave), sr, rng)
                elif q["kind"] == "babble":
                    noise = babble(len(wave), [self.clips(j) for j in q["talkers"]], rng)
                else:
                    noise = colored_noise(len(wave), q["kind"], rng)
                wave = add_noise(wave, noise, q["snr_db"])
            elif name == "eq":
                wave = equalize(wave, sr, q["tilt_db"], q["highpass_hz"], q["lowpass_hz"])
            elif name == "band":
                wave = band_limit(wave, sr, q["kind"])
            elif name == "codec":
                wave = codec_round_trip(wave, sr, q["kind"], q["kbps"], self.ffmpeg)
            else:
                wave = apply_gain(wave, q["db"])
        return np.asarray(wave, dtype=np.float32)

    def __call__(self, wave: np.ndarray, index: int, draw: int) -> np.ndarray:
        """Clip `index`'s waveform as augmented in `draw` (the epoch, or the copy)."""
        return self.apply(wave, self.plan(index, draw))

    def copy_of(self, index: int, epoch: int) -> int:
        """Pre-rendered copies: the one clip `index` is heard as in `epoch`. Each clip walks its
        copies in turn from its own random start, so K epochs hear each of its K copies once."""
        k = self.spec.copies or 1
        start = int(self._rng("copy", index, 0).integers(k))
        return (start + epoch) % k

    def mask(self, x, index: int, draw: int, time_axis: int, n_valid: int, freq_width: int | None = None):
        """SpecAugment on one clip's features `x` (a torch tensor or numpy array, 2-D): time bands
        within its first `n_valid` frames along `time_axis`, and bands of the other axis, set to
        the clip's mean (over its valid frames). `freq_width` overrides the recipe's (for encoder
        channels). Returns a masked copy, or `x` itself when this clip draws no mask."""
        sa = self.spec.masks
        if sa is None or n_valid < 1:
            return x
        rng = self._rng("specaugment", index, draw)
        if rng.random() >= sa.p:
            return x
        freq_axis = 1 - (time_axis % 2)
        times = mask_spans(rng, n_valid, sa.time_masks, max(1, round(sa.time_width * n_valid)))
        freqs = mask_spans(rng, x.shape[freq_axis], sa.freq_masks, freq_width or sa.freq_width)
        y = x.clone() if hasattr(x, "clone") else x.copy()
        valid = y.narrow(time_axis, 0, n_valid) if hasattr(y, "narrow") else np.take(y, range(n_valid), axis=time_axis)
        fill = float(valid.mean())
        for a, b in times:
            _band(y, time_axis, a, b)[...] = fill
        for a, b in freqs:
            _band(y, freq_axis, a, b)[...] = fill
        return y


def _band(y, axis: int, a: int, b: int):
    return y[a:b] if axis % 2 == 0 else y[:, a:b]


def check_codecs(kinds: list[str]) -> str:
    """The ffmpeg that can encode every codec in `kinds`, or an `AugmentError` saying what to install."""
    exe = find_ffmpeg()
    if exe is None:
        raise AugmentError("data.augment.codec: MP3/Opus round trips need ffmpeg, which is not installed; "
                           "pip install 'earful[ingest]' (imageio-ffmpeg ships the binary) or drop data.augment.codec")
    listed = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    missing = [k for k in kinds if f" {_CODECS[k][0]} " not in listed]
    if missing:
        raise AugmentError(f"data.augment.codec.kinds: this ffmpeg ({exe}) has no encoder for {', '.join(missing)}; "
                           f"drop {', '.join(missing)} from the kinds")
    return exe
