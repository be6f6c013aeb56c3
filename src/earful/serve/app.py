"""The OpenAI-compatible HTTP API (FastAPI) in front of a `SpeechLM`, with the Gradio UI on `/ui`.

Routes: `POST /v1/chat/completions` (text and `input_audio` content parts, multi-turn, `stream`
as server-sent events), `POST /v1/audio/transcriptions` (multipart `file`), `GET /v1/models`,
`GET /health`. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so
the official clients raise their usual exceptions: 400 for a malformed request (the message names
the field and the problem), 401 without the API key, 404 for an unknown model, 413 for an upload
over the size limit.

Request audio is decoded in memory: no path or file name from a request reaches the disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from pathlib import PurePath

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..audio import AudioError
from .engine import DecodingOptions, RequestError, SpeakingLM, SpeechLM

logger = logging.getLogger(__name__)

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
DEFAULT_MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit for /v1/audio/transcriptions


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}, self.status)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, from Content-Length or while it streams in."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _reject(self) -> JSONResponse:
        return ApiError(413, f"request body over the {self.limit} byte limit", code="request_too_large").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject()(scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except self._TooLarge:
            if not started:
                await self._reject()(scope, receive, send)


def _int_field(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name}: expected a number, got {json.dumps(value)[:40]}", param=name)
    return value


def parse_chat_request(body: object, model_name: str, speaks: bool = False) -> tuple[list[dict], DecodingOptions, bool, bool]:
    """OpenAI chat-completion JSON -> (engine messages, options, stream, include_usage).

    `speaks`: the model answers in audio (a units LM with a codec), which must be asked for with
    `modalities: ["text", "audio"]` and `audio: {"format": "wav"}`, as OpenAI's audio output is.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(body.get("model"), model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", param="messages")
    if "audio" in (body.get("modalities") or []) and not speaks:
        raise ApiError(400, f"modalities: {model_name} is a listening model and answers in text only", param="modalities")
    if speaks:
        if "audio" not in (body.get("modalities") or []):
            raise ApiError(400, f'modalities: {model_name} answers in speech; ask with "modalities": ["text", "audio"]', param="modalities")
        fmt = (body.get("audio") or {}).get("format", "wav") if isinstance(body.get("audio"), dict) else "wav"
        if fmt != "wav":
            raise ApiError(400, f"audio.format: {json.dumps(fmt)} is not supported; this server speaks wav", param="audio")
    if _int_field(body, "n", 1) != 1:
        raise ApiError(400, "n: only one choice per request is supported", param="n")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}]: expected an object with role and content", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
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
                raise ApiError(400, f"{where}: unsupported content part {json.dumps(kind)} (expected text or input_audio)", param=where)
        out.append({"role": role, "content": parts})
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int_field(body, field, 128)
    if not 1 <= max_tokens <= 4096:
        raise ApiError(400, f"{field}: must be between 1 and 4096, got {max_tokens}", param=field)
    options = DecodingOptions(
        max_new_tokens=int(max_tokens),
        temperature=float(_int_field(body, "temperature", 0.0)),
        top_p=float(_int_field(body, "top_p", 1.0)),
    )
    stream = bool(body.get("stream", False))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False)) if isinstance(body.get("stream_options"), dict) else False
    return out, options, stream, include_usage


def _audio_part(audio: object, where: str) -> bytes:
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise ApiError(400, f"{where}.input_audio: expected {{\"data\": base64 audio, \"format\": \"wav\"|\"mp3\"}}", param=where)
    fmt = audio.get("format", "wav")
    if fmt not in AUDIO_FORMATS:
        raise ApiError(400, f"{where}.input_audio.format: {json.dumps(fmt)} is not one of {', '.join(AUDIO_FORMATS)}", param=where)
    try:
        return base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}.input_audio.data: not valid base64", param=where) from None


def _check_model(model: object, model_name: str) -> None:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required (GET /v1/models lists what this server runs)", param="model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist here; this server runs {model_name!r}", code="model_not_found", param="model")


