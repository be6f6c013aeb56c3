"""Model families. Importing this registers the listening LM with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import AUDIO_TOKEN, SpeechLMConfig
from .listening import SpeechLMForConditionalGeneration

AutoConfig.register(SpeechLMConfig.model_type, SpeechLMConfig)
AutoModel.register(SpeechLMConfig, SpeechLMForConditionalGeneration)
AutoModelForCausalLM.register(SpeechLMConfig, SpeechLMForConditionalGeneration)

__all__ = ["AUDIO_TOKEN", "SpeechLMConfig", "SpeechLMForConditionalGeneration"]
