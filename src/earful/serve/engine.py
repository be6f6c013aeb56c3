"""`earful.load(DIR)`: a trained speech LM behind one queue, for Python users and the server alike.

A `SpeechLM` owns the model and a single worker thread that runs every generation, so any number
of callers (threads, HTTP requests) share the model safely. Requests waiting together that sample
alike (greedy, or the same temperature and top_p) are batched into one `generate()` call (left
padding, one row per request, any number of clips per row), streamed ones included. Each row ends
on its own, at end of turn, a stop sequence, its own `max_new_tokens`, or when its caller cancels
(`future.cancel()`, or leaving a stream early): its answer goes back at that token, so a short
request batched with a long one does not wait for it, and a cancelled one stops costing compute.

The queue is bounded (`max_queue`): past it, `submit` raises `ServerBusy` (the server's 429 with
Retry-After) instead of letting waits grow without end. A request is bounded too: at most
`max_clips` clips and `max_request_audio_seconds` of audio in all, counted from the clips'
headers before any is decoded.

    lm = earful.load("runs/digits")
    lm.transcribe("7_jackson_0.wav")                      # 'seven'
    lm.chat("What number is spoken? <|audio|>", audio="7_jackson_0.wav")
    for piece in lm.stream_chat(messages=[{"role": "user", "content": ["What is said?", {"audio": "x.wav"}]}]):
        print(piece, end="")
"""

from __future__ import annotations

import collections
import io
import logging
import math
import numbers
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..audio import DEFAULT_MAX_SECONDS, AudioTooLong, audio_duration, decode_audio_bytes, load_audio, resample
from ..eval.longform import is_long, max_new_tokens_for, stated_seconds, transcribe_long
from ..models.configuration import place_audio
from ..models.processing import clip_features, max_audio_seconds, min_audio_samples, pad_features
from ..errors import EarfulError
from .speech_out import AnswerVoice, SpokenAnswer

logger = logging.getLogger(__name__)

# What an audio argument may be: a file path, encoded bytes (WAV/FLAC/OGG/MP3), a float waveform
# already at the model's rate, or (waveform, its rate).
AudioLike = Union[str, Path, bytes, np.ndarray, "tuple[np.ndarray, int]"]

MIN_AUDIO_SECONDS = 0.05  # shorter clips give the encoder no frame to work with
# Below this temperature decoding is greedy: sampling that cold picks the top token anyway, and
# logits / T overflows float32 to inf (then NaN probabilities) long before T reaches 1e-45.
MIN_SAMPLING_TEMPERATURE = 1e-2
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 64
DEFAULT_MAX_QUEUE = 64  # requests waiting for the model: 8 batches of 8
DEFAULT_MAX_REQUEST_AUDIO_SECONDS = 120.0
DEFAULT_MAX_CLIPS = 8
STOP_WINDOW_TOKENS = 2 * MAX_STOP_CHARS + 8  # enough tokens to spell any stop sequence


class RequestError(EarfulError, ValueError):
    """A request the model cannot answer as asked (the server turns it into a 400)."""


class ServerBusy(EarfulError, RuntimeError):
    """The queue is full (the server turns it into a 429 with `Retry-After: retry_after_s`)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineSettingsError(EarfulError, ValueError):
    """A `SpeechLM` / `SpeakingLM` limit that cannot work (zero or negative)."""


def _check_limits(**limits: float) -> None:
    bad = [f"{name}={value!r}" for name, value in limits.items()
           if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0]
    if bad:
        raise EngineSettingsError(f"{', '.join(bad)}: each must be a number above 0")


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


def audio_seconds(audio: AudioLike, sampling_rate: int) -> float | None:
    """A clip's length from its header (or its array's shape), without decoding it; None where unknown."""
    try:
        if isinstance(audio, (str, Path)):
            return audio_duration(audio)
        if isinstance(audio, (bytes, bytearray, memoryview)):
            import soundfile as sf

            info = sf.info(io.BytesIO(bytes(audio)))
            return info.frames / info.samplerate
        rate = sampling_rate
        if isinstance(audio, tuple):
            audio, rate = audio
        shape = np.shape(audio)
        return max(shape) / rate if shape else None
    except Exception:  # noqa: BLE001 - the decoder says what is wrong with it, in its own words
        return None


@dataclass(frozen=True)
class DecodingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 to 2; below MIN_SAMPLING_TEMPERATURE (0 included) decoding is greedy
    top_p: float = 1.0  # nucleus sampling, (0, 1]
    stop: tuple[str, ...] = ()  # up to 4 stop sequences: the answer ends before the first one, which it leaves out
    seed: int | None = None  # sampling only: the same request with the same seed gives the same answer

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))  # a list is the same stop sequences, kept hashable
        problems = []
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= 4096:
            problems.append(f"max_new_tokens must be an integer between 1 and 4096, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= 2:
            problems.append(f"temperature must be a number between 0 and 2, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if (not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_SEQUENCES
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop)):
            problems.append(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings of at most "
                            f"{MAX_STOP_CHARS} characters, got {_short(self.stop)}")
        if self.seed is not None and not _is_int(self.seed):
            problems.append(f"seed must be an integer, got {_short(self.seed)}")
        if problems:
            raise RequestError("; ".join(problems))

    @property
    def sampling(self) -> bool:
        return self.temperature >= MIN_SAMPLING_TEMPERATURE

    @property
    def batch_key(self) -> tuple:
        """Requests batch together when they decode alike; budgets and stop sequences are per row."""
        return (True, self.temperature, self.top_p) if self.sampling else (False,)

    @property
    def runs_alone(self) -> bool:
        """A seeded sampled request: its answer must not depend on what it was batched with."""
        return self.sampling and self.seed is not None

    def generate_kwargs(self) -> dict:
        if not self.sampling:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length" (max_new_tokens reached)
    token_ids: list[int] = field(default_factory=list)  # the tokens generated, without the end-of-turn token




class AnswerStream:
    """A streamed answer's text pieces as the worker decodes them: iterate it, or `async for` it.

    Leaving the loop early cancels the generation at its next token (as `future.cancel()` does).
    """

    def __init__(self, future: Future):
        self._future = future
        self._pieces: collections.deque[str] = collections.deque()
        self._ended = False
        self._cv = threading.Condition()
        self._wake = None  # (event loop, asyncio.Event) of an async reader

    def _put(self, piece: str | None) -> None:
        """A piece, or None: the end (the future is resolved before, so a reader that sees the end finds it done)."""
        with self._cv:
            if piece is None:
                self._ended = True
            else:
                self._pieces.append(piece)
            self._cv.notify_all()
            wake = self._wake
        if wake is not None:
            try:
                wake[0].call_soon_threadsafe(wake[1].set)
            except RuntimeError:  # the reader's loop has closed: nobody is listening
                pass

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                with self._cv:
                    while not self._pieces and not self._ended:
                        self._cv.wait()
                    if not self._pieces:
                        return
                    piece = self._pieces.popleft()
                yield piece
        finally:
            self._future.cancel()  # a no-op once the answer is complete

    async def __aiter__(self):
        import asyncio

        event = asyncio.Event()
        with self._cv:
            self._wake = (asyncio.get_running_loop(), event)
        try:
            while True:
                with self._cv:
                    piece = self._pieces.popleft() if self._pieces else None
                    ended = self._ended
                    if piece is None and not ended:
                        event.clear()
                if piece is not None:
                    yield piece
                elif ended:
                    return
                else:
                    await event.wait()
        finally:
            self._future.cancel()


@dataclass
class _Job:
    ids: list[int]
    features: list[np.ndarray]  # each clip's encoder features, computed once when the request came in
    options: DecodingOptions
    future: Future
    stream: AnswerStream | None = None

    def resolve(self, generation: Generation | None = None, error: BaseException | None = None) -> None:
        """Hand the answer (or the error) to the caller, then end its stream; a cancelled job takes neither."""
        try:
            if error is not None:
                self.future.set_exception(error)
            elif generation is not None:
                self.future.set_result(generation)
        except InvalidStateError:  # cancelled meanwhile, or already answered
            pass
        if self.stream is not None:
            self.stream._put(None)


class _Rows(StoppingCriteria):
    """Ends each row of a batch on its own and hands its answer back at that token.

    A row ends at end of turn, at a stop sequence, at its own max_new_tokens, or when its
    caller has cancelled; a streamed row gets its text as it grows, holding back what may yet
    turn out to be a stop sequence (or half a UTF-8 character).
    """

    def __init__(self, jobs: list[_Job], start: int, tokenizer, eos: set[int], counts: collections.Counter):
        self.jobs, self.start, self.tokenizer, self.eos, self.counts = jobs, start, tokenizer, eos, counts
        self.open = [True] * len(jobs)
        self.sent = [""] * len(jobs)  # streamed text so far
        self.rows: list[list[int]] = [[] for _ in jobs]  # the tokens each row has generated

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[1] - self.start == len(self.rows[0]) + 1:  # one token more per step: append it
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                row.append(token)
        else:
            self.rows = input_ids[:, self.start:].tolist()  # (B, t): the tokens generated so far
        for i, (job, row) in enumerate(zip(self.jobs, self.rows)):
            if self.open[i] and row:
                self.step(i, job, row)
        return torch.tensor([not o for o in self.open], dtype=torch.bool, device=input_ids.device)

    def step(self, i: int, job: _Job, row: list[int]) -> None:
        o = job.options
        if job.future.cancelled():
            self.counts["cancelled"] += 1
            return self.close(i, job, None)
        if row[-1] in self.eos:
            return self.close(i, job, Generation(self.decode(row[:-1]).strip(), len(job.ids), len(row), "stop", row[:-1]))
        # A stop sequence that ends in this token lies in the text of the last few tokens.
        if o.stop and any(s in self.decode(row[-STOP_WINDOW_TOKENS:]) for s in o.stop):
            text = self.decode(row)
            cut = min((k for k in (text.find(s) for s in o.stop) if k >= 0), default=len(text))
            return self.close(i, job, Generation(text[:cut].strip(), len(job.ids), len(row), "stop", list(row)))
        if len(row) >= o.max_new_tokens:
            return self.close(i, job, Generation(self.decode(row).strip(), len(job.ids), len(row), "length", list(row)))
        if job.stream is not None:
            visible = self.decode(row).strip().rstrip("\ufffd").rstrip()  # a trailing space waits: the answer ends stripped
            for s in o.stop:  # an end of the text that starts a stop sequence waits for the next tokens
                k = next((k for k in range(min(len(s) - 1, len(visible)), 0, -1) if s.startswith(visible[-k:])), 0)
                visible = visible[: len(visible) - k]
            self.send(i, job, visible)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def send(self, i: int, job: _Job, visible: str) -> None:
        if len(visible) > len(self.sent[i]) and visible.startswith(self.sent[i]):
            job.stream._put(visible[len(self.sent[i]):])
            self.sent[i] = visible

    def close(self, i: int, job: _Job, generation: Generation | None) -> None:
        self.open[i] = False
        if job.stream is not None and generation is not None:
            self.send(i, job, generation.text)
        job.resolve(generation)

    def finish(self, out: torch.Tensor) -> None:
        """Rows `generate` ended before this criterion did (its own limits): answered from its output."""
        for i, (job, row) in enumerate(zip(self.jobs, out[:, self.start:].tolist())):
            if self.open[i]:
                end = next((k for k, t in enumerate(row) if t in self.eos), None)
                kept = row if end is None else row[:end]
                self.close(i, job, Generation(self.decode(kept).strip(), len(job.ids), len(kept) + (end is not None),
                                              "length" if end is None else "stop", kept))


class SpeechLM:
    """A trained listening LM ready to answer; see the module docstring."""

    def __init__(self, model, processor, *, name: str = "earful", max_batch_size: int = 8, batch_wait_s: float = 0.01,
                 max_audio_seconds: float = DEFAULT_MAX_SECONDS, max_request_audio_seconds: float = DEFAULT_MAX_REQUEST_AUDIO_SECONDS,
                 max_clips: int = DEFAULT_MAX_CLIPS, max_queue: int = DEFAULT_MAX_QUEUE, voice: str | None = None):
        _check_limits(max_batch_size=max_batch_size, max_audio_seconds=max_audio_seconds,
                      max_request_audio_seconds=max_request_audio_seconds, max_clips=max_clips, max_queue=max_queue)
        # A voice that reads the answers out (a cascade); loaded now, so a bad name fails here.
        self.voice: AnswerVoice | None = AnswerVoice(voice) if voice is not None else None
        self.model, self.processor, self.name = model, processor, name
        self.max_batch_size, self.batch_wait_s, self.max_audio_seconds = max_batch_size, batch_wait_s, max_audio_seconds
        self.max_request_audio_seconds, self.max_clips, self.max_queue = max_request_audio_seconds, max_clips, max_queue
        self.counts: collections.Counter = collections.Counter()  # "cancelled", "busy": requests so ended
        self._pending: collections.deque[_Job] = collections.deque()
        self._admitting = 0  # requests past the queue check, still being featurised
        self._batch_s = 1.0  # a running mean of one generate() call's time, for Retry-After
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

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not counting the batch it is running)."""
        with self._cv:
            return len(self._pending) + self._admitting

    # -- inputs ----------------------------------------------------------------------------------
    def read_audio(self, audio: AudioLike, name: str = "<audio>") -> np.ndarray:
        """Any `AudioLike` -> float32 mono at `sampling_rate`, checked like every earful input."""
        return read_audio_like(audio, self.sampling_rate, self.max_audio_seconds, name)

    def _check_request_audio(self, messages: list[dict]) -> None:
        """At most `max_clips` clips and `max_request_audio_seconds` in all, from headers: nothing decoded yet."""
        clips = [part["audio"] if isinstance(part, dict) else part for m in messages if isinstance(m, dict)
                 and isinstance(m.get("content"), (list, tuple)) for part in m["content"]
                 if not isinstance(part, str) and (not isinstance(part, dict) or "audio" in part)]
        if len(clips) > self.max_clips:
            raise RequestError(f"messages: {len(clips)} audio clips in one request, over the limit of {self.max_clips}; "
                               "send fewer (the server's --max-clips)")
        seconds = [s for s in (audio_seconds(c, self.sampling_rate) for c in clips) if s is not None]
        if all(s <= self.max_audio_seconds for s in seconds):  # else the decoder names the clip that is too long
            self._check_request_seconds(sum(seconds))

    def _check_request_seconds(self, seconds: float) -> None:
        if seconds > self.max_request_audio_seconds:
            raise RequestError(f"messages: {seconds:.1f} s of audio in one request, over the limit of "
                               f"{self.max_request_audio_seconds:g} s; send less (the server's --max-request-audio-seconds)")

    def _conversation(self, messages: list[dict]) -> tuple[list[int], list[np.ndarray]]:  # (prompt ids, clip features)
        """Messages whose content is text or a list of parts.

        A part is text (a str), or audio: `{"audio": AudioLike}`, or an AudioLike other than a str
        (a `Path`, encoded bytes, a waveform): a str part is always text, never a file name.
        """
        if not messages:
            raise RequestError("messages: at least one message is needed")
        self._check_request_audio(messages)
        token, texts, waves = self.audio_token, [], []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{i}].role: expected system, user or assistant, got {_short(role)}")
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
        self._check_request_seconds(sum(len(w) for w in waves) / self.sampling_rate)  # headers that told no length
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
        before, _, after = place_audio(prompt, self.audio_token).partition(self.audio_token)
        return [{"role": "user", "content": [before, {"audio": audio}, after]}]

    # -- answers ---------------------------------------------------------------------------------
    def submit(self, messages: list[dict], options: DecodingOptions | None = None, stream: bool = False) -> tuple[Future, AnswerStream | None]:
        """Queue a conversation; returns a Future of its `Generation` (and its text pieces when streaming).

        `future.cancel()` (or leaving the stream's loop early) stops its generation at the next token.
        Raises `ServerBusy` when `max_queue` requests are already waiting.
        """
        with self._cv:
            if self._closed:
                raise RuntimeError("this SpeechLM is closed")
            waiting = len(self._pending) + self._admitting
            if waiting >= self.max_queue:
                self.counts["busy"] += 1
                retry = min(60, math.ceil((waiting / self.max_batch_size + 1) * self._batch_s))
                raise ServerBusy(f"{waiting} requests are waiting for the model, the most this server queues "
                                 f"(--max-queue {self.max_queue}); retry in {retry} s", retry)
            self._admitting += 1
        try:
            ids, features = self._conversation(messages)
            future = Future()
            job = _Job(ids, features, options or DecodingOptions(), future, AnswerStream(future) if stream else None)
            with self._cv:
                if self._closed:
                    raise RuntimeError("this SpeechLM is closed")
                self._pending.append(job)
                self._cv.notify()
        finally:
            with self._cv:
                self._admitting -= 1
        return job.future, job.stream

    def generate(self, messages: list[dict], options: DecodingOptions | None = None) -> Generation:
        return self.submit(messages, options)[0].result()

    def chat(self, prompt: str | None = None, audio: AudioLike | None = None, *, messages: list[dict] | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, stop: tuple[str, ...] = (),
             seed: int | None = None, audio_out: bool = False) -> str | SpokenAnswer:
        """The answer to a prompt about a clip (`<|audio|>` in the prompt places it), or to `messages`.

        `audio_out=True`: a `SpokenAnswer`, the text read out by the model's voice (`piper:joe@noise0,w0` when
        it was loaded without one).
        """
        options = DecodingOptions(max_new_tokens, temperature, top_p, stop, seed)
        text = self.generate(self._messages(messages, audio, prompt), options).text
        return self.speak(text) if audio_out else text

    def speak(self, text: str) -> SpokenAnswer:
        """`text` read out by the model's voice (loading the default, `piper:joe@noise0,w0`, if it has none)."""
        if self.voice is None:
            self.voice = AnswerVoice()
        return self.voice.spoken(text)

    def stream_chat(self, prompt: str | None = None, audio: AudioLike | None = None, *, messages: list[dict] | None = None,
                    max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, stop: tuple[str, ...] = (),
                    seed: int | None = None) -> Iterator[str]:
        """`chat`, yielding the answer piece by piece as it is decoded; leaving the loop early cancels it."""
        options = DecodingOptions(max_new_tokens, temperature, top_p, stop, seed)
        future, pieces = self.submit(self._messages(messages, audio, prompt), options, stream=True)
        yield from pieces
        future.result()  # re-raise what went wrong in the worker, if anything

    def transcribe(self, audio: AudioLike, *, max_new_tokens: int = 64, split: str = "vad") -> str:
        """What is said in a recording, asked with the prompt the model was trained on.

        A recording longer than the encoder takes (Whisper: 30 s) is cut into segments (`split`:
        "vad" or "fixed") and decoded a block at a time, as `submit_long`; its segments' texts are
        joined. Bounded by `max_audio_seconds` as every clip is.
        """
        if isinstance(audio, (str, Path, bytes)):
            long = self.needs_long_form(audio, str(audio) if not isinstance(audio, bytes) else "<audio>")
        else:  # a waveform at the model's rate, or (waveform, its rate)
            wave, rate = audio if isinstance(audio, tuple) else (audio, self.sampling_rate)
            long = self.encoder_seconds is not None and len(wave) / rate > self.encoder_seconds
            if long:
                from .speech_out import wav_bytes

                audio = wav_bytes(np.asarray(wave, np.float32), rate)
        if long:
            transcript, _ = self.submit_long(audio, split=split).result()
            return transcript.text
        return self.chat(audio=audio, max_new_tokens=max_new_tokens)

    # -- long recordings (POST /v1/audio/transcriptions) -------------------------------------------
    @property
    def encoder_seconds(self) -> float | None:
        """The longest clip the encoder reads whole (Whisper: 30 s); None where it has no limit."""
        return max_audio_seconds(self.processor.feature_extractor, self.model.config.encoder_config)

    def needs_long_form(self, audio: bytes | str | Path, name: str = "<audio>") -> bool:
        """Whether a recording is longer than the encoder takes (or its header does not say), from its header alone."""
        return is_long(stated_seconds(audio, name), self.encoder_seconds)

    def submit_long(self, audio: bytes | str | Path, *, name: str = "<audio>", split: str = "vad") -> Future:
        """Queue a recording longer than the encoder takes: a Future of (its `Transcript`, token usage).

        It is decoded a block at a time and cut into segments (`earful.eval.longform`) in a thread
        of its own; the segments join the queue `max_batch_size` at a time, so they batch with
        other requests and never fill the queue alone. The recording is bounded by
        `max_audio_seconds` and `max_request_audio_seconds`, from its header before any decode
        (raises `AudioTooLong` / `RequestError`). `future.cancel()` stops it at the next batch.
        """
        seconds = stated_seconds(audio, name)
        if seconds is not None:
            if seconds > self.max_audio_seconds:
                raise AudioTooLong(name, f"{seconds:.1f} s long, more than the limit (max_seconds={self.max_audio_seconds:g}); "
                                         "send a shorter recording (the server's --max-audio-seconds)")
            self._check_request_seconds(seconds)
        future: Future = Future()
        threading.Thread(target=self._transcribe_long, args=(audio, name, split, future), name="earful-longform", daemon=True).start()
        return future

    def _transcribe_long(self, audio, name: str, split: str, future: Future) -> None:
        usage = collections.Counter()
        rate = self.sampling_rate

        def generate(waves: list[np.ndarray]) -> list[Generation]:
            jobs = []
            try:
                for w in waves:
                    options = DecodingOptions(max_new_tokens=max(128, max_new_tokens_for(len(w) / rate)))
                    jobs.append(self.submit([{"role": "user", "content": [w]}], options)[0])
                while wait(jobs, timeout=0.25).not_done:
                    if future.cancelled():
                        raise CancelledError()
                out = [j.result() for j in jobs]
            finally:
                if future.cancelled():
                    for j in jobs:
                        j.cancel()
            usage.update(prompt_tokens=sum(g.prompt_tokens for g in out), completion_tokens=sum(g.completion_tokens for g in out))
            return out

        limit = min(self.max_audio_seconds, self.max_request_audio_seconds)  # a header that stated no length: checked as it decodes
        try:
            shortest = max(min_audio_samples(self.processor.feature_extractor, self.model.config.encoder_config),
                           math.ceil(MIN_AUDIO_SECONDS * rate))
            transcript = transcribe_long(audio, generate, sampling_rate=rate, split=split, segment_seconds=self.encoder_seconds or 30.0,
                                         batch_size=self.max_batch_size, max_seconds=limit, name=name,
                                         limit_hint=" (the server's --max-audio-seconds / --max-request-audio-seconds)",
                                         min_samples=shortest)
        except CancelledError:
            self.counts["cancelled"] += 1
            return
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            transcript, error = None, e
        else:
            error = None
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((transcript, dict(usage)))
        except InvalidStateError:  # cancelled meanwhile
            pass

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
                while True:
                    while self._pending and self._pending[0].future.cancelled():  # its caller left while it waited
                        self.counts["cancelled"] += 1
                        self._pending.popleft().resolve()
                    if self._pending or self._closed:
                        break
                    self._cv.wait()
                if not self._pending:
                    return
                jobs = [self._pending.popleft()]
                if not jobs[0].options.runs_alone:
                    self._gather(jobs)
                for job in [j for j in jobs if j.future.cancelled()]:  # left while the batch was gathered
                    self.counts["cancelled"] += 1
                    jobs.remove(job)
                    job.resolve()
            if not jobs:
                continue
            try:
                self._run(jobs)
            except BaseException as e:  # noqa: BLE001 - handed to every caller waiting on these jobs
                logger.exception("generation failed")
                for job in jobs:
                    job.resolve(error=e)

    def _gather(self, jobs: list[_Job]) -> None:
        """Take compatible waiting jobs into the batch, waiting `batch_wait_s` for more (lock held).

        A batch holds at most `max_batch_size` rows and twice that many clips (the encoder runs
        them all at once).
        """
        deadline = time.monotonic() + self.batch_wait_s
        key = jobs[0].options.batch_key
        clips = len(jobs[0].features)
        while len(jobs) < self.max_batch_size:
            for job in list(self._pending):
                if len(jobs) == self.max_batch_size:
                    break
                if (job.options.batch_key != key or job.options.runs_alone or job.future.cancelled()
                        or clips + len(job.features) > 2 * self.max_batch_size):
                    continue
                self._pending.remove(job)
                jobs.append(job)
                clips += len(job.features)
            left = deadline - time.monotonic()
            if left <= 0 or self._closed or len(jobs) == self.max_batch_size:
                return
            self._cv.wait(timeout=left)

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> None:
        started = time.monotonic()
        batch = self.processor.pad([j.ids for j in jobs], padding_side="left")
        features = [f for j in jobs for f in j.features]
        if features:
            batch.update(pad_features(features))
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        options = jobs[0].options
        eos = self.model.generation_config.eos_token_id
        rows = _Rows(jobs, batch["input_ids"].shape[1], self.processor.tokenizer, set(eos if isinstance(eos, list) else [eos]), self.counts)
        kwargs = dict(**batch, max_new_tokens=max(j.options.max_new_tokens for j in jobs), stopping_criteria=StoppingCriteriaList([rows]),
                      **options.generate_kwargs())
        if options.runs_alone:
            cuda = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(options.seed)
                out = self.model.generate(**kwargs)
        else:
            out = self.model.generate(**kwargs)
        rows.finish(out)
        self._batch_s = 0.8 * self._batch_s + 0.2 * (time.monotonic() - started)


def load(model: str | Path, *, device: str | None = None, name: str | None = None, **kwargs) -> SpeechLM | SpeakingLM:
    """A trained model folder (or hub id): a listening LM as a `SpeechLM`, a units LM as a `SpeakingLM`.

    `quantize="int8"` runs a listening LM's LLM with int8 linear layers on the CPU
    (earful.models.quantize); `voice=NAME` reads its answers out (earful.serve.speech_out).
    """
    from ..models.build import load_speech_lm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_units_model(model):
        from ..vocoders.speaking import load_speaking_unit_lm

        if kwargs.get("quantize") not in (None, "none"):
            raise EngineSettingsError(f"quantize={kwargs['quantize']!r}: {model} is a units LM; quantised inference is for listening LMs")
        if kwargs.get("voice") is not None:
            raise EngineSettingsError(f"voice={kwargs['voice']!r}: {model} is a units LM, which speaks for itself; a voice reads out a listening LM's text answers")
        limits = {k: v for k, v in kwargs.items() if k in ("max_audio_seconds", "max_queue")}
        return SpeakingLM(load_speaking_unit_lm(model, device=device), name=name or Path(str(model)).name, **limits)
    quantize = kwargs.pop("quantize", None)
    lm, processor = load_speech_lm(model, device=device, quantize=quantize)
    return SpeechLM(lm, processor, name=name or Path(str(model)).name, **kwargs)