def create_app(lm: SpeechLM | SpeakingLM, *, api_key: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, ui: bool = True) -> FastAPI:
    app = FastAPI(title=f"earful · {lm.name}", description="OpenAI-compatible speech LM API", version="1")
    app.state.lm = lm

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return ApiError(400, problems or "malformed request").response()

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
        return {"status": "ok", "model": lm.name}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        _check_model(model_id, lm.name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if isinstance(lm, SpeakingLM):
            return await _speak(lm, body)
        try:
            messages, options, stream, include_usage = parse_chat_request(body, lm.name)
            future, pieces = await run_in_threadpool(lm.submit, messages, options, stream)
        except (RequestError, AudioError) as e:
            raise ApiError(400, str(e)) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            g = await asyncio.wrap_future(future)
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": lm.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text, "refusal": None}, "finish_reason": g.finish_reason}],
                "usage": _usage(g),
            }
        return StreamingResponse(_sse(cid, created, lm.name, pieces, future, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        authorize(request)
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - any multipart parsing failure is the client's
            raise ApiError(400, f"expected multipart/form-data with a 'file' field: {e}") from None
        try:
            upload, model = form.get("file"), form.get("model")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "file: required (the audio to transcribe, as a multipart file)", param="file")
            _check_model(model, lm.name)
            if isinstance(lm, SpeakingLM):
                raise ApiError(400, f"{lm.name} is a speech continuation model: it speaks, it does not transcribe", param="model")
            fmt = form.get("response_format") or "json"
            if fmt not in ("json", "text", "verbose_json"):
                raise ApiError(400, f"response_format: {fmt!r} is not supported (json, text or verbose_json)", param="response_format")
            data = await upload.read()
            name = f"file {PurePath(upload.filename or 'upload').name!r}"  # a label for messages, never a path
        finally:
            await form.close()  # spooled upload files are deleted here
        try:
            wave = await run_in_threadpool(lm.read_audio, data, name)
            future, _ = await run_in_threadpool(lm.submit, [{"role": "user", "content": [wave]}], DecodingOptions(max_new_tokens=128))
        except (RequestError, AudioError) as e:
            raise ApiError(400, str(e), param="file") from None
        g = await asyncio.wrap_future(future)
        if fmt == "text":
            return PlainTextResponse(g.text + "\n")
        if fmt == "verbose_json":
            return {"task": "transcribe", "language": "english", "duration": round(len(wave) / lm.sampling_rate, 3), "text": g.text}
        return {"text": g.text, "usage": {"type": "tokens", "input_tokens": g.prompt_tokens, "output_tokens": g.completion_tokens,
                                          "total_tokens": g.prompt_tokens + g.completion_tokens}}

    if ui:
        import gradio as gr

        from .ui import build_ui

        auth = None if api_key is None else (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode()))
        app = gr.mount_gradio_app(app, build_ui(lm), path="/ui", auth=auth, auth_message="Log in with any name and the server's API key.")
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes)
    return app


async def _speak(lm: SpeakingLM, body: object) -> dict:
    """A units LM's answer: the spoken continuation of the last user audio, as OpenAI's audio output."""
    if not lm.can_speak:
        raise ApiError(400, f"{lm.name} has a k-means unit tokenizer, which has no vocoder: it cannot answer in audio", param="model")
    messages, options, stream, _ = parse_chat_request(body, lm.name, speaks=True)
    if stream:
        raise ApiError(400, "stream: spoken answers come whole from this server; leave stream false", param="stream")
    clips = [p for m in messages if m["role"] == "user" for p in m["content"] if isinstance(p, bytes)]
    if not clips:
        raise ApiError(400, f"messages: {lm.name} continues speech; send the prompt as an input_audio part", param="messages")
    temperature = options.temperature if "temperature" in body else 0.8
    try:
        prompt, units, wave = await run_in_threadpool(lambda: lm.continue_speech(clips[-1], max_new_tokens=options.max_new_tokens,
                                                                          temperature=temperature, seed=body.get("seed")))
    except (RequestError, AudioError) as e:
        raise ApiError(400, str(e)) from None
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


def _usage(g) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "total_tokens": g.prompt_tokens + g.completion_tokens}


def _sse(cid: str, created: int, model: str, pieces, future, include_usage: bool):
    """Chat-completion chunks as server-sent events, ending with `data: [DONE]`."""

    def event(delta: dict, finish_reason: str | None = None, **extra) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    for piece in pieces:
        if piece:
            yield event({"content": piece})
    try:
        g = future.result()
    except Exception as e:  # noqa: BLE001 - the status line has gone out; report it in the stream
        logger.exception("streamed generation failed")
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        return
    yield event({}, g.finish_reason)
    if include_usage:
        yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': _usage(g)})}\n\n"
    yield "data: [DONE]\n\n"
