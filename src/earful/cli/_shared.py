"""What verbs of more than one stage do alike: check a prompt, read clips, load a units LM."""

from __future__ import annotations

import sys

from ._parser import UsageError


def check_prompt(prompt: str | None) -> None:
    from ..models.configuration import AUDIO_TOKEN

    if prompt is not None and prompt.count(AUDIO_TOKEN) != 1:
        raise UsageError(f"--prompt: must hold exactly one {AUDIO_TOKEN} (where the clip goes), found {prompt.count(AUDIO_TOKEN)} in {prompt!r}")


def load_clips(files: list[str], sampling_rate: int | None = None, *, front=None) -> tuple[list, list[str], int]:
    """Each file decoded, each bad one reported in one line on stderr: (waves, their files, failures).

    With `front` = (feature extractor, encoder config) a clip must also fit that encoder (`load_clip`).
    """
    from ..audio import AudioError, load_audio
    from ..eval.asr import load_clip

    waves, names, failures = [], [], 0
    for f in files:
        try:
            if front is not None:
                waves.append(load_clip(f, *front))
            else:
                waves.append(load_audio(f, sampling_rate))
            names.append(f)
        except AudioError as e:
            print(f"error: {e} [{type(e).__name__}]", file=sys.stderr)
            failures += 1
    return waves, names, failures


def audio_front(model: str):
    """(feature extractor, encoder config) of a saved listening LM, read without loading its weights."""
    from transformers import AutoFeatureExtractor

    from ..models.configuration import SpeechLMConfig
    from ..models.processing import SpeechLMProcessor
    from ..pretrained import resolve

    SpeechLMProcessor.from_pretrained_sampling_rate(model)  # names a folder that is no earful model
    folder = resolve(str(model))
    return AutoFeatureExtractor.from_pretrained(folder), SpeechLMConfig.from_pretrained(folder).encoder_config


def load_unit_lm(model: str):
    from ..models.vocab import SoundVocabError
    from ..tokenizers import AudioTokenizerError
    from ..vocoders.base import VocoderError
    from ..vocoders.speaking import load_speaking_unit_lm

    try:
        return load_speaking_unit_lm(model)  # k-means units speak through the folder's vocoder/, if any
    except (SoundVocabError, AudioTokenizerError, VocoderError) as e:
        raise UsageError(str(e)) from None
