"""Spoken digits synthesised with the bundled Piper voice: training data on any fresh machine.

FSDD is the real speech this project is measured on; where it is absent, the main job still runs
on these. One voice gives little speaker variety, so each clip draws its speed and noise settings
at random; `speaker` names the speed bucket, which keeps leave-one-out splits meaningful.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from tqdm.auto import tqdm

from .fsdd import DIGIT_WORDS
from .manifest import Utterance, write_manifest

logger = logging.getLogger(__name__)


def synthesise_digits(out_dir: str | Path, per_digit: int = 20, seed: int = 0) -> Path:
    """Write `per_digit` clips of each digit word at 16 kHz, FSDD-named, and their manifest."""
    from .synth import PiperVoice, synthesize_to_file

    out_dir = Path(out_dir)
    rec = out_dir / "recordings"
    rec.mkdir(parents=True, exist_ok=True)
    voice = PiperVoice.load()
    rng = random.Random(seed)
    rows = []
    for i in tqdm(range(per_digit), desc="synthesising digits", unit="round"):
        for d, word in enumerate(DIGIT_WORDS):
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
