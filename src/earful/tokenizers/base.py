"""One interface for every audio tokenizer: waveform -> token ids, and back where it can.

    tok = load_audio_tokenizer("runs/units/k500")
    ids = tok.encode(load_audio("clip.wav", tok.sampling_rate))   # list[int], each in [0, vocab_size)
    wave = tok.decode(ids)                                        # codec tokenizers only

Symbols: `vocab_size` ids, `frame_rate` frames per second of audio, `tokens_per_frame` ids per
frame (1 for units, N codebooks for a codec), so a clip of S seconds gives about
S * frame_rate * tokens_per_frame ids (fewer for deduplicated units).

A tokenizer is saved as a folder holding `audio_tokenizer.json` (its kind and settings) plus
whatever the kind needs (k-means centroids); `load_audio_tokenizer` reads any kind back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..atomic import replacing, write_text as atomic_write_text  # the one atomic text writer, under the name callers use
from ..errors import EarfulError

CONFIG_FILE = "audio_tokenizer.json"


class AudioTokenizerError(EarfulError, ValueError):
    """A tokenizer folder or token sequence that cannot be used; the message names which and why."""


class DecodeUnsupported(AudioTokenizerError):
    """The tokenizer cannot turn ids back into audio (k-means units have no vocoder)."""


# kind -> class: every AudioTokenizer subclass with a `kind` registers itself when its module is
# imported (the package imports the built-in kinds), so loading needs no list of subclasses here.
KINDS: dict[str, type[AudioTokenizer]] = {}


class AudioTokenizer(ABC):
    kind: str  # written to audio_tokenizer.json, picks the class on load
    can_decode: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in KINDS and KINDS[kind] is not cls:
                raise TypeError(f"audio tokenizer kind {kind!r} is taken by {KINDS[kind].__qualname__}")
            KINDS[kind] = cls

    @classmethod
    @abstractmethod
    def from_pretrained(cls, folder: str | Path) -> AudioTokenizer:
        """The tokenizer saved in `folder` by `save_pretrained`."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def frame_rate(self) -> float: ...

    @property
    @abstractmethod
    def sampling_rate(self) -> int: ...

    @property
    def tokens_per_frame(self) -> int:
        return 1

    @abstractmethod
    def encode_batch(self, waves: list[np.ndarray]) -> list[list[int]]:
        """Token ids of each waveform (float32 mono at `sampling_rate`)."""

    def encode(self, audio: np.ndarray) -> list[int]:
        return self.encode_batch([audio])[0]

    def decode(self, ids: list[int]) -> np.ndarray:
        raise DecodeUnsupported(f"a {self.kind} tokenizer cannot turn token ids back into audio; "
                                "write the ids (.json) instead, or use a codec tokenizer")

    @abstractmethod
    def config(self) -> dict:
        """What `audio_tokenizer.json` holds besides `kind`."""

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / CONFIG_FILE, json.dumps({"kind": self.kind, **self.config()}, indent=2) + "\n")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with replacing(path) as f:
        np.save(f, array)


def read_kind_config(path: Path, error: type[Exception], what: str, make: str, kinds: str) -> dict:
    """A folder's JSON config naming its `kind` (audio tokenizers, vocoders), or `error` saying what is wrong."""
    if not path.is_file():
        raise error(f"{path.parent}: not {what} folder (no {path.name}); make one with `{make}`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not JSON ({e.msg})") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise error(f"{path}: expected an object with a 'kind' ({kinds})")
    return config


def read_config(folder: str | Path) -> dict:
    return read_kind_config(Path(folder) / CONFIG_FILE, AudioTokenizerError, "an audio tokenizer", "earful units fit", "units or codec")


def load_audio_tokenizer(folder: str | Path) -> AudioTokenizer:
    """Any saved audio tokenizer, by the `kind` in its folder's audio_tokenizer.json (see `KINDS`)."""
    kind = read_config(folder)["kind"]
    if kind not in KINDS:
        raise AudioTokenizerError(f"{Path(folder) / CONFIG_FILE}: unknown kind {kind!r} (expected one of {', '.join(sorted(KINDS))})")
    return KINDS[kind].from_pretrained(folder)


def deduplicate(ids: list[int]) -> list[int]:
    """Collapse runs of a repeated id to one (Slam, GSLM): 7 7 7 3 3 7 -> 7 3 7."""
    return [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]
