"""Memory per rank: FSDP2 vs DDP on two torchrun processes, same recipe, same run.

The model is recipes/digits.yaml's with the LLM trained in full (`model.freeze_decoder=false`:
SmolLM2-135M's weights, gradients and AdamW moments all live on every rank under DDP), on FSDD
clips. Each side runs `torchrun --nproc_per_node 2 -m earful train` (gloo, CPU) for --steps
steps; every rank logs the bytes it holds of parameters, trained parameters and optimizer state
(an FSDP shard counts its local part) and its peak RSS. Figures: those per rank, and the ratio
DDP / FSDP. The loss of both is logged too: the same model trained the same way.

    .venv/bin/python benchmarks/train_memory.py [--steps 3] [--batch-size 4] [--clips 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reporting import footer, write_report

ROOT = Path(__file__).resolve().parents[1]
HELD = re.compile(r"rank (\d+) holds parameters ([\d.]+) MB, trained_parameters ([\d.]+) MB, optimizer_state ([\d.]+) MB; peak RSS (\d+) MB")


def run(mode: str, train: Path, work: Path, steps: int, batch_size: int) -> dict:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = work / mode
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "earful", "train", str(ROOT / "recipes" / "digits.yaml"),
           "--out", str(out), "--set", f"data.train={train}", "data.eval=null", f"train.max_steps={steps}",
           f"train.batch_size={batch_size}", "train.warmup_steps=0", "train.save_every=0", "train.log_every=1",
           "train.text_gate=off", "model.freeze_decoder=false", f"train.parallel={mode}", "model.lora=null", "model.audio_norm=null"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{r.stderr[-3000:]}")
    ranks = {}
    for m in HELD.finditer(r.stderr):
        ranks[int(m[1])] = {"parameters_mb": float(m[2]), "trained_parameters_mb": float(m[3]),
                            "optimizer_state_mb": float(m[4]), "peak_rss_mb": int(m[5])}
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"ranks": ranks, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_memory.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    from earful.data.fsdd import default_fsdd_dir, fsdd_utterances
    from earful.data.manifest import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_manifest(fsdd_utterances(default_fsdd_dir(), ["jackson", "lucas"])[: args.clips], work / "train.jsonl")
        result = {mode: run(mode, work / "train.jsonl", work, args.steps, args.batch_size) for mode in ("ddp", "fsdp")}

    def per_rank(mode: str, key: str) -> float:
        return max(r[key] for r in result[mode]["ranks"].values())

    keys = ("parameters_mb", "trained_parameters_mb", "optimizer_state_mb", "peak_rss_mb")
    report = {
        "what": "bytes held per rank, 2 torchrun processes (gloo, CPU), digits recipe with the LLM trained in full",
        "steps": args.steps, "batch_size": args.batch_size, "clips": args.clips,
        **result,
        "ddp_over_fsdp": {k: round(per_rank("ddp", k) / max(per_rank("fsdp", k), 1e-9), 2) for k in keys},
        **footer(started),
    }
    write_report(args.out, report)
    for k in keys:
        print(f"{k:24s} ddp {per_rank('ddp', k):9.1f}  fsdp {per_rank('fsdp', k):9.1f}  ratio {report['ddp_over_fsdp'][k]}")
    print("losses ddp ", [round(x, 4) for x in result["ddp"]["losses"]])
    print("losses fsdp", [round(x, 4) for x in result["fsdp"]["losses"]])
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
