"""earful's one trainer: a small loop of our own, read top to bottom in `train()`.

AdamW, linear warm-up then cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA
(fp32 on CPU), periodic evaluation, a progress bar, metrics to JSON Lines and TensorBoard, and
resumable checkpoints written atomically. When the encoder is frozen its outputs are computed
once, before the first step, and reused every epoch (SlamKit's lesson: never pay twice for a
frozen stage). One loop serves both model families: `model.kind: listening` takes its parts from
`listening_parts`, `model.kind: units` (sound tokens in the LLM, audio tokenised once) from
`units_parts` (train/units.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic
from ..data.dataset import SpeechDataset, infinite_batches, length_grouped_batches, prompt_of, response_of, usable_utterances
from ..data.manifest import read_manifest
from ..models.build import build_speech_lm, load_speech_lm, save_speech_lm
from ..models.encoders import stacked_lengths
from ..models.listening import SpeechLMForConditionalGeneration
from ..models.processing import PromptFormat, SpeechLMProcessor
from .recipe import Recipe

logger = logging.getLogger(__name__)

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


def warn_upcast(key: str, spec: str) -> None:
    """Parts are trained in float32 (master weights; bf16 is autocast on CUDA): say so when the
    weights of model.`key` are stored in a lower precision."""
    from transformers import AutoConfig

    from ..pretrained import resolve

    stored = getattr(AutoConfig.from_pretrained(resolve(spec)), "dtype", None)
    if stored is not None and stored != torch.float32 and str(stored) not in ("float32", "torch.float32"):
        logger.warning("model.%s=%s: weights stored as %s -> loaded and trained as float32", key, spec, str(stored).removeprefix("torch."))


def build_model(recipe: Recipe) -> tuple[SpeechLMForConditionalGeneration, SpeechLMProcessor]:
    m = recipe.model
    if m.init_from:
        model, processor = load_speech_lm(m.init_from)
    else:
        warn_upcast("encoder", m.encoder)
        warn_upcast("llm", m.llm)
        model, processor = build_speech_lm(
            m.encoder,
            m.llm,
            stack_factor=m.stack_factor,
            projector_hidden_size=m.projector_hidden_size,
            projector_dropout=m.projector_dropout,
            audio_norm=m.audio_norm,
            prompt_format=PromptFormat(system_prompt=m.system_prompt, use_chat_template=m.chat_template),
        )
    processor.prompt_format.default_prompt = recipe.data.prompt  # saved with the model, reused by transcribe/eval
    if m.keep_every_nth_layer > 1:
        from .adapt import drop_layers

        drop_layers(model.language_model, m.keep_every_nth_layer)
        model.config.text_config = model.language_model.config
    model.freeze(encoder=m.freeze_encoder, projector=m.freeze_projector, decoder=m.freeze_decoder)
    if m.lora:
        from .adapt import add_lora

        # LoRA trains adapters instead of the part itself: its base weights freeze, whatever freeze_* says.
        for part in (("llm", "encoder") if m.lora == "both" else (m.lora,)):
            key = {"llm": "freeze_decoder", "encoder": "freeze_encoder"}[part]
            if not getattr(m, key):
                logger.warning("model.lora=%s: model.%s false -> true for the %s's base weights (only its LoRA adapters train)",
                               m.lora, key, part)
            getattr(model, {"llm": "language_model", "encoder": "audio_tower"}[part]).requires_grad_(False)
            add_lora(model, part, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout)
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model, processor


class Batcher:
    """Turns utterance indices into model inputs, through the encoder cache when there is one."""

    def __init__(self, dataset: SpeechDataset, processor: SpeechLMProcessor, model: SpeechLMForConditionalGeneration, device: torch.device, cache: bool):
        self.dataset, self.processor, self.model, self.device = dataset, processor, model, device
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    @torch.no_grad()
    def fill_cache(self, batch_size: int, desc: str, store: str | None = None) -> None:
        """Run the frozen encoder once over every clip, longest first (little padding).

        With `store` (a folder `earful data encode` filled), clips this encoder already encoded
        there are read instead; the rest (other clips, speed-perturbed copies) are encoded here.
        """
        todo = list(range(len(self.dataset)))
        if store:
            from ..data.shards import encoder_identity, find_objects

            n = len(self.dataset.utterances)
            found = find_objects(store, encoder_identity(self.model.audio_tower, self.model.config.encoder_config),
                                 [self.dataset.utterance(i).audio for i in range(n)] if self.dataset.speeds[0] == 1.0 else [])
            for i, tensor in found.items():
                self.cache[i] = tensor
            todo = [i for i in todo if i not in found]
            logger.info("%s: %d of %d clips read from %s, %d to encode", desc, len(found), len(self.dataset), store, len(todo))
        lengths = self.dataset.lengths()
        order = length_grouped_batches([lengths[i] for i in todo], batch_size, seed=0, shuffle=False)
        order = [[todo[j] for j in b] for b in order]
        self.model.audio_tower.eval()
        for idx in tqdm(order, desc=desc, unit="batch", leave=False):
            items = [self.dataset[i] for i in idx]
            feats = self.processor.featurize([it["audio"] for it in items])
            hidden, mask = self.model.encode_audio(feats["input_features"].to(self.device), feats["input_features_mask"].to(self.device))
            for j, i in enumerate(idx):
                self.cache[i] = hidden[j, : int(mask[j].sum())].to("cpu", torch.float32).clone()

    def lengths(self) -> list[float]:
        return self.dataset.lengths()

    def teacher_batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """The same turns as text for the text-only LLM: each `<|audio|>` replaced by its transcript."""
        from ..models.configuration import AUDIO_TOKEN

        rows, labels = [], []
        for i in idx:
            u = self.dataset.utterance(i)
            if not u.text:
                raise ValueError(f"{u.audio}: distillation needs each clip's transcript (the manifest's text)")
            prompt = prompt_of(u, self.dataset.default_prompt).replace(AUDIO_TOKEN, u.text)
            ids = self.processor.conversation_ids([{"role": "user", "content": prompt}], [])
            answer = self.processor.response_ids(response_of(u))
            rows.append(ids + answer)
            labels.append([-100] * len(ids) + answer)
        batch = self.processor.pad(rows, "right")
        batch["labels"] = self.processor.pad(labels, "right", pad_id=-100)["input_ids"]
        return {k: v.to(self.device) for k, v in batch.items()}

    def __call__(self, idx: list[int], responses: list[str] | None = None) -> dict[str, torch.Tensor]:
        utts = [self.dataset.utterance(i) for i in idx]
        prompts = [prompt_of(u, self.dataset.default_prompt) for u in utts]
        responses = responses if responses is not None else [response_of(u) for u in utts]
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


class PreferenceBatcher:
    """DPO batches for the listening family: each clip with its chosen and its rejected answer.

    The reference model is the model as it starts; its log-probabilities of every pair are
    computed once, before the first step (it never changes), like the frozen encoder's outputs.
    """

    def __init__(self, batcher: Batcher, model, batch_size: int, desc: str):
        self.batcher, self.dataset = batcher, batcher.dataset
        check_pairs(self.dataset.utterances)
        self.reference = reference_logprobs(model, self._pair, self.lengths(), batch_size, desc)
        if batcher.cache is not None:
            model.audio_tower.eval()

    def lengths(self) -> list[float]:
        return self.dataset.lengths()

    def _pair(self, idx):
        utts = [self.dataset.utterance(i) for i in idx]
        return self.batcher(idx, [u.chosen for u in utts]), self.batcher(idx, [u.rejected for u in utts])

    def __call__(self, idx: list[int]) -> dict:
        return preference_batch(self._pair(idx), self.reference, idx)


def check_pairs(utterances: list) -> None:
    """DPO needs a chosen and a rejected answer on every manifest row."""
    missing = [u.id or u.audio for u in utterances if not (u.chosen and u.rejected)]
    if missing:
        from ..data.manifest import ManifestError

        raise ManifestError(f"train.objective=dpo needs chosen and rejected answers on every manifest row; missing on {missing[:3]}")


@torch.no_grad()
def reference_logprobs(model, pair: Callable, lengths: list[float], batch_size: int, desc: str) -> dict[int, tuple[float, float]]:
    """Each pair's (chosen, rejected) log-probability under `model` as it is now: DPO's reference,
    computed once. `pair(idx)` gives the two batches of those pairs."""
    reference = {}
    was_training = model.training
    model.eval()
    for idx in tqdm(length_grouped_batches(lengths, batch_size, seed=0, shuffle=False), desc=desc, unit="batch", leave=False):
        c, r = pair(idx)
        lc, lr = sequence_logprobs(model, c), sequence_logprobs(model, r)
        for j, i in enumerate(idx):
            reference[i] = (float(lc[j]), float(lr[j]))
    model.train(was_training)
    return reference


def preference_batch(pair: tuple[dict, dict], reference: dict, idx: list[int]) -> dict:
    ref = torch.tensor([reference[i] for i in idx], dtype=torch.float32)
    return {"chosen": pair[0], "rejected": pair[1], "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) summed log-probability of each row's labelled tokens (its answer), from the logits at
    labelled positions only (`labelled_logits` of either family, as the training loss uses)."""
    if hasattr(model, "labelled_logits"):  # the listening LM
        logits, targets, rows = model.labelled_logits(**batch)
    else:
        from .units import labelled_logits

        logits, targets, rows = labelled_logits(model, **batch)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    return torch.zeros(batch["labels"].shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def distill_loss(model, batch: dict, teacher: dict, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - w) * next-token loss + w * KL(teacher || student) on the answer's tokens (Ultravox).

    The teacher is the LLM reading the transcript as text, the student the same LLM hearing the
    audio; both predict the same answer tokens, position for position.
    """
    from peft import PeftModel

    labels = batch["labels"]
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    keep = labels[:, 1:] != -100
    student = out.logits[:, :-1][keep].float()  # (N, V)
    llm = model.language_model
    with torch.no_grad(), (llm.disable_adapter() if isinstance(llm, PeftModel) else nullcontext()):
        t_logits = llm(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"]).logits
    t_keep = teacher["labels"][:, 1:] != -100
    target = t_logits[:, :-1][t_keep].float()  # (N, V), the same answer tokens in the same order
    if target.shape != student.shape:
        raise RuntimeError(f"teacher and student answers differ in length ({target.shape[0]} vs {student.shape[0]} tokens)")
    kl = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(target, -1), log_target=True, reduction="batchmean")
    ce = torch.nn.functional.cross_entropy(student, labels[:, 1:][keep])
    return (1 - weight) * ce + weight * kl, kl.detach()


def dpo_loss(model, batch: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * (policy margin - reference margin)); also the mean reward margin."""
    pc, pr = sequence_logprobs(model, batch["chosen"]), sequence_logprobs(model, batch["rejected"])
    margin = (pc - batch["ref_chosen"].to(pc.device)) - (pr - batch["ref_rejected"].to(pr.device))
    return -torch.nn.functional.logsigmoid(beta * margin).mean(), (beta * margin).detach().mean()


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' AdamW8bit (block-wise 8-bit moments; CPU and CUDA)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'earful[lowmem]'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _warmup_cosine_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then a half cosine to 0 at `total`: transformers'
    get_cosine_schedule_with_warmup, step for step (a test holds them equal). Importing that one
    costs every training process ~2 s (transformers.optimization pulls in the Trainer's utilities,
    peft and bitsandbytes with it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_warmup_cosine_factor, warmup=warmup, total=total))


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


