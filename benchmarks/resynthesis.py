"""Resynthesis: audio -> k-means units -> earful's vocoder -> audio, judged by Whisper tiny.en.

On held-out sentences from voices the units were never fitted on (the test split of a corpus made
by `earful data prepare sentences`) and on FSDD clips of speakers the units never heard, each
clip is transcribed by the bundled Whisper tiny.en (30 s padding, greedy) as:

- original: the audio itself (the ceiling);
- griffin_lim_true_mel: Griffin-Lim on the clip's own log-mel (what the mel route loses, no units);
- units_k{K}_piper_joe: the clip's units (non-deduplicated, Whisper tiny.en's last encoder layer,
  k-means fitted on the corpus's TRAIN voices and FSDD's --fit-speakers) decoded by a `piper-joe`
  vocoder (units -> z adapter + Piper's frozen HiFi-GAN) trained on Piper's own speech of
  train-split sentences;
- units_k{K}_griffin_lim: the same units decoded by a `griffin-lim` vocoder (units -> log-mel
  adapter + Griffin-Lim, no vocoder weights) trained on the k-means fit clips themselves (many voices).

WER is word error rate after earful's ASR normalisation (digit words for FSDD). The vocoder's
speed is seconds of audio made per second of decoding (units in, wave out) on this machine's
threads: "x faster than real time". The target of issue 16: resynthesis WER within +0.05 of the
original's on held-out voices, and >= 20x real time on 2 cores.

    .venv/bin/python -m earful data prepare sentences runs/corpus --per-voice 6
    .venv/bin/python benchmarks/resynthesis.py --corpus runs/corpus [--ks 100,500,1000] [--steps 1500]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from reporting import footer, write_report

ROOT = Path(__file__).resolve().parents[1]
SR = 16000


def _sample(rows: list, n: int, seed: int) -> list:
    """Up to n rows, spread over speakers (round robin over a seeded shuffle of each speaker's rows)."""
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r.speaker or "", []).append(r)
    rng = random.Random(seed)
    for v in by.values():
        rng.shuffle(v)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by.values()):
        out += [v[i] for v in by.values() if i < len(v)][: n - len(out)]
        i += 1
    return out


def wer(refs: list[str], hyps: list[str], digits: bool = False) -> float:
    from earful.eval.asr import normalize, normalize_digit_words, word_errors

    norm = normalize_digit_words if digits else normalize
    return round(word_errors([norm(r) for r in refs], [norm(h) for h in hyps])["wer"], 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="folder from `earful data prepare sentences` (train.jsonl, test.jsonl)")
    p.add_argument("--ks", default="100,500,1000", help="numbers of units (default 100,500,1000)")
    p.add_argument("--fit-clips", type=int, default=600, help="corpus train clips the k-means is fitted on (default 600)")
    p.add_argument("--fit-speakers", default="jackson,lucas,nicolas", help="FSDD speakers added to the k-means fit")
    p.add_argument("--fit-fsdd-clips", type=int, default=150, help="FSDD clips of --fit-speakers in the fit (default 150)")
    p.add_argument("--vocoder-texts", type=int, default=300, help="train sentences Piper speaks to train each vocoder")
    p.add_argument("--steps", type=int, default=1500, help="adapter steps (L1 on z) per vocoder (default 1500)")
    p.add_argument("--stft-steps", type=int, default=0, help="then steps through the frozen generator (default 0)")
    p.add_argument("--vocoders", default="piper-joe,griffin-lim", help="which vocoders to fit and score (default both)")
    p.add_argument("--gl-steps", type=int, default=1500, help="griffin-lim adapter steps per k (default 1500)")
    p.add_argument("--test-clips", type=int, default=60, help="held-out-voice test clips (default 60, spread over voices)")
    p.add_argument("--test-speakers", default="george,yweweler", help="FSDD speakers the units never heard")
    p.add_argument("--test-fsdd-clips", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "runs" / "resynthesis"), help="tokenizers and vocoders are kept here")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resynthesis.json"))
    a = p.parse_args(argv)

    from tqdm.auto import tqdm

    from earful.audio import load_audio, resample
    from earful.data.fsdd import default_fsdd_dir, fsdd_utterances
    from earful.data.manifest import read_manifest
    from earful.eval.generation import transcribe_whisper
    from earful.tokenizers.units import LayerFeatures, UnitTokenizer, extract_features, fit_kmeans
    from earful.vocoders import fit_griffin_lim, fit_piper_joe
    from earful.vocoders.griffinlim import LogMel

    started = time.perf_counter()
    corpus, work = Path(a.corpus), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        if not (corpus / f"{split}.jsonl").is_file():
            raise SystemExit(f"{corpus}/{split}.jsonl not found: make the corpus with `earful data prepare sentences {corpus}`")
    train, test = read_manifest(corpus / "train.jsonl"), read_manifest(corpus / "test.jsonl")
    fsdd = default_fsdd_dir()
    fit_fsdd = _sample(fsdd_utterances(fsdd, speakers=a.fit_speakers.split(",")), a.fit_fsdd_clips, a.seed)
    test_fsdd = _sample(fsdd_utterances(fsdd, speakers=a.test_speakers.split(",")), a.test_fsdd_clips, a.seed)
    fit_rows = _sample(train, a.fit_clips, a.seed) + fit_fsdd
    test_rows = _sample(test, a.test_clips, a.seed)
    train_voices, test_voices = sorted({r.speaker for r in train}), sorted({r.speaker for r in test})
    assert not set(train_voices) & set(test_voices), "a voice in both splits"
    print(f"k-means fit: {len(fit_rows)} clips ({len(fit_fsdd)} FSDD); test: {len(test_rows)} clips of {len(test_voices)} "
          f"held-out voices + {len(test_fsdd)} FSDD clips of {a.test_speakers}")

    # -- units: one encoder pass over the fit clips serves every k --------------------------------
    features = LayerFeatures("bundled:whisper-tiny.en")
    frames, _ = extract_features([r.audio for r in fit_rows], features, work / "features")
    ks = sorted({int(k) for k in a.ks.split(",")})
    tokenizers = {}
    for k in ks:
        folder = work / f"units_k{k}"
        if not (folder / "audio_tokenizer.json").is_file():
            UnitTokenizer(fit_kmeans(frames, k, a.seed), features=features).save_pretrained(folder)
        tokenizers[k] = (UnitTokenizer.from_pretrained(folder), folder)

    # -- the evaluation audio ----------------------------------------------------------------------
    sets = {"held_out_voices": ([load_audio(r.audio, SR) for r in test_rows], [r.text for r in test_rows], False),
            "fsdd_unheard_speakers": ([load_audio(r.audio, SR) for r in test_fsdd], [r.text for r in test_fsdd], True)}
    mel = LogMel()
    results: dict[str, dict] = {name: {} for name in sets}
    for name, (waves, refs, digits) in sets.items():
        results[name]["clips"] = len(waves)
        results[name]["audio_seconds"] = round(sum(len(w) for w in waves) / SR, 1)
        results[name]["original"] = {"wer": wer(refs, transcribe_whisper(waves), digits)}
        gl = [mel.invert(torch.from_numpy(mel(w)), len(w), seed=a.seed) for w in tqdm(waves, desc=f"griffin-lim {name}", leave=False)]
        results[name]["griffin_lim_true_mel"] = {"wer": wer(refs, transcribe_whisper(gl), digits)}
        print(f"{name}: original WER {results[name]['original']['wer']:.3f}, Griffin-Lim on the true mel "
              f"{results[name]['griffin_lim_true_mel']['wer']:.3f}")

    # -- one piper-joe vocoder per k, trained on Piper's own speech of train sentences -------------
    texts = sorted({r.text for r in train})  # train-split sentences (never a test sentence), spoken by Piper itself
    texts = random.Random(a.seed).sample(texts, min(a.vocoder_texts, len(texts)))
    kinds = [v.strip() for v in a.vocoders.split(",") if v.strip()]
    fit_waves = None
    fits = {}
    for k, (tok, folder) in tokenizers.items():
        for kind in kinds:
            voc_dir = work / f"vocoder_{kind}_k{k}"
            t0 = time.perf_counter()
            if kind == "piper-joe":
                vocoder, fit = fit_piper_joe(tok, texts, a.steps, stft_steps=a.stft_steps, seed=a.seed, units_folder=folder)
            elif kind == "griffin-lim":
                fit_waves = fit_waves or [load_audio(r.audio, SR) for r in fit_rows]
                vocoder, fit = fit_griffin_lim(tok, fit_waves, a.gl_steps, seed=a.seed, units_folder=folder)
            else:
                raise SystemExit(f"--vocoders: {kind!r} is not piper-joe or griffin-lim")
            vocoder.save_pretrained(voc_dir)
            key = f"units_k{k}_{kind.replace('-', '_')}"
            fits[key] = {**fit, "train_seconds": round(time.perf_counter() - t0, 1), "folder": str(voc_dir)}
            for name, (waves, refs, digits) in sets.items():
                units = tok.encode_batch(waves, dedup=False)
                t1 = time.perf_counter()
                out = [vocoder.decode(u) for u in units]
                decode_s = time.perf_counter() - t1
                made_s = sum(len(w) for w in out) / vocoder.sampling_rate
                resyn = [resample(w, vocoder.sampling_rate, SR) for w in out]
                results[name][key] = {"wer": wer(refs, transcribe_whisper(resyn), digits), "vocoder_x_real_time": round(made_s / decode_s, 1)}
                r = results[name][key]
                print(f"{name} k={k} {kind}: resynthesis WER {r['wer']:.3f} (original {results[name]['original']['wer']:.3f}), "
                      f"vocoder {r['vocoder_x_real_time']:.0f}x real time", flush=True)
    for name in sets:
        base = results[name]["original"]["wer"]
        for key, r in results[name].items():
            if key.startswith("units_k"):
                r["wer_minus_original"] = round(r["wer"] - base, 4)
    report = {"sets": results, "vocoder_fits": fits, "ks": ks, "train_voices": train_voices, "test_voices": test_voices,
              "fit_fsdd_speakers": a.fit_speakers, "test_fsdd_speakers": a.test_speakers, "vocoder_texts": len(texts),
              "target": "resynthesis WER <= original + 0.05 on held-out voices; vocoder >= 20x real time on 2 cores",
              **footer(started)}
    print(f"wrote {write_report(a.out, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
