"""`earful data ...`: manifests from audio (known corpora, raw sources, long recordings, synthesis, pre-encoding)."""

from __future__ import annotations

import argparse
import os
from typing import Annotated, Literal

from ._parser import Arg, Count, NonNegative, Positive, UsageError, _float, verb


@verb("data prepare fsdd")
def data_prepare_fsdd(folder: str, *, out: str, speakers: str | None = None) -> None:
    """Build a manifest from FSDD-style recordings named {digit}_{speaker}_{index}.wav.

    The transcript is the digit's English word. --speakers a,b keeps only those speakers.

    Args:
        folder: folder of recordings (or its parent holding recordings/)
        out: manifest to write (JSON Lines)
        speakers: comma-separated speakers to keep
    """
    from ..data.fsdd import fsdd_utterances
    from ..data.manifest import write_manifest

    wanted = [s.strip() for s in speakers.split(",") if s.strip()] if speakers else None
    try:
        rows = fsdd_utterances(folder, wanted)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    n = write_manifest(rows, out)
    hours = sum(r.duration or 0 for r in rows) / 3600
    print(f"wrote {out}: {n} utterances, {len({r.speaker for r in rows})} speakers, {hours * 60:.1f} min of audio")


def _ms_range(text: str) -> tuple[float, float]:
    """An argparse type: LO,HI milliseconds with 0 <= LO <= HI (one number: LO = HI)."""
    try:
        lo, hi = (float(v) for v in (text.split(",") if "," in text else (text, text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI in milliseconds (e.g. 50,300), found {text!r}") from None
    if not (0 <= lo <= hi < float("inf")):
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI milliseconds, found {text!r}")
    return lo, hi


MsRange = Annotated[tuple[float, float], Arg(_ms_range, metavar="LO,HI")]


@verb("data prepare fsdd-strings")
def data_prepare_fsdd_strings(folder: str, *, out: str, speakers: str | None = None, min: Count = 3, max: Count = 7,
                              count: Count | None = None, seed: int = 0, gap_ms: MsRange = (50.0, 300.0),
                              edge_ms: MsRange = (100.0, 250.0), audio_dir: str | None = None) -> None:
    """Connected digit strings ("four one seven") from FSDD recordings, one speaker per string.

    For each speaker separately, joins its recordings of random digits (--min to --max of them,
    drawn uniformly, so repeats like "one one" occur at their natural rate) with random silences
    between them and at both ends, never using one recording twice in a string where another of
    that digit exists. Writes 16 kHz WAVs to --audio-dir (default: OUT's name + _audio/ beside it,
    e.g. train.jsonl -> train_audio/SPEAKER_00000.wav) and the manifest OUT (id, audio, speaker,
    text, duration, words: each digit's start/end, sources: the FSDD ids used). Seeded per
    speaker: the same settings write the same files.

    Args:
        folder: folder of recordings (or its parent holding recordings/)
        out: manifest to write (JSON Lines)
        speakers: comma-separated speakers (default: every speaker in FOLDER)
        min: fewest digits in a string (default 3)
        max: most digits in a string (default 7)
        count: strings per speaker (default: enough to use each recording about once)
        seed: random seed (default 0)
        gap_ms: silence between digits, drawn uniformly from LO,HI ms (default 50,300)
        edge_ms: silence before the first and after the last digit, LO,HI ms (default 100,250)
        audio_dir: folder for the WAVs (default: OUT's name + _audio/ beside OUT)
    """
    from ..data.digit_strings import prepare_digit_strings

    wanted = [s.strip() for s in speakers.split(",") if s.strip()] if speakers else None
    if speakers is not None and not wanted:
        raise UsageError(f"--speakers: expected a comma-separated list of speakers, found {speakers!r}")
    if min > max:
        raise UsageError(f"--min {min} must be <= --max {max}")
    try:
        s = prepare_digit_strings(folder, out, wanted, min_digits=min, max_digits=max, count=count, seed=seed,
                                  gap_ms=gap_ms, edge_ms=edge_ms, audio_dir=audio_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}: {s.strings} strings of {min}-{max} digits (mean {s.digits / s.strings:.1f}) from "
          f"{len(s.speakers)} speaker(s) ({', '.join(s.speakers)}), {s.seconds / 60:.1f} min of 16 kHz audio in {s.audio_dir}; "
          f"{s.with_repeat} strings hold a repeated digit" + (f", {s.reused} had to reuse a recording" if s.reused else ""))


@verb("data prepare tts-digits")
def data_prepare_tts_digits(out_dir: str, *, per_digit: Count = 20, seed: int = 0, voices: Literal["piper", "many"] = "piper") -> None:
    """Synthesise spoken digits offline (for machines without FSDD, or more voices beside it).

    Writes OUT_DIR/recordings/{digit}_{voice}_{i}.wav and OUT_DIR/manifest.jsonl. `piper`: the
    bundled Piper voice at varied speed and noise (piper{v} names the speed, as a pseudo-speaker);
    `many`: half Piper, half espeak-ng's accents and voice variants (male, female, old, young) at
    random rate and pitch.

    Args:
        per_digit: clips per digit (default 20)
        voices: piper (one neural voice) or many (plus espeak-ng's voices)
    """
    from ..data.tts_digits import synthesise_digits

    manifest = synthesise_digits(out_dir, per_digit=per_digit, seed=seed, voices=voices)
    print(f"wrote {manifest}")


@verb("data prepare tts-storycloze")
def data_prepare_tts_storycloze(out_dir: str, *, limit: Count | None = None) -> None:
    """Synthesise a small spoken StoryCloze-style set with the bundled Piper voice.

    Writes OUT_DIR/audio/*.wav and OUT_DIR/pairs.jsonl: per story an sStoryCloze pair (right vs.
    contradicting ending) and a tStoryCloze pair (right vs. another story's ending), for `eval pairs`.

    Args:
        limit: only the first N stories
    """
    from ..data.storycloze import build_spoken_storycloze

    print(f"wrote {build_spoken_storycloze(out_dir, limit)}")


@verb("data prepare nonspeech")
def data_prepare_nonspeech(out_dir: str, *, count: Count = 300, seed: int = 0, answer: str | None = None, rate: Count = 16000) -> None:
    """Synthesise clips that hold no speech, to teach a listening LM to say so (its transcript is "").

    Silence (digital zero, room tone), white/pink/brown noise, mains hum, clicks and typing, tones,
    beeps and DTMF, chords and melodies, and mixtures of them, in turn; peaks -50..-3 dBFS, 0.3-2.5 s.
    Writes OUT_DIR/audio/nonspeech_{kind}_{i}.wav (16-bit PCM) and OUT_DIR/manifest.jsonl. The
    same --seed writes byte-identical files.

    Args:
        count: clips to write, spread evenly over the kinds (default 300)
        seed: random seed (default 0)
        answer: the reply to train on them (each clip's response), e.g. "I could not hear any speech."
        rate: sampling rate in Hz (default 16000)
    """
    from ..data.nonspeech import make_nonspeech, summary

    try:
        rows = make_nonspeech(out_dir, count, seed=seed, sampling_rate=rate, answer=answer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    s = summary(rows)
    print(f"wrote {out_dir}/manifest.jsonl: {len(rows)} non-speech clips, {s['minutes']:.1f} min at {rate} Hz "
          f"({', '.join(f'{k} {n}' for k, n in s['clips'].items())})" + (f"; answer {answer!r}" if answer is not None else ""))


@verb("data prepare sentences")
def data_prepare_sentences(out_dir: str, *, voices: str = "all", per_voice: Count = 20, seed: int = 0,
                           dev_voices: str | None = None, test_voices: str | None = None, text: str | None = None) -> None:
    """Speak sentences with many offline voices into train/dev/test manifests split by voice.

    Every chosen voice (Piper variants, espeak-ng accents x variants, Kokoro styles and mixtures:
    `earful data voices` lists them) speaks --per-voice sentences at 16 kHz. No voice is in two
    splits, and no sentence is spoken in two splits. Writes OUT_DIR/audio/VOICE/NNNN.wav,
    OUT_DIR/{train,dev,test}.jsonl and OUT_DIR/voices.json (the voices of each split, the sentence
    source, the settings). A rerun keeps the files written before.

    Args:
        voices: comma list of voice names or patterns (* matches anything), families or all (default all)
        per_voice: sentences each voice speaks (default 20)
        seed: random seed for the sentence split and draws (default 0)
        dev_voices: patterns of the voices held out for dev (default: kokoro:*jf_tebukuro*,
            espeak:en-gb-x-gbcwmd*, espeak:*+m5, espeak:*+linda, piper:joe@len0.8,noise0.4)
        test_voices: patterns of the voices held out for test, never in train or dev (default:
            kokoro:*jf_nezumi*, espeak:en-029*, espeak:*+f4, espeak:*+grandpa, piper:joe@len1.3,noise0.6)
        text: file of sentences, one a line (default: the shipped SmolLM2-written sentences)
    """
    from ..data.sentences import prepare_sentences

    s = prepare_sentences(out_dir, voices=voices, per_voice=per_voice, seed=seed, dev_voices=dev_voices,
                          test_voices=test_voices, text=text)
    parts = [f"{split} {s['utterances'][split]} utterances / {len(s['splits'][split])} voices ({s['hours'][split] * 60:.1f} min)"
             for split in ("train", "dev", "test")]
    print(f"wrote {out_dir}: {'; '.join(parts)}; {s['written_now']} spoken now; voices per split in {out_dir}/voices.json")


@verb("data voices")
def data_voices(*, family: Literal["piper", "espeak", "kokoro"] | None = None) -> int:
    """List the offline voices by their names (for --voices of `data synth` and `data prepare sentences`).

    Args:
        family: only this family's voices
    """
    from ..data.synth import voice_catalogue, voice_family

    for name in voice_catalogue():
        if family is None or voice_family(name) == family:
            print(name)
    return 0


@verb("data ingest")
def data_ingest(sources: Annotated[list[str], Arg(metavar="SOURCE")], *, out: str, transcripts: str | None = None,
                min_seconds: NonNegative = 0.1, max_seconds: Positive = 600.0,
                silence_dbfs: Annotated[float, Arg(_float(high=0))] = -60.0, enable_file_urls: bool = False) -> int:
    """Check raw audio from folders, files, manifests, CSVs, datasets or URLs into OUT/manifest.jsonl.

    SOURCE: a folder (transcripts from NAME.txt / NAME.lab sidecars or --transcripts CSV), an audio
    file, a manifest (.jsonl), a CSV (audio,text), a datasets file (.parquet/.arrow) or hf:NAME,
    a URL or yt-dlp search (ytsearch3:QUERY), or a .txt listing URLs. Every clip is decoded and
    measured; unusable ones go to OUT/rejects.jsonl with the reason. OUT/summary.json: in = out + rejected.

    Args:
        out: output folder
        transcripts: CSV of audio,text for folder sources
        min_seconds: shorter clips are rejected (default 0.1)
        max_seconds: longer clips are rejected (default 600; segment long recordings first)
        silence_dbfs: clips whose peak is below this are rejected as silent (default -60)
        enable_file_urls: let yt-dlp fetch file:// URLs
    """
    from ..data.ingest import IngestError, ingest

    if min_seconds >= max_seconds:
        raise UsageError(f"--min-seconds {min_seconds:g} must be less than --max-seconds {max_seconds:g}")
    try:
        s = ingest(sources, out, transcripts=transcripts, min_seconds=min_seconds, max_seconds=max_seconds,
                   silence_dbfs=silence_dbfs, enable_file_urls=enable_file_urls)
    except IngestError as e:
        raise UsageError(str(e)) from None
    print(f"{out}/manifest.jsonl: {s['in']} in = {s['out']} kept ({s['hours'] * 60:.1f} min) + {s['rejected']} rejected (see {out}/rejects.jsonl)")
    return 0


@verb("data segment")
def data_segment(inputs: Annotated[list[str], Arg(metavar="INPUT")], *, out: str, by: Literal["fixed", "vad"] = "fixed",
                 seconds: Positive = 30.0, min_seconds: NonNegative = 1.0, max_seconds: Positive = 30.0, reencode: bool = False) -> int:
    """Cut long recordings into clips: fixed slices by ffmpeg stream copy, or speech regions by Silero VAD.

    INPUT is an audio file or a manifest (.jsonl). Writes OUT/segments/*, OUT/manifest.jsonl and
    OUT/rejects.jsonl. --by fixed --seconds 30 cuts without re-encoding (--reencode to decode and
    encode again); --by vad keeps speech, merging regions up to --max-seconds, dropping those under --min-seconds.

    Args:
        seconds: slice length for --by fixed (default 30)
        min_seconds: --by vad: drop shorter regions (default 1)
        max_seconds: --by vad: merge regions up to this (default 30)
        reencode: --by fixed: decode and encode again instead of stream copy
    """
    from ..data.segment import segment

    if by == "vad" and min_seconds >= max_seconds:
        raise UsageError(f"--min-seconds {min_seconds:g} must be less than --max-seconds {max_seconds:g}")
    s = segment(inputs, out, by=by, seconds=seconds, min_seconds=min_seconds, max_seconds=max_seconds, reencode=reencode)
    print(f"{out}/manifest.jsonl: {s['in']} recordings ({s['audio_seconds_in'] / 60:.1f} min) -> {s['segments']} segments "
          f"({s['audio_seconds_out'] / 60:.1f} min), {s['rejected']} rejected; {s['real_time_factor']}x real time")
    return 0


@verb("data synth")
def data_synth(*, out: str, text: str | None = None, instructions: str | None = None, voices: str | None = None,
               seed: int = 0, limit: Count | None = None) -> int:
    """Synthesise speech from text with the project's voices (Piper + espeak-ng) into OUT/manifest.jsonl.

    --text FILE: one utterance a line (ASR data). --instructions FILE (.jsonl/.parquet with
    prompt/response, instruction/output or question/answer): the prompt is spoken, the response is
    the target (spoken-instruction data). --voices: comma list of piper, piper:VOICE.onnx, espeak:NAME,
    or any voice name `earful data voices` lists (piper:joe@len1.2,noise0.5, kokoro:jm_kumo, ...).

    Args:
        text: a file of lines to speak
        instructions: instruction data (.jsonl or .parquet)
        voices: comma list (default: piper,espeak:en-us+m3,espeak:en+f2,espeak:en-gb-scotland)
        limit: only the first N lines
    """
    from ..data.spoken import DEFAULT_VOICES, read_instructions, read_lines, synthesize_corpus

    if (text is None) == (instructions is None):
        raise UsageError("give exactly one of --text FILE or --instructions FILE")
    try:
        lines = read_lines(text) if text else read_instructions(instructions)
        s = synthesize_corpus(lines[:limit] if limit else lines, out, voices=voices or DEFAULT_VOICES, seed=seed)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(f"{out}/manifest.jsonl: {s['out']} of {s['in']} spoken ({s['hours'] * 60:.1f} min, voices {', '.join(s['voices'])}), {s['rejected']} rejected")
    return 0


@verb("data encode")
def data_encode(*, data: str, out: str, encoder: str, batch_size: Count = 16, max_seconds: Positive | None = None) -> int:
    """Pre-encode a manifest's audio with a frozen encoder (or an audio tokenizer) into OUT.

    ENCODER is an encoder spec (bundled:whisper-tiny.en, facebook/hubert-base-ls960, a folder), a
    trained earful model folder (its encoder), or an earful audio tokenizer folder (token ids).
    Objects are content-addressed (audio bytes + encoder identity): a rerun skips what is done.
    Under `torchrun --nproc_per_node N -m earful data encode ...` the ranks split the batches.
    Clips longer than the encoder takes whole (Whisper: 30 s) are rejected, never cut.
    Writes OUT/index.jsonl, OUT/rejects.jsonl, OUT/summary.json.

    Args:
        data: manifest to encode
        out: store folder (objects/, index.jsonl, rejects.jsonl, summary.json)
        encoder: encoder spec, trained model folder, or audio tokenizer folder
        max_seconds: longer clips are rejected (default 600, and never more than the encoder takes
            whole: 30 s for Whisper)
    """
    from ..audio import DEFAULT_MAX_SECONDS
    from ..data.shards import encode_manifest

    s = encode_manifest(data, out, encoder, batch_size=batch_size, max_seconds=DEFAULT_MAX_SECONDS if max_seconds is None else max_seconds)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{out}: {s['in']} in = {s['out']} encoded ({s['encoded']} now, {s['already_done']} already done) + "
              f"{s['rejected']} rejected; {s['audio_hours'] * 60:.1f} min of audio, {s['encoded_audio_hours_per_hour']} audio-h/h")
    return 0