def loss_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token loss of a batch, for either model family."""
    weights = getattr(model, "token_weights", None)  # train.loss_weights, set by the trainer
    if hasattr(model, "training_loss"):  # the listening LM
        return model.training_loss(**batch, prefix_cache=getattr(model, "prefix_cache", None), token_weights=weights)
    from .units import causal_lm_loss

    return causal_lm_loss(model, **batch, token_weights=weights)


@torch.no_grad()
def evaluate_dpo(model, batcher, batch_size: int, beta: float, amp, runner=None) -> float:
    """Mean DPO loss over the eval pairs; through `runner` (FSDP) when given."""
    model.eval()
    losses = []
    for idx in length_grouped_batches(batcher.lengths(), batch_size, seed=0, shuffle=False):
        with amp:
            loss = (runner if runner is not None else lambda b: dpo_loss(model, b, beta))(batcher(idx))[0]
        losses += [float(loss)] * len(idx)
    model.train()
    if getattr(getattr(batcher, "batcher", None), "cache", None) is not None:
        model.audio_tower.eval()  # the listening family's frozen encoder stays in eval mode
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def evaluate_loss(model, batcher, batch_size: int, amp, runner=None) -> float:
    """Mean token loss over the whole eval set (weighted as the training loss is); through `runner` (FSDP) when given."""
    from .losses import batch_weight

    model.eval()
    total, tokens = 0.0, 0.0
    for idx in length_grouped_batches(batcher.lengths(), batch_size, seed=0, shuffle=False):
        batch = batcher(idx)
        with amp:
            loss = runner(batch) if runner is not None else loss_of(model, batch)
        n = batch_weight(batch, getattr(model, "token_weights", None))  # the loss is a mean over these
        total += float(loss) * n
        tokens += n
    model.train()
    if batcher.cache is not None:
        model.audio_tower.eval()
    return total / max(tokens, 1e-8)


@dataclass
class Parts:
    """What the training loop needs from a model family."""

    model: torch.nn.Module
    train_batches: Callable  # indices -> a batch on the device; .lengths() groups batches by length
    eval_batches: Callable | None
    durations: list[float]  # audio seconds of each training example (for the audio_s_per_s log)
    n_utterances: int
    save: Callable[[torch.nn.Module, Path], None]  # (model, out) writes the trained model as a save_pretrained folder
    rebuild: Callable[[], torch.nn.Module]  # the same model, built afresh and whole (FSDP gathers the trained weights into it)
    text_model: Callable[[torch.nn.Module], tuple] | None = None  # model -> (causal LM, tokenizer) for the text-ability gate
    samples: Callable[[int], list[dict]] | None = None  # n -> eval clips with audio, reference and the model's answer
    token_weights: Callable[[dict], object] | None = None  # train.loss_weights -> losses.TokenWeights for this family
    rejects: list[dict] = field(default_factory=list)  # manifest clips left out as unusable (data.dataset.usable_utterances)


class TextAbilityRegression(RuntimeError):
    """The LLM lost more text ability in training than the recipe allows."""


def _text_gate_on(recipe: Recipe, model: torch.nn.Module, parts: Parts) -> bool:
    if parts.text_model is None or recipe.train.text_gate == "off":
        return False
    if recipe.train.text_gate == "on":
        return True
    llm = parts.text_model(model)[0]
    return any(p.requires_grad for p in llm.parameters()) or recipe.model.keep_every_nth_layer > 1


def _check_trainable(model: torch.nn.Module) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("every part is frozen: unfreeze the projector, encoder or decoder in the recipe")
    logger.info("trainable parameters: %.2fM of %.1fM", sum(p.numel() for p in trainable) / 1e6,
                sum(p.numel() for p in model.parameters()) / 1e6)


def listening_parts(recipe: Recipe, device: torch.device) -> Parts:
    """Encoder -> projector -> LLM; a frozen encoder's outputs are computed once and cached."""
    t = recipe.train
    model, processor = build_model(recipe)
    model.to(device).train()
    if _prefix_cache_on(recipe, model):
        from ..models.listening import PrefixCache

        model.prefix_cache = PrefixCache(model)  # a frozen LLM: the shared prompt prefix is run once, not every step
    encoder_fixed = recipe.model.freeze_encoder and recipe.model.lora not in ("encoder", "both")
    if encoder_fixed:
        model.audio_tower.eval()  # a frozen encoder runs without dropout, so its outputs can be cached
    _check_trainable(model)

    sr, d = processor.sampling_rate, recipe.data
    from ..models.processing import check_audio_length

    fits = partial(check_audio_length, processor.feature_extractor, model.config.encoder_config)  # what the encoder can take
    train_utts, rejects = usable_utterances(read_manifest(d.train), sr, d.max_seconds, d.train, fits)
    train_set = SpeechDataset(train_utts, sr, d.prompt, d.max_seconds, d.speed_perturb)
    eval_set = None
    if d.eval:
        eval_utts, eval_rejects = usable_utterances(read_manifest(d.eval), sr, d.max_seconds, d.eval, fits)
        eval_set, rejects = SpeechDataset(eval_utts, sr, d.prompt, d.max_seconds), rejects + eval_rejects
    cache = encoder_fixed
    train_batches = Batcher(train_set, processor, model, device, cache)
    eval_batches = Batcher(eval_set, processor, model, device, cache) if eval_set else None
    if cache:
        start = time.perf_counter()
        train_batches.fill_cache(t.batch_size, "encoding train audio (frozen encoder, once)", recipe.data.encoded)
        if eval_batches:
            eval_batches.fill_cache(t.batch_size, "encoding eval audio (frozen encoder, once)", recipe.data.encoded)
        logger.info("cached frozen encoder outputs in %.1f s", time.perf_counter() - start)
    if recipe.train.objective == "dpo":
        train_batches = PreferenceBatcher(train_batches, model, t.batch_size, "reference log-probs of train pairs (once)")
        eval_batches = PreferenceBatcher(eval_batches, model, t.batch_size, "reference log-probs of eval pairs (once)") if eval_batches else None
    return Parts(model, train_batches, eval_batches, train_set.lengths(), len(train_set.utterances),
                 lambda m, out: save_final(m, processor, out), lambda: build_model(recipe)[0],
                 text_model=lambda m: (m.language_model, processor.tokenizer),
                 samples=(lambda n: _listening_samples(model, processor, eval_set, n)) if eval_set else None,
                 token_weights=lambda w: _weights(w, {processor.tokenizer.eos_token_id}), rejects=rejects)


