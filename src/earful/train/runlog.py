"""Where a run's figures go: OUT/train_log.jsonl, TensorBoard (OUT/tb) and, when asked, W&B.

One `RunLog` per run, on rank 0 only (the other ranks get one that drops everything). A resumed
run keeps one log: the rows and TensorBoard events after the checkpoint's step, which it is about
to write again, are dropped first.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .. import atomic
from .recipe import RecipeError

logger = logging.getLogger(__name__)

LOG = "train_log.jsonl"


class RunLog:
    """Metrics rows to JSON Lines, TensorBoard and W&B; eval samples (audio, reference, answer) to the last two."""

    def __init__(self, out_dir: Path, recipe, step: int, active: bool = True):
        self.active = active
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        keep_log_until(out_dir / LOG, step)  # a fresh run owns its log; a resumed one drops the rows it will write again
        # One TensorBoard run: events from step + 1 on (a killed run's, an older run's) are purged.
        self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=step + 1)
        self.wb = wandb_run(recipe, out_dir)
        self.jsonl = (out_dir / LOG).open("a", encoding="utf-8")

    def record(self, row: dict) -> None:
        """One row: {"step": N, name: value, ...}; every number is also a TensorBoard scalar."""
        if not self.active:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, row["step"])
        if self.wb is not None:
            self.wb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def samples(self, rows: list[dict], step: int) -> None:
        """Eval clips with the model's answers: {"audio", "sampling_rate", "reference", "answer"} each."""
        if not self.active:
            return
        for i, r in enumerate(rows):
            self.tb.add_audio(f"sample_{i}/audio", torch.from_numpy(r["audio"])[None], step, sample_rate=r["sampling_rate"])
            self.tb.add_text(f"sample_{i}/answer", f"reference: {r['reference']}  \nanswer: {r['answer']}", step)
        if self.wb is not None:
            import wandb

            self.wb.log({"samples": wandb.Table(columns=["audio", "reference", "answer"], data=[
                [wandb.Audio(r["audio"], sample_rate=r["sampling_rate"]), r["reference"], r["answer"]] for r in rows])}, step=step)

    def close(self) -> None:
        if not self.active:
            return
        self.tb.close()
        self.jsonl.close()
        if self.wb is not None:
            self.wb.finish()


def keep_log_until(path: Path, step: int) -> None:
    """Drop the rows of the JSON Lines log after `step` (all of them for step 0), and a line a kill cut short."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run, half-written
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(row)
    if rows:
        atomic.write_jsonl(path, rows)
    else:
        path.unlink()


def wandb_run(recipe, out_dir: Path):
    """A W&B run when asked for (or, with wandb: auto, when installed and configured by env); else None."""
    choice = recipe.train.wandb
    if choice == "off":
        return None
    try:
        import wandb
    except ImportError:
        if choice != "auto":
            raise RecipeError(f"train.wandb={choice} but wandb is not installed: pip install 'earful[track]'") from None
        return None
    if choice == "auto" and not any(os.environ.get(k) for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT")):
        return None
    mode = choice if choice != "auto" else os.environ.get("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", recipe.train.wandb_project), dir=str(out_dir), mode=mode,
                      config=recipe.to_dict(), name=out_dir.name)


def record_rejects(out_dir: Path, rejects: list[dict], named: int = 20) -> None:
    """Warn about each manifest clip left out as unusable (the first `named` by name) and list them
    all in OUT/rejects.jsonl; a run with none leaves no such file."""
    path = out_dir / "rejects.jsonl"
    if not rejects:
        path.unlink(missing_ok=True)  # an earlier run's list, of clips since fixed
        return
    for r in rejects[:named]:
        logger.warning("skipping %s (%s): %s", r["audio"], r["error"], r["reason"])
    logger.warning("%d unusable clip(s) left out of training%s; all listed in %s", len(rejects),
                   f" ({len(rejects) - named} more not named here)" if len(rejects) > named else "", path)
    atomic.write_jsonl(path, rejects)
