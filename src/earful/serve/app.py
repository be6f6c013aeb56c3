"""The OpenAI-compatible HTTP API (FastAPI) in front of a `SpeechLM`, with the Gradio UI on `/ui`.

Routes: `POST /v1/chat/completions` (text and `input_audio` content parts, multi-turn, `stream`
as server-sent events, `stop`, `seed`), `POST /v1/audio/transcriptions` (multipart `file`),
`GET /v1/models`, `GET /health`, and the WebSocket `/v1/realtime` (earful.serve.realtime).
Every error uses OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the
official clients raise their usual exceptions: 400 for a malformed request (the message names the
field and the problem; a field of the wrong type too, never ignored), 401 without the API key,
404 for an unknown model or route, 408 for a body that stops arriving, 413 for a body over the
size limit, 429 with `Retry-After` when the queue is full, and 500 (logged with its traceback) for
a fault of the server's own.

A client that leaves is let go: its generation is cancelled at the next token and the log gets
one line. Request audio is decoded in memory: no path or file name from a request reaches the disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePath
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..audio import AudioError
from ..eval.longform import Transcript, compression_ratio, short_transcript, to_srt, to_vtt
from .engine import MAX_STOP_SEQUENCES, DecodingOptions, RequestError, ServerBusy, SpeakingLM, SpeechLM
from .speech_out import SpanCutter, pcm16_bytes, wav_bytes

logger = logging.getLogger(__name__)

# The decoder recognises a container by its bytes; the field is checked for what OpenAI clients send.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "mp4", "webm", "aac", "opus")
DEFAULT_MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit for /v1/audio/transcriptions
DEFAULT_READ_TIMEOUT_S = 15.0  # a body that sends nothing for this long gets a 408
# A body over the limit is read and dropped, up to this much, before the 413: clients such as
# Python's urllib read the answer only once they have sent the whole body.
DRAIN_MAX_BYTES = 256 * 1024 * 1024
DRAIN_MAX_SECONDS = 10.0
MAX_JSON_DEPTH = 32  # a chat request needs 6 levels; deeper is refused before anything walks it
SPOKEN_KEEP_S = 3600  # how long a spoken answer's id can be sent back as a turn (OpenAI's expires_at)
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
# Options that would change the answer, which this server cannot honour: refused, not ignored.
# name -> the values that mean "not used".
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "response_format": (None, {"type": "text"}),
               "prediction": (None,)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            self.status, headers=self.headers)


class BodyGuard:
    """ASGI middleware for request bodies: a size limit (413), a read timeout (408), quiet disconnects.

    - Over `limit` by Content-Length: a client that sent `Expect: 100-continue` gets the 413 before
      any body (no 100 Continue); any other has its body read and dropped (up to DRAIN_MAX_BYTES
      within DRAIN_MAX_SECONDS) first, so that it is done sending when the 413 comes, then the
      connection is closed. A body without Content-Length is counted as it streams in, the same.
    - No body bytes for `read_timeout_s` while the app waits for them: 408, connection closed.
    - A client that leaves mid-body or mid-answer is one line in the log, not a traceback.
    - Any other exception is a 500 in OpenAI's shape, its traceback logged once; the connection stays open.
    """

    class Abort(Exception):
        def __init__(self, status: int, message: str, code: str):
            super().__init__(message)
            self.status, self.message, self.code = status, message, code

    def __init__(self, app, limit: int, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        self.app, self.limit, self.read_timeout_s = app, limit, read_timeout_s

    def _too_large(self) -> Abort:
        return self.Abort(413, f"request body over the {self.limit} byte limit", "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive)
            return await self._answer(self._too_large(), scope, receive, send)
        seen, body_done, started = 0, False, False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # later calls (disconnect checks) go straight through
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                raise self.Abort(408, f"no request body bytes for {self.read_timeout_s:g} s", "request_timeout") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
                body_done = not message.get("more_body", False)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except self.Abort as e:
            if e.status == 413:
                await _drain(receive)
            logger.info("%s %s: %d %s", scope["method"], scope["path"], e.status, e.message)
            if not started:
                await self._answer(e, scope, receive, send)
        except ClientDisconnect:
            logger.info("%s %s: the client disconnected before its answer", scope["method"], scope["path"])
        except Exception as e:  # a fault of the server's own: logged with its traceback, answered in OpenAI's shape
            logger.exception("%s %s: the server failed", scope["method"], scope["path"])
            if not started:
                error = ApiError(500, f"the server failed on this request ({type(e).__name__}); the server's log has the details",
                                 type="server_error")
                await error.response()(scope, receive, send)

    async def _answer(self, e: Abort, scope, receive, send) -> None:
        error = ApiError(e.status, e.message, code=e.code, headers={"Connection": "close"})
        await error.response()(scope, receive, send)


async def _drain(receive) -> None:
    """Read and drop what is left of a request body, up to DRAIN_MAX_BYTES within DRAIN_MAX_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + DRAIN_MAX_SECONDS, 0
    while seen < DRAIN_MAX_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


