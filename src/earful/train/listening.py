"""The trainer's parts for the listening family (`model.kind: listening`): encoder -> projector -> LLM.

`listening_parts` builds what the loop in trainer.py needs: the model as the recipe sets it up
(freezing, LoRA, layer dropping), its `Family` (the loss from `labelled_logits`, token weights,
prefix cache), and batchers over the manifests. A frozen encoder's outputs are computed once,
before the first step, and reused every epoch (SlamKit's lesson: never pay twice for a frozen
stage); with a frozen LLM, the prompt prefix every row shares is run once (`PrefixCache`). The
model file (models/listening.py) holds no training code: the loss path, the prefix cache and
freezing are here.

`data.augment` (earful.data.augment) changes training audio only, never eval audio. When the
encoder runs every step, each epoch draws every clip's augmentation afresh, and SpecAugment masks
its log-mel input. When its outputs are cached, the cache must not freeze one draw for the whole
run: `data.augment.copies: K` renders K augmented copies of each clip, encoded once, and epoch e
hears one of them (each clip walks its copies in turn, so K epochs hear all K); SpecAugment then
masks the cached encoder frames (time frames, and channels in the share freq_width is of the mel
bins), drawn afresh each epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..audio import AudioError
from ..data.augment import Augmenter, parse_augment
from ..data.dataset import SpeechDataset, length_grouped_batches, prompt_of, response_of, usable_utterances
from ..data.manifest import read_manifest
from ..models.build import build_speech_lm, load_speech_lm, save_speech_lm
from ..models.encoders import stacked_lengths
from ..models.listening import SpeechLMForConditionalGeneration
from ..models.processing import PromptFormat, SpeechLMProcessor, check_audio_length
from .family import Family, Parts, check_trainable, token_weights, warn_upcast
from .preference import PreferenceBatcher
from .recipe import Recipe, RecipeError
from ..data.manifest import ManifestError

logger = logging.getLogger(__name__)


def build_model(recipe: Recipe) -> tuple[SpeechLMForConditionalGeneration, SpeechLMProcessor]:
    """The listening LM as `recipe.model` sets it up for training: parts frozen, LoRA, layers dropped."""
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
    freeze(model, encoder=m.freeze_encoder, projector=m.freeze_projector, decoder=m.freeze_decoder)
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


def freeze(model: SpeechLMForConditionalGeneration, encoder: bool = False, projector: bool = False, decoder: bool = False) -> None:
    """Turn off gradients of the named parts (model.freeze_encoder, freeze_projector, freeze_decoder)."""
    for part, frozen in ((model.audio_tower, encoder), (model.multi_modal_projector, projector), (model.language_model, decoder)):
        if frozen:
            part.requires_grad_(False)


class PrefixCache:
    """Keys and values of the prompt prefix every training row shares, computed once by a frozen LLM.

    A listening LM's training rows start alike (system prompt, the user turn's opening words) up
    to the first audio position; with the LLM frozen, those positions give the same keys and values
    at every step. `split` finds the shared prefix of a right-padded batch (never past the first
    `<|audio|>`), and returns its length and a cache holding it for every row. Saves roughly the
    prefix's share of the LLM's compute, forward and backward.
    """

    def __init__(self, model: SpeechLMForConditionalGeneration, min_length: int = 4):
        self.model, self.min_length = model, min_length
        self._kv: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        from transformers.cache_utils import DynamicCache

        B, L = input_ids.shape
        same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != self.model.config.audio_token_id)
        if attention_mask is not None:
            same &= attention_mask.bool().all(0)
        P = int(same.long().cumprod(0).sum())  # leading run of shared, real, non-audio positions
        if P < self.min_length or P >= L:
            return 0, None
        key = tuple(input_ids[0, :P].tolist())
        if key not in self._kv:
            with torch.no_grad():
                out = self.model.language_model.get_decoder()(input_ids=input_ids[:1, :P], use_cache=True)
            if out.past_key_values is None:  # the decoder keeps no cache (e.g. gradient checkpointing): no shortcut
                return 0, None
            self._kv[key] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in self._kv[key]]
        return P, DynamicCache(ddp_cache_data=kv, config=self.model.language_model.config)


def pack_rows(batch: dict[str, torch.Tensor], row_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows -> fewer rows, each holding consecutive utterances whole (padding-free packing).

    Rows are taken in order and a row is closed when the next utterance would make it longer than
    `row_tokens` (default: the longest utterance of the batch, so no packed row is longer than the
    padded rows were; an utterance longer than it gets a row of its own), and the `<|audio|>` slots
    keep their order (the audio goes into them clip after clip). Each
    utterance's position ids start at 0 and there is no attention mask: transformers then keeps
    attention within each utterance (`masking_utils.find_packed_sequence_indices`, which needs
    `use_cache=False`: `labelled_logits` passes it), so every utterance sees what it would see alone. The padding after the last utterance of a row is its
    own segment, with no label.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = mask.sum(-1).tolist()
    cap = max(max(lengths), row_tokens or 0)
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        if groups and sum(lengths[j] for j in groups[-1]) + n <= cap:
            groups[-1].append(i)
        else:
            groups.append([i])
    pad_id = int(ids[mask == 0][0]) if (mask == 0).any() else 0
    packed_ids = ids.new_full((len(groups), cap), pad_id)
    packed_labels = labels.new_full((len(groups), cap), -100)
    positions = torch.zeros((len(groups), cap), dtype=torch.long, device=ids.device)
    for r, group in enumerate(groups):
        at = 0
        for i in group:
            n = lengths[i]
            packed_ids[r, at : at + n], packed_labels[r, at : at + n] = ids[i, :n], labels[i, :n]
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(cap - at)
    if row_tokens:  # rows no longer than their contents
        cap = max(sum(lengths[i] for i in g) for g in groups)
        packed_ids, packed_labels, positions = packed_ids[:, :cap], packed_labels[:, :cap], positions[:, :cap]
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
    return {**rest, "input_ids": packed_ids, "labels": packed_labels, "position_ids": positions}


def labelled_logits(model: SpeechLMForConditionalGeneration, batch: dict[str, torch.Tensor],
                    prefix_cache: PrefixCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits where a label is: (n_labelled, V), their targets (n_labelled,) and rows (n_labelled,).

    The output layer runs only there: with a 49k-token vocabulary it is ~20% of a small LLM's
    compute, and most positions (prompt, audio) carry no label. With a `prefix_cache` (frozen
    LLM only), the prompt tokens every row shares before the audio are not run again: their
    keys and values, computed once, stand in for them. LLMs whose causal-LM head does more than
    a linear layer (e.g. Gemma's logit soft-capping) take the ordinary forward.
    """
    labels, attention_mask = batch["labels"], batch.get("attention_mask")
    audio_and_ids = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask", "position_ids")}
    # pack_rows: no mask, positions restart; and no cache, without which transformers keeps each utterance to itself
    packed = {"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch else {}
    if getattr(model.config.text_config, "final_logit_softcapping", None):
        keep = labels[:, 1:] != -100
        logits = model(attention_mask=attention_mask, return_dict=True, **packed, **audio_and_ids).logits[:, :-1][keep]
        return logits, labels[:, 1:][keep], keep.nonzero()[:, 0]
    extra = dict(packed)
    if prefix_cache is not None and not packed:
        P, cache = prefix_cache.split(audio_and_ids["input_ids"], attention_mask)
        if P:
            B, L = labels.shape
            audio_and_ids = {**audio_and_ids, "input_ids": audio_and_ids["input_ids"][:, P:]}
            labels = labels[:, P - 1 :]  # position P-1's hidden state (in the cache) predicts token P: unlabelled
            extra = {"past_key_values": cache, "use_cache": True,
                     "position_ids": torch.arange(P, L, device=labels.device)[None].expand(B, -1)}
    inputs_embeds = model.embed_inputs(**audio_and_ids)  # (B, L', D), the audio in its slots
    hidden = model.language_model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra).last_hidden_state
    if "past_key_values" in extra:
        hidden = torch.cat([hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2]), hidden], 1)  # stands for position P-1
    targets = labels[:, 1:]  # (B, L-1)
    keep = targets != -100
    return model.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep], keep.nonzero()[:, 0]


