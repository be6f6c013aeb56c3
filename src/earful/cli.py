"""`earful <stage> <verb>`: every stage of a speech LM's life from the command line.

Each verb is a plain function; its docstring is its help. Errors in what the user gave (a bad
option, audio file, recipe, manifest or model spec: any `EarfulError`) and paths the system refuses
(an `OSError`) print one line (`-v` adds the traceback) and exit with status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from .errors import EarfulError

logger = logging.getLogger("earful")


class UsageError(EarfulError):
    """A problem with what the user gave, reported in one line."""


def _check_prompt(prompt: str | None) -> None:
    from .models.configuration import AUDIO_TOKEN

    if prompt is not None and prompt.count(AUDIO_TOKEN) != 1:
        raise UsageError(f"--prompt: must hold exactly one {AUDIO_TOKEN} (where the clip goes), found {prompt.count(AUDIO_TOKEN)} in {prompt!r}")


# -- verbs --------------------------------------------------------------------------------------
def data_prepare_fsdd(folder: str, out: str, speakers: str | None = None) -> None:
    """Build a manifest from FSDD-style recordings named {digit}_{speaker}_{index}.wav.

    The transcript is the digit's English word. --speakers a,b keeps only those speakers.
    """
    from .data.fsdd import fsdd_utterances
    from .data.manifest import write_manifest

    wanted = [s.strip() for s in speakers.split(",") if s.strip()] if speakers else None
    try:
        rows = fsdd_utterances(folder, wanted)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    n = write_manifest(rows, out)
    hours = sum(r.duration or 0 for r in rows) / 3600
    print(f"wrote {out}: {n} utterances, {len({r.speaker for r in rows})} speakers, {hours * 60:.1f} min of audio")


def data_prepare_tts_digits(out_dir: str, per_digit: int = 20, seed: int = 0) -> None:
    """Synthesise spoken digits with the bundled Piper voice (for machines without FSDD).

    Writes OUT_DIR/recordings/{digit}_piper{v}_{i}.wav at varied speed and noise (v names the
    setting, as a pseudo-speaker) and OUT_DIR/manifest.jsonl.
    """
    from .data.tts_digits import synthesise_digits

    manifest = synthesise_digits(out_dir, per_digit=per_digit, seed=seed)
    print(f"wrote {manifest}")


def data_ingest(sources: list[str], out: str, transcripts: str | None = None, min_seconds: float = 0.1,
                max_seconds: float = 600.0, silence_dbfs: float = -60.0, enable_file_urls: bool = False) -> int:
    """Check raw audio from folders, files, manifests, CSVs, datasets or URLs into OUT/manifest.jsonl.

    SOURCE: a folder (transcripts from NAME.txt / NAME.lab sidecars or --transcripts CSV), an audio
    file, a manifest (.jsonl), a CSV (audio,text), a datasets file (.parquet/.arrow) or hf:NAME,
    a URL or yt-dlp search (ytsearch3:QUERY), or a .txt listing URLs. Every clip is decoded and
    measured; unusable ones go to OUT/rejects.jsonl with the reason. OUT/summary.json: in = out + rejected.
    """
    from .data.ingest import IngestError, ingest

    if min_seconds >= max_seconds:
        raise UsageError(f"--min-seconds {min_seconds:g} must be less than --max-seconds {max_seconds:g}")
    try:
        s = ingest(sources, out, transcripts=transcripts, min_seconds=min_seconds, max_seconds=max_seconds,
                   silence_dbfs=silence_dbfs, enable_file_urls=enable_file_urls)
    except IngestError as e:
        raise UsageError(str(e)) from None
    print(f"{out}/manifest.jsonl: {s['in']} in = {s['out']} kept ({s['hours'] * 60:.1f} min) + {s['rejected']} rejected (see {out}/rejects.jsonl)")
    return 0


def data_segment(inputs: list[str], out: str, by: str = "fixed", seconds: float = 30.0, min_seconds: float = 1.0,
                 max_seconds: float = 30.0, reencode: bool = False) -> int:
    """Cut long recordings into clips: fixed slices by ffmpeg stream copy, or speech regions by Silero VAD.

    INPUT is an audio file or a manifest (.jsonl). Writes OUT/segments/*, OUT/manifest.jsonl and
    OUT/rejects.jsonl. --by fixed --seconds 30 cuts without re-encoding (--reencode to decode and
    encode again); --by vad keeps speech, merging regions up to --max-seconds, dropping those under --min-seconds.
    """
    from .data.segment import segment

    if by == "vad" and min_seconds >= max_seconds:
        raise UsageError(f"--min-seconds {min_seconds:g} must be less than --max-seconds {max_seconds:g}")
    s = segment(inputs, out, by=by, seconds=seconds, min_seconds=min_seconds, max_seconds=max_seconds, reencode=reencode)
    print(f"{out}/manifest.jsonl: {s['in']} recordings ({s['audio_seconds_in'] / 60:.1f} min) -> {s['segments']} segments "
          f"({s['audio_seconds_out'] / 60:.1f} min), {s['rejected']} rejected; {s['real_time_factor']}x real time")
    return 0


def data_synth(out: str, text: str | None = None, instructions: str | None = None, voices: str | None = None,
               seed: int = 0, limit: int | None = None) -> int:
    """Synthesise speech from text with the project's voices (Piper + espeak-ng) into OUT/manifest.jsonl.

    --text FILE: one utterance a line (ASR data). --instructions FILE (.jsonl/.parquet with
    prompt/response, instruction/output or question/answer): the prompt is spoken, the response is
    the target (spoken-instruction data). --voices: comma list of piper, piper:VOICE.onnx, espeak:NAME.
    """
    from .data.spoken import DEFAULT_VOICES, read_instructions, read_lines, synthesize_corpus

    if (text is None) == (instructions is None):
        raise UsageError("give exactly one of --text FILE or --instructions FILE")
    try:
        lines = read_lines(text) if text else read_instructions(instructions)
        s = synthesize_corpus(lines[:limit] if limit else lines, out, voices=voices or DEFAULT_VOICES, seed=seed)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(f"{out}/manifest.jsonl: {s['out']} of {s['in']} spoken ({s['hours'] * 60:.1f} min, voices {', '.join(s['voices'])}), {s['rejected']} rejected")
    return 0


def data_encode(data: str, out: str, encoder: str, batch_size: int = 16, max_seconds: float | None = None) -> int:
    """Pre-encode a manifest's audio with a frozen encoder (or an audio tokenizer) into OUT.

    ENCODER is an encoder spec (bundled:whisper-tiny.en, facebook/hubert-base-ls960, a folder), a
    trained earful model folder (its encoder), or an earful audio tokenizer folder (token ids).
    Objects are content-addressed (audio bytes + encoder identity): a rerun skips what is done.
    Under `torchrun --nproc_per_node N -m earful data encode ...` the ranks split the batches.
    Clips longer than the encoder takes whole (Whisper: 30 s) are rejected, never cut.
    Writes OUT/index.jsonl, OUT/rejects.jsonl, OUT/summary.json.
    """
    from .audio import DEFAULT_MAX_SECONDS
    from .data.shards import encode_manifest

    s = encode_manifest(data, out, encoder, batch_size=batch_size, max_seconds=DEFAULT_MAX_SECONDS if max_seconds is None else max_seconds)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{out}: {s['in']} in = {s['out']} encoded ({s['encoded']} now, {s['already_done']} already done) + "
              f"{s['rejected']} rejected; {s['audio_hours'] * 60:.1f} min of audio, {s['encoded_audio_hours_per_hour']} audio-h/h")
    return 0


def train_cmd(recipe: str, out: str, set: list[str] | None = None, resume: bool = False) -> None:
    """Train a listening or units LM per a YAML recipe; OUT becomes a save_pretrained model folder.

    --set section.key=value overrides the recipe (e.g. --set train.max_steps=3 data.train=M.jsonl).
    --resume continues from the latest OUT/checkpoints/ folder exactly where it stopped, on any
    number of processes. Under `torchrun --nproc_per_node N -m earful train ...` the ranks share
    each batch (train.parallel: ddp, or fsdp to shard the model); rank 0 writes logs and the model.
    """
    from .train.recipe import load_recipe

    loaded = load_recipe(recipe, set or [])  # every problem in the recipe is reported before anything loads
    from .eval.asr import generate_text
    from .eval.text_ability import regression, text_ability
    from .train.trainer import Hooks, train

    # The trainer defines no evaluation of its own: the text-ability gate and the logged eval answers are eval's.
    summary = train(loaded, out, resume=resume, hooks=Hooks(text_ability=text_ability, text_regression=regression, generate_text=generate_text))
    if summary.get("rank", 0) != 0:
        return
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s "
          f"(final loss {summary['final_loss']:.4f}, eval loss {summary['eval_loss'] if summary['eval_loss'] is None else round(summary['eval_loss'], 4)}); model saved to {out}")


def eval_asr(model: str, data: str, out: str, batch_size: int = 16, prompt: str | None = None, limit: int | None = None) -> None:
    """Transcribe a manifest and write corpus WER/CER (Whisper-normalised) to a JSON report.

    Clips that cannot be read, or are too long or too short for the model's encoder (Whisper: 30 s
    at most), are listed under "rejects" with the reason; the rest are scored.
    """
    from .data.manifest import read_manifest
    from .eval.asr import evaluate_asr, write_report
    from .models.build import load_speech_lm

    _check_prompt(prompt)
    utts = read_manifest(data)
    utts = utts if limit is None else utts[:limit]
    lm, processor = load_speech_lm(model)
    report = evaluate_asr(lm, processor, utts, prompt=prompt or processor.prompt_format.default_prompt, batch_size=batch_size)
    report = {"model": str(model), "data": str(data), **report}
    write_report(report, out)
    print(f"WER {report['wer']:.4f}  CER {report['cer']:.4f}  accuracy {report['accuracy']:.4f}  "
          f"on {report['n']} utterances ({report['rejected']} rejected) -> {out}")


def _load_clips(files: list[str], sampling_rate: int | None = None, *, front=None) -> tuple[list, list[str], int]:
    """Each file decoded, each bad one reported in one line on stderr: (waves, their files, failures).

    With `front` = (feature extractor, encoder config) a clip must also fit that encoder (`load_clip`).
    """
    from .audio import AudioError, load_audio
    from .eval.asr import load_clip

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


def _audio_front(model: str):
    """(feature extractor, encoder config) of a saved listening LM, read without loading its weights."""
    from transformers import AutoFeatureExtractor

    from .models.configuration import SpeechLMConfig
    from .models.processing import SpeechLMProcessor
    from .pretrained import resolve

    SpeechLMProcessor.from_pretrained_sampling_rate(model)  # names a folder that is no earful model
    folder = resolve(str(model))
    return AutoFeatureExtractor.from_pretrained(folder), SpeechLMConfig.from_pretrained(folder).encoder_config


def transcribe(model: str, files: list[str], prompt: str | None = None, batch_size: int = 8) -> int:
    """Print 'FILE<TAB>transcript' for each audio file.

    Files that cannot be read, or are too long or too short for the model's encoder (Whisper: 30 s
    at most; split longer recordings with `earful data segment`), are reported on stderr and
    skipped (exit status 1); the rest are still transcribed.
    """
    from .eval.asr import generate_text
    from .models.build import load_speech_lm

    _check_prompt(prompt)
    # Check every file before paying for the model.
    waves, names, failures = _load_clips(files, front=_audio_front(model))
    if waves:
        lm, processor = load_speech_lm(model)
        for start in range(0, len(waves), batch_size):
            texts = generate_text(lm, processor, waves[start : start + batch_size], prompt or processor.prompt_format.default_prompt)
            for name, text in zip(names[start : start + batch_size], texts):
                print(f"{name}\t{text}")
    return 1 if failures else 0


def chat(model: str, audio: str, prompt: str | None = None, max_new_tokens: int = 128, sample: bool = False,
         temperature: float = 0.7, num_beams: int = 1) -> int:
    """Answer a prompt about one audio clip. The prompt may place <|audio|>; otherwise audio comes first."""
    from .eval.asr import generate_text
    from .models.build import load_speech_lm
    from .models.configuration import AUDIO_TOKEN, place_audio

    if prompt is not None and prompt.count(AUDIO_TOKEN) > 1:
        raise UsageError(f"--prompt: one clip, so at most one {AUDIO_TOKEN}; found {prompt.count(AUDIO_TOKEN)} in {prompt!r}")
    waves, _, failures = _load_clips([audio], front=_audio_front(model))
    if failures:
        return 1
    lm, processor = load_speech_lm(model)
    text = place_audio(prompt or processor.prompt_format.default_prompt)
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"num_beams": num_beams}
    print(generate_text(lm, processor, waves, text, max_new_tokens=max_new_tokens, **kwargs)[0])
    return 0


def units_fit(data: str, k: str, out: str, layer: int | None = None, encoder: str = "bundled:whisper-tiny.en",
              dedup: bool = True, seed: int = 0, cache: str | None = None) -> None:
    """Fit k-means unit tokenizers on a manifest's audio: one encoder pass serves every k.

    --k 500 writes the tokenizer folder OUT; --k 100,500 writes OUT/k100 and OUT/k500. Encoder
    features are cached (OUT/features, or --cache DIR) and reused by the next fit on the same clips.
    --layer picks the encoder layer (default: Whisper's last, the middle of HuBERT/wav2vec2).
    """
    from .data.manifest import read_manifest
    from .tokenizers.base import AudioTokenizerError
    from .tokenizers.units import fit_unit_tokenizers

    try:
        ks = sorted({int(x) for x in k.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--k: expected a number or a comma-separated list (100,500), found {k!r}") from None
    if not ks:
        raise UsageError("--k: give at least one number of units")
    if ks[0] < 2:
        raise UsageError(f"--k: a tokenizer needs at least 2 units, found {ks[0]}")
    paths = [u.audio for u in read_manifest(data)]
    try:
        tokenizers = fit_unit_tokenizers(paths, ks, encoder, layer, dedup, seed, cache or f"{out}/features")
    except AudioTokenizerError as e:
        raise UsageError(str(e)) from None
    for n, tok in tokenizers.items():
        folder = out if len(ks) == 1 else f"{out}/k{n}"
        tok.save_pretrained(folder)
        print(f"wrote {folder}: {n} units from layer {tok.layer} of {encoder} ({len(paths)} clips)")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, name: str | None = None,
          max_upload_mb: float = 25.0, max_audio_seconds: float = 120.0, max_batch_size: int = 8, ui: bool = True,
          max_queue: int = 64, max_request_audio_seconds: float = 120.0, max_clips: int = 8, read_timeout: float = 15.0) -> int:
    """Serve a trained model over an OpenAI-compatible HTTP API, with a Gradio voice UI on /ui.

    Routes: POST /v1/chat/completions (input_audio content parts, stream), POST
    /v1/audio/transcriptions, GET /v1/models, GET /health. A units LM with a codec tokenizer
    answers in speech (modalities ["text", "audio"]). With --api-key (or EARFUL_API_KEY)
    the API wants 'Authorization: Bearer KEY' and the UI asks for the key as its password.
    Past --max-queue waiting requests the API answers 429 with Retry-After; a body that sends
    nothing for --read-timeout seconds gets a 408. The address is bound before the model loads,
    so a port in use is an error at once.
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

    from .serve.app import create_app
    from .serve.engine import load

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


def data_prepare_tts_storycloze(out_dir: str, limit: int | None = None) -> None:
    """Synthesise a small spoken StoryCloze-style set with the bundled Piper voice.

    Writes OUT_DIR/audio/*.wav and OUT_DIR/pairs.jsonl: per story an sStoryCloze pair (right vs.
    contradicting ending) and a tStoryCloze pair (right vs. another story's ending), for `eval pairs`.
    """
    from .data.storycloze import build_spoken_storycloze

    print(f"wrote {build_spoken_storycloze(out_dir, limit)}")


def generate_cmd(model: str, audio: str, out: str, max_new_tokens: int = 100, greedy: bool = False,
                 temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> int:
    """Continue a spoken prompt with a units LM; OUT is ids.json (any tokenizer) or out.wav (codecs).

    The JSON holds the prompt's and the continuation's audio-tokenizer ids; the WAV is the prompt
    followed by the continuation, decoded by the codec.
    """
    import json as _json
    from pathlib import Path

    from .models.speech_generation import continue_speech

    if not out.endswith((".json", ".wav")):
        raise UsageError(f"--out {out}: expected a .json (token ids) or .wav (audio) file")
    lm = _load_unit_lm(model)
    at = lm.audio_tokenizer
    if at is None:
        raise UsageError(f"{model}: saved without an audio tokenizer (audio_tokenizer/), so it cannot read {audio}")
    if out.endswith(".wav") and not at.can_decode:
        raise UsageError(f"--out {out}: this model's {at.kind} tokenizer cannot turn tokens back into audio "
                         "(k-means units have no vocoder); write token ids with --out ids.json")
    waves, _, failures = _load_clips([audio], at.sampling_rate)
    if failures:
        return 1
    result = continue_speech(lm, waves[0], max_new_tokens=max_new_tokens, do_sample=not greedy,
                             temperature=temperature, top_k=top_k, seed=seed)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if out.endswith(".json"):
        tmp.write_text(_json.dumps({"model": model, "audio": audio, "tokenizer": at.kind, "frame_rate": at.frame_rate,
                                    "prompt_units": result.prompt_units, "continuation_units": result.continuation_units}) + "\n")
    else:
        import soundfile as sf

        sf.write(str(tmp), at.decode(result.prompt_units + result.continuation_units), at.sampling_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)
    print(f"prompt {len(result.prompt_units)} tokens, continuation {len(result.continuation_units)} tokens -> {out}")
    return 0


def eval_pairs(model: str, data: str, out: str, score: str = "sum", batch_size: int = 16) -> None:
    """Spoken-LM pairs (sBLIMP/sWUGGY/sStoryCloze style): does the model prefer the correct clip?

    DATA is JSON Lines of {"correct": wav, "wrong": wav, "group": ..}; each pair scores 1 / 0.5 / 0
    for a win / tie / loss by summed (or --score mean) log-likelihood of its sound tokens.
    """
    from .eval.asr import write_report
    from .eval.pairs import evaluate_pairs, read_pairs

    pairs = read_pairs(data)
    lm = _load_unit_lm(model)
    report = {"model": str(model), "data": str(data), **evaluate_pairs(lm, pairs, score, batch_size)}
    write_report(report, out)
    groups = "  ".join(f"{g} {r['accuracy']:.3f} (n={r['n']})" for g, r in report["groups"].items())
    print(f"accuracy {report['accuracy']:.3f} on {report['n']} pairs ({report['ties']} ties)  {groups} -> {out}")


def eval_genppl(files: list[str], out: str, asr: str = "bundled:whisper-tiny.en", lm: str = "bundled:smollm2-135m-instruct") -> int:
    """GenPPL and Auto-BLEU-2 of generated speech: transcribe FILEs, score the text with a text LM."""
    from .eval.asr import write_report
    from .eval.generation import auto_bleu, corpus_auto_bleu, gen_ppl, transcribe_whisper

    from transformers import AutoConfig, AutoFeatureExtractor

    from .pretrained import resolve

    # The ASR model's own limits (Whisper: 30 s): a longer clip would be scored on its first 30 s.
    folder = resolve(asr)
    waves, names, failures = _load_clips(files, front=(AutoFeatureExtractor.from_pretrained(folder), AutoConfig.from_pretrained(folder)))
    if not waves:
        return 1
    texts = transcribe_whisper(waves, asr)
    ppl = gen_ppl(texts, lm)
    report = {"genppl": ppl["genppl"], "auto_bleu2": corpus_auto_bleu(texts, 2), "n": len(texts), "asr": asr, "lm": lm,
              "generations": [{"audio": n, "transcript": t, "ppl": p, "auto_bleu2": auto_bleu(t.split(), 2)}
                              for n, t, p in zip(names, texts, ppl["per_text"])]}
    write_report(report, out)
    print(f"GenPPL {report['genppl']}  Auto-BLEU-2 {report['auto_bleu2']}  on {len(texts)} clips -> {out}")
    return 1 if failures else 0


def eval_units_asr(model: str, data: str, out: str, batch_size: int = 16, limit: int | None = None) -> None:
    """Transcribe a manifest with a units LM trained on the ASR format; WER/CER to a JSON report."""
    from .data.manifest import read_manifest
    from .eval.asr import write_report
    from .eval.units_asr import evaluate_units_asr
    from .train.units import tokenize_audio

    utts = read_manifest(data)
    utts = utts if limit is None else utts[:limit]
    lm = _load_unit_lm(model)
    if lm.audio_tokenizer is None:
        raise UsageError(f"{model}: saved without an audio tokenizer (audio_tokenizer/), so it cannot read audio")
    report = {"model": str(model), "data": str(data), **evaluate_units_asr(lm, utts, tokenize_audio(lm.audio_tokenizer, utts), batch_size)}
    write_report(report, out)
    print(f"WER {report['wer']:.4f}  CER {report['cer']:.4f}  accuracy {report['accuracy']:.4f} on {report['n']} utterances -> {out}")


def _load_unit_lm(model: str):
    from .models.vocab import SoundVocabError
    from .tokenizers.unit_lm import load_unit_lm
    from .tokenizers import AudioTokenizerError

    try:
        return load_unit_lm(model)
    except (SoundVocabError, AudioTokenizerError) as e:
        raise UsageError(str(e)) from None


# -- argument parsing ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error: status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int(low: int):
    """An argparse type: a whole number >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, found {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, found {value}")
        return value

    return parse


def _float(low: float | None = None, high: float | None = None, *, above: bool = False):
    """An argparse type: a finite number >= `low` (> `low` with `above`) and <= `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, found {value:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, found {value:g}")
        return value

    return parse


_COUNT = _int(1)  # batch sizes, limits, beams, tokens: at least one
_SECONDS = _float(0, above=True)


def _doc(fn) -> str:
    return (fn.__doc__ or "").strip()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="earful", description="Turn a pretrained text LLM into a speech LM: data, training, evaluation, use.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")

    data = stages.add_parser("data", help="build manifests from audio").add_subparsers(dest="verb", required=True, metavar="VERB")
    prep = data.add_parser("prepare", help="build a manifest from a known corpus").add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    s = prep.add_parser("fsdd", help=_doc(data_prepare_fsdd).splitlines()[0], description=_doc(data_prepare_fsdd))
    s.add_argument("folder", help="folder of recordings (or its parent holding recordings/)")
    s.add_argument("--out", required=True, help="manifest to write (JSON Lines)")
    s.add_argument("--speakers", help="comma-separated speakers to keep")
    s.set_defaults(fn=lambda a: data_prepare_fsdd(a.folder, a.out, a.speakers))
    s = prep.add_parser("tts-digits", help=_doc(data_prepare_tts_digits).splitlines()[0], description=_doc(data_prepare_tts_digits))
    s.add_argument("out_dir")
    s.add_argument("--per-digit", type=_COUNT, default=20, help="clips per digit (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=lambda a: data_prepare_tts_digits(a.out_dir, a.per_digit, a.seed))

    s = prep.add_parser("tts-storycloze", help=_doc(data_prepare_tts_storycloze).splitlines()[0], description=_doc(data_prepare_tts_storycloze))
    s.add_argument("out_dir")
    s.add_argument("--limit", type=_COUNT, help="only the first N stories")
    s.set_defaults(fn=lambda a: data_prepare_tts_storycloze(a.out_dir, a.limit))

    s = data.add_parser("ingest", help=_doc(data_ingest).splitlines()[0], description=_doc(data_ingest), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("sources", nargs="+", metavar="SOURCE")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--transcripts", help="CSV of audio,text for folder sources")
    s.add_argument("--min-seconds", type=_float(0), default=0.1, help="shorter clips are rejected (default 0.1)")
    s.add_argument("--max-seconds", type=_SECONDS, default=600.0, help="longer clips are rejected (default 600; segment long recordings first)")
    s.add_argument("--silence-dbfs", type=_float(high=0), default=-60.0, help="clips whose peak is below this are rejected as silent (default -60)")
    s.add_argument("--enable-file-urls", action="store_true", help="let yt-dlp fetch file:// URLs")
    s.set_defaults(fn=lambda a: data_ingest(a.sources, a.out, a.transcripts, a.min_seconds, a.max_seconds, a.silence_dbfs, a.enable_file_urls))
    s = data.add_parser("segment", help=_doc(data_segment).splitlines()[0], description=_doc(data_segment), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("inputs", nargs="+", metavar="INPUT")
    s.add_argument("--out", required=True)
    s.add_argument("--by", choices=("fixed", "vad"), default="fixed")
    s.add_argument("--seconds", type=_SECONDS, default=30.0, help="slice length for --by fixed (default 30)")
    s.add_argument("--min-seconds", type=_float(0), default=1.0, help="--by vad: drop shorter regions (default 1)")
    s.add_argument("--max-seconds", type=_SECONDS, default=30.0, help="--by vad: merge regions up to this (default 30)")
    s.add_argument("--reencode", action="store_true", help="--by fixed: decode and encode again instead of stream copy")
    s.set_defaults(fn=lambda a: data_segment(a.inputs, a.out, a.by, a.seconds, a.min_seconds, a.max_seconds, a.reencode))
    s = data.add_parser("synth", help=_doc(data_synth).splitlines()[0], description=_doc(data_synth), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", required=True)
    s.add_argument("--text", help="a file of lines to speak")
    s.add_argument("--instructions", help="instruction data (.jsonl or .parquet)")
    s.add_argument("--voices", help="comma list (default: piper,espeak:en-us+m3,espeak:en+f2,espeak:en-gb-scotland)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=_COUNT, help="only the first N lines")
    s.set_defaults(fn=lambda a: data_synth(a.out, a.text, a.instructions, a.voices, a.seed, a.limit))
    s = data.add_parser("encode", help=_doc(data_encode).splitlines()[0], description=_doc(data_encode), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--data", required=True, help="manifest to encode")
    s.add_argument("--out", required=True, help="store folder (objects/, index.jsonl, rejects.jsonl, summary.json)")
    s.add_argument("--encoder", required=True, help="encoder spec, trained model folder, or audio tokenizer folder")
    s.add_argument("--batch-size", type=_COUNT, default=16)
    s.add_argument("--max-seconds", type=_SECONDS, help="longer clips are rejected (default 600, and never more than the encoder takes whole: 30 s for Whisper)")
    s.set_defaults(fn=lambda a: data_encode(a.data, a.out, a.encoder, a.batch_size, a.max_seconds))

    s = stages.add_parser("train", help=_doc(train_cmd).splitlines()[0], description=_doc(train_cmd))
    s.add_argument("recipe", help="YAML recipe (see recipes/)")
    s.add_argument("--out", required=True, help="output folder: the trained model, logs, checkpoints")
    s.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override recipe fields")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints/ (any world size)")
    s.set_defaults(fn=lambda a: train_cmd(a.recipe, a.out, a.set, a.resume))

    ev = stages.add_parser("eval", help="evaluate a model").add_subparsers(dest="verb", required=True, metavar="VERB")
    s = ev.add_parser("asr", help=_doc(eval_asr).splitlines()[0], description=_doc(eval_asr))
    s.add_argument("--model", required=True, help="trained model folder")
    s.add_argument("--data", required=True, help="manifest with transcripts")
    s.add_argument("--out", required=True, help="JSON report to write")
    s.add_argument("--batch-size", type=_COUNT, default=16)
    s.add_argument("--prompt", help="user turn holding <|audio|> (default: the training prompt)")
    s.add_argument("--limit", type=_COUNT, help="score only the first N utterances")
    s.set_defaults(fn=lambda a: eval_asr(a.model, a.data, a.out, a.batch_size, a.prompt, a.limit))

    units = stages.add_parser("units", help="speech units (k-means audio tokenizers)").add_subparsers(dest="verb", required=True, metavar="VERB")
    s = units.add_parser("fit", help=_doc(units_fit).splitlines()[0], description=_doc(units_fit))
    s.add_argument("--data", required=True, help="manifest whose audio the k-means is fitted on")
    s.add_argument("--k", required=True, help="number of units, or a comma-separated list (100,500)")
    s.add_argument("--out", required=True, help="tokenizer folder (a parent folder when several k)")
    s.add_argument("--layer", type=_int(1), help="encoder layer whose features are clustered (1 = first)")
    s.add_argument("--encoder", default="bundled:whisper-tiny.en", help="model spec of the speech encoder")
    s.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep runs of the same unit (default: collapse them)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cache", help="folder for cached encoder features (default OUT/features)")
    s.set_defaults(fn=lambda a: units_fit(a.data, a.k, a.out, a.layer, a.encoder, a.dedup, a.seed, a.cache))

    s = ev.add_parser("pairs", help=_doc(eval_pairs).splitlines()[0], description=_doc(eval_pairs))
    s.add_argument("--model", required=True, help="trained units LM folder")
    s.add_argument("--data", required=True, help="pairs file (JSON Lines: correct, wrong, group)")
    s.add_argument("--out", required=True, help="JSON report to write")
    s.add_argument("--score", choices=("sum", "mean"), default="sum", help="summed or mean token log-likelihood")
    s.add_argument("--batch-size", type=_COUNT, default=16)
    s.set_defaults(fn=lambda a: eval_pairs(a.model, a.data, a.out, a.score, a.batch_size))
    s = ev.add_parser("units-asr", help=_doc(eval_units_asr).splitlines()[0], description=_doc(eval_units_asr))
    s.add_argument("--model", required=True, help="units LM trained on the asr format")
    s.add_argument("--data", required=True, help="manifest with transcripts")
    s.add_argument("--out", required=True, help="JSON report to write")
    s.add_argument("--batch-size", type=_COUNT, default=16)
    s.add_argument("--limit", type=_COUNT, help="score only the first N utterances")
    s.set_defaults(fn=lambda a: eval_units_asr(a.model, a.data, a.out, a.batch_size, a.limit))
    s = ev.add_parser("genppl", help=_doc(eval_genppl).splitlines()[0], description=_doc(eval_genppl))
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--out", required=True, help="JSON report to write")
    s.add_argument("--asr", default="bundled:whisper-tiny.en", help="Whisper model spec that transcribes")
    s.add_argument("--lm", default="bundled:smollm2-135m-instruct", help="text LM spec that scores the transcripts")
    s.set_defaults(fn=lambda a: eval_genppl(a.files, a.out, a.asr, a.lm))

    s = stages.add_parser("generate", help=_doc(generate_cmd).splitlines()[0], description=_doc(generate_cmd))
    s.add_argument("--model", required=True, help="trained units LM folder")
    s.add_argument("--audio", required=True, help="spoken prompt")
    s.add_argument("--out", required=True, help="ids.json or out.wav")
    s.add_argument("--max-new-tokens", type=_COUNT, default=100)
    s.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    s.add_argument("--temperature", type=_float(0, above=True), default=0.8)
    s.add_argument("--top-k", type=_COUNT, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=lambda a: generate_cmd(a.model, a.audio, a.out, a.max_new_tokens, a.greedy, a.temperature, a.top_k, a.seed))

    s = stages.add_parser("transcribe", help=_doc(transcribe).splitlines()[0], description=_doc(transcribe))
    s.add_argument("--model", required=True)
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--prompt", help="user turn holding <|audio|> (default: the training prompt)")
    s.add_argument("--batch-size", type=_COUNT, default=8)
    s.set_defaults(fn=lambda a: transcribe(a.model, a.files, a.prompt, a.batch_size))

    s = stages.add_parser("chat", help=_doc(chat).splitlines()[0], description=_doc(chat))
    s.add_argument("--model", required=True)
    s.add_argument("--audio", required=True)
    s.add_argument("--prompt", help="what to ask (default: transcribe)")
    s.add_argument("--max-new-tokens", type=_COUNT, default=128)
    s.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    s.add_argument("--temperature", type=_float(0, above=True), default=0.7, help="with --sample (default 0.7)")
    s.add_argument("--num-beams", type=_COUNT, default=1)
    s.set_defaults(fn=lambda a: chat(a.model, a.audio, a.prompt, a.max_new_tokens, a.sample, a.temperature, a.num_beams))

    s = stages.add_parser("serve", help=_doc(serve).splitlines()[0], description=_doc(serve), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="trained model folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require this bearer key (default: $EARFUL_API_KEY, else none)")
    s.add_argument("--name", help="model id the API answers to (default: the folder's name)")
    s.add_argument("--max-upload-mb", type=float, default=25.0, help="largest request body, MB (default 25; larger gets 413)")
    s.add_argument("--max-audio-seconds", type=float, default=120.0, help="longest clip accepted (default 120)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the model; more get 429 + Retry-After (default 64)")
    s.add_argument("--max-request-audio-seconds", type=float, default=120.0, help="audio in one request, all clips together (default 120)")
    s.add_argument("--max-clips", type=int, default=8, help="audio clips in one request (default 8)")
    s.add_argument("--read-timeout", type=float, default=15.0, help="seconds a request body may send nothing before a 408 (default 15)")
    s.add_argument("--no-ui", dest="ui", action="store_false", help="don't mount the Gradio UI on /ui")
    s.set_defaults(fn=lambda a: serve(a.model, a.host, a.port, a.api_key, a.name, a.max_upload_mb, a.max_audio_seconds, a.max_batch_size, a.ui,
                                      a.max_queue, a.max_request_audio_seconds, a.max_clips, a.read_timeout))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' own notices drown the run's progress
    hf_logging.disable_progress_bar()

    try:
        return args.fn(args) or 0
    except (EarfulError, OSError) as e:  # what the user gave, or a path the system refuses (exists, is a folder, ...)
        logger.debug("the error in full", exc_info=True)  # -v shows where
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .train.trainer import TextAbilityRegression

        if isinstance(e, TextAbilityRegression):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise
