"""Vocoders: speech unit ids -> audio a person can hear. See base.py for the interface.

Importing the package registers the built-in kinds with `load_vocoder`: `piper-joe` (the bundled
Piper voice's HiFi-GAN behind a trained units -> z adapter; needs the `synth` extra) and
`griffin-lim` (a trained units -> log-mel adapter and Griffin-Lim: no weights, always available).
Their heavy parts (onnx, the Piper voice) load only when a vocoder is fitted or decodes.
"""

from . import griffinlim, piper  # noqa: F401  (register the built-in kinds)
from .base import KINDS, UnitsOutOfRange, Vocoder, VocoderError, expand_durations, load_vocoder, mean_durations
from .griffinlim import GriffinLimVocoder, fit_griffin_lim
from .piper import PiperGenerator, PiperJoeVocoder, PiperSpeaker, fit_piper_joe

__all__ = ["KINDS", "GriffinLimVocoder", "PiperGenerator", "PiperJoeVocoder", "PiperSpeaker", "UnitsOutOfRange",
           "Vocoder", "VocoderError", "expand_durations", "fit_griffin_lim", "fit_piper_joe", "load_vocoder",
           "mean_durations"]
