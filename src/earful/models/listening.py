"""The listening speech LM: audio encoder -> frame stacker -> projector -> any causal LM.

Shape symbols used in comments:
    B  batch size                    L  text tokens in the prompt + response
    F  mel bins (Whisper)            T  feature frames (or samples for waveform encoders)
    T' encoder frames                C  encoder width
    k  stack factor                  S  stacked audio positions, ceil(T' / k)
    H  projector hidden width        D  the LLM's embedding width
    N  audio positions in the whole batch (sum of every clip's S)

Audio enters the LLM where the prompt holds `<|audio|>` placeholder tokens: the processor writes one
placeholder per audio position, and `forward` scatters the projected frames into those slots after
checking that the counts match (the LLaVA / Voxtral pattern), so batching, masks and `generate()`
(greedy, sampling, beam search) are the LLM's own.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import SpeechLMConfig
from .encoders import build_audio_encoder, encoder_hidden_size, stacked_lengths

logger = logging.getLogger(__name__)


class AudioFrameStacker(nn.Module):
    """Concatenates k consecutive encoder frames: (B, T', C) -> (B, S, C*k), S = ceil(T'/k).

    The LLM then spends one position per k frames (Whisper's 50 Hz becomes 12.5 Hz for k=4).
    """

    def __init__(self, stack_factor: int):
        super().__init__()
        self.k = stack_factor

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = hidden.shape
        pad = (-T) % self.k
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero padding, as a lone clip would see
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))  # (B, S*k, C)
        stacked = hidden.reshape(B, (T + pad) // self.k, C * self.k)  # (B, S, C*k)
        lengths = stacked_lengths(mask.sum(-1), self.k)  # (B,)
        stacked_mask = torch.arange(stacked.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return stacked, stacked_mask


class AudioProjector(nn.Module):
    """Maps stacked encoder frames into the LLM's embedding space: (B, S, C*k) -> (B, S, D).

    RMSNorm -> Linear(C*k, H) -> GELU -> Linear(H, D): the norm keeps the input scale of any
    encoder comparable, and the last layer learns the scale of the LLM's embeddings.
    """

    def __init__(self, in_size: int, hidden_size: int, out_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.RMSNorm(in_size)
        self.linear_1 = nn.Linear(in_size, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(self.dropout(x)))))  # (B, S, C*k) -> (B, S, D)


class SpeechLMPreTrainedModel(PreTrainedModel):
    config_class = SpeechLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["WhisperEncoderLayer", "LlamaDecoderLayer"]

    def _init_weights(self, module):
        # Only the projector starts untrained; the encoder and LLM are overwritten by real weights
        # (or are tiny random test models, where transformers' own init has run already).
        if isinstance(module, AudioProjector):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            nn.init.ones_(module.norm.weight)
        elif not isinstance(module, SpeechLMPreTrainedModel):
            super()._init_weights(module)


def utterance_norm(hidden: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each clip's frames (B, T', C) to zero mean and unit variance per channel over its real frames
    (mask (B, T')); padding stays 0, so a clip comes out the same alone or in a batch."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    n = m.sum(1, keepdim=True).clamp(min=1)
    centred = (hidden - (hidden * m).sum(1, keepdim=True) / n) * m
    return centred / ((centred**2).sum(1, keepdim=True) / n + eps).sqrt()


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


class SpeechLMForConditionalGeneration(SpeechLMPreTrainedModel, GenerationMixin):
    """A listening LM: `audio_tower` -> `audio_stacker` -> `multi_modal_projector` -> `language_model`."""

    def __init__(self, config: SpeechLMConfig):
        super().__init__(config)
        self.audio_tower = build_audio_encoder(config.encoder_config)
        self.audio_stacker = AudioFrameStacker(config.stack_factor)
        self.multi_modal_projector = AudioProjector(
            encoder_hidden_size(config.encoder_config) * config.stack_factor,
            config.projector_hidden_size,
            config.text_config.hidden_size,
            config.projector_dropout,
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # The LLM's embeddings are the model's: generate(), resize_token_embeddings and peft use these.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def encode_audio(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder alone: (B, F, T) or (B, T) -> hidden (B, T', C), mask (B, T').

        Kept apart from `project_audio` so a trainer can cache this frozen, expensive stage.
        """
        out, hidden_mask = self.audio_tower(input_features, input_features_mask)
        return out.last_hidden_state, hidden_mask

    def project_audio(self, hidden: torch.Tensor, hidden_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack and project encoder frames: (B, T', C) -> embeds (B, S, D), mask (B, S)."""
        if self.config.audio_norm == "utterance":
            hidden = utterance_norm(hidden, hidden_mask)
        stacked, mask = self.audio_stacker(hidden, hidden_mask)  # (B, S, C*k)
        return self.multi_modal_projector(stacked), mask  # (B, S, D)

    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Audio embeddings of every real audio position in the batch, in order: (N, D)."""
        embeds, mask = self.project_audio(*self.encode_audio(input_features, input_features_mask))
        return embeds[mask]

    def _merge_audio(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, audio_embeds: torch.Tensor) -> torch.Tensor:
        slots = input_ids == self.config.audio_token_id  # (B, L)
        n_slots, n_audio = int(slots.sum()), audio_embeds.shape[0]
        if n_slots != n_audio:
            raise ValueError(
                f"the prompts hold {n_slots} {self.config.audio_token} placeholders but the audio gives "
                f"{n_audio} positions: build inputs with SpeechLMProcessor, which writes one placeholder per position"
            )
        return inputs_embeds.masked_scatter(slots.unsqueeze(-1), audio_embeds.to(inputs_embeds.dtype))

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_hidden_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, L, D) with the projected audio in the `<|audio|>` slots."""
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
        if input_features is not None and audio_hidden_states is None:
            audio_hidden_states, audio_hidden_mask = self.encode_audio(input_features, input_features_mask)
        if audio_hidden_states is not None:
            embeds, mask = self.project_audio(audio_hidden_states, audio_hidden_mask)  # (B, S, D)
            inputs_embeds = self._merge_audio(input_ids, inputs_embeds, embeds[mask])
        return inputs_embeds

    def labelled_logits(self, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                        prefix_cache: PrefixCache | None = None, **audio_and_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits where a label is: (n_labelled, V), their targets (n_labelled,) and rows (n_labelled,).

        The output layer runs only there: with a 49k-token vocabulary it is ~20% of a small LLM's
        compute, and most positions (prompt, audio) carry no label. With a `prefix_cache` (frozen
        LLM only), the prompt tokens every row shares before the audio are not run again: their
        keys and values, computed once, stand in for them. LLMs whose causal-LM head does more than
        a linear layer (e.g. Gemma's logit soft-capping) take the ordinary forward.
        """
        if getattr(self.config.text_config, "final_logit_softcapping", None):
            keep = labels[:, 1:] != -100
            logits = self(attention_mask=attention_mask, **audio_and_ids).logits[:, :-1][keep]
            return logits, labels[:, 1:][keep], keep.nonzero()[:, 0]
        extra = {}
        if prefix_cache is not None:
            P, cache = prefix_cache.split(audio_and_ids["input_ids"], attention_mask)
            if P:
                B, L = labels.shape
                audio_and_ids = {**audio_and_ids, "input_ids": audio_and_ids["input_ids"][:, P:]}
                labels = labels[:, P - 1 :]  # position P-1's hidden state (in the cache) predicts token P: unlabelled
                extra = {"past_key_values": cache, "use_cache": True,
                         "position_ids": torch.arange(P, L, device=labels.device)[None].expand(B, -1)}
        inputs_embeds = self.embed_inputs(**audio_and_ids)
        hidden = self.language_model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra).last_hidden_state
        if extra:
            hidden = torch.cat([hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2]), hidden], 1)  # stands for position P-1
        targets = labels[:, 1:]  # (B, L-1)
        keep = targets != -100
        return self.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep], keep.nonzero()[:, 0]

    def training_loss(self, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                      prefix_cache: PrefixCache | None = None, token_weights=None, **audio_and_ids) -> torch.Tensor:
        """Mean next-token loss over the labelled positions (`labelled_logits`): the value of
        `forward(...).loss`, cheaper. Soft-capping LLMs take `forward(...).loss` itself."""
        if getattr(self.config.text_config, "final_logit_softcapping", None):
            return self(labels=labels, attention_mask=attention_mask, **audio_and_ids).loss
        from ..train.losses import weighted_cross_entropy

        logits, targets, _ = self.labelled_logits(labels, attention_mask, prefix_cache, **audio_and_ids)
        return weighted_cross_entropy(logits, targets, token_weights)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_hidden_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward with audio scattered into the `<|audio|>` slots of `input_ids`.

        Audio comes either as features (`input_features`, `input_features_mask`) or as encoder
        outputs already computed (`audio_hidden_states` (B, T', C), `audio_hidden_mask` (B, T')),
        which is how the trainer skips a frozen encoder. `labels` (B, L) are the next-token
        targets, -100 where no loss is taken; the loss is the mean over the other tokens.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, input_features, input_features_mask, audio_hidden_states, audio_hidden_mask)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()  # (B, L-1, V)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def freeze(self, encoder: bool = False, projector: bool = False, decoder: bool = False) -> None:
        """Turn off gradients of the named parts (`freeze_encoder`, `freeze_projector`, `freeze_decoder`)."""
        for part, frozen in ((self.audio_tower, encoder), (self.multi_modal_projector, projector), (self.language_model, decoder)):
            if frozen:
                part.requires_grad_(False)
