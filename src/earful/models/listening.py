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
(greedy, sampling, beam search, static cache) are the LLM's own. The model follows transformers'
contract for a multimodal causal LM: `inputs_embeds` instead of `input_ids`, `return_dict=False`
tuples, `get_audio_features` returning `BaseModelOutputWithPooling`, the Trainer's loss arguments
(`num_items_in_batch`, `shift_labels`), and capabilities (attention implementations, device-map
split points, full-graph compilation) read from its parts rather than assumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import can_return_tuple
from transformers.utils.import_utils import torch_compilable_check

from .configuration import ModelInputError, SpeechLMConfig
from .encoders import audio_encoder_class, build_audio_encoder, encoder_hidden_size, stacked_lengths

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


# Audio inputs of `forward`: used at prefill only when generating with a cache (the keys and values
# of the audio positions are in the cache from then on), as transformers does for `input_features`.
AUDIO_INPUTS = ("input_features", "input_features_mask", "audio_hidden_states", "audio_hidden_mask")


@dataclass
class SpeechLMAudioOutput(BaseModelOutputWithPooling):
    """`get_audio_features`'s output: transformers' `BaseModelOutputWithPooling`, plus the frame mask.

    last_hidden_state  (B, T', C) the encoder's frames
    pooler_output      (N, D)     the audio embeddings `forward` puts in the `<|audio|>` slots: every
                                  clip's real (unpadded) positions, clip after clip
    hidden_states, attentions     the encoder's, with `output_hidden_states` / `output_attentions`
    hidden_mask        (B, T')    True on encoder frames computed from real input
    """

    hidden_mask: torch.Tensor | None = None


class SpeechLMPreTrainedModel(PreTrainedModel):
    config_class = SpeechLMConfig
    # The LLM is the base model the audio modules are added onto: a bare causal-LM checkpoint's keys
    # ("model.layers...", "lm_head...") load under it, and `model.base_model` is the LLM.
    base_model_prefix = "language_model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    # `_no_split_modules` is gathered from the encoder's and the LLM's own by `post_init`.

    # What the model supports is what both its parts support, read from their classes (these are
    # needed at __init__, before the parts exist). The Whisper encoder builds its padding mask with
    # transformers' mask interface, so it holds under flash attention's 2D mask as under SDPA's.
    def _part_classes(self) -> tuple[type[PreTrainedModel], type[PreTrainedModel]]:
        return audio_encoder_class(self.config.encoder_config), MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config.text_config)]

    @property
    def _supports_sdpa(self) -> bool:
        return all(c._supports_sdpa for c in self._part_classes())

    @property
    def _supports_flash_attn(self) -> bool:
        return all(c._supports_flash_attn for c in self._part_classes())

    @property
    def _supports_flex_attn(self) -> bool:
        return all(c._supports_flex_attn for c in self._part_classes())

    @property
    def _can_compile_fullgraph(self) -> bool:
        # Prefill runs the encoder and the LLM (the audio merge has static shapes); decode steps the LLM.
        return all(c._can_compile_fullgraph for c in self._part_classes())

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
        self.loss_type = "ForCausalLM"  # transformers' causal-LM loss (it cannot tell from the class name)
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

    @can_return_tuple
    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None, **kwargs
    ) -> SpeechLMAudioOutput:
        """The encoder's frames and the audio embeddings of every real audio position, in order.

        transformers' v5 convention (as Voxtral's and LLaVA's `get_*_features`): a
        `BaseModelOutputWithPooling` whose `pooler_output` (N, D) is what `forward` scatters;
        `output_hidden_states` / `output_attentions` reach the encoder; `return_dict=False` gives a tuple.
        """
        out, hidden_mask = self.audio_tower(input_features, input_features_mask, **kwargs)
        embeds, mask = self.project_audio(out.last_hidden_state, hidden_mask)  # (B, S, D), (B, S)
        return SpeechLMAudioOutput(
            last_hidden_state=out.last_hidden_state,
            pooler_output=embeds[mask],  # (N, D)
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            hidden_mask=hidden_mask,
        )

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Where the audio goes, (B, L) bool: the `<|audio|>` tokens of `input_ids`, or without them
        the positions whose embedding is the placeholder's own (as LLaVA finds its image slots)."""
        if input_ids is not None:
            return input_ids == self.config.audio_token_id
        token = torch.tensor(self.config.audio_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token).to(inputs_embeds.dtype)).all(-1)

    def _merge_audio(self, slots: torch.Tensor, inputs_embeds: torch.Tensor, audio_embeds: torch.Tensor,
                     audio_mask: torch.Tensor, from_ids: bool = True) -> torch.Tensor:
        """Scatter the real audio positions (audio_embeds (B, S, D) where audio_mask (B, S)) into the
        slots (B, L) of inputs_embeds (B, L, D), clip after clip.

        Shapes stay static (no boolean indexing) so the merge compiles into one graph: the real
        positions are moved to the front, in order, and masked_scatter takes as many as there are slots.
        """
        n_slots, n_audio = slots.sum(), audio_mask.sum()

        def mismatch() -> str:
            hint = ("; without input_ids the slots are the positions whose embedding is the placeholder's: "
                    "pass input_ids alongside inputs_embeds, or leave those embeddings as they are") if not from_ids else ""
            return (f"the prompts hold {int(n_slots)} {self.config.audio_token} placeholders but the audio gives "
                    f"{int(n_audio)} positions: build inputs with SpeechLMProcessor, which writes one placeholder per position{hint}")

        torch_compilable_check(n_slots == n_audio, mismatch, error_type=ModelInputError)
        B, S, D = audio_embeds.shape
        real_first = torch.argsort((~audio_mask).reshape(-1).to(torch.uint8), stable=True)  # (B*S,)
        source = audio_embeds.reshape(B * S, D)[real_first].to(inputs_embeds.dtype)  # (B*S, D)
        return inputs_embeds.masked_scatter(slots.unsqueeze(-1), source)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_hidden_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, L, D) with the projected audio in the `<|audio|>` slots.

        `inputs_embeds`, when given, are the token embeddings (the caller's); the slots are then
        found from `input_ids` if given, else from the placeholder's embedding (`get_placeholder_mask`).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ModelInputError("forward needs input_ids or inputs_embeds (B, L, D); neither was given")
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
        if input_features is not None and audio_hidden_states is None:
            audio_hidden_states, audio_hidden_mask = self.encode_audio(input_features, input_features_mask)
        if audio_hidden_states is not None:
            if audio_hidden_mask is None:
                audio_hidden_mask = torch.ones(audio_hidden_states.shape[:2], dtype=torch.bool, device=audio_hidden_states.device)
            embeds, mask = self.project_audio(audio_hidden_states, audio_hidden_mask)  # (B, S, D)
            slots = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, L)
            inputs_embeds = self._merge_audio(slots, inputs_embeds, embeds, mask, from_ids=input_ids is not None)
        return inputs_embeds

    @can_return_tuple
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
        """Causal LM forward with audio scattered into the `<|audio|>` slots.

        Audio comes either as features (`input_features`, `input_features_mask`) or as encoder
        outputs already computed (`audio_hidden_states` (B, T', C), `audio_hidden_mask` (B, T')),
        which is how the trainer skips a frozen encoder. Text comes as `input_ids` (B, L) or as
        `inputs_embeds` (B, L, D) (with or without `input_ids`, which then only locate the slots).
        `labels` (B, L) are the next-token targets, -100 where no loss is taken; as in transformers'
        `ForCausalLMLoss`, `shift_labels` (B, L) may stand for labels already shifted, and with
        `num_items_in_batch` the loss is the sum over labelled tokens divided by it (what the
        Trainer passes so accumulated micro-batches weigh every token alike), else their mean.
        """
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in kwargs}
        inputs_embeds = self.embed_inputs(input_ids, input_features, input_features_mask, audio_hidden_states,
                                          audio_hidden_mask, inputs_embeds=inputs_embeds)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        loss = None
        if labels is not None or "shift_labels" in loss_kwargs:
            loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1], **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration: bool = False, **kwargs):
        """transformers' preparation, with every audio input (features or encoder outputs) used at
        prefill only: later steps find the audio positions' keys and values in the cache."""
        audio = {k: kwargs.pop(k) for k in AUDIO_INPUTS if k in kwargs}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(audio)
        return model_inputs
