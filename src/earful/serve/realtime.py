"""`/v1/realtime`: a live session over WebSocket, modelled on OpenAI's Realtime API (beta events).

The client streams audio in and gets the answer as it is decoded:

    client -> server                              server -> client
    session.update {session: {...}}               session.created, session.updated
    input_audio_buffer.append {audio: base64}     input_audio_buffer.speech_started / speech_stopped (server VAD)
    input_audio_buffer.commit                     input_audio_buffer.committed, conversation.item.created
    input_audio_buffer.clear                      input_audio_buffer.cleared
    response.create                               response.created, response.text.delta ... response.text.done,
    response.cancel                               (with a voice) response.audio.delta / response.audio_transcript.delta,
                                                  response.done {response: {status, output, usage}}
                                                  error {error: {type, code, message, param, event_id}}

Audio in is base64 pcm16 mono, 24 kHz as OpenAI's default, or the rate the session names in
`input_audio_sample_rate` (an earful extension, 8000 to 48000). `turn_detection`: `{"type":
"server_vad", "silence_duration_ms", "threshold"}` (the default: Silero VAD on the buffer's tail
ends a turn after that much silence, commits it and answers), or null (the client commits and
asks with `response.create`). Each committed turn joins the session's conversation, so later
turns are answered with the earlier ones in context (re-read each turn: no KV cache is kept).
The audio is encoded when the turn is committed, not as it arrives.

Bad input never ends the session: it gets an `error` event naming the field and the reason (not
JSON, an unknown event type, audio that is not base64 or not whole 16-bit samples, a buffer over
the server's --max-audio-seconds, an empty commit). A client that leaves mid-answer has its
generation cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..audio import resample
from .engine import DecodingOptions, RequestError, ServerBusy
from .speech_out import SpanCutter, pcm16_bytes

logger = logging.getLogger(__name__)

DEFAULT_RATE = 24000  # OpenAI's pcm16
MAX_EVENT_BYTES = 8 * 1024 * 1024  # one event; an append of 100 ms at 24 kHz is 6.4 kB of base64
DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500, "prefix_padding_ms": 300}
VAD_TAIL_S = 2.0  # server VAD looks at this much of the buffer's end after each append


class EventError(Exception):
    def __init__(self, message: str, *, code: str = "invalid_event", param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type


def _float_wave(pcm: bytes | bytearray) -> np.ndarray:
    """16-bit little-endian samples -> float32 in [-1, 1)."""
    return np.frombuffer(bytes(pcm), "<i2").astype(np.float32) / 32768.0


def _event(kind: str, **fields) -> dict:
    return {"event_id": f"event_{uuid.uuid4().hex[:20]}", "type": kind, **fields}


class RealtimeSession:
    """One WebSocket client's session: its settings, its audio buffer, its conversation, its response."""

    def __init__(self, lm, ws: WebSocket):
        self.lm, self.ws = lm, ws
        self.id = f"sess_{uuid.uuid4().hex[:20]}"
        self.rate = DEFAULT_RATE
        self.turn_detection: dict | None = dict(DEFAULT_TURN_DETECTION)
        self.instructions: str | None = None
        self.modalities = ["text"]
        self.buffer = bytearray()  # pcm16 at self.rate
        self.speech_started_at: int | None = None  # sample where server VAD heard speech begin
        self.items: list[dict] = []  # the conversation: engine messages
        self.response: asyncio.Task | None = None
        self.future = None

    # -- the session object clients see ------------------------------------------------------------
    def describe(self) -> dict:
        return {"id": self.id, "object": "realtime.session", "model": self.lm.name, "modalities": self.modalities,
                "instructions": self.instructions or "", "input_audio_format": "pcm16", "input_audio_sample_rate": self.rate,
                "output_audio_format": "pcm16", "turn_detection": self.turn_detection,
                "voice": self.lm.voice.name if self.lm.voice is not None else None}

    async def send(self, kind: str, **fields) -> None:
        await self.ws.send_text(json.dumps(_event(kind, **fields)))

    async def error(self, e: EventError, event_id: str | None = None) -> None:
        await self.send("error", error={"type": e.type, "code": e.code, "message": e.message, "param": e.param, "event_id": event_id})

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.send("session.created", session=self.describe())
        try:
            while True:
                raw = await self.ws.receive_text()
                event_id = None
                try:
                    event = self._parse(raw)
                    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await self._handle(event)
                except EventError as e:
                    await self.error(e, event_id)
        except WebSocketDisconnect:
            pass
        finally:
            self._cancel("the client left")

    def _parse(self, raw: str) -> dict:
        if len(raw) > MAX_EVENT_BYTES:
            raise EventError(f"an event of {len(raw)} bytes, over the {MAX_EVENT_BYTES} byte limit; append audio in smaller pieces",
                             code="event_too_large")
        try:
            event = json.loads(raw)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise EventError(f"not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise EventError('an event is a JSON object with a "type" (e.g. "input_audio_buffer.append")', param="type")
        return event

    async def _handle(self, event: dict) -> None:
        kind = event["type"]
        handler = {"session.update": self._session_update, "input_audio_buffer.append": self._append,
                   "input_audio_buffer.commit": self._commit_event, "input_audio_buffer.clear": self._clear,
                   "response.create": self._response_create, "response.cancel": self._response_cancel}.get(kind)
        if handler is None:
            raise EventError(f"type: {kind[:80]!r} is not an event this server knows (session.update, input_audio_buffer.append / "
                             "commit / clear, response.create / cancel)", code="unknown_event", param="type")
        await handler(event)

    # -- session.update --------------------------------------------------------------------------
    async def _session_update(self, event: dict) -> None:
        s = event.get("session")
        if not isinstance(s, dict):
            raise EventError("session: expected an object of settings", param="session")
        rate, detection, modalities = self.rate, self.turn_detection, self.modalities
        if "input_audio_format" in s and s["input_audio_format"] != "pcm16":
            raise EventError(f"session.input_audio_format: {str(s['input_audio_format'])[:40]!r} is not supported; send pcm16",
                             param="session.input_audio_format")
        if "input_audio_sample_rate" in s:
            rate = s["input_audio_sample_rate"]
            if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 48000:
                raise EventError(f"session.input_audio_sample_rate: expected a whole number of Hz from 8000 to 48000, got {str(rate)[:40]}",
                                 param="session.input_audio_sample_rate")
            if rate != self.rate and self.buffer:
                raise EventError("session.input_audio_sample_rate: the buffer holds audio at the old rate; clear or commit it first",
                                 param="session.input_audio_sample_rate")
        if "turn_detection" in s:
            detection = s["turn_detection"]
            if detection is not None:
                if not isinstance(detection, dict) or detection.get("type", "server_vad") != "server_vad":
                    raise EventError('session.turn_detection: expected null or {"type": "server_vad", ...}', param="session.turn_detection")
                silence, threshold = detection.get("silence_duration_ms", 500), detection.get("threshold", 0.5)
                if not isinstance(silence, (int, float)) or not 100 <= silence <= 5000:
                    raise EventError("session.turn_detection.silence_duration_ms: expected 100 to 5000", param="session.turn_detection")
                if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
                    raise EventError("session.turn_detection.threshold: expected a number in (0, 1)", param="session.turn_detection")
                detection = {**DEFAULT_TURN_DETECTION, **detection, "type": "server_vad"}
        if "modalities" in s:
            modalities = s["modalities"]
            if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"text", "audio"}:
                raise EventError('session.modalities: expected ["text"] or ["text", "audio"]', param="session.modalities")
            if "audio" in modalities and self.lm.voice is None:
                raise EventError(f"session.modalities: {self.lm.name} answers in text only (a server started with --voice speaks)",
                                 param="session.modalities")
        if "instructions" in s and not isinstance(s["instructions"], (str, type(None))):
            raise EventError("session.instructions: expected a string", param="session.instructions")
        self.rate, self.turn_detection, self.modalities = rate, detection, modalities
        if "instructions" in s:
            self.instructions = s["instructions"] or None
        await self.send("session.updated", session=self.describe())

    # -- the audio buffer ------------------------------------------------------------------------
    async def _append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("audio: expected base64 pcm16 (16-bit little-endian mono samples)", param="audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("audio: not valid base64", param="audio") from None
        if len(pcm) % 2:
            raise EventError(f"audio: {len(pcm)} bytes is not a whole number of 16-bit samples", param="audio")
        limit = int(self.lm.max_audio_seconds * self.rate) * 2
        if len(self.buffer) + len(pcm) > limit:
            raise EventError(f"input_audio_buffer: over {self.lm.max_audio_seconds:g} s of audio uncommitted, the server's "
                             "--max-audio-seconds; commit (or let the server's VAD end the turn) more often",
                             code="input_audio_buffer_full", param="audio")
        self.buffer += pcm
        if self.turn_detection is not None and self.response is None:
            await self._detect_turn()

    async def _detect_turn(self) -> None:
        """Server VAD on the buffer's tail: speech_started, then after enough silence speech_stopped, commit, answer."""
        from ..eval.longform import VAD_RATE, vad_probabilities

        tail = int(VAD_TAIL_S * self.rate) * 2
        start = max(0, len(self.buffer) - tail)
        wave = _float_wave(self.buffer[start:])
        if len(wave) < self.rate // 10:
            return
        probs, hop = await run_in_threadpool(vad_probabilities, resample(wave, self.rate, VAD_RATE))
        speech = probs > self.turn_detection["threshold"]
        samples_per_window = hop * self.rate // VAD_RATE
        if self.speech_started_at is None:
            if speech.any():
                self.speech_started_at = start // 2 + int(np.argmax(speech)) * samples_per_window
                await self.send("input_audio_buffer.speech_started", audio_start_ms=self.speech_started_at * 1000 // self.rate,
                                item_id=None)
            return
        silence = int(self.turn_detection["silence_duration_ms"] * VAD_RATE / 1000 / hop)  # windows
        if len(speech) >= silence and not speech[-silence:].any():
            end = len(self.buffer) // 2
            await self.send("input_audio_buffer.speech_stopped", audio_end_ms=end * 1000 // self.rate, item_id=None)
            await self._commit()
            await self._start_response({})

    async def _commit_event(self, event: dict) -> None:
        await self._commit()

    async def _commit(self) -> None:
        if len(self.buffer) < self.rate // 10 * 2:  # under 100 ms, as OpenAI requires
            raise EventError(f"input_audio_buffer: {len(self.buffer) // 2 * 1000 // self.rate} ms of audio; a turn needs at least 100 ms",
                             code="input_audio_buffer_commit_empty")
        wave = _float_wave(self.buffer)
        self.buffer.clear()
        self.speech_started_at = None
        item_id = f"item_{uuid.uuid4().hex[:20]}"
        previous = self.items[-1]["id"] if self.items else None
        self.items.append({"id": item_id, "role": "user", "content": [(wave, self.rate)]})
        await self.send("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        await self.send("conversation.item.created", previous_item_id=previous,
                        item={"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                              "content": [{"type": "input_audio", "transcript": None}]})

    async def _clear(self, event: dict) -> None:
        self.buffer.clear()
        self.speech_started_at = None
        await self.send("input_audio_buffer.cleared")

    # -- responses -------------------------------------------------------------------------------
    async def _response_create(self, event: dict) -> None:
        options = event.get("response") or {}
        if not isinstance(options, dict):
            raise EventError("response: expected an object of settings", param="response")
        await self._start_response(options)

    async def _start_response(self, options: dict) -> None:
        if self.response is not None:
            raise EventError("a response is in progress; wait for response.done or send response.cancel",
                             code="conversation_already_has_active_response")
        if not self.items or self.items[-1]["role"] != "user":
            raise EventError("nothing to answer: commit a turn of audio first (input_audio_buffer.commit)", code="no_user_turn")
        modalities = options.get("modalities", self.modalities)
        if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or ("audio" in modalities and self.lm.voice is None):
            raise EventError('response.modalities: expected ["text"] (or ["text", "audio"] on a server with --voice)',
                             param="response.modalities")
        max_tokens = options.get("max_output_tokens", 128)
        if max_tokens == "inf":
            max_tokens = 4096
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
            raise EventError("response.max_output_tokens: expected 1 to 4096 or \"inf\"", param="response.max_output_tokens")
        instructions = options.get("instructions", self.instructions)
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + \
            [{"role": m["role"], "content": m["content"]} for m in self.items]
        try:
            future, pieces = await run_in_threadpool(self.lm.submit, messages, DecodingOptions(max_new_tokens=max_tokens), True)
        except (RequestError, ServerBusy, ValueError) as e:
            raise EventError(str(e), code="request_refused", param="input_audio_buffer") from None
        self.future = future
        self.response = asyncio.create_task(self._respond(future, pieces, "audio" in modalities))

    async def _respond(self, future, pieces, speak: bool) -> None:
        rid, iid = f"resp_{uuid.uuid4().hex[:20]}", f"item_{uuid.uuid4().hex[:20]}"
        where = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
        status, text, cutter = "completed", "", SpanCutter()
        try:
            await self.send("response.created", response={"id": rid, "object": "realtime.response", "status": "in_progress", "output": []})
            await self.send("response.output_item.added", response_id=rid, output_index=0,
                            item={"id": iid, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress", "content": []})
            async for piece in pieces:
                text += piece
                await self.send("response.audio_transcript.delta" if speak else "response.text.delta", **where, delta=piece)
                if speak:
                    for span in cutter.feed(piece):
                        await self._speak(span, where)
            g = future.result(timeout=0)
            if speak:
                for span in cutter.rest():
                    await self._speak(span, where)
                await self.send("response.audio.done", **where)
                await self.send("response.audio_transcript.done", **where, transcript=text)
            else:
                await self.send("response.text.done", **where, text=text)
            usage = {"input_tokens": g.prompt_tokens, "output_tokens": g.completion_tokens, "total_tokens": g.prompt_tokens + g.completion_tokens}
            self.items.append({"id": iid, "role": "assistant", "content": text})
        except asyncio.CancelledError:
            status, usage = "cancelled", None
            raise
        except Exception as e:  # noqa: BLE001 - the session goes on; the client is told
            if getattr(future, "cancelled", lambda: False)():
                status, usage = "cancelled", None
            else:
                logger.error("%s: response failed: %s: %s", self.id, type(e).__name__, e)
                status, usage = "failed", None
        finally:
            self.response, self.future = None, None
            content = [{"type": "audio" if speak else "text", ("transcript" if speak else "text"): text}]
            try:
                await self.send("response.done", response={"id": rid, "object": "realtime.response", "status": status, "usage": usage,
                                                          "output": [{"id": iid, "object": "realtime.item", "type": "message",
                                                                      "role": "assistant", "status": status, "content": content}]})
            except (WebSocketDisconnect, RuntimeError):
                pass

    async def _speak(self, span: str, where: dict) -> None:
        wave = await run_in_threadpool(self.lm.voice.speak, span)
        await self.send("response.audio.delta", **where, delta=base64.b64encode(pcm16_bytes(wave, self.lm.voice.sampling_rate)).decode())

    async def _response_cancel(self, event: dict) -> None:
        if self.response is None:
            raise EventError("no response is in progress", code="response_cancel_not_active")
        self._cancel("response.cancel")

    def _cancel(self, why: str) -> None:
        if self.future is not None and not self.future.done():
            self.future.cancel()
            logger.info("%s: %s; its generation is cancelled", self.id, why)

