"""earful's one trainer: a small loop of our own, read top to bottom in `train()`.

AdamW, linear warm-up then cosine decay (train/optim.py), gradient accumulation and clipping,
bf16 autocast on CUDA (fp32 on CPU), periodic evaluation, a progress bar, metrics to JSON Lines,
TensorBoard and W&B (train/runlog.py), and resumable checkpoints written atomically
(train/checkpoint.py). One loop serves both model families: each hands it a model, batches and
a `Family` (train/family.py) that computes its losses: `model.kind: listening` from
train/listening.py, `model.kind: units` from train/units.py. `train.objective: dpo` is
train/preference.py; several processes (DDP, FSDP2) are train/parallel.py.

The trainer evaluates text ability and generates eval answers, but defines neither: the caller
passes them as `Hooks` (`earful train` passes eval's), so train/ imports nothing from eval/.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic
from ..data.dataset import infinite_batches, length_grouped_batches
from . import checkpoint
from .family import Family, Parts
from .listening import distill_loss, listening_parts
from .losses import batch_weight
from .optim import make_optimizer, warmup_cosine, warmup_steps
from .parallel import compile_blocks, finish_distributed, full_trainable_state, held_bytes, init_distributed, micro_step, wrap
from .preference import dpo_loss, evaluate_dpo
from .recipe import Recipe
from .runlog import RunLog, record_rejects
from .units import units_parts
from .recipe import RecipeError

logger = logging.getLogger(__name__)


@dataclass
class Hooks:
    """Evaluations a run uses but train/ does not define: its caller passes them (`earful train`
    passes eval's). Without a text-ability scorer the text gate is off; without an answer
    generator no samples are logged; either way the run says so when the recipe asked for it."""

    text_ability: Callable[..., dict] | None = None  # (causal LM, tokenizer) -> text-only scores (eval.text_ability.text_ability)
    text_regression: Callable[[dict, dict], dict] | None = None  # (before, after) -> text_nll_increase, mc_accuracy_drop
    generate_text: Callable[..., list[str]] | None = None  # (model, processor, waves, prompts, max_new_tokens) -> answers


class TextAbilityRegression(RuntimeError):
    """The LLM lost more text ability in training than the recipe allows."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"train.device={name} but CUDA is not available here; use auto or cpu")
    return device


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked (auto = bf16 there); fp32 on CPU, where bf16 is slow."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cpu":
        logger.warning("precision=bf16 on CPU: autocast is slow there; fp32 is the default for a reason")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False, *, hooks: Hooks | None = None) -> dict:
    """Train per `recipe`, write the trained model as a `save_pretrained` folder at `out_dir`.

    `hooks`: the text-ability scorer and answer generator (`Hooks`); none by default.
    Returns the run summary (also written to `out_dir/train_summary.json`).
    """
    hooks = hooks or Hooks()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = recipe.train
    ckpt = checkpoint.latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        checkpoint.check_same_run(ckpt, recipe.to_dict())  # before any model loads
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    rank, world = init_distributed()
    device = _device_of_rank(t.device, world)
    amp = autocast_for(device, t.precision)
    main_rank = rank == 0  # only rank 0 writes logs and the model
    fsdp = world > 1 and t.parallel == "fsdp"

    # -- model and data ------------------------------------------------------------------------
    parts = units_parts(recipe, device) if recipe.model.kind == "units" else listening_parts(recipe, device, out_dir)
    model, family, train_batches, eval_batches = parts.model, parts.family, parts.train_batches, parts.eval_batches
    if main_rank:
        record_rejects(out_dir, parts.rejects)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if world > 1 and t.distill_weight:
        raise RecipeError("train.distill_weight runs on one process here (DDP and FSDP cover sft and dpo)")
    gate = TextGate.start(recipe, parts, hooks, out_dir, resume) if main_rank else None  # the LLM's text-only scores before
    samples = _sampler(t, parts, hooks) if main_rank and not fsdp else None  # under FSDP the model is in shards

    # -- several processes: DDP or FSDP2 around a module whose forward is the loss -------------
    if t.compile:
        compile_blocks(model)
    loss_fn, figure = objective(t, family)
    runner = None
    if world > 1:
        if fsdp and family.prefix_cache is not None:
            family.prefix_cache = None  # each rank would build it at its own moment: FSDP needs every rank in step
            logger.warning("train.prefix_cache: true -> off, because train.parallel=fsdp (every rank must run each block together)")
        runner = wrap(model, loss_fn, t.parallel, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP replaces them by shards
    optimizer = make_optimizer(t.optimizer, trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps(t), t.max_steps)

    # -- resume --------------------------------------------------------------------------------
    at = checkpoint.resume(ckpt, out_dir, model, optimizer, scheduler, world) if resume else checkpoint.Position()
    step, epoch, next_batch = at.step, at.epoch, at.next_batch
    log = RunLog(out_dir, recipe, step, active=main_rank)

    # -- the loop ------------------------------------------------------------------------------
    batches = infinite_batches(train_batches.lengths(), t.batch_size, t.seed, epoch, next_batch)
    durations = parts.durations
    start_time = time.perf_counter() - at.elapsed_s  # elapsed_s and train_seconds carry over a resume
    audio_seconds = at.audio_seconds
    eval_loss = None
    bar = tqdm(total=t.max_steps, initial=step, desc="training", unit="step", disable=not main_rank)
    while step < t.max_steps:
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            epoch, b, idx = next(batches)
            train_batches.epoch = epoch  # data.augment draws anew each epoch (train/listening.py Batcher)
            if runner is None:
                batch = train_batches(idx)
                with amp:
                    loss, aux = loss_fn(model, batch) if figure else (loss_fn(model, batch), None)
                loss = loss / t.grad_accum
                loss.backward()
                loss_sum += loss.item()
            else:  # the same gradient as one process: each micro-batch's mean / grad_accum, weighted as the loss weights
                loss, aux = micro_step(runner, train_batches, idx, rank, world, amp, scale=1 / t.grad_accum,
                                       token_weights=family.token_weights)
                loss_sum += loss / t.grad_accum
            audio_seconds += sum(durations[i] for i in idx)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        next_batch = b + 1  # position of the next batch (in `epoch`), for an exact resume
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if step % t.log_every == 0 or step == t.max_steps:
            elapsed = time.perf_counter() - start_time
            log.record({"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "epoch": epoch, "elapsed_s": round(elapsed, 2), "audio_s_per_s": round(audio_seconds / max(elapsed, 1e-9), 2),
                        **({figure: float(aux)} if figure else {})})
        if eval_batches and (main_rank or fsdp) and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            # Under FSDP every rank runs it: each block is gathered from all of them.
            eval_loss = evaluate(t, family, model, eval_batches, amp, runner if fsdp else None)
            if fsdp:
                runner.reshard()  # FSDP leaves the root's gathered weights in place after a forward without backward
            log.record({"step": step, "eval_loss": eval_loss})
            if samples:
                log.samples(samples(), step)
            if main_rank:
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            at = checkpoint.Position(step, epoch, next_batch, time.perf_counter() - start_time, audio_seconds)
            checkpoint.save_checkpoint(out_dir, step, model, optimizer, checkpoint.run_state(at, scheduler, recipe.to_dict(), world), main_rank)
    bar.close()
    train_seconds = time.perf_counter() - start_time
    if world > 1:
        _log_memory(rank, model, optimizer)
    if fsdp:
        model = _gather_whole(model, parts, main_rank)
    if not main_rank:
        finish_distributed()
        return {"steps": step, "rank": rank, "final_loss": loss_sum}

    # -- the trained model ---------------------------------------------------------------------
    parts.save(model, out_dir)
    summary = {"steps": step, "train_seconds": round(train_seconds, 2), "final_loss": loss_sum, "eval_loss": eval_loss,
               "trainable_parameters": n_trainable, "train_utterances": parts.n_utterances, "train_examples": len(durations),
               "skipped_clips": len(parts.rejects),
               "audio_seconds_per_second": round(audio_seconds / max(train_seconds, 1e-9), 2), "recipe": recipe.to_dict()}
    failed = gate.finish(model, step, summary, log) if gate else []  # the saved model's LLM (LoRA merged)
    log.close()
    summary["world_size"] = world
    summary["parallel"] = t.parallel if world > 1 else None
    atomic.write_json(out_dir / "train_summary.json", summary)
    checkpoint.remove_checkpoints(out_dir)  # the finished model supersedes them
    finish_distributed()
    if failed:
        raise TextAbilityRegression(f"{out_dir}: the LLM lost text ability in training: {'; '.join(failed)} "
                                    f"(the model is saved; see train_summary.json)")
    return summary


def _device_of_rank(name: str, world: int) -> torch.device:
    """train.device; under torchrun on CUDA, this rank's own GPU (LOCAL_RANK)."""
    device = pick_device(name)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def objective(t, family: Family) -> tuple[Callable, str | None]:
    """train.objective's loss of one micro-batch, `(model, batch) -> loss`, and the name of the
    figure logged beside it (the loss then returns `(loss, figure)`), or None."""
    if t.objective == "dpo":
        return (lambda m, batch: dpo_loss(family, m, batch, t.dpo_beta)), "reward_margin"
    if t.distill_weight:
        return (lambda m, batch: distill_loss(m, batch, t.distill_weight)), "distill_kl"
    return family.loss, None


def evaluate(t, family: Family, model, batcher, amp, runner=None) -> float:
    """The eval set's loss for train.objective: DPO's over its pairs, else the token loss."""
    if t.objective != "sft":
        return evaluate_dpo(family, model, batcher, t.batch_size, t.dpo_beta, amp, runner)
    return evaluate_loss(family, model, batcher, t.batch_size, amp, runner)


@torch.no_grad()
def evaluate_loss(family: Family, model, batcher, batch_size: int, amp, runner=None) -> float:
    """Mean token loss over the whole eval set (weighted as the training loss is); through `runner` (FSDP) when given."""
    model.eval()
    total, tokens = 0.0, 0.0
    for idx in length_grouped_batches(batcher.lengths(), batch_size, seed=0, shuffle=False):
        batch = batcher(idx)
        with amp:
            loss = runner(batch) if runner is not None else family.loss(model, batch)
        n = batch_weight(batch, family.token_weights)  # the loss is a mean over these
        total += float(loss) * n
        tokens += n
    family.train_mode(model)
    return total / max(tokens, 1e-8)


def _sampler(t, parts: Parts, hooks: Hooks) -> Callable[[], list[dict]] | None:
    """What logs eval samples at each evaluation (train.log_samples), or None."""
    if not (parts.samples and t.log_samples):
        return None
    if hooks.generate_text is None:
        logger.warning("train.log_samples: %d -> 0, because train() was given no answer generator (hooks.generate_text; "
                       "`earful train` passes eval's)", t.log_samples)
        return None
    return lambda: parts.samples(t.log_samples, hooks.generate_text)


class TextGate:
    """The text-ability gate (train.text_gate): the LLM's text-only scores (`hooks.text_ability`)
    before training and after, and the run failed when they fell past the recipe's limits."""

    def __init__(self, recipe: Recipe, parts: Parts, hooks: Hooks, before: dict):
        self.recipe, self.parts, self.hooks, self.before = recipe, parts, hooks, before

    @classmethod
    def start(cls, recipe: Recipe, parts: Parts, hooks: Hooks, out_dir: Path, resume: bool) -> TextGate | None:
        """The gate with the scores before training, or None when it is off."""
        if not _text_gate_on(recipe, parts):
            return None
        if hooks.text_ability is None or hooks.text_regression is None:
            logger.warning("train.text_gate: %s -> off, because train() was given no text-ability scorer (hooks.text_ability; "
                           "`earful train` passes eval's)", recipe.train.text_gate)
            return None
        before_path = out_dir / "text_ability_before.json"
        if resume and before_path.exists():
            before = json.loads(before_path.read_text())
        else:
            # Layer dropping happened already: "before" is the pretrained LLM only when no layer was dropped.
            before = hooks.text_ability(*parts.text_model(parts.model))
            atomic.write_json(before_path, before)
        logger.info("text ability before training: %s", before)
        return cls(recipe, parts, hooks, before)

    def finish(self, model, step: int, summary: dict, log: RunLog) -> list[str]:
        """Score `model` after training into `summary` and `log`; the limits it broke, if any."""
        after = self.hooks.text_ability(*self.parts.text_model(model))
        change = self.hooks.text_regression(self.before, after)
        summary["text_ability"] = {"before": self.before, "after": after, **change}
        log.record({"step": step, **{f"text_{k}" if not k.startswith("text") else k: v for k, v in change.items()}})
        logger.info("text ability after training: %s (%s)", after, change)
        t = self.recipe.train
        limits = ((t.max_text_nll_increase, "text_nll_increase", "held-out text NLL rose"),
                  (t.max_mc_accuracy_drop, "mc_accuracy_drop", "multiple-choice accuracy fell"))
        failed = [f"{what} by {change[key]:g} (limit {limit:g})" for limit, key, what in limits if limit is not None and change[key] > limit]
        summary["text_gate_passed"] = not failed
        return failed


def _text_gate_on(recipe: Recipe, parts: Parts) -> bool:
    if parts.text_model is None or recipe.train.text_gate == "off":
        return False
    if recipe.train.text_gate == "on":
        return True
    llm = parts.text_model(parts.model)[0]
    return any(p.requires_grad for p in llm.parameters()) or recipe.model.keep_every_nth_layer > 1


def _log_memory(rank: int, model, optimizer) -> None:
    import resource

    held = held_bytes(model, optimizer)
    logger.info("rank %d holds %s; peak RSS %.0f MB", rank, ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in held.items()),
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _gather_whole(model, parts: Parts, main_rank: bool):
    """FSDP: the trained weights gathered into a whole model on rank 0 (collective; the shards elsewhere)."""
    full = full_trainable_state(model)
    if not main_rank:
        return model
    whole = parts.rebuild()
    unexpected = whole.load_state_dict(full, strict=False).unexpected_keys
    missing = {n for n, p in whole.named_parameters() if p.requires_grad} - set(full)
    if unexpected or missing:
        raise RuntimeError(f"FSDP: gathered weights do not fit the rebuilt model ({sorted(missing)[:3]} {unexpected[:3]})")
    return whole
