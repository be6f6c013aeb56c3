"""Model families. Importing this registers the listening LM and its processor with transformers'
Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`, `AutoProcessor`)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration import AUDIO_TOKEN, SpeechLMConfig
from .listening import SpeechLMForConditionalGeneration
from .processing import SpeechLMProcessor

AutoConfig.register(SpeechLMConfig.model_type, SpeechLMConfig)
AutoModel.register(SpeechLMConfig, SpeechLMForConditionalGeneration)
AutoModelForCausalLM.register(SpeechLMConfig, SpeechLMForConditionalGeneration)
AutoProcessor.register(SpeechLMConfig, SpeechLMProcessor)

__all__ = ["AUDIO_TOKEN", "SpeechLMConfig", "SpeechLMForConditionalGeneration", "SpeechLMProcessor"]