def listening_family(model: SpeechLMForConditionalGeneration, weights=None, prefix_cache: PrefixCache | None = None,
                     encoder_fixed: bool = False) -> Family:
    """The listening LM's losses: logits at labelled positions only (`labelled_logits`), weighted
    per token type by `weights` (train.loss_weights), through `prefix_cache` when the LLM is frozen; a fixed
    encoder stays in eval mode (without dropout, so its outputs can be cached)."""
    return Family(logits_at_labels=labelled_logits, softcapped=bool(getattr(model.config.text_config, "final_logit_softcapping", None)),
                  token_weights=weights, prefix_cache=prefix_cache, kept_in_eval=[model.audio_tower] if encoder_fixed else [])


def _prefix_cache_on(recipe: Recipe, model) -> bool:
    """train.prefix_cache holds when the LLM is frozen and runs without activation checkpointing;
    otherwise the cache is off, and a recipe that asked for it is told why."""
    if not recipe.train.prefix_cache or recipe.train.packing:  # packed rows share no prefix past their first utterance
        return False
    why = []
    if any(p.requires_grad for p in model.language_model.parameters()):
        why.append("the LLM trains (model.freeze_decoder=false or model.lora on the llm)")
    if recipe.model.gradient_checkpointing:
        why.append("model.gradient_checkpointing=true")
    if why:
        logger.warning("train.prefix_cache: true -> off, because %s", " and ".join(why))
    return not why



