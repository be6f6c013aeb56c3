"""Training throughput: earful's trainer vs transformers' `Trainer`, same model, data and batch size, one run.

The model is recipes/digits.yaml's with the encoder frozen whole (bundled Whisper tiny.en encoder
and SmolLM2-135M-Instruct, both frozen, a trained projector; the recipe's encoder LoRA is off); the
data FSDD clips of two speakers. Both sides train --steps steps of --batch-size clips with AdamW at the same learning rate, in fp32 on CPU:

- earful: `earful.train.trainer.train` (frozen encoder outputs computed once and cached, batches
  grouped by length, the output layer computed only where a label is);
- transformers: `Trainer` over a torch Dataset that featurises each clip, a collator that pads the
  batch with the same processor, and the model's ordinary forward with labels, the way a
  transformers user would write it (no cache, random batches).

Figures: samples/s and audio-seconds/s of the training loop (earful's includes caching the
encoder outputs, which it pays once before the first step; `cache_s` reports that part), and the
ratio. Target: >= 2x.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--batch-size 16] [--clips 480]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from earful.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
# The measured configuration: digits.yaml with its encoder frozen whole (no LoRA adapters, no
# per-clip normalisation), so both sides train the same projector on the same frozen parts.
FROZEN_ENCODER = ["model.lora=null", "model.audio_norm=null"]


def manifest(folder: Path, n: int) -> Path:
    from earful.data.fsdd import default_fsdd_dir, fsdd_utterances
    from earful.data.manifest import write_manifest

    rows = fsdd_utterances(default_fsdd_dir(), ["jackson", "lucas"])[:n]
    path = folder / "train.jsonl"
    write_manifest(rows, path)
    return path


def run_earful(train_manifest: Path, work: Path, steps: int, batch_size: int, lr: float) -> dict:
    from earful.train.recipe import load_recipe
    from earful.train.trainer import train

    recipe = load_recipe(ROOT / "recipes" / "digits.yaml", [f"data.train={train_manifest}", "data.eval=null", f"train.max_steps={steps}",
                                                            f"train.batch_size={batch_size}", f"train.lr={lr}", "train.warmup_steps=0",
                                                            "train.save_every=0", "train.eval_every=0", "train.log_every=1", "train.text_gate=off",
                                                            *FROZEN_ENCODER])
    start = time.perf_counter()
    summary = train(recipe, work / "earful")
    wall = time.perf_counter() - start
    loop = summary["train_seconds"]
    audio = summary["audio_seconds_per_second"] * loop
    return {"wall_s": round(wall, 2), "loop_s": round(loop, 2), "samples_per_s": round(steps * batch_size / wall, 2),
            "loop_samples_per_s": round(steps * batch_size / loop, 2), "audio_s_per_s": round(audio / wall, 2),
            "final_loss": round(summary["final_loss"], 4)}


def run_hf_trainer(train_manifest: Path, work: Path, steps: int, batch_size: int, lr: float) -> dict:
    from transformers import Trainer, TrainingArguments

    from earful.audio import load_audio
    from earful.data.dataset import prompt_of, response_of
    from earful.data.manifest import read_manifest
    from earful.models.build import build_speech_lm
    from earful.models.processing import PromptFormat
    from earful.train.recipe import load_recipe

    m = load_recipe(ROOT / "recipes" / "digits.yaml", [f"data.train={train_manifest}", *FROZEN_ENCODER]).model
    model, processor = build_speech_lm(m.encoder, m.llm, stack_factor=m.stack_factor, projector_hidden_size=m.projector_hidden_size,
                                       prompt_format=PromptFormat(system_prompt=m.system_prompt))
    model.freeze(encoder=True, decoder=True)
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

    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
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
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    p.add_argument("--side", choices=("earful", "hf"), help=argparse.SUPPRESS)  # internal: one side, in its own process
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:  # each side runs in a fresh process: Trainer/accelerate leave process state that slows what follows
        work = Path(a.work)
        run = run_earful if a.side == "earful" else run_hf_trainer
        (work / f"{a.side}.json").write_text(json.dumps(run(work / "train.jsonl", work, a.steps, a.batch_size, a.lr)))
        return 0
    import subprocess

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest(work, a.clips)
        for side in ("hf", "earful"):
            subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(a.steps),
                            "--batch-size", str(a.batch_size), "--lr", str(a.lr)], check=True)
            results[side] = json.loads((work / f"{side}.json").read_text())
    hf, ours = results["hf"], results["earful"]
    print(f"transformers Trainer: {hf['samples_per_s']} samples/s")
    print(f"earful: {ours['samples_per_s']} samples/s (loop alone {ours['loop_samples_per_s']})")
    import transformers

    report = {
        "earful": ours, "transformers_trainer": hf,
        "speedup_samples_per_s": round(ours["samples_per_s"] / hf["samples_per_s"], 2),
        "target": 2.0, "meets_target": ours["samples_per_s"] / hf["samples_per_s"] >= 2.0,
        "steps": a.steps, "batch_size": a.batch_size, "clips": a.clips,
        "model": "recipes/digits.yaml: bundled Whisper tiny.en (frozen) + SmolLM2-135M-Instruct (frozen) + projector",
        "machine": {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(a.out)
    write_json(out, report)
    print(f"speed-up {report['speedup_samples_per_s']}x -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
