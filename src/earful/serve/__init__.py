"""Serving: `earful.load(DIR)` (engine), the OpenAI-compatible API (app) and the Gradio UI (ui)."""

from .engine import DecodingOptions, Generation, RequestError, ServerBusy, SpeakingLM, SpeechLM, SpokenAnswer, load

__all__ = ["DecodingOptions", "Generation", "RequestError", "ServerBusy", "SpeakingLM", "SpeechLM", "SpokenAnswer", "load"]
