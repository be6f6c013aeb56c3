"""earful's one trainer: a small loop of our own, read top to bottom in `train()`.

AdamW, linear warm-up then cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA
(fp32 on CPU), periodic evaluation, a progress bar, metrics to JSON Lines and TensorBoard, and
resumable checkpoints written atomically. When the encoder is frozen its outputs are computed
once, before the first step, and reused every epoch (SlamKit's lesson: never pay twice for a
frozen stage).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..data.dataset import SpeechDataset, infinite_batches, length_grouped_batches, prompt_of, response_of
from ..data.manifest import read_manifest
from ..models.build import build_speech_lm, load_speech_lm, save_speech_lm
from ..models.encoders import stacked_lengths
from ..models.listening import SpeechLMForConditionalGeneration
from ..models.processing import PromptFormat, SpeechLMProcessor
from .recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available here; use auto or cpu")
    return device


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked (auto = bf16 there); fp32 on CPU, where bf16 is slow."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cpu":
        logger.warning("precision=bf16 on CPU: autocast is slow there; fp32 is the default for a reason")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def build_model(recipe: Recipe) -> tuple[SpeechLMForConditionalGeneration, SpeechLMProcessor]:
    m = recipe.model
    if m.init_from:
        model, processor = load_speech_lm(m.init_from)
    else:
        model, processor = build_speech_lm(
            m.encoder,
            m.llm,
            stack_factor=m.stack_factor,
            projector_hidden_size=m.projector_hidden_size,
            projector_dropout=m.projector_dropout,
            prompt_format=PromptFormat(system_prompt=m.system_prompt, use_chat_template=m.chat_template),
        )
    processor.prompt_format.default_prompt = recipe.data.prompt  # saved with the model, reused by transcribe/eval
    model.freeze(encoder=m.freeze_encoder, projector=m.freeze_projector, decoder=m.freeze_decoder)
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model, processor


class Batcher:
    """Turns utterance indices into model inputs, through the encoder cache when there is one."""

    def __init__(self, dataset: SpeechDataset, processor: SpeechLMProcessor, model: SpeechLMForConditionalGeneration, device: torch.device, cache: bool):
        self.dataset, self.processor, self.model, self.device = dataset, processor, model, device
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    @torch.no_grad()
    def fill_cache(self, batch_size: int, desc: str) -> None:
        """Run the frozen encoder once over every clip, longest first (little padding)."""
        order = length_grouped_batches(self.dataset.lengths(), batch_size, seed=0, shuffle=False)
        self.model.audio_tower.eval()
        for idx in tqdm(order, desc=desc, unit="batch", leave=False):
            items = [self.dataset[i] for i in idx]
            feats = self.processor.featurize([it["audio"] for it in items])
            hidden, mask = self.model.encode_audio(feats["input_features"].to(self.device), feats["input_features_mask"].to(self.device))
            for j, i in enumerate(idx):
                self.cache[i] = hidden[j, : int(mask[j].sum())].to("cpu", torch.float32).clone()

    def __call__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        utts = [self.dataset.utterance(i) for i in idx]
        prompts = [prompt_of(u, self.dataset.default_prompt) for u in utts]
        responses = [response_of(u) for u in utts]
        if self.cache is None:
            batch = self.processor([self.dataset[i]["audio"] for i in idx], prompts, responses)
        else:
            hs = [self.cache[i] for i in idx]
            T = max(h.shape[0] for h in hs)
            hidden = torch.zeros(len(hs), T, hs[0].shape[1])
            mask = torch.zeros(len(hs), T, dtype=torch.bool)
            for j, h in enumerate(hs):
                hidden[j, : h.shape[0]] = h
                mask[j, : h.shape[0]] = True
            n_audio = stacked_lengths(mask.sum(-1), self.model.config.stack_factor).tolist()
            batch = self.processor.text_batch(prompts, n_audio, responses)
            batch.update(audio_hidden_states=hidden, audio_hidden_mask=mask)
        return {k: v.to(self.device) for k, v in batch.items()}


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


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


@torch.no_grad()
def evaluate_loss(model, batcher: Batcher, batch_size: int, amp) -> float:
    """Mean token loss over the whole eval set (token-weighted)."""
    model.eval()
    total, tokens = 0.0, 0
    for idx in length_grouped_batches(batcher.dataset.lengths(), batch_size, seed=0, shuffle=False):
        batch = batcher(idx)
        with amp:
            loss = model.training_loss(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(loss) * n
        tokens += n
    model.train()
    if batcher.cache is not None:
        model.audio_tower.eval()
    return total / max(tokens, 1)


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False) -> dict:
    """Train per `recipe`, write the trained model as a `save_pretrained` folder at `out_dir`.

    Returns the run summary (also written to `out_dir/train_summary.json`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    device = pick_device(t.device)
    amp = autocast_for(device, t.precision)

    # -- model and data ------------------------------------------------------------------------
    model, processor = build_model(recipe)
    model.to(device).train()
    if recipe.model.freeze_encoder:
        model.audio_tower.eval()  # a frozen encoder runs without dropout, so its outputs can be cached
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("every part is frozen: unfreeze the projector, encoder or decoder in the recipe")
    n_trainable = sum(p.numel() for p in trainable)
    logger.info("trainable parameters: %.2fM of %.1fM", n_trainable / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)

    sr = processor.sampling_rate
    train_set = SpeechDataset(read_manifest(recipe.data.train), sr, recipe.data.prompt, recipe.data.max_seconds, recipe.data.speed_perturb)
    eval_set = SpeechDataset(read_manifest(recipe.data.eval), sr, recipe.data.prompt, recipe.data.max_seconds) if recipe.data.eval else None
    cache = recipe.model.freeze_encoder
    train_batches = Batcher(train_set, processor, model, device, cache)
    eval_batches = Batcher(eval_set, processor, model, device, cache) if eval_set else None
    if cache:
        start = time.perf_counter()
        train_batches.fill_cache(t.batch_size, "encoding train audio (frozen encoder, once)")
        if eval_batches:
            eval_batches.fill_cache(t.batch_size, "encoding eval audio (frozen encoder, once)")
        logger.info("cached frozen encoder outputs in %.1f s", time.perf_counter() - start)

    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(t.warmup_steps, t.max_steps), t.max_steps)

    # -- resume --------------------------------------------------------------------------------
    step, epoch, next_batch = 0, 0, 0
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        missing = set(ckpt["trainable"]) ^ {n for n, p in model.named_parameters() if p.requires_grad}
        if missing:
            raise ValueError(f"{ckpt_path}: trained parameters differ from this recipe's ({sorted(missing)[:3]}...)")
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        step, epoch, next_batch = ckpt["step"], ckpt["epoch"], ckpt["next_batch"]
        logger.info("resumed from %s at step %d", ckpt_path, step)
    elif resume:
        logger.warning("--resume: no checkpoint at %s, starting from step 0", ckpt_path)
    elif (out_dir / LOG).exists():
        (out_dir / LOG).unlink()  # a fresh run owns its log

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(out_dir / "tb"))
    log = (out_dir / LOG).open("a", encoding="utf-8")

    def record(row: dict) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, row["step"])

    # -- the loop ------------------------------------------------------------------------------
    batches = infinite_batches(train_set.lengths(), t.batch_size, t.seed, epoch, next_batch)
    durations = train_set.lengths()
    start_time = time.perf_counter()
    audio_seconds = 0.0
    eval_loss = None
    bar = tqdm(total=t.max_steps, initial=step, desc="training", unit="step")
    while step < t.max_steps:
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            epoch, b, idx = next(batches)
            batch = train_batches(idx)
            with amp:
                loss = model.training_loss(**batch) / t.grad_accum
            loss.backward()
            loss_sum += loss.item()
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
            record({"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "epoch": epoch, "elapsed_s": round(elapsed, 2), "audio_s_per_s": round(audio_seconds / max(elapsed, 1e-9), 2)})
        if eval_batches and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            eval_loss = evaluate_loss(model, eval_batches, t.batch_size, amp)
            record({"step": step, "eval_loss": eval_loss})
            bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            _atomic_torch_save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step,
                                "epoch": epoch, "next_batch": next_batch, "recipe": recipe.to_dict()}, ckpt_path)
    bar.close()
    train_seconds = time.perf_counter() - start_time
    tb.close()
    log.close()

    # -- the trained model ---------------------------------------------------------------------
    save_final(model, processor, out_dir)
    summary = {"steps": step, "train_seconds": round(train_seconds, 2), "final_loss": loss_sum, "eval_loss": eval_loss,
               "trainable_parameters": n_trainable, "train_utterances": len(train_set.utterances), "train_examples": len(train_set),
               "audio_seconds_per_second": round(audio_seconds / max(train_seconds, 1e-9), 2), "recipe": recipe.to_dict()}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if ckpt_path.exists():
        ckpt_path.unlink()  # the finished model supersedes it
    return summary


def save_final(model, processor, out_dir: Path) -> None:
    """Save into a temp folder, then move each file into place: no half-written model file."""
    tmp = out_dir / ".save.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_speech_lm(model, processor, tmp)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
