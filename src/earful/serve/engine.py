"""`earful.load(DIR)`: a trained speech LM behind one queue, for Python users and the server alike.

A `SpeechLM` owns the model and a single worker thread that runs every generation, so any number
of callers (threads, HTTP requests) share the model safely. Requests waiting together with the
same decoding options are batched into one `generate()` call (left padding, one row per request,
any number of clips per row); streamed requests run alone and yield text as it is decoded.

    lm = earful.load("runs/digits")
    lm.transcribe("7_jackson_0.wav")                      # 'seven'
    lm.chat("What number is spoken? <|audio|>", audio="7_jackson_0.wav")
    for piece in lm.stream_chat(messages=[{"role": "user", "content": ["What is said?", {"audio": "x.wav"}]}]):
        print(piece, end="")
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch

from ..audio import DEFAULT_MAX_SECONDS, decode_audio_bytes, load_audio, resample
from ..models.processing import clip_features, pad_features
from ..errors import EarfulError

logger = logging.getLogger(__name__)

# What an audio argument may be: a file path, encoded bytes (WAV/FLAC/OGG/MP3), a float waveform
# already at the model's rate, or (waveform, its rate).
AudioLike = Union[str, Path, bytes, np.ndarray, "tuple[np.ndarray, int]"]

MIN_AUDIO_SECONDS = 0.05  # shorter clips give the encoder no frame to work with


class RequestError(EarfulError, ValueError):
    """A request the model cannot answer as asked (the server turns it into a 400)."""


def read_audio_like(audio: AudioLike, sampling_rate: int, max_seconds: float, name: str = "<audio>") -> np.ndarray:
    """Any `AudioLike` -> float32 mono at `sampling_rate`, checked like every earful input."""
    limits = {"max_seconds": max_seconds, "min_seconds": MIN_AUDIO_SECONDS}
    if isinstance(audio, (str, Path)):
        return load_audio(audio, sampling_rate, **limits)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return decode_audio_bytes(bytes(audio), sampling_rate, name=name, **limits)
    rate = sampling_rate
    if isinstance(audio, tuple):
        audio, rate = audio
    wave = np.asarray(audio, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=-1 if wave.shape[-1] < wave.shape[0] else 0)
    if wave.ndim != 1 or not np.isfinite(wave).all() or len(wave) < MIN_AUDIO_SECONDS * rate:
        raise RequestError(f"{name}: a waveform must be a 1-D finite float array of at least {MIN_AUDIO_SECONDS} s")
    if len(wave) > max_seconds * rate:
        raise RequestError(f"{name}: {len(wave) / rate:.1f} s of audio, over the {max_seconds:g} s limit")
    return resample(wave, rate, sampling_rate)


@dataclass(frozen=True)
class DecodingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 4096:
            raise RequestError(f"max_new_tokens must be between 1 and 4096, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 2:
            raise RequestError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def batch_key(self) -> tuple:
        """Requests batch together when they decode the same way (max_new_tokens is cut per row)."""
        return (self.temperature, self.top_p)

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


@dataclass
class _Job:
    ids: list[int]
    features: list[np.ndarray]  # each clip's encoder features, computed once when the request came in
    options: DecodingOptions
    future: Future
    streamer: object | None = None


class SpeechLM:
    """A trained listening LM ready to answer; see the module docstring."""

    def __init__(self, model, processor, *, name: str = "earful", max_batch_size: int = 8, batch_wait_s: float = 0.01,
                 max_audio_seconds: float = DEFAULT_MAX_SECONDS):
        self.model, self.processor, self.name = model, processor, name
        self.max_batch_size, self.batch_wait_s, self.max_audio_seconds = max_batch_size, batch_wait_s, max_audio_seconds
        self._pending: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="earful-generate", daemon=True)
        self._worker.start()

    @property
    def sampling_rate(self) -> int:
        return self.processor.sampling_rate

    @property
    def audio_token(self) -> str:
        return self.model.config.audio_token

    # -- inputs ----------------------------------------------------------------------------------
    def read_audio(self, audio: AudioLike, name: str = "<audio>") -> np.ndarray:
        """Any `AudioLike` -> float32 mono at the model's rate, checked like every earful input."""
        return read_audio_like(audio, self.sampling_rate, self.max_audio_seconds, name)

    def _conversation(self, messages: list[dict]) -> tuple[list[int], list[np.ndarray]]:  # (prompt ids, clip features)
        """Messages whose content is text or a list of parts.

        A part is text (a str), or audio: `{"audio": AudioLike}`, or an AudioLike other than a str
        (a `Path`, encoded bytes, a waveform): a str part is always text, never a file name.
        """
        if not messages:
            raise RequestError("messages: at least one message is needed")
        token, texts, waves = self.audio_token, [], []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}].role: expected system, user or assistant, got {role!r}")
            parts = [content] if isinstance(content, str) else list(content or [])
            pieces, n_clips = [], 0
            for j, part in enumerate(parts):
                if isinstance(part, str):
                    if token in part:
                        raise RequestError(f"messages[{i}].content: text may not contain the reserved {token} token")
                    if part.strip():
                        pieces.append(part.strip())
                else:
                    if isinstance(part, dict):
                        if "audio" not in part:
                            raise RequestError(f"messages[{i}].content[{j}]: a part is text (str) or {{'audio': ...}}")
                        part = part["audio"]
                    if role != "user":
                        raise RequestError(f"messages[{i}]: only user messages may carry audio")
                    waves.append(self.read_audio(part, name=f"messages[{i}].content[{j}]"))
                    pieces.append(token)
                    n_clips += 1
            text = " ".join(pieces)
            if n_clips and text == token * n_clips and n_clips == 1:
                text = self.processor.prompt_format.default_prompt  # audio alone: the task it was trained on
            texts.append({"role": role, "content": text})
        if texts[-1]["role"] != "user":
            raise RequestError("messages: the last message must be the user's")
        features = [clip_features(self.processor.feature_extractor, self.model.config.encoder_config, w) for w in waves]
        n_audio = self.processor.audio_positions(torch.tensor([f.shape[-1] for f in features], dtype=torch.long)).tolist() if waves else []
        ids = self.processor.conversation_ids(texts, n_audio)
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if limit and len(ids) >= limit:
            raise RequestError(f"the conversation takes {len(ids)} positions, over the model's {limit}")
        return ids, features

    def _messages(self, messages, audio, prompt) -> list[dict]:
        if messages is not None:
            return messages
        prompt = prompt or self.processor.prompt_format.default_prompt
        if audio is None:
            return [{"role": "user", "content": prompt}]
        before, found, after = prompt.partition(self.audio_token)
        audio = {"audio": audio}
        parts = [before, audio, after] if found else [audio, prompt]
        return [{"role": "user", "content": parts}]

    # -- answers ---------------------------------------------------------------------------------
    def submit(self, messages: list[dict], options: DecodingOptions | None = None, stream: bool = False) -> tuple[Future, Iterator[str] | None]:
        """Queue a conversation; returns a Future of its `Generation` (and a text iterator when streaming)."""
        ids, features = self._conversation(messages)
        streamer = None
        if stream:
            from transformers import TextIteratorStreamer

            streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        job = _Job(ids, features, options or DecodingOptions(), Future(), streamer)
        with self._cv:
            if self._closed:
                raise RuntimeError("this SpeechLM is closed")
            self._pending.append(job)
            self._cv.notify()
        return job.future, streamer

    def generate(self, messages: list[dict], options: DecodingOptions | None = None) -> Generation:
        return self.submit(messages, options)[0].result()

    def chat(self, prompt: str | None = None, audio: AudioLike | None = None, *, messages: list[dict] | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> str:
        """The answer to a prompt about a clip (`<|audio|>` in the prompt places it), or to `messages`."""
        return self.generate(self._messages(messages, audio, prompt), DecodingOptions(max_new_tokens, temperature, top_p)).text

    def stream_chat(self, prompt: str | None = None, audio: AudioLike | None = None, *, messages: list[dict] | None = None,
                    max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str]:
        """`chat`, yielding the answer piece by piece as it is decoded."""
        future, pieces = self.submit(self._messages(messages, audio, prompt), DecodingOptions(max_new_tokens, temperature, top_p), stream=True)
        yield from pieces
        future.result()  # re-raise what went wrong in the worker, if anything

    def transcribe(self, audio: AudioLike, *, max_new_tokens: int = 64) -> str:
        """What is said in a clip, asked with the prompt the model was trained on."""
        return self.chat(audio=audio, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)

    def __enter__(self) -> SpeechLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                jobs = [self._pending.popleft()]
                if jobs[0].streamer is None:
                    self._gather(jobs)
            try:
                self._run(jobs)
            except BaseException as e:  # noqa: BLE001 - handed to every caller waiting on these jobs
                logger.exception("generation failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                    if job.streamer is not None:
                        job.streamer.end()

    def _gather(self, jobs: list[_Job]) -> None:
        """Take compatible waiting jobs into the batch, waiting `batch_wait_s` for more (lock held)."""
        deadline = time.monotonic() + self.batch_wait_s
        key = jobs[0].options.batch_key
        while len(jobs) < self.max_batch_size:
            for job in [j for j in self._pending if j.streamer is None and j.options.batch_key == key]:
                if len(jobs) == self.max_batch_size:
                    break
                self._pending.remove(job)
                jobs.append(job)
            left = deadline - time.monotonic()
            if left <= 0 or self._closed or len(jobs) == self.max_batch_size:
                return
            self._cv.wait(timeout=left)

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> None:
        batch = self.processor.pad([j.ids for j in jobs], padding_side="left")
        features = [f for j in jobs for f in j.features]
        if features:
            batch.update(pad_features(features))
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        options = jobs[0].options
        max_new = max(j.options.max_new_tokens for j in jobs)
        extra = {"streamer": jobs[0].streamer} if jobs[0].streamer is not None else {}
        out = self.model.generate(**batch, max_new_tokens=max_new, **options.generate_kwargs(), **extra)
        new = out[:, batch["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for job, row in zip(jobs, new.tolist()):
            row = row[: job.options.max_new_tokens]
            stop = next((k for k, t in enumerate(row) if t in eos), None)
            kept = row if stop is None else row[:stop]
            text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
            job.future.set_result(Generation(text, len(job.ids), len(kept) + (stop is not None), "length" if stop is None else "stop"))


def load(model: str | Path, *, device: str | None = None, name: str | None = None, **kwargs) -> SpeechLM | SpeakingLM:
    """A trained model folder (or hub id): a listening LM as a `SpeechLM`, a units LM as a `SpeakingLM`."""
    from ..models.build import load_speech_lm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_units_model(model):
        from ..tokenizers.unit_lm import load_unit_lm

        limits = {k: v for k, v in kwargs.items() if k == "max_audio_seconds"}
        return SpeakingLM(load_unit_lm(model, device=device), name=name or Path(str(model)).name, **limits)
    lm, processor = load_speech_lm(model, device=device)
    return SpeechLM(lm, processor, name=name or Path(str(model)).name, **kwargs)


class SpeakingLM:
    """A units LM (the discrete family) behind a lock: a spoken prompt in, its spoken continuation out.

    Only an audio tokenizer that decodes (a codec) can speak; k-means units have no vocoder, so a
    units LM built on them serves token ids to Python callers but no audio.
    """

    kind = "speaking"

    def __init__(self, lm, *, name: str = "earful", max_audio_seconds: float = DEFAULT_MAX_SECONDS):
        if lm.audio_tokenizer is None:
            raise ValueError("this units LM was saved without its audio tokenizer: it cannot hear or speak")
        self.lm, self.name, self.max_audio_seconds = lm, name, max_audio_seconds
        self._lock = threading.Lock()

    @property
    def sampling_rate(self) -> int:
        return self.lm.audio_tokenizer.sampling_rate

    @property
    def can_speak(self) -> bool:
        return bool(self.lm.audio_tokenizer.can_decode)

    def read_audio(self, audio: AudioLike, name: str = "<audio>") -> np.ndarray:
        return read_audio_like(audio, self.sampling_rate, self.max_audio_seconds, name)

    def continue_speech(self, audio: AudioLike, *, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 50,
                        seed: int | None = None) -> tuple[list[int], list[int], np.ndarray | None]:
        """(prompt tokens, continuation tokens, the continuation's waveform at `sampling_rate` where the tokenizer decodes)."""
        from ..models.speech_generation import continue_speech

        wave = self.read_audio(audio)
        with self._lock:
            out = continue_speech(self.lm, wave, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  temperature=max(temperature, 1e-5), top_k=top_k, seed=seed)
        units = out.continuation_units
        return out.prompt_units, units, (self.lm.audio_tokenizer.decode(units) if self.can_speak and units else None)

    def close(self) -> None:
        pass

    def __enter__(self) -> SpeakingLM:
        return self

    def __exit__(self, *exc) -> None:
        pass


def is_units_model(folder: str | Path) -> bool:
    from ..models.vocab import VOCAB_FILE

    return (Path(folder) / VOCAB_FILE).is_file()