def _encoder_fixed(recipe: Recipe) -> bool:
    """The encoder does not train (frozen, no LoRA on it): its outputs are computed once."""
    return recipe.model.freeze_encoder and recipe.model.lora not in ("encoder", "both")


class Batcher:
    """Turns utterance indices into model inputs, through the encoder cache when there is one.

    With `teacher` (train.distill_weight), each batch also holds under "teacher" the same turns as
    text for the text-only LLM (`teacher_batch`). With `augment` (training only), clips are
    augmented as drawn for `epoch`, which the training loop sets; with a cache, each clip is
    cached as `augment.spec.copies` augmented copies (key: (clip, copy)).
    """

    def __init__(self, dataset: SpeechDataset, processor: SpeechLMProcessor, model: SpeechLMForConditionalGeneration,
                 device: torch.device, cache: bool, teacher: bool = False, augment: Augmenter | None = None,
                 packing: bool = False, pack_tokens: int | None = None):
        self.dataset, self.processor, self.model, self.device = dataset, processor, model, device
        self.packing, self.pack_tokens = packing, pack_tokens  # train.packing: rows packed by `pack_rows` (training only)
        self._told = False
        self.cache: dict[tuple[int, int], torch.Tensor] | None = {} if cache else None
        self.teacher = teacher
        self.augment = augment
        self.copies = (augment.spec.copies or 1) if cache and augment is not None and augment.on_waves else 1
        self.epoch = 0  # set by the training loop: data.augment draws anew each epoch

    @torch.no_grad()
    def fill_cache(self, batch_size: int, desc: str, store: str | None = None) -> None:
        """Run the frozen encoder once over every clip, longest first (little padding).

        With `store` (a folder `earful data encode` filled), clips this encoder already encoded
        there are read instead; the rest (other clips, speed-perturbed copies) are encoded here.
        Augmented copies (data.augment.copies) are never in a store: they are all encoded here.
        """
        todo = [(i, k) for k in range(self.copies) for i in range(len(self.dataset))]
        if store and self.copies > 1:
            logger.info("%s: data.augment renders %d augmented copies of each clip, which %s does not hold: all are encoded here",
                        desc, self.copies, store)
        elif store:
            from ..data.shards import encoder_identity, find_objects

            n = len(self.dataset.utterances)
            found = find_objects(store, encoder_identity(self.model.audio_tower, self.model.config.encoder_config),
                                 [self.dataset.utterance(i).audio for i in range(n)] if self.dataset.speeds[0] == 1.0 else [])
            for i, tensor in found.items():
                self.cache[i, 0] = tensor
            todo = [key for key in todo if key[0] not in found]
            logger.info("%s: %d of %d clips read from %s, %d to encode", desc, len(found), len(self.dataset), store, len(todo))
        lengths = self.dataset.lengths()
        order = length_grouped_batches([lengths[i] for i, _ in todo], batch_size, seed=0, shuffle=False)
        order = [[todo[j] for j in b] for b in order]
        self.model.audio_tower.eval()
        for keys in tqdm(order, desc=desc, unit="batch", leave=False):
            feats = self.processor.featurize([self._wave(i, k) for i, k in keys])  # copy k's augmentation
            hidden, mask = self.model.encode_audio(feats["input_features"].to(self.device), feats["input_features_mask"].to(self.device))
            for j, key in enumerate(keys):
                self.cache[key] = hidden[j, : int(mask[j].sum())].to("cpu", torch.float32).clone()

    def _wave(self, i: int, draw: int) -> np.ndarray:
        """Clip i's audio, augmented as drawn in `draw` (the epoch, or the copy) when wave augmentation is on."""
        audio = self.dataset[i]["audio"]
        speech = self.augment is not None and i % len(self.dataset.utterances) < self.augment.n_clips  # no-speech clips come last
        return self.augment(audio, i, draw) if speech and self.augment.on_waves else audio

    def _features(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """The clips' encoder input, SpecAugment-masked for this epoch when the recipe asks for it."""
        feats = self.processor.featurize([self._wave(i, self.epoch) for i in idx])
        if self.augment is not None and self.augment.spec.masks:
            rows = zip(feats["input_features"], feats["input_features_mask"].sum(-1).tolist(), idx)
            feats["input_features"] = torch.stack([self.augment.mask(f, i, self.epoch, time_axis=-1, n_valid=n) for f, n, i in rows])
        return feats

    def _cached(self, i: int) -> torch.Tensor:
        """Clip i's cached encoder frames (T', C) this epoch: its copy for the epoch, SpecAugment-masked when asked."""
        if self.augment is None:
            return self.cache[i, 0]
        h = self.cache[i, self.augment.copy_of(i, self.epoch) if self.copies > 1 else 0]
        if self.augment.spec.masks:
            mels = getattr(self.processor.feature_extractor, "feature_size", 80) or 80
            width = max(1, round(self.augment.spec.masks.freq_width / mels * h.shape[1]))  # the same share of channels
            h = self.augment.mask(h, i, self.epoch, time_axis=0, n_valid=h.shape[0], freq_width=width)
        return h

    def lengths(self) -> list[float]:
        return self.dataset.lengths()

    def teacher_batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """The same turns as text for the text-only LLM: each `<|audio|>` replaced by its transcript."""
        from ..models.configuration import AUDIO_TOKEN

        rows, labels = [], []
        for i in idx:
            u = self.dataset.utterance(i)
            if not u.text:
                raise ManifestError(f"{u.audio}: distillation needs each clip's transcript (the manifest's text)")
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
            batch = self.processor(prompts=prompts, responses=responses, audio_features=self._features(idx))
        else:
            hs = [self._cached(i) for i in idx]
            T = max(h.shape[0] for h in hs)
            hidden = torch.zeros(len(hs), T, hs[0].shape[1])  # (B, T', C)
            mask = torch.zeros(len(hs), T, dtype=torch.bool)  # (B, T')
            for j, h in enumerate(hs):
                hidden[j, : h.shape[0]] = h
                mask[j, : h.shape[0]] = True
            n_audio = stacked_lengths(mask.sum(-1), self.model.config.stack_factor).tolist()
            batch = self.processor.text_batch(prompts, n_audio, responses)
            batch.update(audio_hidden_states=hidden, audio_hidden_mask=mask)
        if self.packing:
            padded = tuple(batch["input_ids"].shape)
            batch = pack_rows(batch, self.pack_tokens)
            if not self._told:
                logger.info("train.packing: the first batch's %d rows of %d tokens packed into %d rows of %d", *padded,
                            *batch["input_ids"].shape)
                self._told = True
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.teacher:
            batch["teacher"] = self.teacher_batch(idx)
        return batch


def distill_loss(model, batch: dict, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - w) * next-token loss + w * KL(teacher || student) on the answer's tokens (Ultravox).

    The teacher is the LLM reading the transcript as text (`batch["teacher"]`), the student the
    same LLM hearing the audio; both predict the same answer tokens, position for position.
    """
    from peft import PeftModel

    labels, teacher = batch["labels"], batch["teacher"]
    out = model(**{k: v for k, v in batch.items() if k not in ("labels", "teacher")})
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


def listening_parts(recipe: Recipe, device: torch.device, out_dir: Path | None = None) -> Parts:
    """Encoder -> projector -> LLM; a frozen encoder's outputs are computed once and cached.

    With `data.no_speech_clips`, that many clips holding no speech (silence, noise, hum, clicks,
    tones, music; earful.data.nonspeech, seeded by train.seed) are written to OUT/no_speech and
    join the training set, answered with `data.no_speech_answer`. They are not augmented (their
    variety is generated), and babble noise mixes speech clips only.
    """
    t, d = recipe.train, recipe.data
    model, processor = build_model(recipe)
    model.to(device).train()
    family = listening_family(model, token_weights(t.loss_weights, {processor.tokenizer.eos_token_id}),
                              PrefixCache(model) if _prefix_cache_on(recipe, model) else None, _encoder_fixed(recipe))
    family.train_mode(model)
    check_trainable(model)

    fits = partial(check_audio_length, processor.feature_extractor, model.config.encoder_config)  # what the encoder can take
    sr = processor.sampling_rate
    train_utts, rejects = usable_utterances(read_manifest(d.train), sr, d.max_seconds, d.train, fits)
    n_speech = len(train_utts)
    if d.no_speech_clips:
        from ..data.nonspeech import make_nonspeech

        folder = Path(out_dir or tempfile.mkdtemp(prefix="earful-no-speech-")) / "no_speech"
        train_utts = train_utts + make_nonspeech(folder, d.no_speech_clips, seed=t.seed, sampling_rate=sr, answer=d.no_speech_answer)
        logger.info("data.no_speech_clips: %d clips without speech in %s, answered %r", d.no_speech_clips, folder, d.no_speech_answer)
    train_set = SpeechDataset(train_utts, sr, d.prompt, d.max_seconds, d.speed_perturb)
    eval_set = None
    if d.eval:
        eval_utts, eval_rejects = usable_utterances(read_manifest(d.eval), sr, d.max_seconds, d.eval, fits)
        eval_set, rejects = SpeechDataset(eval_utts, sr, d.prompt, d.max_seconds), rejects + eval_rejects
    cache = _encoder_fixed(recipe)
    augment = _augmenter(recipe, train_set, model, fits, n_speech)
    train_batches = Batcher(train_set, processor, model, device, cache, teacher=bool(t.distill_weight), augment=augment,
                            packing=t.packing, pack_tokens=t.pack_tokens)
    eval_batches = Batcher(eval_set, processor, model, device, cache) if eval_set else None
    if cache:
        start = time.perf_counter()
        train_batches.fill_cache(t.batch_size, "encoding train audio (frozen encoder, once)", d.encoded)
        if eval_batches:
            eval_batches.fill_cache(t.batch_size, "encoding eval audio (frozen encoder, once)", d.encoded)
        logger.info("cached frozen encoder outputs in %.1f s", time.perf_counter() - start)
    if t.objective == "dpo":
        train_batches = PreferenceBatcher(train_batches, family, model, t.batch_size, "reference log-probs of train pairs (once)")
        eval_batches = PreferenceBatcher(eval_batches, family, model, t.batch_size, "reference log-probs of eval pairs (once)") if eval_batches else None
    return Parts(model, family, train_batches, eval_batches, train_set.lengths(), len(train_set.utterances),
                 save=lambda m, out: save_final(m, processor, out), rebuild=lambda: build_model(recipe)[0],
                 text_model=lambda m: (m.language_model, processor.tokenizer),
                 samples=(lambda n, generate: _samples(family, model, processor, eval_set, n, generate)) if eval_set else None,
                 rejects=rejects)


def _augmenter(recipe: Recipe, dataset: SpeechDataset, model, fits, n_speech: int) -> Augmenter | None:
    """data.augment for the training set (None when it asks for nothing); `fits(n, name)` is the
    encoder's length check, so a speed change never makes a clip the encoder cannot take. Clips
    from `n_speech` on hold no speech (data.no_speech_clips): never augmented, never babble."""
    spec, problems = parse_augment(recipe.data.augment)
    if problems:  # build_recipe reports them; a Recipe made in code may not have gone through it
        raise RecipeError("; ".join(problems))
    if not spec.active:
        return None
    kind = model.config.encoder_config.model_type
    if spec.masks and not _encoder_fixed(recipe) and kind != "whisper":
        raise RecipeError(f"data.augment.specaugment: masks log-mel features, and a {kind} encoder reads raw samples; "
                          "drop specaugment, or freeze the encoder whole (SpecAugment then masks its cached frames)")
    if spec.copies and not _encoder_fixed(recipe):
        logger.warning("data.augment.copies: %d -> unused, because the encoder runs every step (model.lora=%s, "
                       "model.freeze_encoder=%s): each epoch draws every clip's augmentation afresh",
                       spec.copies, recipe.model.lora, recipe.model.freeze_encoder)

    def length_ok(n: int) -> bool:
        try:
            fits(n, "<augmented clip>")
        except AudioError:
            return False
        return True

    aug = Augmenter(spec, dataset.sampling_rate, recipe.train.seed, clips=dataset.clip, n_clips=n_speech,
                    length_ok=length_ok)
    logger.info("data.augment (training clips only): %s%s", ", ".join([*spec.waves, *(["specaugment"] if spec.masks else [])]),
                f"; {aug.spec.copies} copies per clip, encoded once" if _encoder_fixed(recipe) and spec.waves else "")
    return aug


@torch.no_grad()
def _samples(family: Family, model, processor: SpeechLMProcessor, dataset: SpeechDataset, n: int, generate) -> list[dict]:
    """The first `n` eval clips with their reference and the model's answer (`generate`: the
    caller's answer generator, `(model, processor, waves, prompts, max_new_tokens) -> answers`)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    was_training = model.training
    model.eval()
    try:
        answers = generate(model, processor, [it["audio"] for it in items], [it["prompt"] for it in items], max_new_tokens=32)
    finally:
        if was_training:
            family.train_mode(model)  # a frozen encoder stays in eval mode, as when its outputs were cached
    return [{"audio": it["audio"], "sampling_rate": dataset.sampling_rate, "reference": it["response"], "answer": a}
            for it, a in zip(items, answers)]


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
