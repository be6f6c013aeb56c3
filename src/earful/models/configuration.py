"""`SpeechLMConfig`: the configuration of a listening speech LM.

A listening LM is an audio encoder, a frame stacker, a projector and a causal text LM. The config
holds both sub-configs whole, so a checkpoint folder rebuilds the exact architecture with no hub
access, plus the few numbers that join them. It follows transformers' dataclass configs (as
`LlavaConfig` does), so `save_pretrained` / `from_pretrained` / `AutoConfig` just work.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..errors import EarfulError

AUDIO_TOKEN = "<|audio|>"  # the one placeholder string: where a clip goes in a prompt
AUDIO_NORMS = (None, "utterance")


def place_audio(prompt: str, token: str = AUDIO_TOKEN) -> str:
    """A user turn about one clip: as written when it places the clip with `token`, else the clip
    first and the text after it on its own line (how earful lays out a prompt that names no place)."""
    return prompt if token in prompt else f"{token}\n{prompt}"


class ModelInputError(EarfulError, ValueError):
    """A listening LM was given inputs or parts it cannot use (the message says which and the fix)."""


@strict
class SpeechLMConfig(PretrainedConfig):
    """Configuration of `SpeechLMForConditionalGeneration`.

    Fields:
        encoder_config: config of the audio encoder: Whisper, or Wav2Vec2 / HuBERT / WavLM /
            data2vec-audio (`encoders.WAVEFORM_ENCODERS`).
        text_config: config of the causal LM that the audio is projected into.
        stack_factor: k consecutive encoder frames become one LLM position
            (Whisper's 50 Hz / 4 = 12.5 audio positions a second).
        projector_hidden_size: width of the projector's hidden layer.
        projector_dropout: dropout on the projector's input while training (regularises the only
            trained part when the encoder and LLM are frozen).
        audio_norm: "utterance" normalises each clip's encoder frames to zero mean and unit
            variance per channel over its own frames, before stacking (cepstral mean and variance
            normalisation, at the encoder's output: what a speaker or a microphone adds to every
            frame is taken out); None leaves them as they are.
        audio_token: the placeholder string that marks where audio goes in a prompt.
        audio_token_id: its id in the LLM's tokenizer (set when the token is added).
        encoder_spec, text_spec: the model specs the parts came from (provenance only).
    """

    model_type = "earful_speechlm"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    encoder_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    stack_factor: int = 4
    projector_hidden_size: int = 1024
    projector_dropout: float = 0.0
    audio_norm: str | None = None
    audio_token: str = AUDIO_TOKEN
    audio_token_id: int | None = None
    encoder_spec: str | None = None
    text_spec: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1, found {self.stack_factor}")
        if self.audio_norm not in AUDIO_NORMS:
            raise ValueError(f"audio_norm must be one of {AUDIO_NORMS}, found {self.audio_norm!r}")
