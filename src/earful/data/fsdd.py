"""The Free Spoken Digit Dataset (and anything named like it): `{digit}_{speaker}_{index}.wav`."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import soundfile as sf

from .manifest import Utterance

logger = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")


def default_fsdd_dir() -> Path:
    """Where FSDD is looked for: $EARFUL_FSDD, else `../shared/data/fsdd` beside the checkout."""
    env = os.environ.get("EARFUL_FSDD")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data" / "fsdd"


def fsdd_utterances(folder: str | Path, speakers: list[str] | None = None) -> list[Utterance]:
    """Utterances of an FSDD-style folder (or its `recordings/` subfolder), sorted by name.

    `speakers` keeps only those speakers; a speaker that has no file is an error, since a typo would
    otherwise silently give an empty split.
    """
    folder = Path(folder)
    if (folder / "recordings").is_dir():
        folder = folder / "recordings"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected FSDD recordings named digit_speaker_index.wav)")
    rows = []
    for path in sorted(folder.glob("*.wav")):
        m = _NAME.match(path.name)
        if not m:
            logger.warning("skipping %s: not named digit_speaker_index.wav", path)
            continue
        digit, speaker, _ = m.groups()
        if speakers and speaker not in speakers:
            continue
        info = sf.info(str(path))
        rows.append(
            Utterance(
                audio=str(path.resolve()),
                text=DIGIT_WORDS[int(digit)],
                id=path.stem,
                speaker=speaker,
                duration=round(info.frames / info.samplerate, 4),
            )
        )
    if speakers:
        missing = sorted(set(speakers) - {r.speaker for r in rows})
        if missing:
            found = sorted({_NAME.match(p.name).group(2) for p in folder.glob("*.wav") if _NAME.match(p.name)})
            raise ValueError(f"{folder}: no recordings of speaker(s) {', '.join(missing)}; found: {', '.join(found)}")
    if not rows:
        raise ValueError(f"{folder}: no recordings named digit_speaker_index.wav")
    return rows
