"""The command line built from the verbs themselves: a verb's signature and docstring are its options and help.

A verb is a plain typed function registered with `@verb("stage verb")`. `build_parser()` walks the
registry in order and derives each option from a parameter:

- a parameter before `*` without a default is a positional argument (`list[str]`: one or more);
- a parameter after `*` is an option `--name-with-dashes`, required when it has no default;
- `bool` with default False is a flag (`--name`), with default True a negative flag (`--no-name`);
- `list[str]` as an option takes one or more values and may be repeated (`--set a=1 --set b=2`);
- `Literal["a", "b"]` gives the choices; `int` and `float` parse as such;
- `Annotated[T, Arg(type=..., metavar=...)]` adds a parser that checks the value (`Count`,
  `Positive`, `NonNegative`: every bad number is a one-line error, exit status 2) or a metavar.

The docstring's first line is the verb's one-line help, the rest up to `Args:` its description,
and each `name: text` under `Args:` (continued on more-indented lines) that option's help.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from ..errors import EarfulError

logger = logging.getLogger("earful")


class UsageError(EarfulError):
    """A problem with what the user gave, reported in one line."""


# -- value checks -------------------------------------------------------------------------------
def _int(low: int):
    """An argparse type: a whole number >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, found {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, found {value}")
        return value

    return parse


def _float(low: float | None = None, high: float | None = None, *, above: bool = False):
    """An argparse type: a finite number >= `low` (> `low` with `above`) and <= `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, found {value:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, found {value:g}")
        return value

    return parse


@dataclass(frozen=True)
class Arg:
    """What a parameter's type and default cannot say about its option: a checking parser, a metavar."""

    type: Callable[[str], Any] | None = None
    metavar: str | None = None


Count = Annotated[int, Arg(_int(1))]  # batch sizes, limits, beams, tokens: at least one
Positive = Annotated[float, Arg(_float(0, above=True))]  # seconds, temperatures
NonNegative = Annotated[float, Arg(_float(0))]


# -- the registry -------------------------------------------------------------------------------
GROUPS = {  # the help of each stage that holds verbs rather than being one
    "data": "build manifests from audio",
    "data prepare": "build a manifest from a known corpus",
    "eval": "evaluate a model",
    "units": "speech units (k-means audio tokenizers)",
}
_LEVELS = ("stage", "verb", "corpus")  # the namespace attribute naming the choice at each depth
VERBS: dict[str, Callable] = {}  # "data prepare fsdd" -> its function, in the order they are declared


def verb(words: str):
    """Register a function as the verb `earful WORDS`; its options are checked against its docstring here."""

    def register(fn: Callable) -> Callable:
        assert words not in VERBS, f"two verbs named {words!r}"
        _arguments(fn)  # a docstring entry naming no parameter, or a type the builder cannot read, fails at import
        VERBS[words] = fn
        return fn

    return register


@dataclass
class _Param:
    name: str
    flags: list[str]  # [] for a positional
    kwargs: dict[str, Any]


def _docstring(fn: Callable) -> tuple[str, str, dict[str, str]]:
    """(one-line help, description, {parameter: help}) from `fn`'s docstring."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    text, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        if not line.strip():
            continue
        if line.startswith("    ") and not line.startswith("     ") and ":" in line:
            name, _, first = line.strip().partition(":")
            assert name.isidentifier() and name not in helps, f"{fn.__name__}: bad Args entry {line!r}"
            helps[name] = first.strip()
        else:
            assert name is not None and line.startswith("     "), f"{fn.__name__}: Args line outside an entry: {line!r}"
            helps[name] += " " + line.strip()
    return text.split("\n", 1)[0], text.rstrip(), helps


def _unwrap(hint) -> tuple[Any, Arg]:
    """(the plain type, its Arg) of a hint, with `X | None` reduced to X."""
    arg = Arg()
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [h for h in typing.get_args(hint) if h is not type(None)]
        assert len(rest) == 1, f"cannot read a union option: {hint}"
        hint = rest[0]
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        arg = next(e for e in extras if isinstance(e, Arg))
    return hint, arg


def _arguments(fn: Callable) -> list[_Param]:
    """Each parameter of `fn` as the arguments of one `add_argument` call."""
    hints = typing.get_type_hints(fn, include_extras=True)
    _, _, helps = _docstring(fn)
    signature = inspect.signature(fn)
    unknown = set(helps) - set(signature.parameters)
    assert not unknown, f"{fn.__name__}: its docstring's Args name no parameter: {sorted(unknown)}"
    params = []
    for p in signature.parameters.values():
        hint, arg = _unwrap(hints[p.name])
        kw: dict[str, Any] = {"help": helps.get(p.name)}
        if arg.metavar:
            kw["metavar"] = arg.metavar
        option = "--" + p.name.replace("_", "-")
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert p.default is p.empty, f"{fn.__name__}({p.name}): an option with a default goes after `*`"
            if typing.get_origin(hint) is list:
                kw["nargs"] = "+"
            params.append(_Param(p.name, [], kw))
            continue
        assert p.kind is p.KEYWORD_ONLY, f"{fn.__name__}({p.name}): only positional and keyword-only parameters"
        if p.default is p.empty:
            kw["required"] = True
        else:
            kw["default"] = p.default
        if hint is bool:
            assert p.default in (False, True), f"{fn.__name__}({p.name}): a flag defaults to False or True"
            kw.pop("default")
            kw.update(action="store_false" if p.default else "store_true", dest=p.name)
            if p.default:
                option = "--no-" + p.name.replace("_", "-")
        elif typing.get_origin(hint) is list:
            kw.update(nargs="+", action="extend")
        elif typing.get_origin(hint) is Literal:
            kw["choices"] = typing.get_args(hint)
        elif arg.type is not None:
            kw["type"] = arg.type
        elif hint in (int, float):
            kw["type"] = hint
        else:
            assert hint is str, f"{fn.__name__}({p.name}): cannot read a {hint} from the command line"
        params.append(_Param(p.name, [option], kw))
    return params


# -- the parser ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error: status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="earful", description="Turn a pretrained text LLM into a speech LM: data, training, evaluation, use.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    choices = {(): p.add_subparsers(dest=_LEVELS[0], required=True, metavar=_LEVELS[0].upper())}
    for words, fn in VERBS.items():
        path = tuple(words.split())
        for depth in range(1, len(path)):  # the groups above the verb, each made when its first verb comes
            if path[:depth] not in choices:
                group = choices[path[: depth - 1]].add_parser(path[depth - 1], help=GROUPS[" ".join(path[:depth])])
                choices[path[:depth]] = group.add_subparsers(dest=_LEVELS[depth], required=True, metavar=_LEVELS[depth].upper())
        one_line, description, _ = _docstring(fn)
        s = choices[path[:-1]].add_parser(path[-1], help=one_line, description=description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
        params = _arguments(fn)
        for param in params:
            s.add_argument(*param.flags or [param.name], **param.kwargs)
        s.set_defaults(fn=lambda a, fn=fn, names=[q.name for q in params]: fn(**{n: getattr(a, n) for n in names}))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' own notices drown the run's progress
    hf_logging.disable_progress_bar()

    try:
        return args.fn(args) or 0
    except (EarfulError, OSError) as e:  # what the user gave, or a path the system refuses (exists, is a folder, ...)
        logger.debug("the error in full", exc_info=True)  # -v shows where
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from ..train.trainer import TextAbilityRegression

        if isinstance(e, TextAbilityRegression):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise
