""".venv/bin/python benchmarks/digit_strings.py   # all five folds

Leave-one-speaker-out connected digit strings on FSDD (the TIDIGITS task: PINs, phone numbers):
can earful's strings recipe (`recipes/digit_strings.yaml`) transcribe "four one seven" from a
voice it never heard, with every digit, in order, none added or dropped? Strings are built by
`earful.data.digit_strings` (what `earful data prepare fsdd-strings` runs): 3-7 digits drawn
uniformly (repeats such as "one one" at their natural rate), one speaker's recordings joined with
50-300 ms silences. Each fold trains on `--count` strings of each of the other four speakers (plus
their 2,000 single digits with `--with-digits`) and scores `--test-count` strings of the held-out
speaker (default 100: each of its 500 recordings used about once). Three systems transcribe the
same held-out strings:

- earful: `recipes/digit_strings.yaml` trained from scratch on the fold's strings through the
  Python API, with `data.eval=null` (no periodic evaluation inside the timed loop) plus any
  `--set` overrides, then transcribed by `earful.eval.asr.evaluate_asr` with the recipe's prompt.
- whisper_tiny_zero_shot: the bundled Whisper tiny.en weights earful listens with, as plain ASR
  with no training: 30 s padded features, greedy `generate(max_new_tokens=48)`. It writes digits
  as numerals ("4, 1, 7." or "417"); the digit-word normaliser below spells them out.
- pocketsphinx_grammar: pocketsphinx's default US English model restricted by a JSGF grammar to
  one or more digit words (`<digit>+`), each string padded with 0.3 s more silence at both ends.
  It can only ever answer digits: the classical baseline for this closed task.

Figures. Both sides go through `earful.eval.asr.normalize_digit_words`: every digit its own
word, lower case, punctuation gone ("417", "4-1-7" and "four one seven" are the same three
words); nothing else is rewritten ("oh" is not taken for "zero"). Whisper's English normaliser is
not used: it folds "four one seven" into "417", one word, which would hide errors inside a
string. `string_accuracy` is the share of strings whose normalised hypothesis equals the
normalised reference; `wer` is jiwer's corpus WER over the same words, with its `substitutions`,
`deletions` and `insertions`; `cer` is jiwer's CER. `by_length` gives string accuracy per number
of digits, `with_repeat` over the strings that hold one digit twice in a row. For earful,
`train_seconds` is the trainer's loop time and `total_seconds` the wall time around `train()`;
peers' `seconds` is their transcription time (model loading under `machine`).

Target: WER <= 1 % and string accuracy >= 95 % on every held-out speaker. `meets_target` is true
only if every fold scored all of its strings (not under `--limit`), earful met both on every
fold, and the peers ran in the same run; `checks` says which condition failed.

Development speakers. This recipe takes its parts from `recipes/digits.yaml`, whose choices were
read on the folds `heldout_speaker.DEVELOPMENT_SPEAKERS` names; those folds are marked
`development` here too, and the `headline` is over the other folds only.

Options: `--folds` (default `all`, or a comma list of speakers); `--limit N` scores only the first
N held-out strings (a quick check, never a result); `--set KEY=VALUE` overrides the recipe (e.g.
`--set train.max_steps=3`); `--skip-peers` runs earful alone. Strings go to `--work/strings/`,
each fold's manifests and model to `--work/SPEAKER/`; weights are deleted after scoring unless
`--keep`. FSDD is read from $EARFUL_FSDD or ../shared/data/fsdd.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

from heldout_speaker import DEVELOPMENT_SPEAKERS, SAMPLING_RATE, SPEAKERS, PocketsphinxPeer, WhisperPeer, fsdd_dir, parse_folds
from reporting import footer, write_report

logger = logging.getLogger("digit_strings")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digit_strings.yaml"
TARGET = {"wer": 0.01, "string_accuracy": 0.95}
MIN_DIGITS, MAX_DIGITS = 3, 7
TRAIN_SEED, TEST_SEED = 0, 1  # the held-out speaker is never in training; distinct seeds are hygiene
MAX_NEW_TOKENS = 48  # earful: one token per digit word; Whisper: a numeral and a comma per digit at most
MAX_ERRORS_KEPT = 30
DIGIT_LOOP_GRAMMAR = (
    "#JSGF V1.0;\ngrammar digit_strings;\n"
    "public <digits> = <digit>+;\n"
    "<digit> = zero | one | two | three | four | five | six | seven | eight | nine;\n"
)


# -- data --------------------------------------------------------------------------------------
def prepare(folder: Path, manifest: Path, speakers: list[str], count: int | None, seed: int) -> list:
    """Strings of `speakers` (each seeded by (seed, speaker): the same in every fold and run)."""
    from earful.data.digit_strings import prepare_digit_strings
    from earful.data.manifest import read_manifest

    s = prepare_digit_strings(folder, manifest, speakers, min_digits=MIN_DIGITS, max_digits=MAX_DIGITS, count=count, seed=seed)
    logger.info("%s: %d strings of %s, %.1f min", manifest, s.strings, ", ".join(speakers), s.seconds / 60)
    return read_manifest(manifest)


# -- scoring -----------------------------------------------------------------------------------
def score(utterances: list, hypotheses: list[str]) -> dict:
    """String accuracy, WER with its substitutions / deletions / insertions, CER: digit words on both sides."""
    import jiwer

    from earful.eval.asr import normalize_digit_words, word_errors

    refs = [normalize_digit_words(u.text) for u in utterances]
    hyps = [normalize_digit_words(h) for h in hypotheses]
    correct = [r == h for r, h in zip(refs, hyps)]
    lengths = [len(r.split()) for r in refs]
    repeat = [any(a == b for a, b in pairwise(r.split())) for r in refs]
    by_length = {}
    for n in sorted(set(lengths)):
        ok = [c for c, k in zip(correct, lengths) if k == n]
        by_length[str(n)] = {"n": len(ok), "string_accuracy": sum(ok) / len(ok)}
    with_repeat = [c for c, rep in zip(correct, repeat) if rep]
    errors = [{"id": u.id, "reference": r, "hypothesis": h, "raw": raw}
              for u, r, h, raw, ok in zip(utterances, refs, hyps, hypotheses, correct) if not ok]
    return {"string_accuracy": sum(correct) / len(correct), **word_errors(refs, hyps), "cer": jiwer.cer(refs, hyps),
            "n": len(correct), "by_length": by_length,
            "with_repeat": {"n": len(with_repeat), "string_accuracy": sum(with_repeat) / len(with_repeat) if with_repeat else None},
            "n_errors": len(errors), "errors": errors[:MAX_ERRORS_KEPT]}


# -- earful ------------------------------------------------------------------------------------
def run_earful(speaker: str, train_utts: list, test_utts: list, work: Path, extra: list[str], keep: bool,
               init_from: Path | None = None) -> dict:
    from earful.data.manifest import write_manifest
    from earful.eval.asr import evaluate_asr
    from earful.models.build import load_speech_lm
    from earful.train.recipe import load_recipe
    from earful.train.trainer import train

    fold_dir = work / speaker
    train_manifest = fold_dir / "train.jsonl"
    write_manifest(train_utts, train_manifest)
    write_manifest(test_utts, fold_dir / "test.jsonl")  # what was scored, for a later `earful eval asr --normalize digits`
    start_from = [f"model.init_from={init_from}"] if init_from else []
    recipe = load_recipe(RECIPE, [f"data.train={train_manifest}", "data.eval=null", *start_from, *extra])

    model_dir = fold_dir / "model"
    start = time.perf_counter()
    summary = train(recipe, model_dir)
    total_seconds = time.perf_counter() - start
    logger.info("%s: trained %d steps, loop %.0f s, total %.0f s", speaker, summary["steps"], summary["train_seconds"], total_seconds)

    model, processor = load_speech_lm(model_dir)
    report = evaluate_asr(model, processor, test_utts, prompt=recipe.data.prompt, batch_size=16,
                          max_new_tokens=MAX_NEW_TOKENS, normalizer="digits")
    del model, processor
    gc.collect()
    if not keep:
        for weights in model_dir.glob("model*.safetensors"):
            weights.unlink()
    if report["rejected"]:
        logger.warning("%s: %d held-out strings could not be read: %s", speaker, report["rejected"], report["rejects"][:3])
    by_id = {u.id: u for u in test_utts}
    scored = score([by_id[r["id"]] for r in report["utterances"]], [r["hypothesis"] for r in report["utterances"]])
    return {**scored, "train_seconds": summary["train_seconds"], "total_seconds": round(total_seconds, 2),
            "steps": summary["steps"], "final_loss": summary["final_loss"], "eval_seconds": report["seconds"],
            "rejected": report["rejected"], "text_gate_passed": summary.get("text_gate_passed")}


# -- peers -------------------------------------------------------------------------------------
def whisper_peer() -> WhisperPeer:
    """heldout_speaker's Whisper tiny.en peer, with room for a 7-digit string."""
    return WhisperPeer(max_new_tokens=MAX_NEW_TOKENS)


