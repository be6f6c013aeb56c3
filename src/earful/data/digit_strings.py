"""Connected digit strings (the TIDIGITS task: PINs, phone numbers) made from one speaker's FSDD words.

Each string is one speaker's recordings of its digits, joined with short random silences and a
little silence at both ends, written as a 16 kHz WAV. Digits are drawn independently and uniformly,
so repeats ("one one") occur at their natural rate (one adjacent pair in ten). A string never uses
one recording twice where the speaker has another of that digit, and each (speaker, digit) deck is
dealt through before any recording comes round again, so recordings are used evenly.

Everything is drawn from a generator seeded by (seed, speaker): a speaker's strings are the same
whichever other speakers are prepared with it. Each recording is faded in and out over 5 ms, since
FSDD trims its clips tight and a cut mid-waveform against silence would click.

A manifest row holds `id`, `audio`, `speaker`, `text` ("four one seven"), `duration`, `words`
(each digit's start and end in seconds, the manifest's word-timestamp field) and `sources` (the
FSDD ids the digits came from, in order).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import soundfile as sf

from .. import atomic
from ..audio import load_audio
from ..errors import EarfulError
from .fsdd import DIGIT_WORDS, fsdd_utterances
from .manifest import Utterance

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000  # what Whisper-family encoders take: no resampling each epoch
FADE_SECONDS = 0.005
WHISPER_WINDOW_SECONDS = 30.0  # a longer string would be refused by a Whisper encoder


class DigitStringsError(EarfulError, ValueError):
    """Settings for digit strings that cannot be used (a range the wrong way round, a count below one)."""


@dataclass
class StringsSummary:
    manifest: Path
    audio_dir: Path
    strings: int
    speakers: list[str]
    digits: int  # digits over all strings
    seconds: float  # audio over all strings
    with_repeat: int  # strings holding the same digit twice in a row
    reused: int  # strings that had to use one recording twice (a speaker with too few of a digit)
    too_long: int  # strings over Whisper's 30 s window


def check_settings(min_digits: int, max_digits: int, count: int | None, gap_ms: tuple[float, float],
                   edge_ms: tuple[float, float]) -> None:
    """Every problem with the settings at once, as one `DigitStringsError`."""
    problems = []
    if min_digits < 1:
        problems.append(f"min digits must be >= 1, found {min_digits}")
    if max_digits < min_digits:
        problems.append(f"min digits ({min_digits}) must be <= max digits ({max_digits})")
    if count is not None and count < 1:
        problems.append(f"count must be >= 1 string per speaker, found {count}")
    for name, (lo, hi) in (("gap", gap_ms), ("edge", edge_ms)):
        if not (0 <= lo <= hi):
            problems.append(f"{name} silence must be LO,HI ms with 0 <= LO <= HI, found {lo:g},{hi:g}")
    if problems:
        raise DigitStringsError("; ".join(problems))


def default_count(n_recordings: int, min_digits: int, max_digits: int) -> int:
    """Strings per speaker that use each of its recordings about once."""
    return max(1, round(n_recordings / ((min_digits + max_digits) / 2)))


def _rng(seed: int, speaker: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(speaker.encode("utf-8"))])


class _Decks:
    """Per digit, a speaker's recordings dealt in a shuffled order, reshuffled when dealt through."""

    def __init__(self, by_digit: dict[int, list[Utterance]], rng: np.random.Generator):
        self.by_digit, self.rng = by_digit, rng
        self.decks: dict[int, list[Utterance]] = {d: [] for d in by_digit}

    def deal(self, digit: int, taken: set[str]) -> tuple[Utterance, bool]:
        """A recording of `digit` not in `taken` (ids) where there is one; True if it had to reuse."""
        deck = self.decks[digit]
        for _ in range(2):  # the rest of this deck, then a fresh shuffle
            for i, u in enumerate(deck):
                if u.id not in taken:
                    return deck.pop(i), False
            order = self.rng.permutation(len(self.by_digit[digit]))
            deck.extend(self.by_digit[digit][j] for j in order)
        return deck.pop(0), True  # every recording of this digit is already in the string


