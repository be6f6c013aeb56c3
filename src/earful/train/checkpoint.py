"""Resumable checkpoints that any world size can load: torch.distributed.checkpoint (DCP) folders.

`OUT/checkpoints/step-00000050/` holds the trained parameters and the optimizer state, keyed by
parameter name (DCP's `get_state_dict`), each rank writing its own shard, plus `extra.pt` (step,
data position, scheduler, RNG) from rank 0. Because the keys are names, not ranks, a run sharded
over two FSDP processes resumes on one process, or under DDP, and the other way round: DCP
re-shards on load. Frozen parameters are not saved: the recipe rebuilds them.

Written crash-safe: every rank writes into `step-N.tmp/`, rank 0 renames it to `step-N/`, then
replaces the one-line `checkpoints/latest` (temp + rename) and deletes older steps. A kill at any
moment leaves `latest` naming a complete folder, or no `latest` at all.

`extra.pt` also holds the recipe: `--resume` under one that changes the run is refused
(`check_same_run`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..errors import EarfulError
from .parallel import barrier

logger = logging.getLogger(__name__)


class CheckpointError(EarfulError, ValueError):
    """A checkpoint folder that cannot be resumed from (incomplete, or from another recipe)."""


DIR = "checkpoints"
LATEST = "latest"
EXTRA = "extra.pt"


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
                    main_rank: bool) -> Path:
    """Every rank calls this at the same step (DCP is collective); returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out_dir) / DIR
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    if main_rank:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    if main_rank:
        torch.save(extra, tmp / EXTRA)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic.write_text(root / LATEST, final.name + "\n")
        for old in root.iterdir():
            if old.is_dir() and old != final:
                shutil.rmtree(old, ignore_errors=True)  # older steps, and temporaries of killed runs
    barrier()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The folder `checkpoints/latest` names, or None when there is none yet."""
    pointer = Path(out_dir) / DIR / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / EXTRA).exists():
        raise CheckpointError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


# Recipe keys `--resume` lets differ from the checkpoint's: how long the run goes on, how often it
# logs, evaluates and saves, how it is spread over processes and threads, and the end-of-run text
# gate's limits. None of them changes what the steps already taken would compute next.
RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.save_every", "train.eval_every", "train.log_every", "train.num_threads",
    "train.parallel", "train.compile", "train.wandb", "train.wandb_project", "train.log_samples",
    "train.max_text_nll_increase", "train.max_mc_accuracy_drop",
})


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def check_same_run(path: Path, recipe: dict) -> None:
    """Refuse to resume the checkpoint at `path` under a recipe (`Recipe.to_dict()`) that differs
    from the one it was saved with in any setting outside `RESUMABLE_CHANGES`: lr, data, model,
    batch size, seed, ... all change the run, so its steps would no longer be one run's.
    Raises `RecipeError` naming every key that differs, with both values."""
    from .recipe import Recipe, RecipeError

    saved = torch.load(Path(path) / EXTRA, map_location="cpu", weights_only=False).get("recipe")
    if saved is None:  # a checkpoint from before recipes were saved in it
        return
    defaults, saved, now = _flat(Recipe().to_dict()), _flat(saved), _flat(recipe)
    differ = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES
              and saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k))]
    if differ:
        changes = "; ".join(f"{k}: saved {saved.get(k, defaults.get(k))!r}, now {now.get(k, defaults.get(k))!r}" for k in differ)
        raise RecipeError(f"{path}: --resume with a recipe that changes the run ({changes}); resume with the saved "
                          f"settings, or train into a new --out without --resume (may change on resume: "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))})")


def saved_parameter_names(path: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len("model."):] for k in keys if k.startswith("model.")}


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load parameters and optimizer state in place (re-sharded to this run's layout); returns the extra state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    saved = saved_parameter_names(path)
    if saved != set(model_state):
        differ = sorted(saved ^ set(model_state))
        raise CheckpointError(f"{path}: its trained parameters differ from this recipe's ({len(differ)} names, e.g. {differ[:3]})")
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))  # frozen parameters stay as the recipe built them (names checked above)
    return torch.load(path / EXTRA, map_location="cpu", weights_only=False)


def remove_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / DIR, ignore_errors=True)


@dataclass
class Position:
    """Where a run stands besides its weights, optimizer and schedule: what a checkpoint's extra holds."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0  # the next batch's index in `epoch`
    elapsed_s: float = 0.0  # training seconds so far, over every resume
    audio_seconds: float = 0.0  # audio trained on so far


def run_state(at: Position, scheduler, recipe: dict, world: int) -> dict:
    """A checkpoint's extra: the position, the schedule, every RNG and the recipe (`check_same_run`)."""
    return {"scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": at.step, "epoch": at.epoch,
            "next_batch": at.next_batch, "world_size": world, "recipe": recipe, "elapsed_s": at.elapsed_s,
            "audio_seconds": at.audio_seconds}


def resume(ckpt: Path | None, out_dir: Path, model, optimizer, scheduler, world: int) -> Position:
    """Load checkpoint `ckpt` into model, optimizer, scheduler and RNGs; where it stood."""
    if ckpt is None:
        logger.warning("--resume: no checkpoint in %s, starting from step 0", Path(out_dir) / DIR)
        return Position()
    extra = load_checkpoint(ckpt, model, optimizer)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    logger.info("resumed from %s at step %d (saved by %d process(es), now %d)", ckpt, extra["step"], extra.get("world_size", 1), world)
    return Position(extra["step"], extra["epoch"], extra["next_batch"], extra.get("elapsed_s", 0.0), extra.get("audio_seconds", 0.0))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
