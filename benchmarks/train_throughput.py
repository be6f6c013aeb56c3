"""Training throughput: earful's trainer vs transformers' `Trainer`, same model, data and batch size, one run.

Two configurations of recipes/digits.yaml (bundled Whisper tiny.en encoder, SmolLM2-135M-Instruct
frozen), each trained by both sides on the same model built by earful's `build_model`:

- `shipped`: the recipe as it ships: LoRA adapters on the encoder (so its outputs change every
  step and nothing can be cached) and per-clip normalisation of the encoder frames;
- `frozen_encoder`: the encoder frozen whole (no LoRA, no normalisation), a trained projector.

The data are FSDD clips of two speakers. Both sides train --steps steps of --batch-size clips with
AdamW at the same learning rate, in fp32 on CPU:

- earful: `earful.train.trainer.train` (a frozen encoder's outputs computed once and cached, batches
  grouped by length, the output layer computed only where a label is, the shared prompt prefix
  run once when the LLM is frozen);
- transformers: `Trainer` over a torch Dataset that featurises each clip, a collator that pads the
  batch with the same processor, and the model's ordinary forward with labels, the way a
  transformers user would write it (no cache, random batches).

Figures: samples/s and audio-seconds/s of the training loop (earful's includes caching the
encoder outputs, which it pays once before the first step; `cache_s` reports that part), and the
ratio, per configuration. Target: >= 2x on each.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--batch-size 16] [--clips 480] [--configs shipped,frozen_encoder]

Padding-free packing (train.packing) is measured apart, earful against itself on utterances of
varied length (the frozen-encoder configuration, rows padded vs packed, everything else alike):

    .venv/bin/python benchmarks/train_throughput.py --packing-data runs/corpus/train.jsonl --out benchmarks/results/packing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from reporting import footer, write_report

ROOT = Path(__file__).resolve().parents[1]
# The measured configurations: recipe overrides of digits.yaml.
CONFIGS = {
    "shipped": [],  # encoder LoRA + utterance normalisation, as users train it
    "frozen_encoder": ["model.lora=null", "model.audio_norm=null"],  # only the projector trains
}
# --packing-data: earful against itself on utterances of varied length, padded rows vs packed ones.
PACKING = {"padded": CONFIGS["frozen_encoder"], "packed": [*CONFIGS["frozen_encoder"], "train.packing=true"]}


def manifest(folder: Path, n: int) -> Path:
    from earful.data.fsdd import default_fsdd_dir, fsdd_utterances
    from earful.data.manifest import write_manifest

    rows = fsdd_utterances(default_fsdd_dir(), ["jackson", "lucas"])[:n]
    path = folder / "train.jsonl"
    write_manifest(rows, path)
    return path


def run_earful(train_manifest: Path, work: Path, steps: int, batch_size: int, lr: float, config: str, extra: list[str] = ()) -> dict:
    from earful.train.recipe import load_recipe
    from earful.train.trainer import train

    overrides = CONFIGS[config] if config in CONFIGS else PACKING[config]
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", [f"data.train={train_manifest}", "data.eval=null", f"train.max_steps={steps}",
                                                            f"train.batch_size={batch_size}", f"train.lr={lr}", "train.warmup_steps=0",
                                                            "train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.text_gate=off",
                                                            "data.no_speech_clips=0", *overrides, *extra])
    start = time.perf_counter()
    summary = train(recipe, work / f"earful-{config}")
    wall = time.perf_counter() - start
    loop = summary["train_seconds"]
    audio = summary["audio_seconds_per_second"] * loop
    return {"wall_s": round(wall, 2), "loop_s": round(loop, 2), "samples_per_s": round(steps * batch_size / wall, 2),
            "loop_samples_per_s": round(steps * batch_size / loop, 2), "audio_s_per_s": round(audio / wall, 2),
            "final_loss": round(summary["final_loss"], 4)}


def run_hf_trainer(train_manifest: Path, work: Path, steps: int, batch_size: int, lr: float, config: str) -> dict:
    from transformers import Trainer, TrainingArguments

    from earful.audio import load_audio
    from earful.data.dataset import prompt_of, response_of
    from earful.data.manifest import read_manifest
    from earful.train.recipe import load_recipe
    from earful.train.listening import build_model

    # The very model earful trains: the same freezing, adapters and normalisation.
    model, processor = build_model(load_recipe(ROOT / "recipes" / "digits.yaml", [f"data.train={train_manifest}", *CONFIGS[config]]))
    utts = read_manifest(train_manifest)

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return len(utts)

        def __getitem__(self, i):
            u = utts[i]
            return {"audio": load_audio(u.audio, processor.sampling_rate), "prompt": prompt_of(u, processor.prompt_format.default_prompt),
                    "response": response_of(u)}

    def collate(items):
        return dict(processor([it["audio"] for it in items], [it["prompt"] for it in items], [it["response"] for it in items]))

    args = TrainingArguments(output_dir=str(work / f"hf-{config}"), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
                             lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Clips(), data_collator=collate)
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    audio = sum(u.duration or 0 for u in utts) / len(utts) * steps * batch_size  # clips drawn uniformly
    return {"wall_s": round(wall, 2), "samples_per_s": round(steps * batch_size / wall, 2), "audio_s_per_s": round(audio / wall, 2),
            "final_loss": round(float(trainer.state.log_history[-2].get("loss", out.training_loss)), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--clips", type=int, default=480, help="training clips (cached by earful before its first step)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--configs", default="shipped,frozen_encoder", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    p.add_argument("--side", choices=("earful", "hf"), help=argparse.SUPPRESS)  # internal: one side, in its own process
    p.add_argument("--config", choices=(*CONFIGS, *PACKING), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--packing-data", help="a manifest of utterances of varied length (e.g. a corpus from `earful data prepare sentences`): "
                                          "measure earful's padded rows against packed ones (train.packing) on it, instead of the above")
    p.add_argument("--pack-tokens", type=int, default=None, help="with --packing-data: train.pack_tokens (default: the batch's longest)")
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:  # each side runs in a fresh process: Trainer/accelerate leave process state that slows what follows
        work = Path(a.work)
        data = Path(a.manifest) if a.manifest else work / "train.jsonl"
        extra = [f"train.pack_tokens={a.pack_tokens}"] if a.pack_tokens and a.config == "packed" else []
        run = run_earful if a.side == "earful" else run_hf_trainer
        result = run(data, work, a.steps, a.batch_size, a.lr, a.config, extra) if a.side == "earful" else \
            run(data, work, a.steps, a.batch_size, a.lr, a.config)
        (work / f"{a.side}-{a.config}.json").write_text(json.dumps(result))
        return 0
    if a.packing_data:
        return packing_report(a)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        p.error(f"--configs: expected a comma-separated list of {', '.join(CONFIGS)}, found {a.configs!r}")
    import subprocess

    started = time.perf_counter()
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest(work, a.clips)
        for config in configs:
            results = {}
            for side in ("hf", "earful"):
                subprocess.run([sys.executable, __file__, "--side", side, "--config", config, "--work", str(work), "--steps", str(a.steps),
                                "--batch-size", str(a.batch_size), "--lr", str(a.lr)], check=True)
                results[side] = json.loads((work / f"{side}-{config}.json").read_text())
            hf, ours = results["hf"], results["earful"]
            ratio = ours["samples_per_s"] / hf["samples_per_s"]
            measured[config] = {"earful": ours, "transformers_trainer": hf, "speedup_samples_per_s": round(ratio, 2), "meets_target": ratio >= 2.0}
            print(f"{config}: transformers Trainer {hf['samples_per_s']} samples/s, earful {ours['samples_per_s']} "
                  f"(loop alone {ours['loop_samples_per_s']}): {ratio:.2f}x")
    report = {
        "configs": measured, "target": 2.0, "meets_target": all(m["meets_target"] for m in measured.values()),
        "steps": a.steps, "batch_size": a.batch_size, "clips": a.clips,
        "model": "recipes/digits.yaml: bundled Whisper tiny.en + SmolLM2-135M-Instruct (frozen) + projector; "
                 "shipped: encoder LoRA r=8 + utterance normalisation; frozen_encoder: the encoder frozen whole",
        **footer(started),
    }
    out = write_report(a.out, report)
    print(f"wrote {out}")
    return 0


def packing_report(a) -> int:
    """earful padded vs earful packed (train.packing), frozen encoder, on --packing-data; each in a fresh process."""
    import subprocess

    from earful.data.manifest import read_manifest, write_manifest

    started = time.perf_counter()
    rows = read_manifest(a.packing_data)[: a.clips]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_manifest(rows, work / "train.jsonl")
        for config in PACKING:
            subprocess.run([sys.executable, __file__, "--side", "earful", "--config", config, "--work", str(work), "--steps", str(a.steps),
                            "--batch-size", str(a.batch_size), "--lr", str(a.lr), *(["--pack-tokens", str(a.pack_tokens)] if a.pack_tokens else [])],
                           check=True)
            results[config] = json.loads((work / f"earful-{config}.json").read_text())
    ratio = results["packed"]["samples_per_s"] / results["padded"]["samples_per_s"]
    seconds = [r.duration for r in rows]
    report = {"padded": results["padded"], "packed": results["packed"], "speedup_samples_per_s": round(ratio, 2),
              "data": str(a.packing_data), "clips": len(rows), "clip_seconds": {"min": round(min(seconds), 2), "max": round(max(seconds), 2),
                                                                               "mean": round(sum(seconds) / len(seconds), 2)},
              "steps": a.steps, "batch_size": a.batch_size, "pack_tokens": a.pack_tokens,
              "model": "recipes/digits.yaml with the encoder frozen whole (outputs cached), batches grouped by length as earful does",
              **footer(started)}
    print(f"padded {results['padded']['samples_per_s']} samples/s, packed {results['packed']['samples_per_s']}: {ratio:.2f}x")
    print(f"wrote {write_report(a.out, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
