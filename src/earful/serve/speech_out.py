"""Spoken answers for a listening LM: its text answer read out by an offline voice (a cascade).

A listening LM answers in text. With a voice (`earful.load(DIR, voice="kokoro:jm_kumo")`, `earful
serve --voice piper:joe`: any name of `earful.data.synth.voice_catalogue()`) the text is also
spoken, sentence by sentence as it is decoded, so the first audio is ready when the first sentence
is, not when the whole answer is. This is a cascade — LM text
then speech synthesis — and is named as such in the API: the model itself does not speak.

    voice = AnswerVoice("piper:joe@noise0,w0")
    wave = voice.speak("The answer is seven.")                 # float32 mono at voice.sampling_rate
    for text, wave in voice.speak_as_decoded(pieces): ...      # one (sentence, audio) at a time

OpenAI's audio output is 16-bit PCM: whole as a WAV file, streamed as raw 24 kHz little-endian
chunks ("pcm16"); `wav_bytes` and `pcm16_bytes` make them.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import resample
from ..errors import EarfulError

logger = logging.getLogger(__name__)

# The bundled Piper voice without its noise: the same answer is the same audio every time.
DEFAULT_VOICE = "piper:joe@noise0,w0"
PCM16_RATE = 24000  # OpenAI's streamed audio output: 24 kHz mono 16-bit little-endian
# Where a streamed answer may be cut for speaking: after a sentence's end, or after a clause's
# once there is enough text for the voice to say it naturally.
_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:]\s")
MIN_CLAUSE_CHARS = 24


class VoiceError(EarfulError, ValueError):
    """Text that cannot be spoken."""


@dataclass
class SpokenAnswer:
    """A text answer and its audio, spoken by an offline voice (`SpeechLM.speak`, `chat(..., audio_out=True)`)."""

    text: str
    audio: np.ndarray  # float32 mono
    sampling_rate: int
    voice: str

    def save(self, path: str | Path) -> Path:
        """Write the audio as a 16-bit PCM WAV (a temporary file, then renamed)."""
        from ..atomic import write_bytes

        write_bytes(path, wav_bytes(self.audio, self.sampling_rate))
        return Path(path)


class AnswerVoice:
    """An offline voice (`earful.data.synth` names: piper:joe, espeak:en-gb-scotland+m3, kokoro:jm_kumo, ...)."""

    def __init__(self, name: str = DEFAULT_VOICE):
        if not isinstance(name, str) or not name.strip():
            raise VoiceError(f"voice: expected a voice name such as {DEFAULT_VOICE!r}, got {name!r}")
        self.name = name.strip()
        from ..data.synth import voice_from_name

        self.voice = voice_from_name(self.name)  # VoiceNameError (an EarfulError) naming a bad one
        self._lock = threading.Lock()  # espeak-ng and one onnxruntime session per voice: one caller at a time

    @property
    def sampling_rate(self) -> int:
        return int(self.voice.sample_rate)

    def speak(self, text: str) -> np.ndarray:
        """`text` spoken, float32 mono at `sampling_rate`; empty audio for text with no word in it."""
        if not isinstance(text, str):
            raise VoiceError(f"text to speak must be a string, got {type(text).__name__}")
        if not re.search(r"\w", text):
            return np.zeros(0, np.float32)
        with self._lock:
            wave = self.voice.synthesize(text.strip())
        return np.asarray(wave, np.float32)

    def spoken(self, text: str) -> SpokenAnswer:
        """`text` and its audio in this voice."""
        return SpokenAnswer(text, self.speak(text), self.sampling_rate, self.name)

    def speak_as_decoded(self, pieces: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(text, its audio) for each sentence of a streamed answer as soon as that sentence is complete."""
        for text in sentences_as_decoded(pieces):
            yield text, self.speak(text)


class SpanCutter:
    """Text pieces in as they are decoded, speakable spans out: whole sentences, or long clauses
    (`next_cut`); `rest()` gives what is left at the end. Spans are stripped, never empty."""

    def __init__(self):
        self.unspoken = ""

    def feed(self, piece: str) -> list[str]:
        self.unspoken += piece
        spans = []
        while (cut := next_cut(self.unspoken)) is not None:
            span, self.unspoken = self.unspoken[:cut].strip(), self.unspoken[cut:]
            if span:
                spans.append(span)
        return spans

    def rest(self) -> list[str]:
        span, self.unspoken = self.unspoken.strip(), ""
        return [span] if span else []


def sentences_as_decoded(pieces: Iterable[str]) -> Iterator[str]:
    """Cut a stream of text pieces into speakable spans: whole sentences, or long clauses; the rest at the end."""
    cutter = SpanCutter()
    for piece in pieces:
        yield from cutter.feed(piece)
    yield from cutter.rest()


def next_cut(text: str) -> int | None:
    """The end of the first speakable span of `text` (its end included), or None while there is none yet."""
    m = _SENTENCE_END.search(text)
    if m:
        return m.end()
    for m in _CLAUSE_END.finditer(text):
        if m.end() >= MIN_CLAUSE_CHARS:
            return m.end()
    return None


def wav_bytes(wave: np.ndarray, sampling_rate: int) -> bytes:
    """A 16-bit PCM WAV file of a float wave."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, np.float32), sampling_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def pcm16_bytes(wave: np.ndarray, sampling_rate: int, target_rate: int = PCM16_RATE) -> bytes:
    """Raw 16-bit little-endian mono PCM at `target_rate` (OpenAI's streamed `pcm16`)."""
    wave = np.asarray(wave, np.float32)
    if len(wave) and sampling_rate != target_rate:
        wave = resample(wave, sampling_rate, target_rate)
    return (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
