"""`earful eval ...`: scored reports (ASR, spoken-LM pairs, units ASR, generated speech)."""

from __future__ import annotations

from typing import Annotated, Literal

from ._parser import Arg, Count, NonNegative, Positive, UsageError, verb
from ._shared import check_prompt, load_clips, load_unit_lm


@verb("eval asr")
def eval_asr(*, model: str, data: str, out: str, batch_size: Count = 16, prompt: str | None = None, limit: Count | None = None,
             normalize: Literal["whisper", "digits"] = "whisper", split: Literal["vad", "fixed"] = "vad",
             segment_seconds: Positive | None = None, overlap: NonNegative = 2.0, max_hours: Positive = 4.0,
             quantize: Literal["int8", "int4"] | None = None) -> None:
    """Transcribe a manifest and write corpus WER/CER (both sides normalised first) to a JSON report.

    Recordings longer than the model's encoder takes whole (Whisper: 30 s) are transcribed
    long-form, as `earful transcribe` does (their rows keep the segments). Clips that cannot be
    read, are too short for the encoder or over --max-hours are listed under "rejects" with the
    reason; the rest are scored.

    Args:
        model: trained model folder
        data: manifest with transcripts
        out: JSON report to write
        prompt: user turn holding <|audio|> (default: the training prompt)
        limit: score only the first N utterances
        normalize: whisper (Whisper's English normaliser: "four one seven" -> "417", one word) or
            digits (each digit its own word: "417" -> "four one seven", for digit strings)
        split: how a long recording is cut: vad (speech regions, default) or fixed (windows sharing --overlap)
        segment_seconds: the longest segment (default: what the encoder takes, Whisper's 30 s)
        overlap: fixed windows: seconds each shares with the next (default 2)
        max_hours: reject longer recordings (default 4)
        quantize: run the LLM's linear layers in int8 on the CPU (to measure what it costs)
    """
    from ..data.manifest import read_manifest
    from ..eval.asr import evaluate_asr, write_report
    from ..eval.longform import evaluate_asr_long, is_long
    from ..models.build import load_speech_lm
    from ..models.processing import max_audio_seconds

    check_prompt(prompt)
    utts = read_manifest(data)
    utts = utts if limit is None else utts[:limit]
    lm, processor = load_speech_lm(model, quantize=quantize)
    prompt = prompt or processor.prompt_format.default_prompt
    encoder_limit = max_audio_seconds(processor.feature_extractor, processor.config.encoder_config)
    if any(is_long(_seconds(u.audio), encoder_limit) for u in utts):
        report = evaluate_asr_long(lm, processor, utts, prompt=prompt, batch_size=batch_size, normalizer=normalize, split=split,
                                   segment_seconds=segment_seconds, overlap=overlap, max_hours=max_hours)
    else:  # every clip fits the encoder: the short path, as it always was
        report = evaluate_asr(lm, processor, utts, prompt=prompt, batch_size=batch_size, normalizer=normalize)
    report = {"model": str(model), "data": str(data), **report}
    write_report(report, out)
    print(f"WER {report['wer']:.4f}  CER {report['cer']:.4f}  accuracy {report['accuracy']:.4f}  "
          f"on {report['n']} utterances ({report['rejected']} rejected) -> {out}")


def _seconds(path: str) -> float | None:
    """A recording's stated length (None: its header states none); 0 for one that cannot be read (the scorer records why)."""
    from ..audio import AudioError
    from ..eval.longform import stated_seconds

    try:
        return stated_seconds(path)
    except AudioError:
        return 0.0


@verb("eval pairs")
def eval_pairs(*, model: str, data: str, out: str, score: Literal["sum", "mean"] = "sum", batch_size: Count = 16) -> None:
    """Spoken-LM pairs (sBLIMP/sWUGGY/sStoryCloze style): does the model prefer the correct clip?

    DATA is JSON Lines of {"correct": wav, "wrong": wav, "group": ..}; each pair scores 1 / 0.5 / 0
    for a win / tie / loss by summed (or --score mean) log-likelihood of its sound tokens.

    Args:
        model: trained units LM folder
        data: pairs file (JSON Lines: correct, wrong, group)
        out: JSON report to write
        score: summed or mean token log-likelihood
    """
    from ..eval.asr import write_report
    from ..eval.pairs import evaluate_pairs, read_pairs

    pairs = read_pairs(data)
    lm = load_unit_lm(model)
    report = {"model": str(model), "data": str(data), **evaluate_pairs(lm, pairs, score, batch_size)}
    write_report(report, out)
    groups = "  ".join(f"{g} {r['accuracy']:.3f} (n={r['n']})" for g, r in report["groups"].items())
    print(f"accuracy {report['accuracy']:.3f} on {report['n']} pairs ({report['ties']} ties)  {groups} -> {out}")


@verb("eval units-asr")
def eval_units_asr(*, model: str, data: str, out: str, batch_size: Count = 16, limit: Count | None = None) -> None:
    """Transcribe a manifest with a units LM trained on the ASR format; WER/CER to a JSON report.

    Args:
        model: units LM trained on the asr format
        data: manifest with transcripts
        out: JSON report to write
        limit: score only the first N utterances
    """
    from ..data.manifest import read_manifest
    from ..eval.asr import write_report
    from ..eval.units_asr import evaluate_units_asr
    from ..train.units import tokenize_audio

    utts = read_manifest(data)
    utts = utts if limit is None else utts[:limit]
    lm = load_unit_lm(model)
    if lm.audio_tokenizer is None:
        raise UsageError(f"{model}: saved without an audio tokenizer (audio_tokenizer/), so it cannot read audio")
    report = {"model": str(model), "data": str(data), **evaluate_units_asr(lm, utts, tokenize_audio(lm.audio_tokenizer, utts), batch_size)}
    write_report(report, out)
    print(f"WER {report['wer']:.4f}  CER {report['cer']:.4f}  accuracy {report['accuracy']:.4f} on {report['n']} utterances -> {out}")


@verb("eval genppl")
def eval_genppl(files: Annotated[list[str], Arg(metavar="FILE")], *, out: str, asr: str = "bundled:whisper-tiny.en",
                lm: str = "bundled:smollm2-135m-instruct") -> int:
    """GenPPL and Auto-BLEU-2 of generated speech: transcribe FILEs, score the text with a text LM.

    Args:
        out: JSON report to write
        asr: Whisper model spec that transcribes
        lm: text LM spec that scores the transcripts
    """
    from transformers import AutoConfig, AutoFeatureExtractor

    from ..eval.asr import write_report
    from ..eval.generation import auto_bleu, corpus_auto_bleu, gen_ppl, transcribe_whisper
    from ..pretrained import resolve

    # The ASR model's own limits (Whisper: 30 s): a longer clip would be scored on its first 30 s.
    folder = resolve(asr)
    waves, names, failures = load_clips(files, front=(AutoFeatureExtractor.from_pretrained(folder), AutoConfig.from_pretrained(folder)))
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