def _prefix_cache_on(recipe: Recipe, model) -> bool:
    """train.prefix_cache holds when the LLM is frozen and runs without activation checkpointing;
    otherwise the cache is off, and a recipe that asked for it is told why."""
    if not recipe.train.prefix_cache:
        return False
    why = []
    if any(p.requires_grad for p in model.language_model.parameters()):
        why.append("the LLM trains (model.freeze_decoder=false or model.lora on the llm)")
    if recipe.model.gradient_checkpointing:
        why.append("model.gradient_checkpointing=true")
    if why:
        logger.warning("train.prefix_cache: true -> off, because %s", " and ".join(why))
    return not why


def _weights(weights: dict, special_ids: set, **sound):
    from .losses import TokenWeights

    return TokenWeights(weights, {i for i in special_ids if i is not None}, **sound)


@torch.no_grad()
def _listening_samples(model, processor: SpeechLMProcessor, dataset: SpeechDataset, n: int) -> list[dict]:
    from ..eval.asr import generate_text

    items = [dataset[i] for i in range(min(n, len(dataset)))]
    was_training = model.training
    model.eval()
    try:
        answers = generate_text(model, processor, [it["audio"] for it in items], [it["prompt"] for it in items], max_new_tokens=32)
    finally:
        model.train(was_training)
        if not any(p.requires_grad for p in model.audio_tower.parameters()):
            model.audio_tower.eval()  # a frozen encoder stays in eval mode, as when its outputs were cached
    return [{"audio": it["audio"], "sampling_rate": dataset.sampling_rate, "reference": it["response"], "answer": a}
            for it, a in zip(items, answers)]


