"""`earful vocoder fit` and `earful resynth`: units -> audio a person can hear, and audio -> units -> audio."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from ._parser import GROUPS, Count, UsageError, verb

GROUPS.setdefault("vocoder", "vocoders: speech units back to audio")


def default_texts() -> list[str]:
    """Sentences shipped with earful, for Piper to speak when no --texts is given (about 80)."""
    import json
    from importlib import resources

    from ..data.storycloze import STORIES

    data = resources.files("earful.eval") / "data"
    texts = [t.strip() for t in (data / "heldout_text.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    texts += [f"{context} {ending}" for context, ending, _ in STORIES]
    for line in (data / "multiple_choice.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(json.loads(line)["question"])
    return texts


def read_texts(path: str) -> list[str]:
    try:
        texts = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    except UnicodeDecodeError as e:
        raise UsageError(f"--texts {path}: not UTF-8 text ({e.reason} at byte {e.start}); give one sentence per line") from None
    if not texts:
        raise UsageError(f"--texts {path}: no sentences (expected one sentence per line)")
    return texts


def _load_units(units: str):
    from ..tokenizers import AudioTokenizerError, load_audio_tokenizer

    try:
        tok = load_audio_tokenizer(units)
    except AudioTokenizerError as e:
        raise UsageError(f"--units: {e}") from None
    if tok.kind != "units":
        raise UsageError(f"--units {units}: a {tok.kind} tokenizer decodes its own ids; a vocoder is for k-means units "
                         "(make them with `earful units fit`)")
    return tok


@verb("vocoder fit")
def vocoder_fit(*, units: str, out: str, kind: Literal["piper-joe", "griffin-lim"] = "piper-joe", data: str | None = None,
                texts: str | None = None, steps: Count = 2000, stft_steps: int = 0, channels: Count = 256,
                batch_size: Count = 16, seed: int = 0) -> None:
    """Train a vocoder that turns the unit tokenizer UNITS's units back into speech; writes the folder OUT.

    piper-joe (22050 Hz): the bundled Piper voice speaks sentences (--texts, one per line; default:
    about 80 sentences shipped with earful), and a units -> z adapter is trained in front of Piper's
    own frozen HiFi-GAN, on L1 to Piper's z (--steps), then optionally through the generator with a
    multi-resolution STFT loss (--stft-steps). griffin-lim (16 kHz): a units -> log-mel adapter
    trained on a manifest's audio (--data), decoded by Griffin-Lim; no pretrained weights.
    OUT keeps a copy of the unit tokenizer (OUT/units), so `earful resynth` needs no --units.

    Args:
        units: unit tokenizer folder (`earful units fit`)
        out: vocoder folder to write
        kind: piper-joe (Piper's HiFi-GAN, trained on Piper's own speech) or griffin-lim (any audio)
        data: manifest whose audio griffin-lim is trained on
        texts: piper-joe: a text file of sentences, one per line, for Piper to speak
        steps: training steps of the adapter
        stft_steps: piper-joe: further steps through the frozen generator (multi-resolution STFT loss)
        channels: adapter width
        batch_size: clips (random crops of 2 s) per step
    """
    from ..tokenizers import AudioTokenizerError
    from ..vocoders import VocoderError, fit_griffin_lim, fit_piper_joe

    if stft_steps < 0:
        raise UsageError(f"--stft-steps: must be >= 0, found {stft_steps}")
    tok = _load_units(units)
    adapter = {"channels": channels}
    try:
        if kind == "piper-joe":
            if data is not None:
                raise UsageError("--data: piper-joe trains on speech Piper makes from --texts (its z is known only for "
                                 "that); use --kind griffin-lim to train on a manifest's audio")
            sentences = read_texts(texts) if texts else default_texts()
            vocoder, report = fit_piper_joe(tok, sentences, steps, stft_steps=stft_steps, seed=seed, units_folder=units,
                                            batch=batch_size, adapter=adapter)
        else:
            if data is None:
                raise UsageError("--data: griffin-lim is trained on a manifest's audio; give --data MANIFEST")
            if texts is not None or stft_steps:
                raise UsageError("--texts and --stft-steps are piper-joe options; griffin-lim trains on --data")
            from ..audio import AudioError, load_audio
            from ..data.manifest import read_manifest

            waves = []
            for u in read_manifest(data):
                try:
                    waves.append(load_audio(u.audio, tok.sampling_rate))
                except AudioError as e:
                    print(f"skipped: {e} [{type(e).__name__}]", file=sys.stderr)
            vocoder, report = fit_griffin_lim(tok, waves, steps, seed=seed, units_folder=units, batch=batch_size,
                                              adapter=adapter)
    except (VocoderError, AudioTokenizerError) as e:
        raise UsageError(str(e)) from None
    vocoder.save_pretrained(out)
    print(f"wrote {out}: {kind} vocoder for {tok.vocab_size} units at {vocoder.frame_rate:g} Hz -> {vocoder.sampling_rate} Hz audio; "
          f"{report['clips']} clips ({report['seconds'] / 60:.1f} min), {steps} steps, L1 loss {report['loss_first']:.4f} -> "
          f"{report['loss']:.4f}" + (f", STFT stage {report['stft_loss']:.4f}" if report.get("stft_loss") is not None else ""))


@verb("resynth")
def resynth(files: list[str], *, vocoder: str, out: str, units: str | None = None) -> int:
    """Audio -> units -> audio: each FILE through the unit tokenizer and the vocoder, to OUT/<name>.wav.

    Writes 16-bit PCM WAVs at the vocoder's rate, each atomically. A file that cannot be read is
    reported on stderr and listed in OUT/rejects.jsonl with the reason, and the rest go on; the
    exit status is 1 when any was rejected.

    Args:
        vocoder: vocoder folder (`earful vocoder fit`)
        out: folder for the resynthesised WAVs
        units: unit tokenizer folder (default: the copy saved in the vocoder folder)
    """
    import soundfile as sf
    from tqdm.auto import tqdm

    from ..atomic import replacing, write_jsonl
    from ..audio import AudioError, load_audio
    from ..vocoders import VocoderError, load_vocoder

    try:
        voc = load_vocoder(vocoder)
        tok = _load_units(units) if units else voc.unit_tokenizer()
    except VocoderError as e:
        raise UsageError(str(e)) from None
    if tok.vocab_size != voc.vocab_size:
        raise UsageError(f"--units: the tokenizer has {tok.vocab_size} units but the vocoder {vocoder} was fitted for "
                         f"{voc.vocab_size}; use the tokenizer it was fitted with (its units/ folder)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects, written, taken = [], 0, set()
    for f in tqdm(files, desc="resynth", unit="file", disable=len(files) < 2):
        try:
            wave = load_audio(f, tok.sampling_rate)
        except AudioError as e:
            print(f"error: {e} [{type(e).__name__}]", file=sys.stderr)
            rejects.append({"file": str(f), "error": str(e), "type": type(e).__name__})
            continue
        audio = voc.decode(tok.encode(wave, dedup=False))
        name = Path(f).stem
        while name in taken:  # two inputs of the same name from different folders
            name += "_"
        taken.add(name)
        with replacing(out_dir / f"{name}.wav") as fh:
            sf.write(fh, audio, voc.sampling_rate, subtype="PCM_16", format="WAV")
        written += 1
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    print(f"wrote {written} WAVs ({voc.kind}, {voc.sampling_rate} Hz) to {out}; {len(rejects)} rejected"
          + (f" (see {out}/rejects.jsonl)" if rejects else ""))
    return 1 if rejects else 0


@verb("vocoder attach")
def vocoder_attach(*, model: str, vocoder: str) -> None:
    """Put a vocoder into a units LM's folder (as vocoder/), so the LM speaks: `earful generate
    --out out.wav`, `earful serve` (OpenAI audio output) and `earful.load()` decode through it.

    The vocoder must have been fitted on the model's own units (the same k-means centroids,
    encoder and layer as its audio_tokenizer/); one of other units is refused.

    Args:
        model: units LM folder (trained with `earful train` on a units recipe)
        vocoder: vocoder folder (from `earful vocoder fit --units MODEL/audio_tokenizer`)
    """
    from ..models.vocab import SoundVocabError
    from ..tokenizers import AudioTokenizerError
    from ..vocoders.base import VocoderError
    from ..vocoders.speaking import attach_vocoder

    try:
        target = attach_vocoder(model, vocoder)
    except (VocoderError, SoundVocabError, AudioTokenizerError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {target}: {model} now speaks through the {vocoder} vocoder")