def pocketsphinx_peer() -> PocketsphinxPeer:
    """heldout_speaker's pocketsphinx peer on a digit-loop grammar (`<digit>+`)."""
    return PocketsphinxPeer(DIGIT_LOOP_GRAMMAR, "digit_strings", "pocketsphinx digit loop", "string")


def run_peer(peer, utterances: list, waves: list[np.ndarray]) -> dict:
    start = time.perf_counter()
    hyps = peer.transcribe(waves)
    seconds = time.perf_counter() - start
    return {**score(utterances, hyps), "seconds": round(seconds, 2)}


# -- the benchmark -----------------------------------------------------------------------------
def summarise(folds: list[dict], skip_peers: bool) -> dict:
    systems = ["earful"] + ([] if skip_peers else ["whisper_tiny_zero_shot", "pocketsphinx_grammar"])
    mean = {s: {k: float(np.mean([f[s][k] for f in folds])) for k in ("string_accuracy", "wer")} for s in systems}
    worst = {"string_accuracy": min(f["earful"]["string_accuracy"] for f in folds), "wer": max(f["earful"]["wer"] for f in folds)}
    checks = {
        "scored_all_strings": all(f["earful"]["n"] == f["strings"] for f in folds),  # --limit or unreadable strings
        "wer_every_fold": worst["wer"] <= TARGET["wer"],
        "string_accuracy_every_fold": worst["string_accuracy"] >= TARGET["string_accuracy"],
        "peers_in_same_run": not skip_peers,
    }
    test = [f for f in folds if f["speaker"] not in DEVELOPMENT_SPEAKERS]
    headline = {"test_speakers": [f["speaker"] for f in test],
                "development_speakers": {f["speaker"]: "recipes/digits.yaml, whose parts this recipe takes: " + DEVELOPMENT_SPEAKERS[f["speaker"]]
                                         for f in folds if f["speaker"] in DEVELOPMENT_SPEAKERS}}
    if test:
        for s in systems:
            headline[f"mean_string_accuracy_{s}"] = float(np.mean([f[s]["string_accuracy"] for f in test]))
            headline[f"mean_wer_{s}"] = float(np.mean([f[s]["wer"] for f in test]))
        headline["min_string_accuracy_earful"] = min(f["earful"]["string_accuracy"] for f in test)
        headline["max_wer_earful"] = max(f["earful"]["wer"] for f in test)
    return {"headline": headline, "mean": mean, "worst_earful": worst,
            "max_train_seconds_earful": max(f["earful"]["train_seconds"] for f in folds),
            "target": TARGET, "meets_target": all(checks.values()), "checks": checks}


