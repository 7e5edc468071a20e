"""The one "did you mean" helper that every unknown-name error of clipline uses, and the
check of a config's fixed choices built on it."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable

_NAMESPACE = re.compile(r"[:.]")


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` that ``word`` is probably a misspelling of, best first.

    A word typed without its namespace or section (``tiny`` for ``clipline:tiny``,
    ``steps`` for ``loop.steps``) is also matched against the part of each choice after its
    last ``:`` or ``.``.
    """
    choices = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if close:
        return close
    tails: dict[str, list[str]] = {}
    for choice in choices:
        tails.setdefault(_NAMESPACE.split(choice)[-1], []).append(choice)
    tail = _NAMESPACE.split(word)[-1]
    found = difflib.get_close_matches(tail, list(tails), n=n, cutoff=0.6)
    return [choice for t in found for choice in tails[t]][:n]


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """``" Did you mean 'x' or 'y'?"`` for the close matches of ``word``, or ``""``."""
    close = close_matches(word, choices, n)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def check_choices(cfg: object, section: str) -> None:
    """Rejects a ``Literal``-typed field of dataclass ``cfg`` that holds none of its choices.

    Recipes are checked against the annotations while they are read; this is the same check
    for a config built directly in Python, where a misspelled choice would otherwise fall
    through to some default branch.

    Raises:
        ValueError: ``"<section>.<field>: 'x' is not one of [...]"`` with close matches.
    """
    for name, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is not typing.Literal:
            continue
        value, choices = getattr(cfg, name), typing.get_args(tp)
        if value not in choices:
            key = f"{section}.{name}"
            hint = did_you_mean(str(value), [str(c) for c in choices])
            raise ValueError(f"{key}: {value!r} is not one of {list(choices)}.{hint}")
