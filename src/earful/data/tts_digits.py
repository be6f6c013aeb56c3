"""Spoken digits synthesised offline: the bundled Piper voice and espeak-ng's many voices.

FSDD is the real speech this project is measured on; where it is absent, the main job still runs
on these. With `voices="piper"` each clip draws the Piper voice's speed and noise settings at
random, and `speaker` names the speed bucket (a pseudo-speaker, which keeps leave-one-out splits
meaningful). `voices="many"` adds espeak-ng's accents and voice variants at random rate and pitch
(`espeak_{accent}_{variant}` speakers, female and child-like variants among them): formant
speech, robotic, but spread over vocal tracts that FSDD's five men do not cover.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from tqdm.auto import tqdm

from .fsdd import DIGIT_WORDS
from .manifest import Utterance, write_manifest

logger = logging.getLogger(__name__)

ESPEAK_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Alex", "Andy", "adam", "belinda",
                   "benjamin", "david", "ed", "edward", "grandpa", "ian", "john", "linda", "max", "michel", "norbert", "aunty")
VOICE_SETS = ("piper", "many")


def synthesise_digits(out_dir: str | Path, per_digit: int = 20, seed: int = 0, voices: str = "piper") -> Path:
    """Write `per_digit` clips of each digit word at 16 kHz, FSDD-named, and their manifest.

    `voices="many"`: half the clips from Piper, half from espeak-ng voices drawn at random.
    """
    from .synth import EspeakVoice, PiperVoice, synthesize_to_file

    if voices not in VOICE_SETS:
        raise ValueError(f"voices: expected one of {', '.join(VOICE_SETS)}, found {voices!r}")
    out_dir = Path(out_dir)
    rec = out_dir / "recordings"
    rec.mkdir(parents=True, exist_ok=True)
    voice = PiperVoice.load()
    rng = random.Random(seed)
    rows = []
    for i in tqdm(range(per_digit), desc="synthesising digits", unit="round"):
        for d, word in enumerate(DIGIT_WORDS):
            if voices == "many" and i % 2:
                accent, variant = rng.choice(ESPEAK_ACCENTS), rng.choice(ESPEAK_VARIANTS)
                name = accent + (f"+{variant}" if variant else "")
                speaker = f"espeak_{accent}_{variant or 'default'}".replace("-", "")
                path = rec / f"{d}_{speaker}_{i}.wav"
                duration = synthesize_to_file(word, path, sampling_rate=16000,
                                              voice=EspeakVoice(name, rate=rng.randint(120, 230), pitch=rng.randint(20, 80)))
            else:
                length_scale = rng.uniform(0.8, 1.3)
                speaker = f"piper{int(length_scale * 10)}"
                path = rec / f"{d}_{speaker}_{i}.wav"
                duration = synthesize_to_file(
                    word, path, sampling_rate=16000, voice=voice,
                    length_scale=length_scale, noise_scale=rng.uniform(0.3, 0.9), noise_w=rng.uniform(0.5, 1.0),
                )
            rows.append(Utterance(audio=str(path.resolve()), text=word, id=path.stem, speaker=speaker, duration=round(duration, 4)))
    manifest = out_dir / "manifest.jsonl"
    write_manifest(rows, manifest)
    logger.info("synthesised %d clips into %s", len(rows), rec)
    return manifest
