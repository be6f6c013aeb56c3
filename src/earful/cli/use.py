"""`earful transcribe`, `earful chat`, `earful serve`: a trained listening LM put to use."""

from __future__ import annotations

from typing import Annotated

from ._parser import Arg, Count, Positive, UsageError, verb
from ._shared import audio_front, check_prompt, load_clips


@verb("transcribe")
def transcribe(files: Annotated[list[str], Arg(metavar="FILE")], *, model: str, prompt: str | None = None, batch_size: Count = 8) -> int:
    """Print 'FILE<TAB>transcript' for each audio file.

    Files that cannot be read, or are too long or too short for the model's encoder (Whisper: 30 s
    at most; split longer recordings with `earful data segment`), are reported on stderr and
    skipped (exit status 1); the rest are still transcribed.

    Args:
        prompt: user turn holding <|audio|> (default: the training prompt)
    """
    from ..eval.asr import generate_text
    from ..models.build import load_speech_lm

    check_prompt(prompt)
    # Check every file before paying for the model.
    waves, names, failures = load_clips(files, front=audio_front(model))
    if waves:
        lm, processor = load_speech_lm(model)
        for start in range(0, len(waves), batch_size):
            texts = generate_text(lm, processor, waves[start : start + batch_size], prompt or processor.prompt_format.default_prompt)
            for name, text in zip(names[start : start + batch_size], texts):
                print(f"{name}\t{text}")
    return 1 if failures else 0


@verb("chat")
def chat(*, model: str, audio: str, prompt: str | None = None, max_new_tokens: Count = 128, sample: bool = False,
         temperature: Positive = 0.7, num_beams: Count = 1) -> int:
    """Answer a prompt about one audio clip. The prompt may place <|audio|>; otherwise audio comes first.

    Args:
        prompt: what to ask (default: transcribe)
        sample: sample instead of greedy/beam decoding
        temperature: with --sample (default 0.7)
    """
    from ..eval.asr import generate_text
    from ..models.build import load_speech_lm
    from ..models.configuration import AUDIO_TOKEN, place_audio

    if prompt is not None and prompt.count(AUDIO_TOKEN) > 1:
        raise UsageError(f"--prompt: one clip, so at most one {AUDIO_TOKEN}; found {prompt.count(AUDIO_TOKEN)} in {prompt!r}")
    waves, _, failures = load_clips([audio], front=audio_front(model))
    if failures:
        return 1
    lm, processor = load_speech_lm(model)
    text = place_audio(prompt or processor.prompt_format.default_prompt)
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"num_beams": num_beams}
    print(generate_text(lm, processor, waves, text, max_new_tokens=max_new_tokens, **kwargs)[0])
    return 0


@verb("serve")
def serve(*, model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, name: str | None = None,
          max_upload_mb: float = 25.0, max_audio_seconds: float = 120.0, max_batch_size: int = 8, max_queue: int = 64,
          max_request_audio_seconds: float = 120.0, max_clips: int = 8, read_timeout: float = 15.0, ui: bool = True) -> int:
    """Serve a trained model over an OpenAI-compatible HTTP API, with a Gradio voice UI on /ui.

    Routes: POST /v1/chat/completions (input_audio content parts, stream), POST
    /v1/audio/transcriptions, GET /v1/models, GET /health. A units LM with a codec tokenizer
    answers in speech (modalities ["text", "audio"]). With --api-key (or EARFUL_API_KEY)
    the API wants 'Authorization: Bearer KEY' and the UI asks for the key as its password.
    Past --max-queue waiting requests the API answers 429 with Retry-After; a body that sends
    nothing for --read-timeout seconds gets a 408. The address is bound before the model loads,
    so a port in use is an error at once.

    Args:
        model: trained model folder
        host: address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)
        api_key: require this bearer key (default: $EARFUL_API_KEY, else none)
        name: model id the API answers to (default: the folder's name)
        max_upload_mb: largest request body, MB (default 25; larger gets 413)
        max_audio_seconds: longest clip accepted (default 120)
        max_batch_size: requests decoded together (default 8)
        max_queue: requests that may wait for the model; more get 429 + Retry-After (default 64)
        max_request_audio_seconds: audio in one request, all clips together (default 120)
        max_clips: audio clips in one request (default 8)
        read_timeout: seconds a request body may send nothing before a 408 (default 15)
        ui: don't mount the Gradio UI on /ui
    """
    import errno
    import os
    import socket

    problems = [f"--port {port}: expected 1 to 65535"] if not 0 < port < 65536 else []
    for flag, value in (("--max-upload-mb", max_upload_mb), ("--max-audio-seconds", max_audio_seconds),
                        ("--max-batch-size", max_batch_size), ("--max-queue", max_queue),
                        ("--max-request-audio-seconds", max_request_audio_seconds), ("--max-clips", max_clips),
                        ("--read-timeout", read_timeout)):
        if not value > 0:
            problems.append(f"{flag} {value}: must be above 0")
    if problems:
        raise UsageError("; ".join(problems))
    try:  # bind first: a busy port or a bad host fails in a second, not after the model has loaded
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:  # socket.gaierror included
        why = "the port is in use (another server?); pick another with --port" if e.errno == errno.EADDRINUSE else e.strerror or e
        raise UsageError(f"--host {host} --port {port}: cannot listen there: {why}") from None

    import uvicorn

    from ..serve.app import create_app
    from ..serve.engine import load

    api_key = api_key or os.environ.get("EARFUL_API_KEY") or None
    try:
        lm = load(model, name=name, max_batch_size=max_batch_size, max_audio_seconds=max_audio_seconds, max_queue=max_queue,
                  max_request_audio_seconds=max_request_audio_seconds, max_clips=max_clips)
        app = create_app(lm, api_key=api_key, max_upload_bytes=int(max_upload_mb * 1024 * 1024), read_timeout_s=read_timeout, ui=ui)
    except BaseException:
        sock.close()
        raise
    print(f"serving {lm.name!r} on http://{host}:{port}/v1 (UI: {'http://%s:%d/ui' % (host, port) if ui else 'off'})", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        lm.close()
        sock.close()
    return 0
