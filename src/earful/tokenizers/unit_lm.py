"""Loading a units LM whole: the causal LM with its sound vocabulary (models/vocab.py) and the audio
tokenizer saved beside it, which turns audio into its sound tokens and, for a codec, back.

It sits here, after both, because it needs both: the model side knows nothing of tokenizers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..models.vocab import AUDIO_TOKENIZER_DIR, SoundVocabError, UnitLM, load_sound_lm
from ..pretrained import resolve
from .base import load_audio_tokenizer


def load_unit_lm(folder: str | Path, device: str | torch.device = "cpu") -> UnitLM:
    """A saved units LM: the model, its tokenizer, where the sound tokens sit, and the audio tokenizer."""
    lm = load_sound_lm(folder, device)
    audio_dir = Path(resolve(str(folder))) / AUDIO_TOKENIZER_DIR
    if not audio_dir.is_dir():
        return lm
    audio_tokenizer = load_audio_tokenizer(audio_dir)
    if audio_tokenizer.vocab_size != lm.vocab.n_units:
        raise SoundVocabError(f"{audio_dir}: the audio tokenizer has {audio_tokenizer.vocab_size} ids but the LM "
                              f"{lm.vocab.n_units} sound tokens")
    return replace(lm, audio_tokenizer=audio_tokenizer)