def units_parts(recipe: Recipe, device: torch.device) -> Parts:
    """Sound tokens in a causal LM; the audio is tokenised once, before the first step."""
    from .units import UnitsBatcher, UnitsPreferenceBatcher, build_units_lm, save_units

    lm = build_units_lm(recipe)
    lm.model.to(device).train()
    _check_trainable(lm.model)
    batcher = UnitsPreferenceBatcher if recipe.train.objective == "dpo" else UnitsBatcher
    train_batches = batcher(lm, recipe, recipe.data.train, device, "tokenising train audio (once)")
    eval_batches = batcher(lm, recipe, recipe.data.eval, device, "tokenising eval audio (once)") if recipe.data.eval else None
    v = lm.vocab
    specials = {v.sound_start_id, v.sound_end_id, v.text_start_id, v.text_end_id, lm.tokenizer.eos_token_id}
    per_frame = lm.audio_tokenizer.tokens_per_frame if lm.audio_tokenizer is not None else 1
    return Parts(lm.model, train_batches, eval_batches, train_batches.durations(), len(train_batches.utterances),
                 lambda m, out: save_units(replace(lm, model=m), out), lambda: build_units_lm(recipe).model,
                 text_model=lambda m: (m, lm.tokenizer),  # text-only scores of the LLM whose vocabulary grew
                 token_weights=lambda w: _weights(w, specials, first_unit_id=v.first_unit_id, n_units=v.n_units, tokens_per_frame=per_frame),
                 rejects=train_batches.rejects + (eval_batches.rejects if eval_batches else []))


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False) -> dict:
    """Train per `recipe`, write the trained model as a `save_pretrained` folder at `out_dir`.

    Returns the run summary (also written to `out_dir/train_summary.json`).
    """
    from . import checkpoint
    from .parallel import compile_blocks, finish_distributed, full_trainable_state, held_bytes, init_distributed, micro_step, wrap

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
    device = pick_device(t.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    amp = autocast_for(device, t.precision)
    main_rank = rank == 0  # only rank 0 writes logs and the model
    fsdp = world > 1 and t.parallel == "fsdp"

    # -- model and data ------------------------------------------------------------------------
    parts = units_parts(recipe, device) if recipe.model.kind == "units" else listening_parts(recipe, device)
    model, train_batches, eval_batches = parts.model, parts.train_batches, parts.eval_batches
    if main_rank:
        _record_rejects(out_dir, parts.rejects)
    if t.loss_weights:
        model.token_weights = parts.token_weights(t.loss_weights)
        logger.info("loss weights per token type: %s", model.token_weights.w)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if world > 1 and t.distill_weight:
        raise ValueError("train.distill_weight runs on one process here (DDP and FSDP cover sft and dpo)")

    # -- the text-ability gate: the LLM's text-only scores before training ---------------------
    gate = main_rank and _text_gate_on(recipe, model, parts)
    text_before = None
    if gate:
        from ..eval.text_ability import text_ability

        before_path = out_dir / "text_ability_before.json"
        if resume and before_path.exists():
            text_before = json.loads(before_path.read_text())
        else:
            # Layer dropping happened already: "before" is the pretrained LLM only when no layer was dropped.
            text_before = text_ability(*parts.text_model(model))
            atomic.write_json(before_path, text_before)
        logger.info("text ability before training: %s", text_before)

    # -- several processes: DDP or FSDP2 around a module whose forward is the loss -------------
    if t.compile:
        compile_blocks(model)
    runner = None
    if world > 1:
        if fsdp and getattr(model, "prefix_cache", None) is not None:
            model.prefix_cache = None  # each rank would build it at its own moment: FSDP needs every rank in step
            logger.warning("train.prefix_cache: true -> off, because train.parallel=fsdp (every rank must run each block together)")
        loss_fn = (lambda m, batch: dpo_loss(m, batch, t.dpo_beta)) if t.objective == "dpo" else loss_of
        runner = wrap(model, loss_fn, t.parallel, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP replaces them by shards
    optimizer = make_optimizer(t.optimizer, trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = warmup_cosine(optimizer, _warmup_steps(t), t.max_steps)

    # -- resume --------------------------------------------------------------------------------
    at = _resume(ckpt, out_dir, model, optimizer, scheduler, world) if resume else Position()
    step, epoch, next_batch = at.step, at.epoch, at.next_batch

    from torch.utils.tensorboard import SummaryWriter

    if main_rank:
        _keep_log_until(out_dir / LOG, step)  # a fresh run owns its log; a resumed one drops the rows it will write again
    # One TensorBoard run: events from step + 1 on (a killed run's, an older run's) are purged.
    tb = SummaryWriter(str(out_dir / "tb"), purge_step=step + 1) if main_rank else None
    wb = _wandb_run(recipe, out_dir) if main_rank else None
    log = (out_dir / LOG).open("a", encoding="utf-8") if main_rank else None

    def record(row: dict) -> None:
        if not main_rank:
            return
        log.write(json.dumps(row) + "\n")
        log.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, row["step"])
        if wb is not None:
            wb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def record_samples(at_step: int) -> None:
        if not (main_rank and parts.samples and t.log_samples) or fsdp:  # under FSDP the model is in shards
            return
        rows = parts.samples(t.log_samples)
        for i, r in enumerate(rows):
            tb.add_audio(f"sample_{i}/audio", torch.from_numpy(r["audio"])[None], at_step, sample_rate=r["sampling_rate"])
            tb.add_text(f"sample_{i}/answer", f"reference: {r['reference']}  \nanswer: {r['answer']}", at_step)
        if wb is not None:
            import wandb

            wb.log({"samples": wandb.Table(columns=["audio", "reference", "answer"], data=[
                [wandb.Audio(r["audio"], sample_rate=r["sampling_rate"]), r["reference"], r["answer"]] for r in rows])}, step=at_step)

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
            if runner is None:
                batch = train_batches(idx)
                with amp:
                    if t.objective == "dpo":
                        loss, reward_margin = dpo_loss(model, batch, t.dpo_beta)
                        loss = loss / t.grad_accum
                    elif t.distill_weight:
                        loss, distill_kl = distill_loss(model, batch, train_batches.teacher_batch(idx), t.distill_weight)
                        loss = loss / t.grad_accum
                    else:
                        loss = loss_of(model, batch) / t.grad_accum
                loss.backward()
                loss_sum += loss.item()
            else:  # the same gradient as one process: each micro-batch's mean / grad_accum, weighted as loss_of weights
                loss, reward_margin = micro_step(runner, train_batches, idx, rank, world, amp, scale=1 / t.grad_accum,
                                                 token_weights=getattr(model, "token_weights", None))
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
            record({"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "epoch": epoch, "elapsed_s": round(elapsed, 2), "audio_s_per_s": round(audio_seconds / max(elapsed, 1e-9), 2),
                    **({"reward_margin": float(reward_margin)} if t.objective == "dpo" else {}),
                    **({"distill_kl": float(distill_kl)} if t.distill_weight else {})})
        if eval_batches and (main_rank or fsdp) and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            if t.objective != "sft":
                eval_loss = evaluate_dpo(model, eval_batches, t.batch_size, t.dpo_beta, amp, runner if fsdp else None)
            else:  # under FSDP every rank runs it: each block is gathered from all of them
                eval_loss = evaluate_loss(model, eval_batches, t.batch_size, amp, runner if fsdp else None)
            if fsdp:
                runner.reshard()  # FSDP leaves the root's gathered weights in place after a forward without backward
            record({"step": step, "eval_loss": eval_loss})
            record_samples(step)
            if main_rank:
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            checkpoint.save_checkpoint(out_dir, step, model, optimizer, {
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step, "epoch": epoch,
                "next_batch": next_batch, "world_size": world, "recipe": recipe.to_dict(),
                "elapsed_s": time.perf_counter() - start_time, "audio_seconds": audio_seconds}, main_rank)
    bar.close()
    train_seconds = time.perf_counter() - start_time
    if world > 1:
        import resource

        held = held_bytes(model, optimizer)
        logger.info("rank %d holds %s; peak RSS %.0f MB", rank, ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in held.items()),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if fsdp:  # gather the trained weights into a whole model on rank 0
        full = full_trainable_state(model)
        if main_rank:
            model = parts.rebuild()
            unexpected = model.load_state_dict(full, strict=False).unexpected_keys
            missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(full)
            if unexpected or missing:
                raise RuntimeError(f"FSDP: gathered weights do not fit the rebuilt model ({sorted(missing)[:3]} {unexpected[:3]})")
    if not main_rank:
        finish_distributed()
        return {"steps": step, "rank": rank, "final_loss": loss_sum}
    tb.close()
    log.close()
    if wb is not None:
        wb.finish()

    # -- the trained model ---------------------------------------------------------------------
    parts.save(model, out_dir)
    summary = {"steps": step, "train_seconds": round(train_seconds, 2), "final_loss": loss_sum, "eval_loss": eval_loss,
               "trainable_parameters": n_trainable, "train_utterances": parts.n_utterances, "train_examples": len(durations),
               "skipped_clips": len(parts.rejects),
               "audio_seconds_per_second": round(audio_seconds / max(train_seconds, 1e-9), 2), "recipe": recipe.to_dict()}
    failed = []
    if gate:
        from ..eval.text_ability import regression, text_ability

        text_after = text_ability(*parts.text_model(model))  # the saved model's LLM (LoRA merged)
        change = regression(text_before, text_after)
        summary["text_ability"] = {"before": text_before, "after": text_after, **change}
        with (out_dir / LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{f"text_{k}" if not k.startswith("text") else k: v for k, v in change.items()}}) + "\n")
        logger.info("text ability after training: %s (%s)", text_after, change)
        limits = ((recipe.train.max_text_nll_increase, "text_nll_increase", "held-out text NLL rose"),
                  (recipe.train.max_mc_accuracy_drop, "mc_accuracy_drop", "multiple-choice accuracy fell"))
        failed = [f"{what} by {change[key]:g} (limit {limit:g})" for limit, key, what in limits if limit is not None and change[key] > limit]
        summary["text_gate_passed"] = not failed
    summary["world_size"] = world
    summary["parallel"] = t.parallel if world > 1 else None
    atomic.write_json(out_dir / "train_summary.json", summary)
    checkpoint.remove_checkpoints(out_dir)  # the finished model supersedes them
    finish_distributed()
    if failed:
        raise TextAbilityRegression(f"{out_dir}: the LLM lost text ability in training: {'; '.join(failed)} "
                                    f"(the model is saved; see train_summary.json)")
    return summary


