"""`earful units fit` and `earful generate`: k-means speech units, and speech continued by a units LM."""

from __future__ import annotations

from ._parser import Count, Positive, UsageError, verb
from ._shared import load_clips, load_unit_lm


@verb("units fit")
def units_fit(*, data: str, k: str, out: str, layer: Count | None = None, encoder: str = "bundled:whisper-tiny.en",
              dedup: bool = True, seed: int = 0, cache: str | None = None) -> None:
    """Fit k-means unit tokenizers on a manifest's audio: one encoder pass serves every k.

    --k 500 writes the tokenizer folder OUT; --k 100,500 writes OUT/k100 and OUT/k500. Encoder
    features are cached (OUT/features, or --cache DIR) and reused by the next fit on the same clips.
    --layer picks the encoder layer (default: Whisper's last, the middle of HuBERT/wav2vec2).

    Args:
        data: manifest whose audio the k-means is fitted on
        k: number of units, or a comma-separated list (100,500)
        out: tokenizer folder (a parent folder when several k)
        layer: encoder layer whose features are clustered (1 = first)
        encoder: model spec of the speech encoder
        dedup: keep runs of the same unit (default: collapse them)
        cache: folder for cached encoder features (default OUT/features)
    """
    from ..data.manifest import read_manifest
    from ..tokenizers.base import AudioTokenizerError
    from ..tokenizers.units import fit_unit_tokenizers

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


@verb("generate")
def generate_cmd(*, model: str, audio: str, out: str, max_new_tokens: Count = 100, greedy: bool = False,
                 temperature: Positive = 0.8, top_k: Count = 50, seed: int = 0) -> int:
    """Continue a spoken prompt with a units LM; OUT is ids.json (any tokenizer) or out.wav.

    The JSON holds the prompt's and the continuation's audio-tokenizer ids; the WAV is the prompt
    followed by the continuation, decoded by the codec, or for k-means units by the vocoder in the
    model folder (`earful vocoder attach`).

    Args:
        model: trained units LM folder
        audio: spoken prompt
        out: ids.json or out.wav
        greedy: greedy decoding instead of sampling
    """
    import json

    from ..models.speech_generation import continue_speech

    if not out.endswith((".json", ".wav")):
        raise UsageError(f"--out {out}: expected a .json (token ids) or .wav (audio) file")
    lm = load_unit_lm(model)
    at = lm.audio_tokenizer
    if at is None:
        raise UsageError(f"{model}: saved without an audio tokenizer (audio_tokenizer/), so it cannot read {audio}")
    if out.endswith(".wav") and not at.can_decode:
        raise UsageError(f"--out {out}: this model's {at.kind} tokenizer cannot turn tokens back into audio "
                         "(k-means units need a vocoder: `earful vocoder attach --model MODEL --vocoder DIR`); write token ids with --out ids.json")
    waves, _, failures = load_clips([audio], at.sampling_rate)
    if failures:
        return 1
    result = continue_speech(lm, waves[0], max_new_tokens=max_new_tokens, do_sample=not greedy,
                             temperature=temperature, top_k=top_k, seed=seed)
    from ..atomic import replacing

    if out.endswith(".json"):
        with replacing(out, "w") as f:
            f.write(json.dumps({"model": model, "audio": audio, "tokenizer": at.kind, "frame_rate": at.frame_rate,
                                "prompt_units": result.prompt_units, "continuation_units": result.continuation_units}) + "\n")
    else:
        import soundfile as sf

        with replacing(out) as f:
            sf.write(f, at.decode(result.prompt_units + result.continuation_units), at.sampling_rate, subtype="PCM_16", format="WAV")
    print(f"prompt {len(result.prompt_units)} tokens, continuation {len(result.continuation_units)} tokens -> {out}")
    return 0