# -- reading a chat request ------------------------------------------------------------------------
def parse_json_body(raw: bytes) -> object:
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN/Infinity, an integer of thousands of digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return body


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed(body: dict, name: str, kinds: type | tuple, what: str, default=None):
    """body[name], which must be one of `kinds` (null is the default); a bool is never a number."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))):
        raise ApiError(400, f"{name}: expected {what}, got {_show(value)}", param=name)
    return value


def _integer(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = _typed(body, name, (int, float), "an integer", default)
    if isinstance(value, float):
        if not value.is_integer():
            raise ApiError(400, f"{name}: expected an integer, got {_show(value)}", param=name)
        value = int(value)
    if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
        raise ApiError(400, f"{name}: must be between {low} and {high}, got {value}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = float(_typed(body, name, (int, float), "a number", default))
    if not (low < value if low_open else low <= value) or not value <= high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{name}: must be in {interval}, got {value:g}", param=name)
    return value


@dataclass
class ChatRequest:
    messages: list[dict]  # the engine's messages
    options: DecodingOptions
    stream: bool
    include_usage: bool
    audio_format: str | None = None  # "wav" or "pcm16" when the answer is asked for in audio too


def parse_chat_request(body: object, model_name: str, speaks: bool = False, max_clips: int | None = None,
                       voice: str | None = None, recall: Callable[[str], str | None] | None = None) -> ChatRequest:
    """OpenAI chat-completion JSON -> a `ChatRequest`.

    `speaks`: the model answers in audio only (a units LM with a codec), which must be asked for
    with `modalities: ["text", "audio"]` and `audio: {"format": "wav"}`, as OpenAI's audio output is.
    `voice`: a listening LM's answers may also be read out by this voice (a cascade), when asked
    with `modalities: ["text", "audio"]`: `audio.format` "wav" whole, "pcm16" (24 kHz) whole or
    streamed, as OpenAI streams audio; `audio.voice` must be absent or this voice.
    `recall`: the transcript of an earlier spoken answer by its `audio.id`, for assistant turns
    that carry `{"audio": {"id": ...}}` instead of content.
    `max_clips`: more input_audio parts than this are refused before any is decoded.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(body.get("model"), model_name)
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise ApiError(400, f"{name}: not supported by this server (it would be ignored); leave it out", param=name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", param="messages")
    modalities = _typed(body, "modalities", list, 'a list such as ["text"]', ["text"])
    if not all(m in ("text", "audio") for m in modalities):
        raise ApiError(400, f'modalities: expected "text" and/or "audio", got {_show(modalities)}', param="modalities")
    if "audio" in modalities and not speaks and voice is None:
        raise ApiError(400, f"modalities: {model_name} is a listening model and answers in text only "
                            "(a server started with --voice reads its answers out)", param="modalities")
    if speaks and "audio" not in modalities:
        raise ApiError(400, f'modalities: {model_name} answers in speech; ask with "modalities": ["text", "audio"]', param="modalities")
    stream = _typed(body, "stream", bool, "true or false", False)
    audio_format = None
    if "audio" in modalities:
        audio = _typed(body, "audio", dict, 'an object such as {"format": "wav"}', {})
        audio_format = audio.get("format", "pcm16" if stream and voice else "wav")
        formats = ("wav",) if speaks else ("pcm16",) if stream else ("wav", "pcm16")
        if audio_format not in formats:
            raise ApiError(400, f"audio.format: {_show(audio_format)} is not supported{' when streaming' if stream and voice else ''}; "
                                f"this server speaks {' or '.join(formats)}", param="audio")
        asked = audio.get("voice")
        if voice is not None and asked is not None and asked != voice:
            raise ApiError(400, f"audio.voice: {_show(asked)} is not a voice of this server; it speaks with {voice!r}", param="audio")
    elif "audio" in body and body["audio"] is not None:
        raise ApiError(400, 'audio: only with "modalities": ["text", "audio"]', param="audio")
    if _integer(body, "n", 1) != 1:
        raise ApiError(400, "n: only one choice per request is supported", param="n")
    stream_options = _typed(body, "stream_options", dict, 'an object such as {"include_usage": true}')
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")
    include_usage = bool(_typed(stream_options or {}, "include_usage", bool, "true or false", False))
    n_clips = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                  for p in m["content"] if isinstance(p, dict) and p.get("type") == "input_audio")
    if max_clips is not None and n_clips > max_clips:
        raise ApiError(400, f"messages: {n_clips} input_audio parts in one request, over this server's limit of {max_clips}",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: expected an object with role and content", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role: expected system, developer, user or assistant, got {_show(role)}",
                           param=f"messages[{i}].role")
        if role == "assistant" and content is None and isinstance(m.get("audio"), dict):
            said = recall(m["audio"].get("id")) if recall is not None and isinstance(m["audio"].get("id"), str) else None
            if said is None:
                raise ApiError(400, f"messages[{i}].audio.id: {_show(m['audio'].get('id'))} is no spoken answer this server "
                                    "remembers (unknown, or over an hour old); send the answer's text as content",
                               param=f"messages[{i}].audio")
            content = said
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content: expected a string or a list of content parts", param=f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "input_audio":
                parts.append(_audio_part(part.get("input_audio"), where))
            else:
                raise ApiError(400, f"{where}: unsupported content part {_show(kind)} (expected text or input_audio)", param=where)
        out.append({"role": role, "content": parts})
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop: expected a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings, "
                            f"got {_show(body.get('stop'))}", param="stop")
    try:
        options = DecodingOptions(
            max_new_tokens=_integer(body, field, 128, 1, 4096),
            temperature=_number(body, "temperature", 0.0, 0, 2),
            top_p=_number(body, "top_p", 1.0, 0, 1, low_open=True),
            stop=tuple(stop),
            seed=_integer(body, "seed", None),
        )
    except RequestError as e:  # what the app's checks leave to the engine's (a stop sequence's length)
        raise ApiError(400, str(e)) from None
    return ChatRequest(out, options, stream, include_usage, audio_format)


def _audio_part(audio: object, where: str) -> bytes:
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise ApiError(400, f"{where}.input_audio: expected {{\"data\": base64 audio, \"format\": \"wav\"|\"mp3\"}}", param=where)
    fmt = audio.get("format", "wav")
    if fmt not in AUDIO_FORMATS:
        raise ApiError(400, f"{where}.input_audio.format: {_show(fmt)} is not one of {', '.join(AUDIO_FORMATS)}", param=where)
    try:
        return base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}.input_audio.data: not valid base64", param=where) from None


def _check_model(model: object, model_name: str) -> None:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required (GET /v1/models lists what this server runs)", param="model")
    if model != model_name:
        raise ApiError(404, f"the model {model[:100]!r} does not exist here; this server runs {model_name!r}", code="model_not_found", param="model")


async def _answer_of(request: Request, future):
    """The engine's answer, or — when the client leaves first — its generation cancelled."""
    waiter = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiter.result()
        if await request.is_disconnected():
            future.cancel()
            raise ClientDisconnect()


# -- the app ------------------------------------------------------------------------------------
def create_app(lm: SpeechLM | SpeakingLM, *, api_key: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, ui: bool = True) -> FastAPI:
    app = FastAPI(title=f"earful · {lm.name}", description="OpenAI-compatible speech LM API", version="1")
    app.state.lm = lm

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return ApiError(400, problems or "malformed request").response()

    @app.exception_handler(RequestError)
    @app.exception_handler(AudioError)
    async def _request_error(_: Request, e: Exception):
        return ApiError(400, str(e)).response()

    @app.exception_handler(ServerBusy)
    async def _busy(_: Request, e: ServerBusy):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(e.retry_after_s)}).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), type="invalid_request_error", headers=e.headers).response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", type="authentication_error", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": lm.name, "object": "model", "created": int(app.state.started), "owned_by": "earful"}

    app.state.started = time.time()

    @app.get("/health")
    async def health():
        """Liveness, and what the queue is doing: requests waiting, and counts of those cancelled / refused busy."""
        return {"status": "ok", "model": lm.name, "queued": lm.queued, "cancelled": lm.counts["cancelled"], "busy": lm.counts["busy"]}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        _check_model(model_id, lm.name)
        return model_card()

    spoken = SpokenAnswers()

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        """A live session (earful.serve.realtime): audio streamed in, the answer streamed out as it is decoded."""
        from .realtime import RealtimeSession

        # The key comes as a header (server-side clients) or, from a browser, as OpenAI's subprotocol.
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        keys = [p.removeprefix("openai-insecure-api-key.") for p in offered if p.startswith("openai-insecure-api-key.")]
        scheme, _, token = ws.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else (keys[0] if keys else "")
        model = ws.query_params.get("model")
        refusal = None  # (close code, type, code, message): told as an error event, then the socket closes
        if api_key is not None and not hmac.compare_digest(given.encode(), api_key.encode()):
            refusal = (1008, "authentication_error", "invalid_api_key", "a valid API key is required: send 'Authorization: Bearer KEY'")
        elif model is not None and model != lm.name:
            refusal = (1008, "invalid_request_error", "model_not_found", f"the model {model[:100]!r} does not exist here; this server runs {lm.name!r}")
        elif isinstance(lm, SpeakingLM):
            refusal = (1003, "invalid_request_error", "unsupported_model", f"{lm.name} continues speech; /v1/realtime serves listening models")
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        if refusal is not None:
            close, kind, code, message = refusal
            await ws.send_text(json.dumps({"type": "error", "error": {"type": kind, "code": code, "message": message, "param": None}}))
            await ws.close(code=close, reason=message[:120])
            return
        await RealtimeSession(lm, ws).run()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse_json_body(await request.body())
        if isinstance(lm, SpeakingLM):
            return await _speak(lm, body)
        chat = parse_chat_request(body, lm.name, max_clips=lm.max_clips, voice=lm.voice.name if lm.voice else None,
                                  recall=spoken.recall)
        future, pieces = await run_in_threadpool(lm.submit, chat.messages, chat.options, chat.stream)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            voice = lm.voice if chat.audio_format else None
            return StreamingResponse(_sse(cid, created, lm.name, pieces, future, chat.include_usage, voice, spoken.remember),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        g = await _answer_of(request, future)
        message = {"role": "assistant", "content": g.text, "refusal": None}
        if chat.audio_format:  # the text read out by the server's voice: a cascade, not the model's own speech
            wave = await run_in_threadpool(lm.voice.speak, g.text)
            data = wav_bytes(wave, lm.voice.sampling_rate) if chat.audio_format == "wav" else pcm16_bytes(wave, lm.voice.sampling_rate)
            message["content"] = None
            message["audio"] = spoken.remember(g.text, data)
        return {"id": cid, "object": "chat.completion", "created": created, "model": lm.name,
                "choices": [{"index": 0, "message": message, "finish_reason": g.finish_reason}], "usage": _usage(g)}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        authorize(request)
        try:
            form = await request.form(max_files=1, max_fields=16)
        except (BodyGuard.Abort, ClientDisconnect):
            raise
        except Exception as e:  # noqa: BLE001 - any multipart parsing failure is the client's
            raise ApiError(400, f"expected multipart/form-data with one 'file' field: {e}") from None
        try:
            upload, model = form.get("file"), form.get("model")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "file: required (the audio to transcribe, as a multipart file)", param="file")
            _check_model(model, lm.name)
            if isinstance(lm, SpeakingLM):
                raise ApiError(400, f"{lm.name} is a speech continuation model: it speaks, it does not transcribe", param="model")
            fmt = _transcription_format(form)
            data = await upload.read()
            name = f"file {PurePath(upload.filename or 'upload').name!r}"  # a label for messages, never a path
        finally:
            await form.close()  # spooled upload files are deleted here
        try:
            if await run_in_threadpool(lm.needs_long_form, data, name):  # longer than the encoder takes: cut into segments
                future = await run_in_threadpool(lm.submit_long, data, name=name)
                transcript, usage = await _answer_of(request, future)
            else:
                wave = await run_in_threadpool(lm.read_audio, data, name)
                future, _ = await run_in_threadpool(lm.submit, [{"role": "user", "content": [wave]}], DecodingOptions(max_new_tokens=128))
                g = await _answer_of(request, future)
                transcript = short_transcript(g.text, len(wave) / lm.sampling_rate)
                transcript.segments[0].tokens = list(g.token_ids)
                usage = {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
        except (RequestError, AudioError) as e:
            raise ApiError(400, str(e), param="file") from None
        return _transcription(transcript, usage, fmt)

    if ui:
        import gradio as gr

        from .ui import build_ui

        auth = None if api_key is None else (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode()))
        app = gr.mount_gradio_app(app, build_ui(lm), path="/ui", auth=auth, auth_message="Log in with any name and the server's API key.")
    app.add_middleware(BodyGuard, limit=max_upload_bytes, read_timeout_s=read_timeout_s)
    return app