def _warmup_steps(t) -> int:
    """train.warmup_steps, at most max_steps (a longer warm-up would never reach the peak lr)."""
    if t.warmup_steps > t.max_steps:
        logger.warning("train.warmup_steps: %d -> %d, because train.max_steps=%d", t.warmup_steps, t.max_steps, t.max_steps)
    return min(t.warmup_steps, t.max_steps)


@dataclass
class Position:
    """Where a run stands besides its weights, optimizer and schedule: what a checkpoint's extra holds."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0  # the next batch's index in `epoch`
    elapsed_s: float = 0.0  # training seconds so far, over every resume
    audio_seconds: float = 0.0  # audio trained on so far


def _resume(ckpt: Path | None, out_dir: Path, model, optimizer, scheduler, world: int) -> Position:
    """Load checkpoint `ckpt` into model, optimizer, scheduler and RNGs; where it stood."""
    from . import checkpoint

    if ckpt is None:
        logger.warning("--resume: no checkpoint in %s, starting from step 0", out_dir / checkpoint.DIR)
        return Position()
    extra = checkpoint.load_checkpoint(ckpt, model, optimizer)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    logger.info("resumed from %s at step %d (saved by %d process(es), now %d)", ckpt, extra["step"], extra.get("world_size", 1), world)
    return Position(extra["step"], extra["epoch"], extra["next_batch"], extra.get("elapsed_s", 0.0), extra.get("audio_seconds", 0.0))


def _keep_log_until(path: Path, step: int) -> None:
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


def _record_rejects(out_dir: Path, rejects: list[dict], named: int = 20) -> None:
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


def _wandb_run(recipe: Recipe, out_dir: Path):
    """A W&B run when asked for (or, with wandb: auto, when installed and configured by env); else None."""
    choice = recipe.train.wandb
    if choice == "off":
        return None
    try:
        import wandb
    except ImportError:
        if choice != "auto":
            raise RuntimeError(f"train.wandb={choice} but wandb is not installed: pip install 'earful[track]'") from None
        return None
    if choice == "auto" and not any(os.environ.get(k) for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT")):
        return None
    mode = choice if choice != "auto" else os.environ.get("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", recipe.train.wandb_project), dir=str(out_dir), mode=mode,
                      config=recipe.to_dict(), name=out_dir.name)


def save_final(model, processor, out_dir: Path) -> None:
    """Save into a temp folder, then move each file into place: no half-written model file.

    LoRA adapters are merged first, so the folder is an ordinary model that loads without peft.
    """
    from .adapt import has_lora, merge_lora

    if has_lora(model):
        merge_lora(model)
    tmp = out_dir / ".save.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_speech_lm(model, processor, tmp)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
