""".venv/bin/python benchmarks/digits_ablation.py NAME=REPORT.json [NAME=REPORT.json ...]

The ablation table behind `recipes/digits.yaml`: one row per configuration (the recipe with some
part added or taken away) and seed, each a `benchmarks/heldout_speaker.py` report of its own run
(its command, overrides, date and machine load are copied in). Per configuration it gives the
accuracy of every fold it ran, their mean and worst, the refusal rates where the recipe trains a
no-speech answer, and, where a configuration ran with more than one seed, the seed noise: the
spread (max - min) of each fold's accuracy over seeds and of the mean. A difference between two
configurations smaller than that spread is not a finding.

Which folds a configuration ran on is part of the row: the ablations read on the development
speakers only (`heldout_speaker.DEVELOPMENT_SPEAKERS`) say so, and the figures on the other folds
come from the final recipe's runs, never used to choose it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from heldout_speaker import DEVELOPMENT_SPEAKERS
from reporting import footer, write_report


def row(name: str, path: Path) -> dict:
    r = json.loads(path.read_text())
    folds = {f["speaker"]: f["earful"]["accuracy"] for f in r["folds"]}
    refusal = {f["speaker"]: {k: f["earful"]["no_speech"][k] for k in ("refusal_rate", "speech_refusal_rate")}
               for f in r["folds"] if f["earful"].get("no_speech")}
    config, _, seed = name.partition("@")
    return {"config": config, "seed": seed or None, "report": str(path), "overrides": r.get("overrides", []),
            "command": r.get("command"), "date": r.get("date"), "load_average_at_end": r.get("machine", {}).get("load_average_at_end"),
            "accuracy": folds, "mean": float(np.mean(list(folds.values()))), "worst": min(folds.values()),
            "development_only": set(folds) <= set(DEVELOPMENT_SPEAKERS),
            "train_seconds": {f["speaker"]: f["earful"]["train_seconds"] for f in r["folds"]},
            **({"no_speech": refusal} if refusal else {}),
            **({"peers": {f["speaker"]: {p: f[p]["accuracy"] for p in ("whisper_tiny_zero_shot", "pocketsphinx_grammar") if p in f}
                          for f in r["folds"]}} if any("whisper_tiny_zero_shot" in f for f in r["folds"]) else {})}


def seed_noise(rows: list[dict]) -> dict:
    """Per configuration with >= 2 seeds: each shared fold's spread over seeds, and the mean's."""
    noise = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        runs = [r for r in rows if r["config"] == config]
        if len(runs) < 2:
            continue
        shared = sorted(set.intersection(*(set(r["accuracy"]) for r in runs)))
        per_fold = {s: max(r["accuracy"][s] for r in runs) - min(r["accuracy"][s] for r in runs) for s in shared}
        means = [float(np.mean([r["accuracy"][s] for s in shared])) for r in runs]
        noise[config] = {"seeds": [r["seed"] for r in runs], "folds": shared, "spread_per_fold": per_fold,
                         "spread_of_mean": max(means) - min(means), "mean_over_seeds": float(np.mean(means))}
    return noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", metavar="NAME[@SEED]=REPORT", help="a configuration's name (and seed) and its heldout_speaker report")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_ablation.json"))
    parser.add_argument("--note", default="", help="what the reader must know about these runs (machine load, what was decided)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            sys.exit(f"{spec}: expected NAME[@SEED]=REPORT.json with an existing report")
        rows.append(row(name, Path(path)))
    result = {"rows": rows, "seed_noise": seed_noise(rows), "development_speakers": DEVELOPMENT_SPEAKERS, "note": args.note,
              **footer(started)}
    write_report(args.out, result)
    for r in rows:
        folds = "  ".join(f"{s} {a:.3f}" for s, a in sorted(r["accuracy"].items()))
        extra = ""
        if "no_speech" in r:
            extra = "  refusal " + " ".join(f"{v['refusal_rate']:.2f}/{v['speech_refusal_rate']:.3f}" for v in r["no_speech"].values())
        print(f"{r['config'] + ('@' + r['seed'] if r['seed'] else ''):<28} mean {r['mean']:.4f} worst {r['worst']:.3f}  {folds}{extra}")
    for config, n in result["seed_noise"].items():
        print(f"seed noise {config}: mean spread {n['spread_of_mean']:.4f}, per fold " +
              ", ".join(f"{s} {v:.3f}" for s, v in n["spread_per_fold"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