async def _speak(lm: SpeakingLM, body: object) -> dict:
    """A units LM's answer: the spoken continuation of the last user audio, as OpenAI's audio output."""
    if not lm.can_speak:
        raise ApiError(400, f"{lm.name} has a k-means unit tokenizer and no vocoder in its folder: it cannot answer in audio "
                                 "(fit one with `earful vocoder fit` and add it with `earful vocoder attach`)", param="model")
    chat = parse_chat_request(body, lm.name, speaks=True, max_clips=1)
    messages, options, stream = chat.messages, chat.options, chat.stream
    if stream:
        raise ApiError(400, "stream: spoken answers come whole from this server; leave stream false", param="stream")
    if options.stop:
        raise ApiError(400, "stop: a spoken answer has no text to stop at; leave stop out", param="stop")
    clips = [p for m in messages if m["role"] == "user" for p in m["content"] if isinstance(p, bytes)]
    if not clips:
        raise ApiError(400, f"messages: {lm.name} continues speech; send the prompt as an input_audio part", param="messages")
    temperature = options.temperature if body.get("temperature") is not None else 0.8
    prompt, units, wave = await run_in_threadpool(lambda: lm.continue_speech(clips[-1], max_new_tokens=options.max_new_tokens,
                                                                      temperature=temperature, seed=options.seed))
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave if wave is not None else np.zeros(0, np.float32), lm.sampling_rate, format="WAV", subtype="PCM_16")
    audio = {"id": f"audio_{uuid.uuid4().hex}", "data": base64.b64encode(buf.getvalue()).decode(), "expires_at": int(time.time()) + 3600,
             "transcript": ""}
    finish = "length" if len(units) + lm.lm.audio_tokenizer.tokens_per_frame > options.max_new_tokens else "stop"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": lm.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": None, "audio": audio}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(units), "total_tokens": len(prompt) + len(units)}}


TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")


def _transcription_format(form) -> str:
    """A transcription form's response_format, its timestamp_granularities checked against it as OpenAI checks them."""
    fmt = form.get("response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise ApiError(400, f"response_format: {_show(fmt)} is not supported (json, text, verbose_json, srt or vtt)",
                       param="response_format")
    field = "timestamp_granularities[]"
    granularities = [*form.getlist(field), *form.getlist("timestamp_granularities")]
    for g in granularities:
        if g not in GRANULARITIES:
            raise ApiError(400, f"{field}: {_show(g)} is not one of segment, word", param=field)
        if g == "word":
            raise ApiError(400, f"{field}: word timestamps are not supported by this server; ask for segment", param=field)
    if granularities and fmt != "verbose_json":
        raise ApiError(400, f"{field}: timestamps come with response_format verbose_json, not {fmt}", param=field)
    return fmt


def _transcription(t: Transcript, usage: dict, fmt: str):
    """A transcript in OpenAI's response formats: text, json, verbose_json (with segments), srt, vtt."""
    if fmt == "text":
        return PlainTextResponse(t.text + "\n")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(to_srt(t) if fmt == "srt" else to_vtt(t))
    if fmt == "json":
        p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        return {"text": t.text, "usage": {"type": "tokens", "input_tokens": p, "output_tokens": c, "total_tokens": p + c}}
    # OpenAI's segment fields; what this model does not compute (log-probabilities, a no-speech
    # probability) is null, never made up. Timestamps are the segments' own: VAD regions.
    segments = [{"id": s.id, "seek": round(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
                 "tokens": s.tokens, "temperature": 0.0, "avg_logprob": None, "compression_ratio": compression_ratio(s.text),
                 "no_speech_prob": None} for s in t.segments]
    return {"task": "transcribe", "language": "english", "duration": round(t.duration, 3), "text": t.text, "segments": segments,
            "usage": {"type": "duration", "seconds": math.ceil(t.duration)}}


def _usage(g) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "total_tokens": g.prompt_tokens + g.completion_tokens}


