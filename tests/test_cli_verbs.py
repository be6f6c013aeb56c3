"""Each verb is stated once: its function's signature and docstring are its command line, and cannot drift apart.

In-process and fast: the parser is built, never run against a model.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from typing import Annotated, Literal

import pytest

from earful.cli import VERBS, build_parser
from earful.cli._parser import Arg, Count, _arguments, _docstring


def _verb_parser(words: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _own_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_stage_and_verb_is_reachable_in_order():
    assert list(VERBS)[:5] == ["data prepare fsdd", "data prepare fsdd-strings", "data prepare tts-digits",
                               "data prepare tts-storycloze", "data prepare nonspeech"]
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(top.choices) == ["data", "train", "eval", "units", "generate", "vocoder", "resynth", "transcribe", "chat", "serve"]
    assert len(VERBS) == 24


@pytest.mark.parametrize("words", list(VERBS))
def test_a_verbs_options_are_its_functions_parameters(words):
    """Option dests are the parameters, positionals in signature order, and each has its docstring help."""
    fn, parser = VERBS[words], _verb_parser(words)
    params = inspect.signature(fn).parameters
    actions = _own_actions(parser)
    assert [a.dest for a in actions] == list(params)
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [a.dest for a in actions if not a.option_strings] == positional
    _, _, helps = _docstring(fn)
    for a in actions:
        assert a.help == helps.get(a.dest)
        p = params[a.dest]
        if a.option_strings:
            assert a.required == (p.default is p.empty)
            if p.default is not p.empty:
                assert a.default == p.default
    # What the parser hands the function is exactly its parameters: `fn(**namespace)` binds.
    inspect.signature(fn).bind(**{a.dest: a.default for a in actions})


@pytest.mark.parametrize("words", list(VERBS))
def test_help_of_every_verb_exits_0_and_names_each_option(words, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each help is one line of the output
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*words.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    _, description, _ = _docstring(VERBS[words])
    assert description.splitlines()[0] in out and "Args:" not in out
    for a in _own_actions(_verb_parser(words)):
        assert (a.option_strings[0] if a.option_strings else a.metavar or a.dest) in out
        if a.help:
            assert a.help in out


def _toy(paths: Annotated[list[str], Arg(metavar="PATH")], name: str, *, out: str, n: Count = 3, rate: float = 0.5,
         mode: Literal["a", "b"] = "a", keys: list[str] | None = None, fast: bool = False, cache: bool = True,
         label: str | None = None) -> None:
    """One line.

    Args:
        out: where it goes
        n: how many, continued
            on a second line
    """


def test_the_rules_that_turn_a_signature_into_options():
    p = argparse.ArgumentParser(exit_on_error=False)
    for param in _arguments(_toy):
        p.add_argument(*param.flags or [param.name], **param.kwargs)
    ns = p.parse_args(["x", "y", "z", "--out", "o", "--keys", "a=1", "b=2", "--keys", "c=3", "--fast", "--no-cache", "--mode", "b"])
    assert vars(ns) == {"paths": ["x", "y"], "name": "z", "out": "o", "n": 3, "rate": 0.5, "mode": "b",
                        "keys": ["a=1", "b=2", "c=3"], "fast": True, "cache": False, "label": None}
    by = {a.dest: a for a in p._actions}
    assert by["paths"].metavar == "PATH" and by["out"].required and not by["label"].required
    assert by["out"].help == "where it goes" and by["n"].help == "how many, continued on a second line"
    assert by["mode"].choices == ("a", "b") and by["cache"].option_strings == ["--no-cache"]
    for bad in (["x", "z", "--out", "o", "--n", "0"], ["x", "z", "--out", "o", "--mode", "c"], ["x", "z", "--out", "o", "--rate", "r"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            p.parse_args(bad)


def test_a_docstring_naming_no_parameter_fails_at_registration():
    def stale(*, out: str) -> None:
        """Old help.

        Args:
            out: where
            gone: an option that was removed from the signature
        """

    with pytest.raises(AssertionError, match="gone"):
        _arguments(stale)


def test_python_dash_m_earful_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "earful", "units", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "fit" in r.stdout, r.stderr
