"""earful: turn any pretrained text LLM into a speech language model.

Stages, in pipeline order: `earful.audio` (load and validate), `earful.pretrained` (model specs),
`earful.models` (the listening LM), `earful.data` (manifests), `earful.train`, `earful.eval`,
`earful.serve`, `earful.cli`. `earful.load(DIR)` gives a trained model ready to transcribe and chat.
"""

__version__ = "0.1.0"


def load(model, **kwargs):
    """A trained model folder as a `earful.serve.SpeechLM` (`.transcribe()`, `.chat()`, `.stream_chat()`)."""
    from .serve.engine import load as _load

    return _load(model, **kwargs)
