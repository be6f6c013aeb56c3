"""Audio encoders behind one interface: features in, hidden frames and their mask out.

Every encoder here is called as `encoder(input_features, input_features_mask)` and returns
`(output, hidden_mask)`, `output` a transformers `BaseModelOutput`:

    input_features       (B, F, T) log-mel frames (Whisper) or (B, T) raw samples (Wav2Vec2/HuBERT)
    input_features_mask  (B, T)    1 where a feature frame / sample is real, 0 where it is padding
    output.last_hidden_state (B, T', C) encoder frames, C = `encoder_hidden_size(config)`
    hidden_mask          (B, T')    bool, True on frames computed from real input

`output_hidden_states=True` / `output_attentions=True` fill `output.hidden_states` / `.attentions`
as in transformers. `encoder_output_lengths` gives T' from T without running the encoder, so a
processor can put the right number of `<|audio|>` placeholders in a prompt before the model sees it.

Supported: Whisper (`WhisperShortEncoder`), and the CTC-style encoders over raw 16 kHz samples with
a convolutional front end (`WAVEFORM_ENCODERS`: wav2vec2, HuBERT, WavLM, data2vec-audio), each
tested on a tiny config. w2v-BERT (`wav2vec2-bert`) is not one of them: it reads (T, 160)
filter-bank frames, time first, and has no `conv_kernel` to count frames by.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils.output_capturing import capture_outputs

# Encoders with a CTC-style convolutional front end over raw samples, loaded with AutoModel.
WAVEFORM_ENCODERS = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")


class WhisperShortEncoder(WhisperEncoder):
    """Whisper's encoder without the 30 s padding that transformers' version insists on.

    Whisper was trained on 30 s windows, and transformers refuses anything else. On one-second
    clips that padding costs ~30x in compute. As in Ultravox, we slice the positional embeddings to
    the input's length instead; padding inside a batch is masked out of attention (and zeroed
    between the two convolutions) so a clip encodes the same alone or in a batch.
    The state dict keys are those of `WhisperEncoder`, so real Whisper weights load unchanged.
    """

    def forward(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        B, F, T = input_features.shape
        max_frames = self.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if T > max_frames:
            raise ValueError(
                f"Whisper's encoder takes at most {max_frames} mel frames ({max_frames // 100} s), "
                f"found {T}: segment long audio first (earful data segment)"
            )
        if input_features_mask is None:
            input_features_mask = torch.ones(B, T, dtype=torch.long, device=input_features.device)
        hidden_mask = _strided_mask(input_features_mask, (T + 1) // 2)  # (B, T'): conv2 has stride 2, padding 1
        kwargs.pop("return_dict", None)  # always an output object: the tuple is (output, hidden_mask)
        return self._encode(input_features, input_features_mask, hidden_mask, **kwargs), hidden_mask

    @capture_outputs
    def _encode(self, input_features, input_features_mask, hidden_mask, **kwargs) -> BaseModelOutput:
        frame_mask = input_features_mask.to(input_features.dtype).unsqueeze(1)  # (B, 1, T)
        x = nn.functional.gelu(self.conv1(input_features * frame_mask))  # (B, C, T)
        # Zero padded frames before the strided conv, as a clip alone would see conv padding zeros.
        x = nn.functional.gelu(self.conv2(x * frame_mask))  # (B, C, T')
        x = x.permute(0, 2, 1)  # (B, T', C)
        x = x + self.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=self.dropout, training=self.training)

        # Padded frames are never attended to. transformers builds the mask each attention
        # implementation takes (additive for eager, boolean or none for SDPA, the 2D padding mask
        # flash attention unpads with), and never branches on the mask's values while tracing, so
        # torch.export and torch.compile see one graph.
        attention_mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=hidden_mask)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layer_norm(x))


def _strided_mask(input_mask: torch.Tensor, out_len: int) -> torch.Tensor:
    """Mask of a stride-2 convolution's output: output frame j is real if input frame 2j is."""
    lengths = (input_mask.sum(-1) + 1) // 2  # (B,)
    return torch.arange(out_len, device=input_mask.device)[None, :] < lengths[:, None]