class SpokenAnswers:
    """Spoken answers' transcripts by audio id for an hour, so a client can send `{"audio": {"id"}}` back as a turn."""

    def __init__(self, max_items: int = 4096, keep_s: int = SPOKEN_KEEP_S):
        self.max_items, self.keep_s = max_items, keep_s
        self._said: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def remember(self, transcript: str, data: bytes | None = None, audio_id: str | None = None) -> dict:
        """OpenAI's `message.audio` for an answer (with `data`, base64, when given), remembered by its id."""
        audio_id = audio_id or f"audio_{uuid.uuid4().hex}"
        expires = int(time.time()) + self.keep_s
        self._said[audio_id] = (transcript, expires)
        while len(self._said) > self.max_items:
            self._said.popitem(last=False)
        audio = {"id": audio_id, "expires_at": expires, "transcript": transcript}
        if data is not None:
            audio["data"] = base64.b64encode(data).decode()
        return audio

    def recall(self, audio_id: str) -> str | None:
        said = self._said.get(audio_id)
        return said[0] if said is not None and said[1] > time.time() else None


async def _sse(cid: str, created: int, model: str, pieces, future, include_usage: bool, voice=None, remember=None):
    """Chat-completion chunks as server-sent events, ending with `data: [DONE]`.

    With a `voice`, the answer comes as OpenAI streams audio: `delta.audio.transcript` pieces as they
    are decoded and `delta.audio.data` (base64 pcm16, 24 kHz) for each sentence as soon as it is
    complete and spoken, while the model goes on decoding; then `delta.audio.expires_at`.
    A client that leaves mid-answer ends this generator (Starlette cancels it), and with it the generation.
    """

    def event(delta: dict, finish_reason: str | None = None, **extra) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def failed(e: BaseException, what: str) -> str:
        logger.error("%s: streamed %s failed: %s: %s", cid, what, type(e).__name__, e)
        return f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"

    audio_id = f"audio_{uuid.uuid4().hex}"

    class SpeechFailed(Exception):
        pass

    async def spoken(span: str):
        try:
            wave = await run_in_threadpool(voice.speak, span)
        except Exception as e:  # noqa: BLE001 - reported in the stream, which has begun
            raise SpeechFailed(failed(e, "speech")) from e
        return event({"audio": {"id": audio_id, "data": base64.b64encode(pcm16_bytes(wave, voice.sampling_rate)).decode()}})

    ended = False
    said, cutter = "", SpanCutter()
    try:
        yield event({"role": "assistant", "content": "" if voice is None else None})
        async for piece in pieces:
            if voice is None:
                yield event({"content": piece})
                continue
            yield event({"audio": {"id": audio_id, "transcript": piece}})
            said += piece
            for span in cutter.feed(piece):
                yield await spoken(span)
        ended = True
        try:
            g = future.result(timeout=0)  # resolved before its stream ended
        except Exception as e:  # noqa: BLE001 - the status line has gone out; report it in the stream
            yield failed(e, "generation")
            return
        if voice is not None:
            for span in cutter.rest():
                yield await spoken(span)
            audio = remember(said, audio_id=audio_id)
            yield event({"audio": {"id": audio_id, "expires_at": audio["expires_at"]}})
        yield event({}, g.finish_reason)
        if include_usage:
            yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': _usage(g)})}\n\n"
        yield "data: [DONE]\n\n"
    except SpeechFailed as e:
        ended = True
        future.cancel()
        yield str(e)
    finally:
        if not ended:
            future.cancel()
            logger.info("%s: the client left mid-stream; its generation is cancelled", cid)
