"""earful: turn any pretrained text LLM into a speech language model.

Stages, in pipeline order: `earful.audio` (load and validate), `earful.pretrained` (model specs),
`earful.models` (the listening LM), `earful.data` (manifests), `earful.train`, `earful.eval`,
`earful.cli`.
"""

__version__ = "0.1.0"