class WaveformEncoder(nn.Module):
    """Wav2Vec2 / HuBERT / WavLM / data2vec-audio: a transformers encoder over raw 16 kHz samples."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.model = AutoModel.from_config(config)
        self._prepare()

    def _prepare(self) -> None:
        # A pretrained encoder carries a masked-spectrogram embedding for pre-training; we never mask.
        self.model.config.mask_time_prob = 0.0
        self.model.config.mask_feature_prob = 0.0
        # Device-map placement reads these from the top-level model's children (transformers' post_init).
        self._no_split_modules = self.model._no_split_modules

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None, **kwargs):
        # Base wav2vec2 (group norm front end) was trained without attention masks; pass one
        # only where the config says the model expects it, as transformers' docs advise. Without
        # one, the group norm sees a batch's padding: a clip encodes slightly differently alone.
        use_mask = input_features_mask is not None and getattr(self.model.config, "feat_extract_norm", "layer") == "layer"
        kwargs["return_dict"] = True
        # kwargs reach the model (e.g. output_hidden_states=True for a unit tokenizer's layer features).
        out = self.model(input_features, attention_mask=input_features_mask if use_mask else None, **kwargs)
        T_out = out.last_hidden_state.shape[1]
        if input_features_mask is None:
            hidden_mask = torch.ones(out.last_hidden_state.shape[:2], dtype=torch.bool, device=input_features.device)
        else:
            lengths = self.model._get_feat_extract_output_lengths(input_features_mask.sum(-1))
            hidden_mask = torch.arange(T_out, device=input_features.device)[None, :] < lengths[:, None]
        return out, hidden_mask


def _unsupported(config: PretrainedConfig) -> ValueError:
    from .configuration import ModelInputError

    return ModelInputError(
        f"unsupported audio encoder type {config.model_type!r}: expected whisper or one of "
        f"{', '.join(WAVEFORM_ENCODERS)} (encoders over raw samples with a convolutional front end)"
    )


def audio_encoder_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers model class that computes this encoder's frames (what its capabilities,
    attention implementations and compilability, are read from), without building it."""
    if config.model_type == "whisper":
        return WhisperShortEncoder
    if config.model_type in WAVEFORM_ENCODERS:
        return MODEL_MAPPING[type(config)]
    raise _unsupported(config)


def build_audio_encoder(config: PretrainedConfig) -> nn.Module:
    """An untrained encoder of the right architecture; weights come from `load_encoder_weights`."""
    if config.model_type == "whisper":
        return WhisperShortEncoder(config)
    if config.model_type in WAVEFORM_ENCODERS:
        return WaveformEncoder(config)
    raise _unsupported(config)


def encoder_hidden_size(config: PretrainedConfig) -> int:
    return config.d_model if config.model_type == "whisper" else config.hidden_size


def encoder_output_lengths(config: PretrainedConfig, feature_lengths: torch.Tensor) -> torch.Tensor:
    """Encoder frames T' produced from T feature frames (Whisper) or samples (waveform encoders)."""
    if config.model_type == "whisper":
        return (feature_lengths + 1) // 2  # conv2 has stride 2, padding 1
    lengths = feature_lengths
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths


def load_encoder_weights(encoder: nn.Module, folder: str, dtype: torch.dtype = torch.float32) -> None:
    """Put a pretrained checkpoint's encoder weights, in `dtype`, into `encoder` (strictly: every
    tensor filled). The tensors are assigned, not copied, so `encoder` may live on the meta device."""
    if isinstance(encoder, WhisperShortEncoder):
        from transformers import WhisperModel

        source = WhisperModel.from_pretrained(folder, dtype=dtype).get_encoder()
        encoder.load_state_dict(source.state_dict(), strict=True, assign=True)
    else:
        encoder.model = AutoModel.from_pretrained(folder, dtype=dtype)
        encoder._prepare()


def stacked_lengths(encoder_lengths: torch.Tensor, stack_factor: int) -> torch.Tensor:
    return (encoder_lengths + stack_factor - 1) // stack_factor

