""".venv/bin/python benchmarks/units.py [--steps 150] [--k 100] [--threads 1] [--lr 0.001]

Discrete speech LMs on FSDD, leave-one-speaker-out (train: george, jackson, lucas, nicolas;
held out: yweweler, the spine benchmark's fold), all in one run:

1. Tokenizer throughput: the unit tokenizer (Whisper tiny.en, last layer, k-means k=--k with
   faiss, fitted on the four training speakers) tokenising all 2,500 clips, batch 16 and batch 1,
   as audio seconds per wall second.
2. A units LM for speech continuation (`recipes/units_continuation.yaml`: the bundled SmolLM2 with
   sound tokens, speech-only sequences) trained on the four speakers, then scored on pairs built
   from the held-out speaker's 500 clips. Correct: a clip's own units. Wrong: the same units in a
   shuffled order (re-drawn until no unit repeats its neighbour, since training units are
   deduplicated). Both have the same length and the same unit counts, so neither a unigram model
   nor the untrained model (whose new sound tokens all start at the same mean embedding) can tell
   them apart: only a model that learnt how speech units follow one another wins. Another
   speaker's unrelated clip would be no "wrong" answer at all, it is just as natural speech.
   Chance is 0.5; the same pairs are scored by the same model before training, in the same run.
3. A units LM for ASR (`recipes/units_asr.yaml`) trained on the four speakers and scored on the
   held-out speaker's 500 clips (Whisper-normalised WER / accuracy), beside the listening LM's
   figure from benchmarks/results/heldout_speaker.json (same fold, same four training speakers).

CPU threads: torch runs with --threads (default 1: on a shared 2-core machine two threads were
~10x slower per step than one, from contention). Writes benchmarks/results/units.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reporting import footer, write_report  # noqa: E402

from earful.audio import load_audio  # noqa: E402
from earful.data.fsdd import default_fsdd_dir, fsdd_utterances  # noqa: E402
from earful.data.manifest import write_manifest  # noqa: E402
from earful.eval.pairs import score_pairs  # noqa: E402
from earful.eval.text_ability import regression, text_ability  # noqa: E402
from earful.eval.units_asr import evaluate_units_asr  # noqa: E402
from earful.models.vocab import UnitLM, build_unit_lm  # noqa: E402
from earful.tokenizers.unit_lm import load_unit_lm  # noqa: E402
from earful.tokenizers.units import fit_unit_tokenizers  # noqa: E402
from earful.train.recipe import load_recipe  # noqa: E402
from earful.train.trainer import Hooks, train  # noqa: E402
from earful.train.units import tokenize_audio  # noqa: E402

logger = logging.getLogger("units_benchmark")
TRAIN_SPEAKERS = ["george", "jackson", "lucas", "nicolas"]
HELDOUT = "yweweler"


def shuffled(units: list[int], rng: random.Random, tries: int = 200) -> list[int] | None:
    """The same units in another order with no unit next to itself; None if no such order was drawn."""
    for _ in range(tries):
        s = units[:]
        rng.shuffle(s)
        if s != units and all(a != b for a, b in zip(s, s[1:])):
            return s
    return None


def throughput(tok, utts, batch_size: int) -> dict:
    waves = [load_audio(u.audio, tok.sampling_rate) for u in utts]  # decoding files is not the tokenizer's cost
    seconds = sum(len(w) for w in waves) / tok.sampling_rate
    start = time.perf_counter()
    for s in range(0, len(waves), batch_size):
        tok.encode_batch(waves[s : s + batch_size])
    wall = time.perf_counter() - start
    return {"clips": len(waves), "audio_seconds": round(seconds, 1), "wall_seconds": round(wall, 2),
            "audio_seconds_per_second": round(seconds / wall, 1), "batch_size": batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each LM")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, help="peak learning rate of both LMs (default: the recipes')")
    p.add_argument("--work", default=str(ROOT / "runs" / "units_benchmark"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "units.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run_start = time.perf_counter()

    fsdd = default_fsdd_dir()
    train_utts, held = fsdd_utterances(fsdd, TRAIN_SPEAKERS), fsdd_utterances(fsdd, [HELDOUT])
    write_manifest(train_utts, work / "train.jsonl")
    write_manifest(held, work / "heldout.jsonl")

    # 1. the unit tokenizer and its throughput -------------------------------------------------
    start = time.perf_counter()
    tok = fit_unit_tokenizers([u.audio for u in train_utts], [args.k], cache_dir=work / "features")[args.k]
    fit_seconds = time.perf_counter() - start
    tok.save_pretrained(work / "tokenizer")
    tput = {"batch_16": throughput(tok, train_utts + held, 16), "batch_1": throughput(tok, held[::5], 1)}
    logger.info("throughput %s", tput)
    held_units = tokenize_audio(tok, held)
    mean_units = sum(map(len, held_units)) / len(held_units)

    # 2. speech continuation: pairs on the held-out speaker ----------------------------------------
    rng = random.Random(0)
    pairs, groups = [], []
    for u, units in zip(held, held_units):
        wrong = shuffled(units, rng)
        if wrong is not None:
            pairs.append((units, wrong))
            groups.append(u.text)  # per digit
    common = ["model.llm=bundled:smollm2-135m-instruct", f"model.audio_tokenizer={work / 'tokenizer'}",
              f"data.train={work / 'train.jsonl'}", "data.eval=null", f"train.max_steps={args.steps}",
              f"train.num_threads={args.threads}", "train.save_every=0", "train.eval_every=0"]
    if args.lr is not None:
        common.append(f"train.lr={args.lr!r}")
    torch.manual_seed(0)  # the trainer seeds the same way before it builds the model
    model, tokenizer, vocab = build_unit_lm("bundled:smollm2-135m-instruct", args.k)
    before = score_pairs(UnitLM(model.eval(), tokenizer, vocab), pairs, groups)
    del model
    recipe = load_recipe(ROOT / "recipes" / "units_continuation.yaml", common)
    start = time.perf_counter()
    hooks = Hooks(text_ability=text_ability, text_regression=regression)  # the text gate, as `earful train` runs it
    cont_summary = train(recipe, work / "continuation", hooks=hooks)
    cont_total = time.perf_counter() - start
    after = score_pairs(load_unit_lm(work / "continuation"), pairs, groups)
    logger.info("pairs accuracy before %.3f after %.3f", before["accuracy"], after["accuracy"])

    # 3. ASR by a units LM --------------------------------------------------------------------------
    recipe = load_recipe(ROOT / "recipes" / "units_asr.yaml", common)
    start = time.perf_counter()
    asr_summary = train(recipe, work / "asr", hooks=hooks)
    asr_total = time.perf_counter() - start
    asr_lm = load_unit_lm(work / "asr")
    asr = evaluate_units_asr(asr_lm, held, held_units)
    write_report(asr, work / "asr_report.json")
    logger.info("units ASR on %s: WER %.3f accuracy %.3f", HELDOUT, asr["wer"], asr["accuracy"])

    spine = json.loads((ROOT / "benchmarks" / "results" / "heldout_speaker.json").read_text())
    listening = next((f["earful"] for f in spine.get("folds", []) if f.get("speaker") == HELDOUT), None)

    def strip(report):
        return {k: v for k, v in report.items() if k != "pairs"}

    result = {
        "split": {"train_speakers": TRAIN_SPEAKERS, "heldout_speaker": HELDOUT, "train_clips": len(train_utts), "heldout_clips": len(held)},
        "tokenizer": {"encoder": tok.encoder_spec, "layer": tok.layer, "k": args.k, "dedup": tok.dedup, "frame_rate": tok.frame_rate,
                      "fit_seconds_including_feature_extraction": round(fit_seconds, 1),
                      "mean_units_per_heldout_clip": round(mean_units, 1), "throughput": tput},
        "continuation_pairs": {
            "what": "correct = a held-out clip's own units; wrong = the same units shuffled (no unit next to itself); summed log-likelihood",
            "chance": 0.5,
            "n_pairs": len(pairs),
            "before_training": strip(before),
            "after_training": strip(after),
            "train": {k: cont_summary[k] for k in ("steps", "train_seconds", "final_loss")} | {"total_seconds": round(cont_total, 1)},
        },
        "units_asr": {
            "wer": asr["wer"], "cer": asr["cer"], "accuracy": asr["accuracy"], "n": asr["n"],
            "train": {k: asr_summary[k] for k in ("steps", "train_seconds", "final_loss")} | {"total_seconds": round(asr_total, 1)},
            "errors": [r for r in asr["utterances"] if not r["correct"]][:20],
        },
        "listening_lm_same_fold": None if listening is None else {
            "accuracy": listening.get("accuracy"), "wer": listening.get("wer"),
            "source": "benchmarks/results/heldout_speaker.json (recipes/digits.yaml)"},
        "total_seconds": round(time.perf_counter() - run_start, 1),
        **footer(run_start),
    }
    write_report(args.out, result)
    print(json.dumps({k: result[k] for k in ("tokenizer", "listening_lm_same_fold")}, indent=2))
    print(f"pairs: before {before['accuracy']:.3f}  after {after['accuracy']:.3f}  (chance 0.5, n={len(pairs)})")
    print(f"units ASR on {HELDOUT}: WER {asr['wer']:.3f}  accuracy {asr['accuracy']:.3f}")


if __name__ == "__main__":
    main()