def _fade(wave: np.ndarray, rate: int) -> np.ndarray:
    n = min(int(FADE_SECONDS * rate), len(wave) // 2)
    if n:
        wave = wave.copy()
        ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
        wave[:n] *= ramp
        wave[-n:] *= ramp[::-1]
    return wave


def _silence(rng: np.random.Generator, ms: tuple[float, float], rate: int) -> np.ndarray:
    return np.zeros(round(rng.uniform(*ms) / 1000 * rate), dtype=np.float32)


def prepare_digit_strings(
    folder: str | Path,
    manifest: str | Path,
    speakers: list[str] | None = None,
    *,
    min_digits: int = 3,
    max_digits: int = 7,
    count: int | None = None,
    seed: int = 0,
    gap_ms: tuple[float, float] = (50.0, 300.0),
    edge_ms: tuple[float, float] = (100.0, 250.0),
    audio_dir: str | Path | None = None,
) -> StringsSummary:
    """Write `count` strings per speaker of `folder`'s FSDD recordings and their manifest.

    `count` None: enough strings to use each of a speaker's recordings about once. WAVs go to
    `audio_dir` (default: MANIFEST's name + `_audio/` beside it) as SPEAKER_NNNNN.wav, each
    written atomically; the manifest is written last, also atomically, so it never names a WAV
    that is not there. A rerun with the same settings writes the same files.

    Raises `DigitStringsError` for bad settings, `FileNotFoundError` / `ValueError` from
    `fsdd_utterances` for a missing folder or an unknown speaker.
    """
    check_settings(min_digits, max_digits, count, gap_ms, edge_ms)
    manifest = Path(manifest)
    audio_dir = Path(audio_dir) if audio_dir is not None else manifest.with_name(manifest.stem + "_audio")
    recordings = fsdd_utterances(folder, speakers)
    by_speaker: dict[str, dict[int, list[Utterance]]] = defaultdict(lambda: defaultdict(list))
    for u in recordings:
        by_speaker[u.speaker][DIGIT_WORDS.index(u.text)].append(u)
    order = list(dict.fromkeys(speakers)) if speakers else sorted(by_speaker)

    audio_dir.mkdir(parents=True, exist_ok=True)
    waves: dict[str, np.ndarray] = {}  # FSDD id -> its samples at SAMPLING_RATE, each read once
    rows, digits, seconds, with_repeat, reused, too_long = [], 0, 0.0, 0, 0, 0
    for speaker in order:
        by_digit = by_speaker[speaker]
        rng = _rng(seed, speaker)
        decks = _Decks(by_digit, rng)
        available = sorted(by_digit)  # a partial folder may lack some digit
        n = count or default_count(sum(len(v) for v in by_digit.values()), min_digits, max_digits)
        for k in range(n):
            length = int(rng.integers(min_digits, max_digits + 1))
            chosen = [available[i] for i in rng.integers(0, len(available), length)]
            parts, words, sources, taken = [_silence(rng, edge_ms, SAMPLING_RATE)], [], [], set()
            t, had_to_reuse = len(parts[0]), False  # t: samples so far
            for j, digit in enumerate(chosen):
                if j:
                    parts.append(_silence(rng, gap_ms, SAMPLING_RATE))
                    t += len(parts[-1])
                u, again = decks.deal(digit, taken)
                had_to_reuse |= again
                taken.add(u.id)
                if u.id not in waves:
                    waves[u.id] = _fade(load_audio(u.audio, SAMPLING_RATE), SAMPLING_RATE)
                wave = waves[u.id]
                parts.append(wave)
                words.append({"word": DIGIT_WORDS[digit], "start": round(t / SAMPLING_RATE, 6),
                              "end": round((t + len(wave)) / SAMPLING_RATE, 6)})
                sources.append(u.id)
                t += len(wave)
            parts.append(_silence(rng, edge_ms, SAMPLING_RATE))
            audio = np.concatenate(parts)
            name = f"{speaker}_{k:05d}"
            path = audio_dir / f"{name}.wav"
            with atomic.replacing(path) as f:
                sf.write(f, audio, SAMPLING_RATE, format="WAV", subtype="PCM_16")
            duration = len(audio) / SAMPLING_RATE
            utt = Utterance(audio=str(path.resolve()), text=" ".join(w["word"] for w in words), id=name,
                            speaker=speaker, duration=round(duration, 4), words=words)
            rows.append({**utt.to_json(manifest.parent.resolve()), "sources": sources})
            digits += length
            seconds += duration
            with_repeat += any(a == b for a, b in pairwise(chosen))
            reused += had_to_reuse
            too_long += duration > WHISPER_WINDOW_SECONDS
    if reused:
        logger.warning("%d strings had to use one recording twice: a speaker has fewer recordings of a digit than a string holds", reused)
    if too_long:
        logger.warning("%d strings are longer than %g s: a Whisper encoder refuses them (lower --max or the silences)",
                       too_long, WHISPER_WINDOW_SECONDS)
    atomic.write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return StringsSummary(manifest, audio_dir, len(rows), list(order), digits, seconds, with_repeat, reused, too_long)
