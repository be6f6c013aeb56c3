"""One interface for every vocoder: speech unit ids -> a waveform a person can hear.

    voc = load_vocoder("runs/vocoder")                 # any kind, by vocoder_config.json's "kind"
    units = voc.unit_tokenizer().encode(wave_16k, dedup=False)
    audio = voc.decode(units)                          # float32 mono at voc.sampling_rate

Symbols: `vocab_size` unit ids (the k of the unit tokenizer the vocoder was fitted with),
`frame_rate` units per second it expects (the tokenizer's frame rate: 50 Hz for Whisper units),
`sampling_rate` of the audio it writes. `decode` takes NON-deduplicated units, one per frame, so a
sequence of n units gives n * sampling_rate / frame_rate samples (within one unit frame).

Deduplicated units (runs collapsed, as a units LM sees them) carry no durations. The rule here is
the simplest honest one: each unit is repeated for its mean run length measured on the data the
vocoder was fitted on (`durations.npy` in the folder; `expand_durations`). `decode(units,
deduplicated=True)` applies it. Rhythm then comes out average, not as spoken.

A vocoder is saved as a folder holding `vocoder_config.json` (its kind and settings), the
trainable part's weights, the mean durations, and a copy of the unit tokenizer it was fitted with
(`units/`), so that audio -> units -> audio needs nothing but the folder.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..errors import EarfulError

CONFIG_FILE = "vocoder_config.json"
DURATIONS_FILE = "durations.npy"
UNITS_DIR = "units"  # the unit tokenizer the vocoder was fitted with, saved inside its folder


class VocoderError(EarfulError, ValueError):
    """A vocoder folder, or units given to a vocoder, that cannot be used; the message says which and why."""


class UnitsOutOfRange(VocoderError):
    """Unit ids outside [0, vocab_size) or an empty sequence: units from another tokenizer, or none."""


# kind -> class: every Vocoder subclass with a `kind` registers itself when its module is imported
# (the package imports the built-in kinds), as audio tokenizers do.
KINDS: dict[str, type[Vocoder]] = {}


def check_units(units, vocab_size: int) -> np.ndarray:
    """`units` as an int64 array (n,), or UnitsOutOfRange naming what is wrong."""
    ids = np.asarray(units)
    if ids.ndim != 1 or ids.size == 0:
        raise UnitsOutOfRange(f"expected a non-empty 1-D sequence of unit ids, found shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UnitsOutOfRange(f"expected integer unit ids, found dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise UnitsOutOfRange(f"unit ids must be in [0, {vocab_size}) for this vocoder (k={vocab_size}); found "
                              f"{int(bad.sum())} outside it, e.g. {int(ids[bad][0])}: were the units made by another "
                              "tokenizer? Use the one saved in the vocoder folder (units/)")
    return ids.astype(np.int64)


def mean_durations(sequences: list[list[int]], vocab_size: int) -> np.ndarray:
    """Mean run length in frames of each unit over non-deduplicated sequences: (vocab_size,) float32.

    A unit never seen gets the mean over all runs, so it still lasts a plausible time.
    """
    total = np.zeros(vocab_size)
    count = np.zeros(vocab_size)
    for seq in sequences:
        seq = np.asarray(seq)
        if seq.size == 0:
            continue
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])  # first frame of each run
        lengths = np.diff(np.r_[starts, seq.size])
        np.add.at(total, seq[starts], lengths)
        np.add.at(count, seq[starts], 1)
    overall = total.sum() / max(count.sum(), 1)
    return np.where(count > 0, total / np.maximum(count, 1), overall if count.sum() else 1.0).astype(np.float32)


def expand_durations(units, durations) -> np.ndarray:
    """Deduplicated units -> one unit per frame: unit u repeated round(durations[u]) times (at least once)."""
    ids = np.asarray(units, dtype=np.int64)
    repeats = np.maximum(np.rint(np.asarray(durations)[ids]).astype(np.int64), 1)
    return np.repeat(ids, repeats)


class Vocoder(ABC):
    kind: str  # written to vocoder_config.json, picks the class on load

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            if kind in KINDS and KINDS[kind] is not cls:
                raise TypeError(f"vocoder kind {kind!r} is taken by {KINDS[kind].__qualname__}")
            KINDS[kind] = cls

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def frame_rate(self) -> float: ...

    @property
    @abstractmethod
    def sampling_rate(self) -> int: ...

    @abstractmethod
    def decode(self, units, deduplicated: bool = False) -> np.ndarray:
        """A waveform (float32 mono in [-1, 1] at `sampling_rate`) for NON-deduplicated unit ids;
        with `deduplicated`, each unit is first repeated for its mean duration (module docstring)."""

    @abstractmethod
    def config(self) -> dict:
        """What vocoder_config.json holds besides `kind`."""

    @abstractmethod
    def save_pretrained(self, folder: str | Path) -> None: ...

    @classmethod
    @abstractmethod
    def from_pretrained(cls, folder: str | Path) -> Vocoder: ...

    def _write_config(self, folder: Path) -> None:
        write_text(folder / CONFIG_FILE, json.dumps({"kind": self.kind, **self.config()}, indent=2) + "\n")


def read_config(folder: str | Path) -> dict:
    from ..tokenizers.base import read_kind_config

    return read_kind_config(Path(folder) / CONFIG_FILE, VocoderError, "a vocoder", "earful vocoder fit", ", ".join(sorted(KINDS)))


def load_vocoder(folder: str | Path) -> Vocoder:
    """Any saved vocoder, by the `kind` in its folder's vocoder_config.json (see `KINDS`)."""
    kind = read_config(folder)["kind"]
    if kind not in KINDS:
        raise VocoderError(f"{Path(folder) / CONFIG_FILE}: unknown kind {kind!r} (expected one of {', '.join(sorted(KINDS))})")
    return KINDS[kind].from_pretrained(folder)
