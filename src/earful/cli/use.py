"""`earful transcribe`, `earful chat`, `earful serve`: a trained listening LM put to use."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from .. import atomic
from ._parser import Arg, Count, NonNegative, Positive, UsageError, verb
from ._shared import audio_front, check_prompt, load_clips


@verb("transcribe")
def transcribe(files: Annotated[list[str], Arg(metavar="FILE")], *, model: str, prompt: str | None = None, batch_size: Count = 8,
               format: Literal["text", "json", "srt", "vtt"] = "text", split: Literal["vad", "fixed"] = "vad",
               segment_seconds: Positive | None = None, overlap: NonNegative = 2.0, max_hours: Positive = 4.0,
               out_dir: str | None = None, quantize: Literal["int8", "int4"] | None = None) -> int:
    """Print each audio file's transcript: 'FILE<TAB>transcript', or JSON, SRT or WebVTT with timestamps.

    A file longer than the model's encoder takes whole (Whisper: 30 s) is transcribed long-form:
    decoded a block at a time, cut into segments by Silero VAD (speech regions; silence is
    skipped) or into fixed windows that overlap, the segments batched through the model, each
    with its start and end. Memory stays that of a few minutes of audio however long the file;
    a file over --max-hours is refused from its header (exit status 2) before the model loads.
    Files that cannot be read, or are too short for the encoder, are reported on stderr and
    skipped (exit status 1); the rest are still transcribed.

    Args:
        prompt: user turn holding <|audio|> (default: the training prompt)
        format: text (FILE<TAB>transcript), json (a line per file: duration, text, segments with start and end),
            srt or vtt (subtitles: one FILE, or --out-dir)
        split: how a long file is cut: vad (speech regions, default) or fixed (windows sharing --overlap)
        segment_seconds: the longest segment (default: what the encoder takes, Whisper's 30 s)
        overlap: fixed windows: seconds each shares with the next (default 2)
        max_hours: refuse longer files (default 4)
        out_dir: write each transcript to OUT_DIR/NAME.txt|json|srt|vtt instead of printing it
        quantize: run the LLM's linear layers in int8 on the CPU (int4: refused where no kernel exists)
    """
    from ..audio import AudioError
    from ..eval.asr import generate_text, load_clip
    from ..eval.longform import check_settings, is_long, render, short_transcript, stated_seconds, texts_of, too_long, transcribe_long
    from ..models.build import load_speech_lm
    from ..models.processing import max_audio_seconds, min_audio_samples

    check_prompt(prompt)
    if format in ("srt", "vtt") and len(files) > 1 and out_dir is None:
        raise UsageError(f"--format {format}: {len(files)} FILEs would run together on stdout; give one, or --out-dir DIR")
    names = [Path(f).stem for f in files]
    if out_dir is not None and len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"--out-dir: FILEs share the name {twice[0]!r}, so their transcripts would overwrite each other; "
                         "give files of different names or run once per folder")
    front = audio_front(model)
    limit = max_audio_seconds(*front)
    segment_seconds = segment_seconds or limit or 30.0
    check_settings(split, segment_seconds, overlap, limit, max_hours)

    # Check every file before paying for the model: short clips are read whole, as before; long ones from the header.
    jobs, failures, over = [], 0, False  # jobs: (file, its wave, or None when long-form)
    for f in files:
        try:
            seconds = stated_seconds(f)
            if not is_long(seconds, limit):
                jobs.append((f, load_clip(f, *front)))
            elif seconds is not None and seconds > max_hours * 3600:
                over = True
                raise too_long(f, seconds, max_hours * 3600, "; raise --max-hours or cut it with `earful data segment`")
            else:
                jobs.append((f, None))
        except AudioError as e:
            print(f"error: {e} [{type(e).__name__}]", file=sys.stderr)
            failures += 1
    if over:  # a hard limit is a usage error, as a bad option is: nothing is transcribed
        return 2
    if not jobs:
        return 1 if failures else 0
    lm, processor = load_speech_lm(model, quantize=quantize)
    prompt = prompt or processor.prompt_format.default_prompt

    def emit(f: str, transcript) -> None:
        text = render(transcript, format, f)
        if out_dir is None:
            print(text, end="", flush=True)
            return
        path = Path(out_dir) / f"{Path(f).stem}.{'txt' if format == 'text' else format}"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, transcript.text + "\n" if format == "text" else text)
        print(f"{f} -> {path}", flush=True)

    batch: list[tuple[str, object]] = []  # short clips waiting, so they go through the model together as before

    def flush() -> None:
        texts = generate_text(lm, processor, [w for _, w in batch], prompt)
        for (f, wave), text in zip(batch, texts):
            emit(f, short_transcript(text, len(wave) / processor.sampling_rate))
        batch.clear()

    generate = texts_of(lm, processor, prompt)
    for f, wave in jobs:
        if wave is not None:
            batch.append((f, wave))
            if len(batch) == batch_size:
                flush()
            continue
        if batch:
            flush()
        try:
            transcript = transcribe_long(f, generate, sampling_rate=processor.sampling_rate, split=split, segment_seconds=segment_seconds,
                                         overlap=overlap, batch_size=batch_size, max_seconds=max_hours * 3600, name=f,
                                         limit_hint="; raise --max-hours", min_samples=min_audio_samples(*front))
        except AudioError as e:  # found only as it decodes: a truncated file, a length the header did not state
            print(f"error: {e} [{type(e).__name__}]", file=sys.stderr)
            failures += 1
            continue
        emit(f, transcript)
    if batch:
        flush()
    return 1 if failures else 0


@verb("chat")
def chat(*, model: str, audio: str, prompt: str | None = None, max_new_tokens: Count = 128, sample: bool = False,
         temperature: Positive = 0.7, num_beams: Count = 1, speak_to: str | None = None, voice: str = "piper:joe@noise0,w0",
         quantize: Literal["int8", "int4"] | None = None) -> int:
    """Answer a prompt about one audio clip. The prompt may place <|audio|>; otherwise audio comes first.

    With --speak-to answer.wav the answer is also read out by --voice (a cascade: the model's
    text, spoken by an offline voice) into that WAV.

    Args:
        prompt: what to ask (default: transcribe)
        sample: sample instead of greedy/beam decoding
        temperature: with --sample (default 0.7)
        speak_to: also write the answer, spoken, to this WAV file
        voice: the offline voice for --speak-to (piper:joe, espeak:en-gb-scotland+m3, kokoro:jm_kumo, ...)
        quantize: run the LLM's linear layers in int8 on the CPU
    """
    from ..eval.asr import generate_text
    from ..models.build import load_speech_lm
    from ..models.configuration import AUDIO_TOKEN, place_audio

    if prompt is not None and prompt.count(AUDIO_TOKEN) > 1:
        raise UsageError(f"--prompt: one clip, so at most one {AUDIO_TOKEN}; found {prompt.count(AUDIO_TOKEN)} in {prompt!r}")
    speaker = None
    if speak_to:  # a bad voice name fails before the model loads
        from ..serve.speech_out import AnswerVoice

        speaker = AnswerVoice(voice)
    waves, _, failures = load_clips([audio], front=audio_front(model))
    if failures:
        return 1
    lm, processor = load_speech_lm(model, quantize=quantize)
    text = place_audio(prompt or processor.prompt_format.default_prompt)
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"num_beams": num_beams}
    answer = generate_text(lm, processor, waves, text, max_new_tokens=max_new_tokens, **kwargs)[0]
    print(answer)
    if speaker is not None:
        spoken = speaker.spoken(answer)
        spoken.save(speak_to)
        print(f"wrote {speak_to}: the answer read out by {speaker.name} ({len(spoken.audio) / spoken.sampling_rate:.1f} s)",
              file=sys.stderr)
    return 0


@verb("serve")
def serve(*, model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, name: str | None = None,
          max_upload_mb: float = 25.0, max_audio_seconds: float = 120.0, max_batch_size: int = 8, max_queue: int = 64,
          max_request_audio_seconds: float = 120.0, max_clips: int = 8, read_timeout: float = 15.0, ui: bool = True,
          voice: str | None = None, quantize: Literal["int8", "int4"] | None = None) -> int:
    """Serve a trained model over an OpenAI-compatible HTTP API, with a Gradio voice UI on /ui.

    Routes: POST /v1/chat/completions (input_audio content parts, stream), POST
    /v1/audio/transcriptions, GET /v1/models, GET /health. A units LM with a codec tokenizer
    answers in speech (modalities ["text", "audio"]). With --voice, a listening LM's answers
    can be read out too (a cascade: its text, spoken by an offline voice), whole as a WAV or
    streamed sentence by sentence as pcm16, as OpenAI's audio output. With --api-key (or EARFUL_API_KEY)
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
        voice: read a listening LM's answers out with this offline voice when asked (piper:joe, espeak:en-gb-scotland+m3, kokoro:jm_kumo, ...)
        quantize: run a listening LM's linear layers in int8 on the CPU
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
                  max_request_audio_seconds=max_request_audio_seconds, max_clips=max_clips, **({"voice": voice} if voice else {}),
                  **({"quantize": quantize} if quantize else {}))
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