def print_table(result: dict) -> None:
    peers = "whisper_tiny_zero_shot" in result["mean"]
    head = f"{'held out':<10} {'n':>4} {'earful acc':>10} {'WER':>6} {'S/D/I':>9} {'train s':>8}"
    if peers:
        head += f" {'whisper acc':>11} {'WER':>6} {'sphinx acc':>10} {'WER':>6}"
    print(head)
    for f in result["folds"]:
        e = f["earful"]
        name = f["speaker"] + ("*" if f.get("development") else "")
        sdi = f"{e['substitutions']}/{e['deletions']}/{e['insertions']}"
        line = f"{name:<10} {e['n']:>4} {e['string_accuracy']:>10.4f} {e['wer']:>6.3f} {sdi:>9} {e['train_seconds']:>8.0f}"
        if peers:
            w, p = f["whisper_tiny_zero_shot"], f["pocketsphinx_grammar"]
            line += f" {w['string_accuracy']:>11.4f} {w['wer']:>6.3f} {p['string_accuracy']:>10.4f} {p['wer']:>6.3f}"
        print(line)
    m = result["mean"]
    line = f"{'mean':<10} {'':>4} {m['earful']['string_accuracy']:>10.4f} {m['earful']['wer']:>6.3f} {'':>9} {'':>8}"
    if peers:
        w, p = m["whisper_tiny_zero_shot"], m["pocketsphinx_grammar"]
        line += f" {w['string_accuracy']:>11.4f} {w['wer']:>6.3f} {p['string_accuracy']:>10.4f} {p['wer']:>6.3f}"
    print(line)
    h = result["headline"]
    if "min_string_accuracy_earful" in h:
        print(f"headline over never-used folds ({', '.join(h['test_speakers'])}): earful mean string accuracy "
              f"{h['mean_string_accuracy_earful']:.4f} (min {h['min_string_accuracy_earful']:.4f}), mean WER {h['mean_wer_earful']:.4f} "
              f"(max {h['max_wer_earful']:.4f})")
    print("* development speaker (used to choose recipes/digits.yaml): " + (", ".join(h["development_speakers"]) or "none in this run"))
    failed = [k for k, ok in result["checks"].items() if not ok]
    print(f"target: WER <= {TARGET['wer']:.0%} and string accuracy >= {TARGET['string_accuracy']:.0%} every fold, peers in the same run: "
          f"{'met' if result['meets_target'] else 'NOT met (' + ', '.join(failed) + ')'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", default="all", help="held-out speakers, comma-separated, or 'all' (default all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digit_strings.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_digit_strings"), help="strings, manifests and trained models")
    parser.add_argument("--count", type=int, default=400, help="training strings per training speaker (default 400)")
    parser.add_argument("--test-count", type=int, default=100, help="held-out strings per fold (default 100: each recording about once)")
    parser.add_argument("--with-digits", action="store_true", help="train on the training speakers' single digits too")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="recipe overrides, as for `earful train`")
    parser.add_argument("--limit", type=int, help="score only the first N held-out strings (quick checks)")
    parser.add_argument("--skip-peers", action="store_true", help="run earful only")
    parser.add_argument("--keep", action="store_true", help="keep each fold's trained weights")
    parser.add_argument("--init-from-work", type=Path, metavar="DIR",
                        help="start each fold from DIR/SPEAKER/model: the single-digit model benchmarks/heldout_speaker.py "
                             "trained without that speaker (`--keep --work DIR`); a curriculum, words before strings")
    args = parser.parse_args()
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' notices would drown the run's progress
    hf_logging.disable_progress_bar()

    from importlib.metadata import version

    from earful.audio import load_audio
    from earful.data.fsdd import fsdd_utterances
    from earful.train.recipe import RecipeError, load_recipe

    speakers = parse_folds(args.folds)
    for name, value in (("--limit", args.limit), ("--count", args.count), ("--test-count", args.test_count)):
        if value is not None and value < 1:
            sys.exit(f"{name}: expected a positive number of strings, found {value}")
    try:
        load_recipe(RECIPE, ["data.train=check.jsonl", "data.eval=null", *args.set])  # fail before any work
    except RecipeError as e:
        sys.exit(f"--set: {e}")
    init = {s: (args.init_from_work / s / "model" if args.init_from_work else None) for s in speakers}
    missing = [str(p) for p in init.values() if p is not None and not (p / "config.json").is_file()]
    if missing:
        sys.exit(f"--init-from-work: no trained model at {', '.join(missing)}; run benchmarks/heldout_speaker.py --keep --work DIR first")
    folder = fsdd_dir()
    train_speakers = sorted({s for held in speakers for s in SPEAKERS if s != held})
    train_pool = prepare(folder, args.work / "strings" / "train.jsonl", train_speakers, args.count, TRAIN_SEED)
    test_pool = prepare(folder, args.work / "strings" / "test.jsonl", speakers, args.test_count, TEST_SEED)
    digits = fsdd_utterances(folder, train_speakers) if args.with_digits else []
    peers = {} if args.skip_peers else {"whisper_tiny_zero_shot": whisper_peer(), "pocketsphinx_grammar": pocketsphinx_peer()}

    folds = []
    for speaker in speakers:
        logger.info("fold: %s held out", speaker)
        train_utts = [u for u in train_pool + digits if u.speaker != speaker]
        strings = [u for u in test_pool if u.speaker == speaker]
        test_utts = strings[: args.limit] if args.limit else strings
        fold = {"speaker": speaker, "development": speaker in DEVELOPMENT_SPEAKERS,
                "train_strings": sum(u.speaker != speaker for u in train_pool), "train_single_digits": sum(u.speaker != speaker for u in digits),
                "strings": len(strings), "scored_strings": len(test_utts),
                "earful": run_earful(speaker, train_utts, test_utts, args.work, args.set, args.keep, init[speaker])}
        if peers:
            waves = [load_audio(u.audio, SAMPLING_RATE) for u in test_utts]
            for name, peer in peers.items():
                fold[name] = run_peer(peer, test_utts, waves)
                logger.info("%s: %s string accuracy %.4f, WER %.4f", speaker, name, fold[name]["string_accuracy"], fold[name]["wer"])
        folds.append(fold)

    result = {"folds": folds, **summarise(folds, args.skip_peers),
              "recipe": str(RECIPE.relative_to(RECIPE.parents[1])), "overrides": args.set, "limit": args.limit,
              "strings": {"min_digits": MIN_DIGITS, "max_digits": MAX_DIGITS, "train_per_speaker": args.count,
                          "test_per_speaker": args.test_count, "train_seed": TRAIN_SEED, "test_seed": TEST_SEED,
                          "with_single_digits": args.with_digits, "init_from_work": str(args.init_from_work) if args.init_from_work else None, "normalizer": "earful.eval.asr.normalize_digit_words"},
              **footer(started, pocketsphinx=version("pocketsphinx"), jiwer=version("jiwer"),
                       peer_load_seconds={name: round(p.load_seconds, 2) for name, p in peers.items()})}
    write_report(args.out, result)
    print_table(result)
    print(f"wrote {args.out} in {result['runtime_seconds']:.0f} s")


if __name__ == "__main__":
    main()
