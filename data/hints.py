"""The one "did you mean" helper that every unknown-name error of clipline uses."""

from __future__ import annotations

import difflib
import re
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
