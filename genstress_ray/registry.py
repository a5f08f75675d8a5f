"""One kind of registry for every plugin: strategies, model kinds and architectures, data sources,
labellers. A name is registered once (a second registration raises), and an unknown name raises an
error that lists what is registered, as torchvision's model registry does.

Example:
    >>> colours = Registry("colour")
    >>> colours.register("red", 1)
    1
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    KeyError: "unknown colour 'blue'; allowed: red"
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plugins of one kind, in registration order. ``error`` is raised for an unknown name."""

    def __init__(self, what: str, error: type[Exception] = KeyError):
        self.what, self.error = what, error
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered (registered: {', '.join(self._items)})")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.what} {name!r}; allowed: {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


def resolve(ref: Any) -> Any:
    """A plugin's part named as ``"package.module:attribute"`` (imported on first use, so a Ray-free
    layer can name a Ray stage), or the object itself. Only ever called on names registered in code,
    never on a name read from a run folder or a config file."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