class SpeakingLM:
    """A units LM (the discrete family) behind a lock: a spoken prompt in, its spoken continuation out.

    Only an audio tokenizer that decodes can speak: a codec, or k-means units with a vocoder in the
    model folder (`earful vocoder attach`); a units LM on k-means units without one serves token ids
    to Python callers but no audio. At most `max_queue`
    callers wait for the lock; past that `continue_speech` raises `ServerBusy`.
    """

    kind = "speaking"

    def __init__(self, lm, *, name: str = "earful", max_audio_seconds: float = DEFAULT_MAX_SECONDS, max_queue: int = DEFAULT_MAX_QUEUE):
        if lm.audio_tokenizer is None:
            raise ValueError("this units LM was saved without its audio tokenizer: it cannot hear or speak")
        _check_limits(max_audio_seconds=max_audio_seconds, max_queue=max_queue)
        self.lm, self.name, self.max_audio_seconds, self.max_queue = lm, name, max_audio_seconds, max_queue
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._waiting = 0
        self._count_lock = threading.Lock()

    @property
    def queued(self) -> int:
        """Requests waiting for the model or running on it."""
        with self._count_lock:
            return self._waiting

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
        """(prompt tokens, continuation tokens, the continuation's waveform at `sampling_rate` where the tokenizer decodes).

        A temperature under MIN_SAMPLING_TEMPERATURE decodes greedily, as for `SpeechLM`.
        """
        from ..models.speech_generation import continue_speech

        wave = self.read_audio(audio)
        with self._count_lock:
            if self._waiting >= self.max_queue:
                self.counts["busy"] += 1
                raise ServerBusy(f"{self._waiting} requests are waiting for the model, the most this server queues "
                                 f"(--max-queue {self.max_queue}); retry in a few seconds", 5)
            self._waiting += 1
        try:
            with self._lock:
                sampling = temperature >= MIN_SAMPLING_TEMPERATURE
                out = continue_speech(self.lm, wave, max_new_tokens=max_new_tokens, do_sample=sampling,
                                      temperature=temperature if sampling else 1.0, top_k=top_k, seed=seed)
        finally:
            with self._count_lock:
                self._waiting -= 1
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
