"""The one name -> builder registry pattern of clipline (towers, losses, export formats,
evaluators), after timm's ``register_model``/``list_models``.

A registry maps a name to whatever builds that thing; components register themselves
where they are defined, with a decorator, and callers dispatch through :meth:`Registry.get`
instead of an if-chain. An unknown name raises ``ValueError`` listing the valid names and
the close matches, so every kind of name fails the same helpful way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from clipline.data.hints import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to builders for one kind of component.

    Args:
        kind: What the names name, for error messages (``"loss"``, ``"export format"``).
        key: The config key that takes these names, for error messages
            (``"loss.kind"``); empty: not named.
    """

    def __init__(self, kind: str, key: str = "") -> None:
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: registers the decorated builder under ``name``; returns it unchanged."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        """Registers ``entry`` under ``name``; a name is registered once."""
        assert name not in self._entries, f"{self.kind} {name!r} registered twice"
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """The builder registered as ``name``.

        Raises:
            ValueError: ``name`` is not registered; the message lists the valid names.
        """
        try:
            return self._entries[name]
        except KeyError:
            where = f"{self.key}={name!r}" if self.key else repr(name)
            raise ValueError(
                f"unknown {self.kind} {where}; valid: {', '.join(self.names())}."
                + did_you_mean(name, self._entries)
            ) from None

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
