"""`earful <stage> <verb>`: every stage of a speech LM's life from the command line.

Each verb is a plain typed function, registered with `@verb("stage verb")` in this package's
module for its stage (data, train, eval, units, vocoder, use); its signature and docstring are its options
and help (`_parser` says how one becomes the other). Errors in what the user gave (a bad option,
audio file, recipe, manifest or model spec: any `EarfulError`) and paths the system refuses (an
`OSError`) print one line (`-v` adds the traceback) and exit with status 2; anything else is a
bug and keeps its traceback.
"""

from ._parser import VERBS, UsageError, build_parser, main, verb

# Importing a stage's module registers its verbs; this order is the order `earful --help` lists them in.
from . import data, train, eval, units, vocoder, use  # noqa: F401  isort: skip

__all__ = ["VERBS", "UsageError", "build_parser", "main", "verb"]
