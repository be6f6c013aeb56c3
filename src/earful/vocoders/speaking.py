"""A units LM that speaks: its k-means unit tokenizer with a vocoder saved in the model folder.

K-means units have no decoder of their own. A vocoder fitted on the same units (`earful vocoder
fit`) gives them one; `attach_vocoder` copies it into the units LM's folder as `vocoder/`, and
`load_speaking_unit_lm` loads the LM with a tokenizer that decodes through it, so `earful
generate --out out.wav`, `earful serve` (OpenAI audio output) and `earful.load(DIR)` all speak.

    attach_vocoder("runs/units/continuation", "runs/vocoder")
    lm = load_speaking_unit_lm("runs/units/continuation")
    lm.audio_tokenizer.decode(units)             # float32 mono at the tokenizer's rate (16 kHz)

A units LM reads deduplicated units (runs collapsed), so its own continuations are decoded with
the vocoder's mean unit durations (see `earful.vocoders.base`): the rhythm comes out average.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..audio import resample
from ..pretrained import resolve
from ..tokenizers.base import AudioTokenizer
from ..tokenizers.unit_lm import load_unit_lm
from .base import VocoderError, load_vocoder

VOCODER_DIR = "vocoder"  # inside a units LM's folder, beside audio_tokenizer/


class VoicedUnits(AudioTokenizer):
    """A unit tokenizer whose ids decode to audio through a vocoder fitted on the same units.

    Audio comes out at the tokenizer's own rate (the rate it reads), so one rate serves both ways.
    """

    can_decode = True

    def __init__(self, tokenizer, vocoder):
        check_same_units(tokenizer, vocoder)
        self.tokenizer, self.vocoder = tokenizer, vocoder
        self.kind = tokenizer.kind  # per instance: this class registers no kind of its own

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def frame_rate(self) -> float:
        return self.tokenizer.frame_rate

    @property
    def sampling_rate(self) -> int:
        return self.tokenizer.sampling_rate

    @property
    def dedup(self) -> bool:
        return bool(getattr(self.tokenizer, "dedup", False))

    def encode_batch(self, waves: list[np.ndarray]) -> list[list[int]]:
        return self.tokenizer.encode_batch(waves)

    def decode(self, ids: list[int]) -> np.ndarray:
        wave = self.vocoder.decode(list(ids), deduplicated=self.dedup)
        return resample(wave, self.vocoder.sampling_rate, self.sampling_rate)

    def config(self) -> dict:
        return self.tokenizer.config()

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)  # the vocoder lives in the model folder's vocoder/, not here

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VoicedUnits:
        raise VocoderError("a voiced unit tokenizer is loaded with its units LM: load_speaking_unit_lm(MODEL_DIR)")


def check_same_units(tokenizer, vocoder) -> None:
    """VocoderError unless the vocoder was fitted on exactly these units (same centroids, encoder and layer)."""
    theirs, ours = vocoder.unit_tokenizer(), tokenizer

    def layer(t):  # None: the encoder's default layer, known once its features load
        return t.layer if t.layer is not None else t.features.layer

    same = (getattr(ours, "centroids", None) is not None and getattr(theirs, "centroids", None) is not None
            and ours.centroids.shape == theirs.centroids.shape and np.array_equal(ours.centroids, theirs.centroids)
            and ours.encoder_spec == theirs.encoder_spec and layer(ours) == layer(theirs))
    if not same:
        raise VocoderError(f"the vocoder was fitted on other units (k={theirs.vocab_size}, {theirs.encoder_spec}) than this "
                           f"model's (k={ours.vocab_size}, {getattr(ours, 'encoder_spec', '?')}): other k-means centroids or "
                           "encoder layer; fit one on the model's audio_tokenizer/ with `earful vocoder fit --units`")


def attach_vocoder(model_dir: str | Path, vocoder_dir: str | Path) -> Path:
    """Copy a vocoder into a units LM's folder (as vocoder/) after checking it speaks the model's units."""
    model_dir, vocoder_dir = Path(model_dir), Path(vocoder_dir)
    lm = load_unit_lm(model_dir)
    if lm.audio_tokenizer is None:
        raise VocoderError(f"{model_dir}: a units LM saved without its audio tokenizer has no units to speak")
    if lm.audio_tokenizer.can_decode:
        raise VocoderError(f"{model_dir}: its {lm.audio_tokenizer.kind} tokenizer decodes by itself; it needs no vocoder")
    check_same_units(lm.audio_tokenizer, load_vocoder(vocoder_dir))
    target = model_dir / VOCODER_DIR
    staging = Path(tempfile.mkdtemp(prefix=".vocoder-", dir=model_dir))
    try:
        shutil.copytree(vocoder_dir, staging / VOCODER_DIR)
        if target.exists():  # replaced whole: the old one moves aside, then goes
            old = staging / "old"
            target.rename(old)
        (staging / VOCODER_DIR).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_speaking_unit_lm(folder: str | Path, device: str = "cpu"):
    """`load_unit_lm`, with a k-means tokenizer made to speak by the model folder's vocoder/ when it has one."""
    lm = load_unit_lm(folder, device=device)
    voc = Path(resolve(str(folder))) / VOCODER_DIR
    if lm.audio_tokenizer is None or lm.audio_tokenizer.can_decode or not voc.is_dir():
        return lm
    return replace(lm, audio_tokenizer=VoicedUnits(lm.audio_tokenizer, load_vocoder(voc)))
